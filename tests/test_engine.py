"""The engine's own rules (cache, FastV rows, finding image tokens, refusing bad plans); parity with stock
transformers for every family is in test_families.py."""

import pytest
import torch

from par_demo.engine import Engine, PruningPlan
from par_demo.errors import UserError


@pytest.fixture(scope="module")
def inputs(predictor, scene):
    return predictor.encode(scene, "What color is the circle?")


def test_cache_lengths_follow_the_plan(tiny, inputs):
    engine = Engine(tiny.model)
    plan = PruningPlan(start_layer=2, keep_visual=torch.arange(0, 144, 4), skip_layers=frozenset({4, 5}))
    generation = engine.generate(inputs, lambda q: plan, max_new_tokens=6)
    query = engine.prepare(inputs)
    pre = engine.prefill(query, plan, reserve=5)
    for _ in range(5):
        engine.decode_step(1, query.length, pre.cache, plan)
    n_kept = query.n_text + 36
    expected = [query.length + 5] * 2 + [n_kept + 5] * 2 + [0, 0] + [n_kept + 5] * 2
    assert pre.cache.lengths == expected
    assert generation.kept_visual.tolist() == list(range(0, 144, 4))
    # A pruned cache is smaller than the full one, by the dropped tokens and the skipped layers.
    full = engine.generate(inputs, max_new_tokens=6)
    assert generation.kv_cache_bytes < 0.5 * full.kv_cache_bytes


def test_fastv_keeps_the_tokens_the_last_position_attends_to(tiny, inputs):
    engine = Engine(tiny.model)
    query = engine.prepare(inputs)
    pre = engine.prefill(query, PruningPlan(start_layer=2, keep_visual_count=20))
    assert pre.attention_to_image.shape == (144,)
    expected = torch.topk(pre.attention_to_image, 20).indices.sort().values
    assert pre.kept_visual.tolist() == expected.tolist()
    # The scores are real softmax rows restricted to the image: positive, summing to at most 1.
    assert (pre.attention_to_image > 0).all() and pre.attention_to_image.sum() <= 1 + 1e-5


def test_image_tokens_are_found_anywhere_in_the_prompt(tiny, inputs):
    engine = Engine(tiny.model)
    ids = inputs["input_ids"]
    moved = torch.cat([ids[:, :1], ids[:, -4:], ids[:, 1:-4]], dim=1)  # text after the image moves before it
    query = engine.prepare({**inputs, "input_ids": moved})
    assert query.image_positions.tolist() == (moved[0] == tiny.image_token_id).nonzero().squeeze(1).tolist()
    pre = engine.prefill(query, PruningPlan(keep_visual=torch.arange(10)))
    assert pre.kept_visual.tolist() == list(range(10))


@pytest.mark.parametrize("plan, message", [
    (PruningPlan(start_layer=99), "start layer"),
    (PruningPlan(skip_layers=frozenset({8})), "skip_layers"),
    (PruningPlan(keep_visual=torch.tensor([0, 0])), "distinct"),
    (PruningPlan(keep_visual=torch.tensor([144])), "distinct"),
    (PruningPlan(start_layer=0, keep_visual_count=3), "start layer >= 1"),
    (PruningPlan(keep_visual_count=500), "visual tokens kept"),
    (PruningPlan(start_layer=2, keep_visual=torch.arange(3), visual_features=torch.zeros(3, 128)), "start layer 0"),
    (PruningPlan(start_layer=0, keep_visual=torch.arange(3), visual_features=torch.zeros(2, 128)), "one row"),
    (PruningPlan(start_layer=0, visual_features=torch.zeros(144, 128)), "one row"),
])
def test_bad_plans_are_refused_with_a_clear_message(tiny, inputs, plan, message):
    engine = Engine(tiny.model)
    query = engine.prepare(inputs)
    with pytest.raises(UserError, match=message):
        engine.prefill(query, plan)


def test_mismatched_image_tokens_and_batches_are_refused(tiny, inputs):
    engine = Engine(tiny.model)
    with pytest.raises(UserError, match="image tokens"):
        engine.prepare({**inputs, "input_ids": inputs["input_ids"][:, :-150]})
    with pytest.raises(UserError, match="batch size 1"):
        engine.prepare({"input_ids": inputs["input_ids"].repeat(2, 1), "pixel_values": inputs["pixel_values"].repeat(2, 1, 1, 1)})


@pytest.mark.parametrize("preset", ["llava-tiny", "qwen2.5-vl-tiny", "smolvlm-tiny", "internvl3-tiny"])
def test_the_fused_rms_norm_gives_every_familys_decoder_norm_bit_for_bit(random_models, preset):
    """`engine.rms_norm` swaps a decoder norm for one fused kernel only where the bits stay the same (fp32); in bf16
    the module itself runs. A transformers release whose norm computes otherwise fails here."""
    import copy

    from par_demo.engine import FUSABLE_NORMS, rms_norm

    loaded = random_models(preset)
    engine = Engine(loaded.model, loaded.family)
    norms = [engine.lm.norm] + [n for layer in engine.layers for n in (layer.input_layernorm,
                                                                        layer.post_attention_layernorm)]
    assert {type(n).__name__ for n in norms} <= FUSABLE_NORMS  # every family's decoder norm is fused
    torch.manual_seed(0)
    h = torch.randn(1, 37, engine.lm.norm.weight.shape[0]) * 3
    with torch.no_grad():
        for shared in norms:
            norm = copy.deepcopy(shared)  # the session's model stays as it is
            norm.weight.uniform_(0.5, 1.5)
            assert torch.equal(rms_norm(norm, h), norm(h))
        half = copy.deepcopy(norms[0]).to(torch.bfloat16)
        assert torch.equal(rms_norm(half, h.bfloat16()), half(h.bfloat16()))


def test_a_generation_reports_its_planners_share_of_the_prefill(tiny, inputs):
    """`Generation.plan_s`: the planner's time, inside `prefill_s` (the cost model's overheads are read from it)."""
    import time

    engine = Engine(tiny.model, tiny.family)

    def slow_planner(query):
        time.sleep(0.02)
        return PruningPlan()

    slow = engine.generate(inputs, slow_planner, max_new_tokens=1)
    assert 0.02 <= slow.plan_s < slow.prefill_s
    assert engine.generate(inputs, None, max_new_tokens=1).plan_s < 0.02


def test_attention_rows_of_several_last_queries_never_look_at_keys_after_them():
    torch.manual_seed(0)
    q, k = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 10, 8)  # the last 3 of 10 queries; grouped key heads
    rows = Engine._attention_rows(q, k, 0.35)
    keys = k.repeat_interleave(2, dim=1)
    expected = torch.zeros(10)
    for i in range(3):  # query 7 + i sees keys 0 .. 7 + i, as in the layer
        seen = 8 + i
        logits = (q[0, :, i, None] @ keys[0, :, :seen].transpose(-1, -2))[:, 0] * 0.35  # (heads, seen)
        expected[:seen] += torch.softmax(logits, -1).mean(0) / 3
    assert torch.allclose(rows, expected, atol=1e-6) and rows[9] > 0 and abs(float(rows.sum()) - 1) < 1e-5
