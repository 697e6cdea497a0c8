"""Every method meets its FLOPs budget, at equal FLOPs, with its own kind of pruning."""

import json

import pytest
import torch

from par_demo.errors import UserError

QUESTION = "What shape is the red object?"
PREDICT_KEYS = {"answer", "method", "budget", "flops", "flops_full", "flops_ratio", "n_visual_tokens",
                "kept_visual_tokens", "n_layers", "kept_layers", "prefill_s", "total_s", "new_tokens"}


@pytest.mark.parametrize("method", ["full", "fastv", "random", "layerdrop"])
@pytest.mark.parametrize("budget", [1.0, 0.75, 0.5, 0.35, 0.25])
def test_every_method_stays_within_its_flops_budget(predictor, scene, method, budget):
    if method == "full" and budget < 1:
        pytest.skip("full has one setting: it only fits budget 1.0")
    p = predictor.predict(scene, QUESTION, method, budget, max_new_tokens=2)
    assert p.flops_ratio <= budget + 1e-9
    assert p.flops_ratio == pytest.approx(p.flops / p.flops_full)


def test_token_methods_prune_tokens_only_and_layerdrop_layers_only(predictor, scene):
    fastv = predictor.predict(scene, QUESTION, "fastv", 0.5, max_new_tokens=2)
    assert len(fastv.kept_visual_tokens) < fastv.n_visual_tokens and fastv.kept_layers == list(range(8))
    rand = predictor.predict(scene, QUESTION, "random", 0.5, max_new_tokens=2)
    assert len(rand.kept_visual_tokens) == len(fastv.kept_visual_tokens)  # equal FLOPs -> equal counts here
    drop = predictor.predict(scene, QUESTION, "layerdrop", 0.5, max_new_tokens=2)
    assert len(drop.kept_visual_tokens) == drop.n_visual_tokens and len(drop.kept_layers) < 8
    assert drop.layer_scores is not None and len(drop.layer_scores) == 8


def test_tighter_budgets_keep_less(predictor, scene):
    kept = [len(predictor.predict(scene, QUESTION, "fastv", b, max_new_tokens=1).kept_visual_tokens)
            for b in (0.9, 0.6, 0.4)]
    assert kept[0] > kept[1] > kept[2]


def test_explicit_tokens_and_layers_override_the_budget(predictor, scene):
    p = predictor.predict(scene, QUESTION, "fastv", 1.0, tokens=17, max_new_tokens=1)
    assert len(p.kept_visual_tokens) == 17
    p = predictor.predict(scene, QUESTION, "layerdrop", 1.0, layers=5, max_new_tokens=1)
    assert len(p.kept_layers) == 5


def test_budget_below_reach_falls_back_to_an_earlier_start_layer(predictor, scene):
    # Layers before K always see every token, so a tight budget moves K earlier instead of failing.
    p = predictor.predict(scene, QUESTION, "random", 0.3, max_new_tokens=1)
    assert p.flops_ratio <= 0.3 and p.start_layer < 2


def test_random_tokens_differ_between_queries(predictor, scene):
    a = predictor.predict(scene, QUESTION, "random", 0.5, max_new_tokens=1).kept_visual_tokens
    b = predictor.predict(scene, QUESTION, "random", 0.5, max_new_tokens=1).kept_visual_tokens
    assert a != b


def test_prediction_json_has_the_documented_keys(predictor, scene):
    p = predictor.predict(scene, QUESTION, "fastv", 0.5, max_new_tokens=3)
    data = json.loads(json.dumps(p.to_dict()))
    assert PREDICT_KEYS <= set(data)
    assert data["kept_visual_tokens"] == sorted(data["kept_visual_tokens"])
    assert data["token_scores"] is not None and len(data["token_scores"]) == data["n_visual_tokens"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nope"), "unknown method"),
    (dict(method="fastv", budget=0), r"\(0, 1\]"),
    (dict(method="fastv", budget=1.5), r"\(0, 1\]"),
    (dict(method="fastv", budget=float("nan")), r"\(0, 1\]"),
    (dict(method="fastv", budget="abc"), "number"),
    (dict(method="fastv", tokens=1000), "tokens kept"),
    (dict(method="fastv", layers=3), "does not skip layers"),
    (dict(method="layerdrop", layers=0), "layers kept"),
    (dict(method="full", budget=0.01), "below what full can reach"),
    (dict(method="par"), "train-router"),
    (dict(method="fastv", start_layer=20), "start layer"),
])
def test_bad_method_parameters_get_one_clear_message(predictor, scene, kwargs, message):
    with pytest.raises(UserError, match=message):
        predictor.predict(scene, QUESTION, **kwargs)


