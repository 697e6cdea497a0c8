"""The analytic FLOPs model against torch's FlopCounterMode on a real prefill."""

import numpy as np
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


@pytest.mark.parametrize("size", [(448, 224), (252, 364)])
@pytest.mark.parametrize("plan, rows", [
    (PruningPlan(), 0),
    (PruningPlan(start_layer=2, keep_visual=torch.arange(0, 100, 3), skip_layers=frozenset({3})), 0),
    (PruningPlan(start_layer=1, keep_visual_count=20, skip_layers=frozenset({4})), 1),
    (PruningPlan(start_layer=0, keep_visual=torch.arange(7)), 0),
])
def test_qwen2_5_vl_flops_match_flop_counter_within_5_percent(size, plan, rows):
    """Vision tower (window and full attention blocks), merger, decoder and a router, on images of two shapes."""
    analytic, counted = analytic_and_counted_with_router("qwen2.5-vl-tiny", size, plan, rows)
    assert abs(analytic - counted) / counted < 0.05, (analytic, counted)


@pytest.mark.parametrize("preset, size", [("smolvlm-tiny", (200, 100)), ("smolvlm-tiny", (50, 40)),
                                          ("internvl3-tiny", (160, 160)), ("internvl3-tiny", (300, 80))])
@pytest.mark.parametrize("plan, rows", [
    (PruningPlan(), 0),
    (PruningPlan(start_layer=2, keep_visual=torch.arange(0, 80, 3), skip_layers=frozenset({3})), 0),
    (PruningPlan(start_layer=1, keep_visual_count=20, skip_layers=frozenset({4})), 1),
])
def test_tiled_families_flops_match_flop_counter_within_5_percent(preset, size, plan, rows):
    """Vision tower on every tile and the global view / thumbnail, connector, decoder and a router."""
    analytic, counted = analytic_and_counted_with_router(preset, size, plan, rows)
    assert abs(analytic - counted) / counted < 0.05, (analytic, counted)


def analytic_and_counted_with_router(preset: str, size, plan, rows):
    """(analytic, FlopCounterMode) FLOPs of vision path + a router's forward + the prefill under `plan`, for a tiny
    random model with 6 layers of 64 on a scene of `size`."""
    from par_demo.models import encode_query, load_model
    from par_demo.router import MetaRouter, RouterConfig
    from par_demo.shapes import render_scene

    loaded = load_model(f"random:{preset}", device="cpu")
    image, _ = render_scene(np.random.default_rng(2))
    inputs = encode_query(loaded, image.resize(size), "How many objects are there?")
    engine = Engine(loaded.model)
    router = MetaRouter(RouterConfig(lm_width=64, n_layers=6, width=16, heads=1)).eval()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        query = engine.prepare(inputs)
        text = query.inputs_embeds[0, : query.n_text]  # any n_text rows: the router's cost depends on counts only
        router(query.image_features, text, torch.tensor([0.5]), query.layout)
        engine.prefill(query, plan)
    kept = None if plan.keep_visual is None and plan.keep_visual_count is None else (
        plan.keep_visual.numel() if plan.keep_visual is not None else plan.keep_visual_count)
    analytic = FlopsModel.from_config(loaded.config).prefill(
        query, kept, plan.skip_layers, plan.start_layer, router=router.flops(query.layout, query.n_text),
        attention_rows=rows)
    return analytic, counter.get_total_flops()


@pytest.mark.parametrize("preset, views, low, high", [
    ("smolvlm-256m", 17, 0.90, 0.93),  # 16 tiles + the global view: 17 x 1,024 patches through SigLIP-B
    ("smolvlm-256m", 1, 0.90, 0.93),  # one view: the same share (tower and decoder both scale with the views)
    ("smolvlm-500m", 17, 0.78, 0.83),
    ("internvl3-2b", 13, 0.44, 0.49),  # 12 tiles + the thumbnail
    ("internvl3-8b", 13, 0.15, 0.18),
])
def test_tiled_presets_vision_share_of_the_prefill(preset, views, low, high):
    """The vision path's share of a full prefill (40 text tokens) on the exact architectures, by the analytic count
    (no weights are built). Methods that prune inside the decoder cannot go below it (docs/models.md)."""
    from par_demo.families import preset_families
    from par_demo.flops import Shape

    family = preset_families()[preset]
    config, _ = family.build_random(preset)
    vision = family.vision_flops(config, views)
    n_visual = views * (64 if preset.startswith("smolvlm") else 256)
    total = FlopsModel.from_config(config).full(Shape(n_text=40, n_visual=n_visual, vision_flops=vision))
    assert low < vision / total < high, vision / total
