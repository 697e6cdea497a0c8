"""Absorbing dropped visual tokens (proportional attention): the sizes, the attention identity it rests on, the mask,
its FLOPs and budgets on every family. The engine against stock layers: `test_families.py`; batched training flows:
`test_training.py`."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from par_demo.engine import PruningPlan, attention_mask
from par_demo.errors import UserError
from par_demo.methods.absorb import absorb_flops, absorbed_sizes
from par_demo.methods.base import Setting

QUESTION = "How many objects are there?"


def test_each_dropped_token_joins_the_kept_token_most_like_it():
    kept_rows = torch.eye(4)  # kept tokens 0, 2, 4, 6 point along the four axes
    features = torch.zeros(10, 4)
    features[[0, 2, 4, 6]] = kept_rows
    features[[1, 3, 5]] = torch.tensor([[2.0, 0.1, 0, 0], [0.9, 0, 0.2, 0], [0, 0, 0.1, 3.0]])  # like 0, 0, 6
    features[[7, 8, 9]] = torch.tensor([[0, 1.0, 0, 0], [0, 5.0, 1.0, 0], [0.1, 0, 1.0, 0]])  # like 2, 2, 4
    sizes = absorbed_sizes(features, torch.tensor([6, 0, 4, 2]))  # in keep's order, not sorted
    assert sizes.tolist() == [2.0, 3.0, 2.0, 3.0]
    assert sizes.sum() == 10  # every visual token is somebody
    assert absorbed_sizes(features, torch.arange(10)).tolist() == [1.0] * 10


def test_a_key_with_log_s_bias_attracts_what_s_copies_of_it_do():
    """The identity proportional attention rests on (ToMe): softmax over s equal keys = one key with + log s."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 8, generator=g)
    k, v = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 2, 3, 8, generator=g)
    copies = [0, 0, 0, 1, 2, 2]  # key 0 three times, key 2 twice
    expanded = F.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])
    bias = torch.tensor([[3.0, 1.0, 2.0]]).log()
    merged = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(bias, 1, 3))
    torch.testing.assert_close(merged, expanded)
    plain = F.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(plain, expanded)


def test_the_mask_is_causal_over_the_last_queries_and_gives_decoded_keys_no_bias():
    mask = attention_mask(torch.tensor([[0.5, 0.0, 1.5]]), 2, 4)  # 2 queries at the end of 4 keys; bias on 3
    assert mask.shape == (1, 1, 2, 4)
    assert mask[0, 0].tolist() == [[0.5, 0.0, 1.5, float("-inf")], [0.5, 0.0, 1.5, 0.0]]


def test_sizes_must_be_one_per_kept_token_and_at_least_one(predictor, scene):
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    keep = torch.tensor([0, 1, 2])
    for sizes in (torch.ones(2), torch.tensor([1.0, 0.5, 2.0])):
        with pytest.raises(UserError, match="one value >= 1 per kept visual token"):
            predictor.engine.prefill(query, PruningPlan(start_layer=0, keep_visual=keep, kept_sizes=sizes))


def test_absorbing_costs_what_flop_counter_sees(predictor, scene):
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    n, width = query.image_features.shape
    for k in (1, 10, n // 2, n - 1):
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(k))[:k]
        with FlopCounterMode(display=False) as counter:
            absorbed_sizes(query.image_features, keep)
        charged = absorb_flops(n, k, width)
        assert counter.get_total_flops() <= charged <= 1.05 * counter.get_total_flops() + 3 * k * width
    assert absorb_flops(n, n, width) == 0 and absorb_flops(n, 0, width) == 0


CASES = [("llava-tiny", (160, 160)), ("qwen2.5-vl-tiny", (448, 224)), ("smolvlm-tiny", (200, 100)),
         ("internvl3-tiny", (160, 160))]


@pytest.fixture(scope="module")
def family_predictors(random_models):
    from par_demo.predict import Predictor

    return {preset: Predictor(random_models(preset)) for preset, _ in CASES}


@pytest.mark.parametrize("preset, size", CASES)
def test_cdpruner_absorb_stays_within_budget_and_charges_its_absorbing(family_predictors, scene, preset, size):
    predictor = family_predictors[preset]
    image = scene.resize(size)
    plain, absorbing = predictor.method("cdpruner"), predictor.method("cdpruner-absorb")
    query = predictor.engine.prepare(predictor.encode(image, QUESTION))
    setting = Setting(query.n_visual // 3, frozenset(), 0)
    assert absorbing.setting_flops(query, setting) == pytest.approx(
        plain.setting_flops(query, setting) + absorb_flops(query.n_visual, setting.tokens, query.image_features.shape[1]))
    for budget in (0.9, 0.75, 0.6):
        p = predictor.predict(image, QUESTION, "cdpruner-absorb", budget, max_new_tokens=2)
        assert p.flops_ratio <= budget + 1e-9
        assert len(p.kept_visual_tokens) < p.n_visual_tokens
        plan, _ = absorbing.plan(query, budget)
        assert plan.kept_sizes is not None and int(plan.kept_sizes.sum()) == query.n_visual


def test_the_prediction_and_the_page_say_when_dropped_tokens_were_absorbed(predictor, scene):
    from par_demo.panels import stats_markdown

    absorbed = predictor.predict(scene, QUESTION, "cdpruner-absorb", 0.5, max_new_tokens=1)
    dropped = predictor.predict(scene, QUESTION, "cdpruner", 0.5, max_new_tokens=1)
    assert absorbed.absorbed and absorbed.to_dict()["absorbed"] is True and not dropped.absorbed
    assert "absorbed" in stats_markdown(absorbed) and "absorbed" not in stats_markdown(dropped)
    full = predictor.predict(scene, QUESTION, "cdpruner-absorb", 1.0, max_new_tokens=1)
    assert not full.absorbed  # every token kept: nothing to absorb