def test_questions_cannot_add_image_slots(predictor, scene):
    # A literal <image> in the question would create extra image tokens and break the feature alignment.
    p = predictor.predict(scene, "What <image> color <image> is the circle?", "full", 1.0, max_new_tokens=1)
    assert p.n_visual_tokens == 144
    with pytest.raises(UserError, match="empty"):
        predictor.predict(scene, "  <image> ", "full")


def test_layerdrop_calibration_is_not_reused_after_the_model_is_retrained():
    from par_demo.models import load_model
    from par_demo.predict import Predictor

    first = Predictor(load_model("random:llava-tiny", device="cpu"))
    again = load_model("random:llava-tiny", device="cpu")
    assert first.cache_key == Predictor(again).cache_key  # same weights: the cached block influence is valid
    with torch.no_grad():
        again.model.lm_head.weight.mul_(1.5)  # same name and architecture, other weights
    assert first.cache_key != Predictor(again).cache_key
    tuned = load_model("random:llava-tiny", device="cpu")
    with torch.no_grad():  # fine-tuned with its LM head frozen (LoRA on the attention layers, merged)
        for name, weight in tuned.model.named_parameters():
            if "self_attn" in name:
                weight.add_(1e-3 * torch.randn_like(weight))
    assert first.cache_key != Predictor(tuned).cache_key


