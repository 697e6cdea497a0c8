"""VisionZip, DivPrune, CDPruner and downsampling: their selections, their own FLOPs, and their budgets on every
model family (tiny random models with each family's exact architecture)."""

import itertools

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from par_demo.errors import BudgetOutOfReach
from par_demo.methods.base import Setting
from par_demo.methods.cdpruner import greedy_dpp
from par_demo.methods.divprune import max_min_diverse
from par_demo.methods.downsample import pooled_grids
from par_demo.shapes import render_scene

NEW_METHODS = ["visionzip", "divprune", "cdpruner", "downsample"]
# FlopCounterMode counts matrix products but not matrix-vector ones, which the greedy selections use for one row
MATRIX_VECTOR = {torch.ops.aten.mv: lambda matrix_shape, vector_shape, *args, **kwargs: 2 * matrix_shape[0] *
                 matrix_shape[1]}
QUESTION = "What color is the circle?"


@pytest.fixture(scope="module")
def qwen():
    from par_demo.models import load_model
    from par_demo.predict import Predictor

    return Predictor(load_model("random:qwen2.5-vl-tiny", device="cpu"))


@pytest.fixture(scope="module")
def family_predictors(predictor, qwen, tiled_models):
    return {"llava-tiny": predictor, "qwen2.5-vl-tiny": qwen, **tiled_models}


# (preset, image size): Qwen2.5-VL gives one visual token per 28 x 28 px, so each size its own grid and count;
# SmolVLM and InternVL3 cut these images into 2 x 3 and 2 x 2 tiles (+ the global view / thumbnail)
CASES = [("llava-tiny", (160, 160)), ("qwen2.5-vl-tiny", (448, 224)), ("qwen2.5-vl-tiny", (252, 364)),
         ("smolvlm-tiny", (200, 100)), ("internvl3-tiny", (160, 160))]


# ------------------------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("preset, size", CASES)
@pytest.mark.parametrize("method", NEW_METHODS)
def test_each_new_method_stays_within_every_reachable_budget_and_refuses_the_rest(family_predictors, scene, preset,
                                                                                  size, method):
    predictor = family_predictors[preset]
    image = scene.resize(size)
    chosen = predictor.method(method)
    query = predictor.engine.prepare(predictor.encode(image, QUESTION))
    full = predictor.flops.full(query)
    cheapest = min(chosen.setting_flops(query, s) for s in chosen.candidates(query, 0)) / full
    for budget in (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.35, 0.25, 0.15):
        if budget < cheapest:
            with pytest.raises(BudgetOutOfReach, match=f"below what {method} can reach"):
                predictor.predict(image, QUESTION, method, budget, max_new_tokens=1)
            continue
        p = predictor.predict(image, QUESTION, method, budget, max_new_tokens=1)
        assert p.flops_ratio <= budget + 1e-9
        assert p.kept_layers == list(range(p.n_layers))  # before the LM, every layer runs
        assert len(p.kept_visual_tokens) <= p.n_visual_tokens
        if budget < 1:  # (at budget 1 the full model's own path runs: nothing leaves the sequence anywhere)
            assert p.start_layer == 0 and len(p.kept_visual_tokens) < p.n_visual_tokens
    if preset == "llava-tiny":
        assert cheapest < 0.15  # the LLaVA tower is a small share: every budget here is reachable


def test_the_qwen_tower_puts_low_budgets_out_of_reach_with_the_usual_message(qwen, scene):
    with pytest.raises(BudgetOutOfReach, match="budget 0.25 is below what divprune can reach"):
        qwen.predict(scene.resize((448, 224)), QUESTION, "divprune", 0.25, max_new_tokens=1)


