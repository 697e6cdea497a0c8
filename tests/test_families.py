"""Every model family, on tiny random models with the exact architecture: the engine against stock transformers.

For each family the empty plan must reproduce stock `model.generate` (tokens) and the stock forward (logits at
every step); a plan that gathers visual tokens at K = 0 or K = 2 and skips layers must equal a reference built
from the stock decoder layers with the tokens' original positions (prefill and three decode steps). Qwen2.5-VL
runs on images of three aspect ratios, which give three different token counts and grids; SmolVLM and InternVL3
on images their processors cut into several tiles (plus the global view / thumbnail), and on one that is not cut.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from par_demo.engine import Engine, PruningPlan
from par_demo.families.base import language_model
from par_demo.shapes import render_scene

EXAMPLE = Path(__file__).resolve().parent.parent / "assets" / "examples" / "shapes_color.png"

# (preset, image size (width, height)); Qwen2.5-VL gives one token per 28 x 28 px, so each size its own grid.
CASES = [
    ("llava-tiny", (160, 160)),
    ("qwen2.5-vl-tiny", (448, 224)),  # wide: 8 x 16 grid, 128 tokens
    ("qwen2.5-vl-tiny", (252, 364)),  # tall: 13 x 9 grid, 117 tokens
    ("qwen2.5-vl-tiny", (336, 336)),  # square: 12 x 12 grid, 144 tokens
    ("smolvlm-tiny", (200, 100)),  # wide: 2 x 3 tiles + the global view, 16 tokens each: 112 tokens
    ("smolvlm-tiny", (160, 160)),  # square: 3 x 3 tiles + the global view: 160 tokens
    ("internvl3-tiny", (160, 160)),  # 2 x 2 tiles + the thumbnail, 16 tokens each: 80 tokens
    ("internvl3-tiny", (300, 80)),  # 1 x 4 tiles + the thumbnail: 80 tokens
    ("internvl3-tiny", (50, 40)),  # one tile, no thumbnail: 16 tokens
]


@pytest.fixture(scope="module")
def models(random_models):
    return random_models


def encode(loaded, size):
    from par_demo.models import encode_query

    image, _ = render_scene(np.random.default_rng(5))
    return encode_query(loaded, image.resize(size), "What color is the circle?")


def reference_logits(model, query, plan, extra_tokens=()):
    """Last-position logits from the stock decoder layers (their own attention), not the engine's loop.

    Tokens dropped at layer K leave the sequence; kept ones keep their original (1-D or 3-D) positions; skipped
    layers are not called. `extra_tokens` (generated text) take the positions decoding gives them."""
    lm = language_model(model)
    embeds, positions = query.inputs_embeds, query.positions
    if extra_tokens:
        embeds = torch.cat([embeds, lm.embed_tokens(torch.tensor([list(extra_tokens)]))], dim=1)
        steps = query.next_position + torch.arange(len(extra_tokens))
        positions = torch.cat([positions, steps.expand(*positions.shape[:-1], len(extra_tokens))], dim=-1)
    if plan.visual_features is not None:  # merged tokens: new input features at their representatives' places
        embeds = embeds.clone()
        embeds[0, query.image_positions[plan.keep_visual]] = plan.visual_features
    keep = torch.ones(embeds.shape[1], dtype=torch.bool)
    bias = torch.zeros(embeds.shape[1])  # absorbed tokens: log size on their keys, as the layers' own additive mask
    if plan.keep_visual is not None:
        keep[query.image_positions] = False
        keep[query.image_positions[plan.keep_visual]] = True
    if plan.kept_sizes is not None:
        bias[query.image_positions[plan.keep_visual]] = plan.kept_sizes.log()
    h, mask = embeds, None
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == plan.start_layer:
                h, positions, bias = h[:, keep], positions[..., keep], bias[keep]
                if plan.kept_sizes is not None:
                    future = torch.ones(len(bias), len(bias), dtype=torch.bool).triu(1)
                    mask = bias.expand(len(bias), -1).masked_fill(future, float("-inf"))[None, None]
            if i in plan.skip_layers:
                continue
            h = layer(h, attention_mask=mask, position_embeddings=lm.rotary_emb(h, positions))
        return model.lm_head(lm.norm(h[:, -1])).reshape(-1)


@pytest.mark.parametrize("preset, size", CASES)
def test_empty_plan_matches_stock_generate_token_for_token(models, preset, size):
    loaded = models(preset)
    inputs = encode(loaded, size)
    ours = Engine(loaded.model).generate(inputs, max_new_tokens=10).tokens
    stock = loaded.model.generate(**loaded.family.stock_inputs(inputs), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                  eos_token_id=None)
    assert ours == stock[0, inputs["input_ids"].shape[1]:].tolist()


@pytest.mark.parametrize("preset, size", CASES)
def test_empty_plan_logits_match_stock_forward_at_every_step(models, preset, size):
    loaded = models(preset)
    inputs = encode(loaded, size)
    engine = Engine(loaded.model)
    query = engine.prepare(inputs)
    pre = engine.prefill(query, PruningPlan(), reserve=4)
    ours, tokens, position = [pre.logits], [int(pre.logits.argmax())], pre.next_position
    for _ in range(4):
        ours.append(engine.decode_step(tokens[-1], position, pre.cache, PruningPlan()))
        tokens.append(int(ours[-1].argmax()))
        position += 1
    with torch.no_grad():
        stock = loaded.model(**loaded.family.stock_inputs(inputs, tokens[:-1])).logits[0, -5:]
    torch.testing.assert_close(torch.stack(ours), stock, atol=1e-4, rtol=1e-4)


def check_against_stock_layers(loaded, engine, query, plan, steps: int = 3):
    """The engine's prefill and `steps` decode steps under `plan` equal the stock-layer reference. -> the prefill."""
    pre = engine.prefill(query, plan, reserve=steps)
    torch.testing.assert_close(pre.logits, reference_logits(loaded.model, query, plan), atol=1e-4, rtol=1e-4)
    generated, token, position = [], int(pre.logits.argmax()), pre.next_position
    for _ in range(steps):
        logits = engine.decode_step(token, position, pre.cache, plan)
        generated.append(token)
        torch.testing.assert_close(logits, reference_logits(loaded.model, query, plan, generated),
                                   atol=1e-4, rtol=1e-4)
        token, position = int(logits.argmax()), position + 1
    return pre


