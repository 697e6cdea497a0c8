"""The analytic FLOPs model against torch's FlopCounterMode on a real prefill."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from par_demo.engine import Engine, PruningPlan
from par_demo.flops import FlopsModel


def counted_prefill_flops(model, inputs, plan):
    # The math SDPA backend is decomposed into matmuls that the counter sees; fused CPU kernels are not counted.
    engine = Engine(model)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        query = engine.prepare(inputs)
        engine.prefill(query, plan)
    return counter.get_total_flops(), query


@pytest.mark.parametrize("plan, kept, rows", [
    (PruningPlan(), None, 0),
    (PruningPlan(start_layer=2, keep_visual=torch.arange(0, 144, 3), skip_layers=frozenset({3, 7})), 48, 0),
    (PruningPlan(start_layer=3, keep_visual_count=30), 30, 1),
    (PruningPlan(start_layer=0, keep_visual=torch.arange(5), skip_layers=frozenset({0})), 5, 0),
])
def test_analytic_prefill_flops_match_flop_counter_within_5_percent(tiny, predictor, scene, plan, kept, rows):
    inputs = predictor.encode(scene, "How many objects are there?")
    counted, query = counted_prefill_flops(tiny.model, inputs, plan)
    analytic = FlopsModel.from_config(tiny.config).prefill(query, kept, plan.skip_layers, plan.start_layer,
                                                           attention_rows=rows)
    assert abs(analytic - counted) / counted < 0.05


def test_llava_7b_full_prefill_is_in_the_published_range():
    # LLaVA-1.5-7B on ~600 tokens: about 2 x 6.7e9 parameters x 640 tokens, i.e. ~8-9 TFLOPs.
    from par_demo.families.llava import PRESETS, Llava, build_config
    from par_demo.flops import Shape

    config = build_config(PRESETS["llava-1.5-7b"], image_token_id=32000)
    vision = Llava.vision_flops(config)
    total = FlopsModel.from_config(config).full(Shape(n_text=64, n_visual=576, vision_flops=vision))
    assert 7.5e12 < total < 9.5e12
    assert vision / total < 0.06  # the vision tower is a small share; the LM dominates