@pytest.mark.parametrize("preset, size", CASES)
@pytest.mark.parametrize("method", ["visionzip", "divprune", "cdpruner"])
def test_each_method_s_own_flops_are_what_flop_counter_sees_while_it_selects(family_predictors, scene, preset,
                                                                              size, method):
    predictor = family_predictors[preset]
    query = predictor.engine.prepare(predictor.encode(scene.resize(size), QUESTION))
    chosen = predictor.method(method)
    for tokens in (1, 9, 24, query.n_visual // 2):
        with FlopCounterMode(display=False, custom_mapping=MATRIX_VECTOR) as counter:
            chosen.select(query, tokens)
        charged = chosen.extra_flops(query, Setting(tokens, frozenset(), 0))
        if tokens <= 24:
            assert charged == counter.get_total_flops()
        else:  # CDPruner stops updating once the features' rank is used up (random tiny features: ~60): less work
            assert charged >= counter.get_total_flops()
    assert chosen.extra_flops(query, Setting(query.n_visual, frozenset(), 0)) == 0  # all kept: nothing selected


@pytest.mark.parametrize("method", NEW_METHODS)
def test_explicit_token_counts_and_tight_budgets_keep_fewer_tokens(predictor, scene, method):
    kept = [len(predictor.predict(scene, QUESTION, method, b, max_new_tokens=1).kept_visual_tokens)
            for b in (0.9, 0.5, 0.25)]
    assert kept[0] > kept[1] > kept[2] > 0
    fixed = predictor.predict(scene, QUESTION, method, 1.0, tokens=36, max_new_tokens=1)
    assert len(fixed.kept_visual_tokens) == 36  # 36 = 6 x 6: a pooled grid too


# ------------------------------------------------------------------------------------------------ selections
def test_divprune_greedy_is_the_max_min_greedy_over_the_full_distance_matrix():
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    unit = torch.nn.functional.normalize(x, dim=-1)
    distance = 1 - unit @ unit.T
    nearest = (distance + torch.eye(40) * 9).min(dim=1).values
    expected = [int(nearest.argmax())]
    while len(expected) < 12:
        to_chosen = distance[:, expected].min(dim=1).values
        to_chosen[expected] = -1
        expected.append(int(to_chosen.argmax()))
    assert max_min_diverse(x, 12, rows_at_once=7).tolist() == expected  # blocks of rows change nothing


def test_divprune_never_picks_a_token_twice_among_duplicates():
    x = torch.ones(10, 4)
    assert sorted(max_min_diverse(x, 10).tolist()) == list(range(10))


def test_cdpruner_greedy_adds_the_token_that_most_increases_the_kernel_determinant():
    g = torch.Generator().manual_seed(1)
    x, quality = torch.randn(30, 16, generator=g), torch.rand(30, generator=g) + 0.1
    unit = torch.nn.functional.normalize(x, dim=-1)
    kernel = quality[:, None] * (unit @ unit.T) * quality[None, :]
    expected: list[int] = []
    for _ in range(8):
        gains = {i: torch.logdet(kernel[expected + [i]][:, expected + [i]].double()) for i in range(30)
                 if i not in expected}
        expected.append(max(gains, key=gains.get))
    assert greedy_dpp(x, quality, 8).tolist() == expected


def test_cdpruner_fills_past_the_kernel_rank_by_relevance():
    x = torch.randn(12, 3, generator=torch.Generator().manual_seed(2))  # rank 3: only 3 tokens can add volume
    quality = torch.linspace(0.1, 1.0, 12)
    chosen = greedy_dpp(x, quality, 8).tolist()
    assert len(set(chosen)) == 8
    rest = sorted(set(range(12)) - set(chosen[:3]), key=lambda i: -quality[i])
    assert chosen[3:] == rest[:5]


def test_visionzip_keeps_the_most_attended_tokens_and_merges_the_rest_into_group_means(predictor, scene):
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    chosen = predictor.method("visionzip").select(query, 64)  # the paper's 54 dominant + 10 contextual
    dominant, targets = chosen.keep[:54], chosen.keep[54:]
    assert set(dominant.tolist()) == set(torch.topk(query.dominance(), 54).indices.tolist())
    assert len(set(chosen.keep.tolist())) == 64
    assert torch.equal(chosen.features[:54], query.image_features[dominant])  # dominant tokens: unchanged
    # each contextual token is the mean of its target and the remaining tokens closest to it; groups cover the rest
    rest = sorted(set(range(144)) - set(dominant.tolist()))
    others = [i for i in rest if i not in targets.tolist()]
    unit = torch.nn.functional.normalize(query.image_features.float(), dim=-1)
    group = (unit[others] @ unit[targets].T).argmax(dim=1)
    for g, target in enumerate(targets.tolist()):
        members = [target] + [others[i] for i in range(len(others)) if group[i] == g]
        torch.testing.assert_close(chosen.features[54 + g], query.image_features[members].mean(0))


def test_downsample_2x2_averages_each_block_at_its_top_left_middle_cell(predictor, scene):
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    chosen = predictor.method("downsample").select(query, 36)  # 12 x 12 -> 6 x 6
    grid = query.image_features.view(12, 12, -1)
    expected = grid.view(6, 2, 6, 2, -1).mean(dim=(1, 3)).reshape(36, -1)
    torch.testing.assert_close(chosen.features, expected)
    assert chosen.keep.tolist() == [r * 2 * 12 + c * 2 for r in range(6) for c in range(6)]


def test_downsample_grids_follow_the_image_aspect_in_fine_steps():
    grids = pooled_grids(8, 16)
    assert grids[128] == (8, 16) and grids[32] == (4, 8) and grids[2] == (1, 2)
    counts = sorted(grids)
    assert all(b - a <= 16 for a, b in itertools.pairwise(counts))  # no big jumps between settings
    assert all(abs(c / r - 2) <= 1 / r + 1e-9 for r, c in grids.values())  # within one column of 2:1


# ------------------------------------------------------------------------------------------------ the tower's attention
def test_llava_dominance_is_the_cls_attention_stock_clip_reports(tiny, predictor, scene):
    inputs = predictor.encode(scene, QUESTION)
    query = predictor.engine.prepare(inputs)
    tower = tiny.model.model.vision_tower
    tower.config._attn_implementation = "eager"  # stock attention weights are returned by the eager path
    try:
        with torch.no_grad():
            out = tower(inputs["pixel_values"], output_attentions=True)
    finally:
        tower.config._attn_implementation = "sdpa"
    layer = tiny.config.vision_feature_layer % tiny.config.vision_config.num_hidden_layers  # the feature layer
    expected = out.attentions[layer][0, :, 0, 1:].mean(0)  # CLS row, patches only, mean over heads
    torch.testing.assert_close(query.dominance(), expected, atol=1e-5, rtol=1e-4)


def test_qwen_dominance_is_the_attention_each_merged_token_receives_in_the_last_full_block(qwen, scene):
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    from par_demo.families.base import recorded_calls

    model = qwen.loaded.model
    inputs = qwen.encode(scene.resize((252, 364)), QUESTION)
    query = qwen.engine.prepare(inputs)
    visual = model.model.visual
    attn = visual.blocks[max(visual.fullatt_block_indexes)].attn
    with recorded_calls(attn) as (calls,), torch.no_grad():
        merged = visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    h, cos_sin = calls[0].args[0], calls[0].kwargs["position_embeddings"]
    n = h.shape[0]
    q, k, _ = attn.qkv(h).reshape(n, 3, attn.num_heads, -1).unbind(1)
    q, k = apply_rotary_pos_emb_vision(q, k, *cos_sin)
    weights = torch.softmax(q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2) * attn.scaling, dim=-1)
    per_patch = weights.mean(dim=(0, 1))  # (n,), in the tower's window order
    order = qwen.loaded.family.window_order(model.config, inputs["image_grid_thw"])
    # the tower's merged tokens in window order are the query's visual tokens at `order`: the same mapping
    torch.testing.assert_close(visual.merger(merged.last_hidden_state)[order.argsort()], query.image_features)
    expected = per_patch.view(-1, 4).sum(1)[order.argsort()]
    torch.testing.assert_close(query.dominance(), expected, atol=1e-6, rtol=1e-4)