@pytest.mark.parametrize("preset, size", CASES)
@pytest.mark.parametrize("start_layer", [0, 2])
def test_gathered_tokens_and_skipped_layers_match_stock_layers(models, preset, size, start_layer):
    loaded = models(preset)
    engine = Engine(loaded.model)
    query = engine.prepare(encode(loaded, size))
    keep = torch.tensor(sorted({0, 3, 17, 40, 41, query.n_visual // 2, query.n_visual - 1} & set(range(query.n_visual))))
    plan = PruningPlan(start_layer=start_layer, keep_visual=keep, skip_layers=frozenset({1, 4}))
    check_against_stock_layers(loaded, engine, query, plan)


@pytest.mark.parametrize("preset, size", CASES)
def test_merged_tokens_replace_their_representatives_like_stock_layers(models, preset, size):
    """A plan may give kept tokens new input features (VisionZip's merged tokens, pooled tokens) at K = 0; they keep
    their representatives' positions. Given in any order, each row goes with its own index."""
    loaded = models(preset)
    engine = Engine(loaded.model)
    query = engine.prepare(encode(loaded, size))
    keep = torch.tensor([query.n_visual - 1, 5, 0, 33 % query.n_visual, query.n_visual // 2])  # not sorted on purpose
    features = torch.randn(keep.numel(), query.image_features.shape[1], generator=torch.Generator().manual_seed(3))
    plan = PruningPlan(start_layer=0, keep_visual=keep, visual_features=features, skip_layers=frozenset({1}))
    pre = check_against_stock_layers(loaded, engine, query, plan)
    plain = engine.prefill(query, PruningPlan(start_layer=0, keep_visual=keep, skip_layers=frozenset({1})))
    assert not torch.allclose(plain.logits, pre.logits)  # the features were used


@pytest.mark.parametrize("preset, size", CASES)
@pytest.mark.parametrize("start_layer", [0, 2])
def test_absorbing_plans_match_stock_layers_given_the_same_additive_mask(models, preset, size, start_layer):
    """Proportional attention: each kept token's key gets + log(its size) from layer K on, in prefill and in every
    decode step; the stock layers, handed that as their own additive attention mask, agree."""
    from par_demo.methods.absorb import absorbed_sizes

    loaded = models(preset)
    engine = Engine(loaded.model)
    query = engine.prepare(encode(loaded, size))
    keep = torch.tensor([query.n_visual - 1, 0, 7 % query.n_visual, query.n_visual // 2, 3])  # any order
    sizes = absorbed_sizes(query.image_features, keep)
    assert sizes.max() > 1
    plan = PruningPlan(start_layer=start_layer, keep_visual=keep, kept_sizes=sizes, skip_layers=frozenset({1}))
    pre = check_against_stock_layers(loaded, engine, query, plan)
    dropped = engine.prefill(query, PruningPlan(start_layer=start_layer, keep_visual=keep, skip_layers=frozenset({1})))
    assert not torch.allclose(dropped.logits, pre.logits, atol=1e-4)  # the sizes were used


def test_image_shape_sets_the_qwen_grid_and_token_count(models):
    loaded = models("qwen2.5-vl-tiny")
    engine = Engine(loaded.model)
    grids = {}
    for _, size in [case for case in CASES if case[0] == "qwen2.5-vl-tiny"]:
        query = engine.prepare(encode(loaded, size))
        grids[size] = (query.layout.grid, query.n_visual)
        rows, cols = query.layout.grid
        assert query.n_visual == rows * cols
        # M-RoPE: a visual token's row/column axes carry its cell; text after the image resumes past the image.
        first = int(query.image_positions[0])
        vision_pos = query.positions[:, 0, query.image_positions]
        assert (vision_pos[1] - vision_pos[1].min()).tolist() == query.layout.rows.tolist()
        assert (vision_pos[2] - vision_pos[2].min()).tolist() == query.layout.cols.tolist()
        assert int(vision_pos.min()) == first
        assert query.next_position == int(query.positions.max()) + 1
    assert grids == {(448, 224): ((8, 16), 128), (252, 364): ((13, 9), 117), (336, 336): ((12, 12), 144)}


def test_max_pixels_trades_resolution_for_visual_tokens(models):
    from dataclasses import replace

    loaded = models("qwen2.5-vl-tiny")
    small = replace(loaded, options={"max_pixels": 28 * 28 * 32})
    query = Engine(small.model).prepare(encode(small, (448, 224)))
    assert query.n_visual <= 32 and query.layout.grid[1] > query.layout.grid[0]  # still wide
    assert small.max_visual_tokens == 32 < loaded.max_visual_tokens


def test_a_saved_qwen_folder_loads_offline_and_answers_alike(models, tmp_path):
    """A save_pretrained folder (weights, image processor, tokenizer, chat template) loads with no network."""
    from par_demo.models import load_model

    loaded = models("qwen2.5-vl-tiny")
    loaded.model.save_pretrained(tmp_path)
    loaded.processor.save_pretrained(tmp_path)
    again = load_model(str(tmp_path), device="cpu")
    assert again.family.name == "qwen2.5-vl"
    inputs, inputs_again = encode(loaded, (448, 224)), encode(again, (448, 224))
    assert torch.equal(inputs["input_ids"], inputs_again["input_ids"])
    assert Engine(again.model).generate(inputs_again, max_new_tokens=4).tokens == \
        Engine(loaded.model).generate(inputs, max_new_tokens=4).tokens


@pytest.mark.parametrize("config, message", [
    ({"model_type": "gemma3"}, "model type 'gemma3' is not supported; par-demo runs: llava, qwen2_5_vl, idefics3, smolvlm, "
                               "internvl"),
    ({"model_type": "no-such-architecture"}, "cannot load model"),
])
def test_an_unsupported_model_folder_is_one_clear_line(tmp_path, capsys, config, message):
    import json

    from par_demo.cli import main

    (tmp_path / "config.json").write_text(json.dumps(config))
    code = main(["predict", "--model", str(tmp_path), "--image", str(EXAMPLE),
                 "--question", "What color is the circle?"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err


def test_pixel_limits_are_checked_before_any_query(tmp_path):
    from par_demo.errors import UserError
    from par_demo.models import load_model

    with pytest.raises(UserError, match="llava models resize every image to one size"):
        load_model("random:llava-tiny", device="cpu", options={"max_pixels": 50_000})
    with pytest.raises(UserError, match="at least 784"):
        load_model("random:qwen2.5-vl-tiny", device="cpu", options={"max_pixels": 100})
    with pytest.raises(UserError, match="above --max-pixels"):
        load_model("random:qwen2.5-vl-tiny", device="cpu", options={"min_pixels": 90_000, "max_pixels": 50_000})