def test_a_4bit_models_cache_key_holds_after_its_first_forward(scene):
    """bitsandbytes repacks its 4-bit weights on a CPU's first forward: the cost model cached at one start must be
    found at the next, whatever ran first."""
    from par_demo.models import load_model
    from par_demo.predict import Predictor

    predictor = Predictor(load_model("random:llava-tiny", device="cpu", quant="4bit"))
    before = predictor.cache_key
    predictor.predict(scene, "what color?", "full", 1.0, max_new_tokens=1)
    assert predictor.cache_key == before == Predictor(load_model("random:llava-tiny", device="cpu",
                                                                 quant="4bit")).cache_key


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The tiny Qwen2.5-VL with an untrained router (PAR's plumbing, not its quality, is under test here)."""
    from par_demo.models import load_model
    from par_demo.predict import Predictor
    from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router

    loaded = load_model("random:qwen2.5-vl-tiny", device="cpu")
    predictor = Predictor(loaded)
    torch.manual_seed(0)
    config = RouterConfig(lm_width=64, n_layers=6, width=16, heads=1, start_layer=0, model=fingerprint(loaded))
    predictor.router_path = save_router(MetaRouter(config), tmp_path_factory.mktemp("qwen-router"))
    return predictor


@pytest.mark.parametrize("size", [(448, 224), (224, 392)])  # 128 and 112 visual tokens, wide and tall grids
@pytest.mark.parametrize("method", ["fastv", "random", "layerdrop", "par", "par-tokens", "par-layers", "par-prior"])
@pytest.mark.parametrize("budget", [0.9, 0.75])
def test_every_method_runs_on_qwen_within_budget_for_any_token_count(qwen, scene, size, method, budget):
    # Qwen2.5-VL's vision tower is a large share of its prefill (about half on this tiny one, 28 % on the 7B),
    # so budgets here stay where pruning inside the decoder can reach.
    p = qwen.predict(scene.resize(size), QUESTION, method, budget, max_new_tokens=2)
    rows, cols = p.grid
    assert p.flops_ratio <= budget + 1e-9 and p.n_visual_tokens == rows * cols
    assert (cols > rows) == (size[0] > size[1])  # the grid has the image's orientation
    assert all(0 <= i < rows * cols for i in p.kept_visual_tokens)
    if p.token_scores is not None:
        assert len(p.token_scores) == rows * cols


@pytest.mark.parametrize("preset, size", [("smolvlm-tiny", (200, 100)), ("internvl3-tiny", (160, 160))])
@pytest.mark.parametrize("method", ["fastv", "random", "layerdrop", "par", "par-tokens", "par-layers", "par-prior"])
@pytest.mark.parametrize("budget", [0.85, 0.6])
def test_every_method_runs_on_tiled_images_within_budget_over_all_tiles(tiled, scene, preset, size, method, budget):
    # The tiny towers are about a quarter of the prefill here, so both budgets are reachable inside the decoder.
    p = tiled[preset].predict(scene.resize(size), QUESTION, method, budget, max_new_tokens=2)
    rows, cols = p.grid
    assert p.flops_ratio <= budget + 1e-9
    assert p.n_visual_tokens == (112 if preset == "smolvlm-tiny" else 80)  # every tile and the global view
    assert len(set(p.kept_visual_tokens)) == len(p.kept_visual_tokens)
    assert all(0 <= i < rows * cols for i in p.kept_visual_tokens)
    if p.token_scores is not None:
        assert sum(s is not None for s in p.token_scores) == p.n_visual_tokens  # one score per token, empty cells none


def test_at_budget_one_every_method_is_the_full_models_path_with_no_work_of_its_own(scene, monkeypatch):
    """Nothing pruned, nothing paid: at budget 1 no router pass, no scores, no mask; the answer and FLOPs are the
    full model's (the embedded model, whose PAR has a router)."""
    from par_demo.methods import METHODS, REGISTRY
    from par_demo.models import DEFAULT_MODEL, load_model
    from par_demo.predict import Predictor

    predictor = Predictor(load_model(DEFAULT_MODEL, device="cpu"))
    full = predictor.predict(scene, QUESTION, "full", 1.0, max_new_tokens=3)
    for name in METHODS[1:]:  # all but the full model itself
        monkeypatch.setattr(REGISTRY[name], "make_plan", lambda *a, **k: pytest.fail("a method planned at budget 1"))
    for name in METHODS:
        p = predictor.predict(scene, QUESTION, name, 1.0, max_new_tokens=3)
        assert p.method == name and p.answer == full.answer and p.flops == full.flops and p.flops_ratio == 1.0
        assert len(p.kept_visual_tokens) == p.n_visual_tokens and len(p.kept_layers) == p.n_layers
        assert not p.absorbed and p.layer_scores is None


@pytest.mark.parametrize("preset", ["llava-tiny", "qwen2.5-vl-tiny", "smolvlm-tiny"])
def test_token_methods_bisect_to_the_setting_a_full_scan_finds(random_models, scene, preset):
    """Methods that bisect their candidates (`monotone_costs`) really have costs that fall after the first
    candidate, so the bisection lands where the scan of every candidate would: the FLOPs tables do not move."""
    from par_demo.methods import METHODS
    from par_demo.predict import Predictor

    predictor = Predictor(random_models(preset))
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    full = predictor.flops.full(query)
    bisecting = [predictor.method(n) for n in METHODS if predictor.method(n).monotone_costs]
    assert {m.name for m in bisecting} >= {"fastv", "random", "visionzip", "divprune", "cdpruner", "downsample"}
    for method in bisecting:
        for start in sorted({0, 2}):
            costs = [method.setting_flops(query, s) for s in method.candidates(query, start)]
            assert all(a >= b for a, b in zip(costs[1:], costs[2:])), method.name
            for budget in [i / 40 for i in range(1, 41)]:
                limit = budget * full * (1 + 1e-9)
                scan = next((i for i, c in enumerate(costs) if c <= limit), None)
                assert method.first_fitting(lambda i: costs[i], len(costs), limit) == scan, (method.name, budget)


def test_fastv_asked_to_start_at_layer_0_starts_at_layer_1_where_its_attention_row_is(predictor, scene):
    # one start layer goes to every method (the page's slider, `compare`): random can drop at 0, FastV ranks at K-1
    fastv = predictor.predict(scene, QUESTION, "fastv", 0.5, start_layer=0, max_new_tokens=1)
    random = predictor.predict(scene, QUESTION, "random", 0.5, start_layer=0, max_new_tokens=1)
    assert fastv.start_layer == 1 and random.start_layer == 0
    assert predictor.predict(scene, QUESTION, "fastv", 1.0, tokens=9, start_layer=0, max_new_tokens=1).start_layer == 1