@pytest.fixture(scope="module")
def tiled_models():
    from par_demo.models import load_model
    from par_demo.predict import Predictor

    return {preset: Predictor(load_model(f"random:{preset}", device="cpu"))
            for preset in ("smolvlm-tiny", "internvl3-tiny")}


def stock_tower_attentions(tower, pixel_values, **kwargs):
    """The last layer's attention weights (views, heads, n, n) as the stock tower reports them (eager path)."""
    tower.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            return tower(pixel_values, output_attentions=True, **kwargs).attentions[-1]
    finally:
        tower.config._attn_implementation = "sdpa"


def per_token(per_patch: torch.Tensor, fold: int) -> torch.Tensor:
    """(views, side * side) per-patch values -> per visual token: token (r, c) of a view takes the fold x fold
    patches from row r * fold and column c * fold (pixel shuffle's grouping); view by view, row-major."""
    views, n = per_patch.shape
    side = int(n ** 0.5)
    out = []
    for v in range(views):
        grid = per_patch[v].view(side, side)
        for r in range(side // fold):
            for c in range(side // fold):
                out.append(grid[r * fold:(r + 1) * fold, c * fold:(c + 1) * fold].sum())
    return torch.stack(out)


def test_smolvlm_dominance_is_the_attention_each_token_s_patches_receive_in_the_last_layer(tiled_models, scene):
    predictor = tiled_models["smolvlm-tiny"]
    model = predictor.loaded.model
    inputs = predictor.encode(scene.resize((200, 100)), QUESTION)
    query = predictor.engine.prepare(inputs)
    weights = stock_tower_attentions(model.model.vision_model, inputs["pixel_values"][0])  # 7 views
    expected = per_token(weights.mean(dim=(1, 2)), model.config.scale_factor)  # mean over heads and queries
    torch.testing.assert_close(query.dominance(), expected, atol=1e-6, rtol=1e-4)


def test_internvl_dominance_is_each_view_s_cls_attention_to_the_token_s_patches(tiled_models, scene):
    predictor = tiled_models["internvl3-tiny"]
    model = predictor.loaded.model
    inputs = predictor.encode(scene.resize((160, 160)), QUESTION)
    query = predictor.engine.prepare(inputs)
    weights = stock_tower_attentions(model.model.vision_tower, inputs["pixel_values"])  # 5 views
    expected = per_token(weights[:, :, 0, 1:].mean(1), 2)  # CLS row, patches only, mean over heads
    torch.testing.assert_close(query.dominance(), expected, atol=1e-6, rtol=1e-4)


def test_downsample_pools_every_tile_and_the_global_view_on_its_own(tiled_models, scene):
    predictor = tiled_models["smolvlm-tiny"]
    query = predictor.engine.prepare(predictor.encode(scene.resize((200, 100)), QUESTION))  # 7 views of 4 x 4
    chosen = predictor.method("downsample")
    assert [s.tokens for s in chosen.candidates(query, 0)][:3] == [112, 84, 63]  # 7 x 16, 7 x 12, 7 x 9
    selection = chosen.select(query, 7)  # one token per view: the mean of its 16
    views = query.image_features.view(7, 16, -1)
    torch.testing.assert_close(selection.features, views.mean(1))
    assert selection.keep.tolist() == [v * 16 + 5 for v in range(7)]  # each view's cell (1, 1), its centre
