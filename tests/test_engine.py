"""The engine against independent references built from the stock Hugging Face modules."""

import pytest
import torch

from par_demo.engine import Engine, PruningPlan
from par_demo.errors import UserError


@pytest.fixture(scope="module")
def inputs(predictor, scene):
    return predictor.encode(scene, "What color is the circle?")


def reference_logits(model, query, plan, extra_tokens=()):
    """Last-position logits computed with the stock decoder layers (HF's own attention), not the engine's.

    Tokens dropped at layer K leave the sequence; kept ones keep their original positions; skipped layers are
    simply not called. `extra_tokens` are appended (as generated text) at positions L, L+1, ...
    """
    lm = model.model.language_model
    embeds = query.inputs_embeds
    if extra_tokens:
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([list(extra_tokens)]))], dim=1)
    n = embeds.shape[1]
    positions = torch.arange(n).unsqueeze(0)
    keep = torch.ones(n, dtype=torch.bool)
    if plan.keep_visual is not None:
        keep[query.image_positions] = False
        keep[query.image_positions[plan.keep_visual]] = True
    h = embeds
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == plan.start_layer:
                h, positions = h[:, keep], positions[:, keep]
            if i in plan.skip_layers:
                continue
            h = layer(h, position_embeddings=lm.rotary_emb(h, positions))
        return model.lm_head(lm.norm(h[:, -1])).reshape(-1)


def test_empty_plan_matches_stock_generate_token_for_token(tiny, inputs):
    engine = Engine(tiny.model)
    ours = engine.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=12).tokens
    stock = tiny.model.generate(**inputs, attention_mask=torch.ones_like(inputs["input_ids"]), max_new_tokens=12,
                                do_sample=False, eos_token_id=None, min_new_tokens=12)
    assert ours == stock[0, inputs["input_ids"].shape[1]:].tolist()


def test_empty_plan_logits_match_stock_forward_at_every_step(tiny, inputs):
    engine = Engine(tiny.model)
    query = engine.prepare(inputs["input_ids"], inputs["pixel_values"])
    pre = engine.prefill(query, PruningPlan(), reserve=4)
    ours, token, position = [pre.logits], int(pre.logits.argmax()), pre.next_position
    tokens = [token]
    for _ in range(4):
        ours.append(engine.decode_step(token, position, pre.cache, PruningPlan()))
        token, position = int(ours[-1].argmax()), position + 1
        tokens.append(token)
    ids = torch.cat([inputs["input_ids"], torch.tensor([tokens[:-1]])], dim=1)
    with torch.no_grad():
        stock = tiny.model(input_ids=ids, pixel_values=inputs["pixel_values"]).logits[0, -5:]
    torch.testing.assert_close(torch.stack(ours), stock, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("start_layer", [0, 2, 5])
def test_gathered_tokens_and_skipped_layers_match_reference(tiny, inputs, start_layer):
    engine = Engine(tiny.model)
    query = engine.prepare(inputs["input_ids"], inputs["pixel_values"])
    keep = torch.tensor([0, 3, 17, 40, 41, 99, 143])
    plan = PruningPlan(start_layer=start_layer, keep_visual=keep, skip_layers=frozenset({3, 6}))
    pre = engine.prefill(query, plan, reserve=3)
    torch.testing.assert_close(pre.logits, reference_logits(tiny.model, query, plan), atol=1e-4, rtol=1e-4)
    # Decoding continues from the unpruned length: each step equals the reference over prompt + generated.
    generated, token, position = [], int(pre.logits.argmax()), pre.next_position
    assert position == query.length
    for _ in range(3):
        logits = engine.decode_step(token, position, pre.cache, plan)
        generated.append(token)
        torch.testing.assert_close(logits, reference_logits(tiny.model, query, plan, generated), atol=1e-4, rtol=1e-4)
        token, position = int(logits.argmax()), position + 1


def test_cache_lengths_follow_the_plan(tiny, inputs):
    engine = Engine(tiny.model)
    plan = PruningPlan(start_layer=2, keep_visual=torch.arange(0, 144, 4), skip_layers=frozenset({4, 5}))
    generation = engine.generate(inputs["input_ids"], inputs["pixel_values"], lambda q: plan, max_new_tokens=6)
    query = engine.prepare(inputs["input_ids"], inputs["pixel_values"])
    pre = engine.prefill(query, plan, reserve=5)
    for _ in range(5):
        engine.decode_step(1, query.length, pre.cache, plan)
    n_kept = query.n_text + 36
    expected = [query.length + 5] * 2 + [n_kept + 5] * 2 + [0, 0] + [n_kept + 5] * 2
    assert pre.cache.lengths == expected
    assert generation.kept_visual.tolist() == list(range(0, 144, 4))
    # A pruned cache is smaller than the full one, by the dropped tokens and the skipped layers.
    full = engine.generate(inputs["input_ids"], inputs["pixel_values"], max_new_tokens=6)
    assert generation.kv_cache_bytes < 0.5 * full.kv_cache_bytes


def test_fastv_keeps_the_tokens_the_last_position_attends_to(tiny, inputs):
    engine = Engine(tiny.model)
    query = engine.prepare(inputs["input_ids"], inputs["pixel_values"])
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
    query = engine.prepare(moved, inputs["pixel_values"])
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
])
def test_bad_plans_are_refused_with_a_clear_message(tiny, inputs, plan, message):
    engine = Engine(tiny.model)
    query = engine.prepare(inputs["input_ids"], inputs["pixel_values"])
    with pytest.raises(UserError, match=message):
        engine.prefill(query, plan)


def test_mismatched_image_tokens_and_batches_are_refused(tiny, inputs):
    engine = Engine(tiny.model)
    with pytest.raises(UserError, match="image tokens"):
        engine.prepare(inputs["input_ids"][:, :-150], inputs["pixel_values"])
    with pytest.raises(UserError, match="batch size 1"):
        engine.prepare(inputs["input_ids"].repeat(2, 1), inputs["pixel_values"].repeat(2, 1, 1, 1))
