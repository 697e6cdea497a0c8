"""The PAR meta-router, its training command and the `par` method, on the tiny random model."""

import json
from argparse import Namespace

import pytest
import torch
from PIL import Image

from par_demo.errors import UserError
from par_demo.router import (
    MetaRouter, RouterConfig, auto_width, fingerprint, load_router, router_cells, router_flops, save_router,
)

QUESTION = "What shape is the red object?"


@pytest.fixture(scope="module")
def config(tiny):
    return RouterConfig(lm_width=128, n_layers=8, width=16, heads=1, protected_first=1,
                        protected_last=1, model=fingerprint(tiny))


@pytest.fixture(scope="module")
def router_dir(tmp_path_factory, config):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("router")
    return save_router(MetaRouter(config), folder)


@pytest.fixture(scope="module")
def par_predictor(tiny, router_dir):
    from par_demo.predict import Predictor

    predictor = Predictor(tiny)
    predictor.router_path = router_dir
    return predictor


@pytest.fixture(scope="module")
def image_file(tmp_path_factory, scene):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scene.save(path)
    return str(path)


@pytest.fixture(scope="module")
def target(par_predictor, image_file):
    from par_demo.training.targets import make_target

    return make_target(par_predictor, image_file, QUESTION, start_layer=2, max_new_tokens=3)


# ------------------------------------------------------------------------------------------------ router
def test_router_shapes_and_budget_conditioning(config, target):
    router = MetaRouter(config)
    tokens, layers = router(target.visual, target.text, torch.tensor([0.2, 0.8]), target.layout)
    assert tokens.shape == (2, 144) and layers.shape == (2, 8)
    assert not torch.allclose(tokens[0], tokens[1])  # the budget embedding reaches the scores
    assert target.visual.shape == (144, 128) and target.text.shape[1] == 128


def test_router_inference_reuses_its_query_free_parts_until_a_weight_changes(config, target):
    torch.manual_seed(1)
    router, fresh = MetaRouter(config), MetaRouter(config)
    budgets = torch.tensor([0.3])

    def scores(model):
        with torch.inference_mode():
            return model(target.visual, target.text, budgets, target.layout)

    first = scores(router)
    assert len(router._parts_cache) == 1
    again = scores(router)  # same layout and budget: the kept parts, the same answer
    assert len(router._parts_cache) == 1 and all(torch.equal(a, b) for a, b in zip(first, again))
    fresh.load_state_dict(router.state_dict())
    with torch.no_grad():
        router.position.weight.add_(0.5)  # an optimizer step would do this in place
        router.budget[0].bias.add_(0.5)
        fresh.position.weight.add_(0.5)
        fresh.budget[0].bias.add_(0.5)
    changed, expected = scores(router), scores(fresh)
    assert not torch.allclose(changed[0], first[0])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(changed, expected))
    with torch.enable_grad():  # training: made afresh, with gradients, nothing kept
        tokens, _ = router(target.visual, target.text, budgets, target.layout)
    tokens.sum().backward()
    assert router.position.weight.grad is not None and router.budget[0].weight.grad is not None


def test_router_cells_are_squares_of_neighbours_within_each_view():
    from par_demo.families.base import Layout

    cell, n = router_cells(Layout.row_major(5, 3), 2)  # 5 x 3 grid: squares of 2 x 2, partial ones at the edges
    assert n == 6 and cell.tolist() == [0, 0, 1, 0, 0, 1, 2, 2, 3, 2, 2, 3, 4, 4, 5]
    tiled = Layout.tiled(1, 2, (3, 3))  # two tiles and the global view, 3 x 3 tokens each
    cell, n = router_cells(tiled, 2)
    assert n == 3 * 4
    for a in range(tiled.n_visual):  # no square mixes views
        for b in range(tiled.n_visual):
            if cell[a] == cell[b]:
                assert tiled.tile[a] == tiled.tile[b]
    cell, n = router_cells(tiled, 1)
    assert n == tiled.n_visual and torch.equal(cell, torch.arange(tiled.n_visual))


def test_a_pooled_router_scores_every_token_for_fewer_flops_and_trains_end_to_end(tiny, config, target, tmp_path):
    from dataclasses import replace

    torch.manual_seed(2)
    pooled = MetaRouter(replace(config, pool=2))
    budgets = torch.tensor([0.2, 0.8])
    tokens, layers = pooled(target.visual, target.text, budgets, target.layout)
    assert tokens.shape == (2, 144) and layers.shape == (2, 8)
    cell, n_cells = router_cells(target.layout, 2)
    assert n_cells == 36  # the 12 x 12 grid in 2 x 2 squares
    same_square = cell[:, None] == cell[None, :]
    assert not torch.allclose(tokens[0][same_square.nonzero()[:, 0]], tokens[0][same_square.nonzero()[:, 1]])
    assert pooled.flops(target.layout, target.n_text) < router_flops(config, 144, target.n_text) / 2
    assert pooled.flops(target.layout, target.n_text) == router_flops(pooled.config, 144, target.n_text, 36)
    (tokens.sum() + layers.sum()).backward()
    assert all(p.grad is not None for p in pooled.parameters())
    with torch.inference_mode():  # inference (its kept parts) answers as training's forward does
        again = pooled(target.visual, target.text, budgets, target.layout)
    assert torch.allclose(again[0], tokens.detach(), atol=1e-6)
    save_router(pooled.eval(), tmp_path)
    loaded, meta = load_router(tmp_path, tiny)
    assert meta["config"].pool == 2
    with torch.inference_mode():
        assert torch.equal(loaded(target.visual, target.text, budgets, target.layout)[0], again[0])


def test_router_overhead_is_under_one_percent_for_llava_7b():
    from par_demo.families.llava import PRESETS, Llava, build_config
    from par_demo.flops import FlopsModel, Shape

    config = build_config(PRESETS["llava-1.5-7b"], 32000)
    n_text, n_visual = 40, 576
    full = FlopsModel.from_config(config).full(Shape(n_text, n_visual, Llava.vision_flops(config)))
    width = auto_width(4096, 32, n_visual, n_text, full)
    assert width == 128  # the widest candidate fits easily at 7B
    cfg = RouterConfig(lm_width=4096, n_layers=32, width=width, heads=8)
    assert router_flops(cfg, n_visual, n_text) <= 0.01 * full


def test_save_load_round_trip_and_mismatch_refusal(tiny, config, tmp_path, target):
    torch.manual_seed(1)
    router = MetaRouter(config).eval()
    save_router(router, tmp_path, pareto=[{"budget": 0.5, "tokens": 40, "layers": 6}])
    loaded, meta = load_router(tmp_path, tiny)
    budgets = torch.tensor([0.5])
    with torch.no_grad():
        for a, b in zip(router(target.visual, target.text, budgets, target.layout),
                        loaded(target.visual, target.text, budgets, target.layout)):
            assert torch.equal(a, b)
    assert meta["config"] == config and meta["pareto"][0]["layers"] == 6
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))  # no pickle

    data = json.loads((tmp_path / "router.json").read_text())
    data["config"]["model"]["n_layers"] = 32
    (tmp_path / "router.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="another model"):
        load_router(tmp_path, tiny)


def test_a_router_loads_silently_on_its_model_in_another_dtype_and_warns_on_other_weights(tiny, config, tmp_path):
    import warnings

    from par_demo.models import load_model

    save_router(MetaRouter(config), tmp_path)  # fingerprinted on the fp32 model
    for dtype in ("bf16", "fp16"):  # trained on a GPU in bf16, served on a CPU in fp32, or the other way round
        same = load_model("random:llava-tiny", device="cpu", dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_router(tmp_path, same)
    other = load_model("random:llava-tiny", device="cpu")
    head = other.model.lm_head.weight
    with torch.no_grad():
        head.mul_(1.01)  # retrained: the same draw, scaled
    with pytest.warns(UserWarning, match="different weights"):
        load_router(tmp_path, other)
    with torch.no_grad():  # redrawn: another draw of the same distribution (its mean and std differ by chance only)
        head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(1)) * (head.std() / 1.01))
    with pytest.warns(UserWarning, match="different weights"):
        load_router(tmp_path, other)


def test_par_is_unavailable_with_a_router_for_another_model(tiny, config, tmp_path):
    from par_demo.predict import Predictor

    other = RouterConfig(**{**config.__dict__, "model": {**config.model, "name": "llava-1.5-7b"}})
    save_router(MetaRouter(other), tmp_path)
    predictor = Predictor(tiny)
    predictor.router_path = tmp_path
    assert "another model" in predictor.method("par").available()


# ------------------------------------------------------------------------------------------------ method
@pytest.mark.parametrize("budget", [0.9, 0.5, 0.35, 0.25])
def test_par_plans_fit_their_budgets_router_included(par_predictor, scene, budget):
    p = par_predictor.predict(scene, QUESTION, "par", budget, max_new_tokens=1)
    assert p.flops_ratio <= budget + 1e-9
    # the router's FLOPs are in the count: the same setting without them is cheaper by exactly that much
    par = par_predictor.method("par")
    query = par_predictor.engine.prepare(par_predictor.encode(scene, QUESTION))
    kept = None if len(p.kept_visual_tokens) == 144 else len(p.kept_visual_tokens)
    skip = [i for i in range(8) if i not in p.kept_layers]
    without = par_predictor.flops.prefill(query, kept, skip, p.start_layer)
    assert p.flops == pytest.approx(without + par.router.flops(query.layout, query.n_text))


@pytest.mark.parametrize("budget", [0.9, 0.5, 0.25])
def test_protected_layers_are_never_skipped(par_predictor, scene, budget):
    p = par_predictor.predict(scene, QUESTION, "par", budget, max_new_tokens=1)
    assert 0 in p.kept_layers and 7 in p.kept_layers
    p = par_predictor.predict(scene, QUESTION, "par", 1.0, layers=2, max_new_tokens=1)
    assert p.kept_layers == [0, 7]
    with pytest.raises(UserError, match="protected"):
        par_predictor.predict(scene, QUESTION, "par", 1.0, layers=1, max_new_tokens=1)


def test_fixed_versions_and_scores_for_display(par_predictor, scene):
    p = par_predictor.predict(scene, QUESTION, "par", 1.0, tokens=20, layers=6, max_new_tokens=2)
    assert len(p.kept_visual_tokens) == 20 and len(p.kept_layers) == 6
    data = json.loads(json.dumps(p.to_dict()))
    assert len(data["token_scores"]) == 144 and all(0 <= s <= 1 for s in data["token_scores"])
    assert len(data["layer_scores"]) == 8 and data["layer_scores"][0] == 1.0 and data["layer_scores"][7] == 1.0
    # the kept tokens are the router's top-20
    top = sorted(range(144), key=lambda i: -data["token_scores"][i])[:20]
    assert sorted(top) == data["kept_visual_tokens"]


def test_predict_command_with_method_par(router_dir, image_file, monkeypatch, capsys):
    from par_demo.cli import main

    monkeypatch.setenv("PAR_DEMO_ROUTER", str(router_dir))
    code = main(["predict", "--model", "random:llava-tiny", "--device", "cpu", "--image", image_file,
                 "--question", QUESTION, "--method", "par", "--budget", "0.5", "--max-new-tokens", "2", "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "par" and data["flops_ratio"] <= 0.5
    assert len(data["token_scores"]) == 144 and len(data["layer_scores"]) == 8


# ------------------------------------------------------------------------------------------------ training
def train_parts(par_predictor, config):
    from par_demo.training.flows import Budgeter
    from par_demo.training.loop import TrainConfig

    return TrainConfig(flows=4, budgets_per_query=2, beta=5.0), Budgeter(par_predictor.flops, config)


def test_flows_fit_their_budget_and_keep_protected_layers(par_predictor, config, target):
    from par_demo.training.flows import sample_flows

    _, budgeter = train_parts(par_predictor, config)
    gen = torch.Generator().manual_seed(0)
    for budget in (0.3, 0.6):
        flows = sample_flows(target, target.prior.log(), torch.zeros(8), budget, 5, 1.0, budgeter, gen)
        assert len(flows) == 5
        for flow in flows:
            assert not flow.skip & {0, 7} and flow.layers == 8 - len(flow.skip)
            kept = None if flow.keep is None else flow.keep.numel()
            cost = par_predictor.flops.prefill(target.shape, kept, flow.skip, 2,
                                               router=router_flops(config, 144, target.n_text))
            assert cost <= budget * par_predictor.flops.full(target.shape) * (1 + 1e-9)


@pytest.mark.parametrize("pairs", ["extremes", "all"])
def test_a_training_step_changes_the_weights(par_predictor, config, target, pairs):
    from dataclasses import replace

    from par_demo.training.loop import batch_loss

    train, budgeter = train_parts(par_predictor, config)
    train = replace(train, pairs=pairs)
    torch.manual_seed(0)
    router = MetaRouter(config)
    before = {k: v.clone() for k, v in router.state_dict().items()}
    optimizer = torch.optim.AdamW(router.parameters(), lr=1e-3)
    stats = {"kl_current": [], "kl_best": [], "preference": []}
    gen = torch.Generator().manual_seed(0)
    for use_router in (0.0, 1.0):  # one step from the attention prior, one from the router's own scores
        loss, _ = batch_loss(router, [target], train, budgeter, par_predictor.engine, torch.ones(8), use_router, gen,
                             stats)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert stats["preference"] and all(k >= 0 for k in stats["kl_best"])
    changed = [k for k, v in router.state_dict().items() if not torch.equal(v, before[k])]
    assert "token_head.weight" in changed and "layer_tokens" in changed


def test_preference_loss_decreases_on_a_fixed_batch(par_predictor, config, target):
    import torch.nn.functional as F

    from par_demo.training.flows import flow_kl, log_pi, sample_flows

    _, budgeter = train_parts(par_predictor, config)
    gen = torch.Generator().manual_seed(3)
    budget = 0.5
    flows = sample_flows(target, target.prior.log(), torch.zeros(8), budget, 4, 1.0, budgeter, gen)
    scored = sorted(((flow_kl(par_predictor.engine, target, f.keep, f.skip, 2)[0], f.keep, f.skip) for f in flows),
                    key=lambda s: s[0])
    best, worst = scored[0], scored[-1]
    assert best[0] <= worst[0]
    torch.manual_seed(0)
    router = MetaRouter(config)
    optimizer = torch.optim.AdamW(router.parameters(), lr=3e-3)
    routable = config.routable()
    losses = []
    for _ in range(6):
        tok, lay = router(target.visual, target.text, torch.tensor([budget]), target.layout)
        margin = log_pi(tok[0], lay[0], best[1], best[2], routable) - log_pi(tok[0], lay[0], worst[1], worst[2], routable)
        loss = -F.logsigmoid(5.0 * margin)
        losses.append(float(loss.detach()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0]


def test_train_router_command_writes_a_usable_resumable_checkpoint(tmp_path, tiny, scene):
    from par_demo.cli import main
    from par_demo.predict import Predictor

    data = tmp_path / "data"
    data.mkdir()
    scene.save(data / "a.png")
    rows = [{"image": "a.png", "question": q} for q in ("How many objects are there?", QUESTION,
                                                      "Is there a red circle?")]  # no answers: none needed
    (data / "q.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "router"
    common = ["train-router", "--model", "random:llava-tiny", "--device", "cpu", "--data", str(data / "q.jsonl"),
              "--out", str(out), "--batch", "1", "--flows", "3", "--budgets-per-query", "1", "--max-new-tokens", "2",
              "--val", "1", "--pareto-low", "0.5", "--pareto-high", "0.5", "--width", "16"]
    assert main(common + ["--steps", "1"]) == 0
    assert (out / "router.safetensors").is_file() and (out / "train_state.pt").is_file()
    assert main(common + ["--steps", "2"]) == 2  # refuses to overwrite a run without --resume
    assert main(common + ["--steps", "2", "--resume"]) == 0
    meta = json.loads((out / "router.json").read_text())
    assert meta["training"]["steps"] == 2 and meta["config"]["model"]["name"] == "random_llava-tiny"
    assert meta["pareto"] and meta["pareto"][0]["budget"] == 0.5
    predictor = Predictor(tiny)
    predictor.router_path = out
    assert predictor.method("par").available() is None
    assert meta["config"]["absorb"] and predictor.method("par").absorbs  # a new router absorbs by default

    # A shipped router has no optimizer state: --resume at its own step count only re-measures its Pareto table,
    # here without absorbing, and keeps the run's figures.
    (out / "train_state.pt").unlink()
    assert main(common + ["--steps", "2", "--resume", "--no-absorb"]) == 0
    again = json.loads((out / "router.json").read_text())
    assert not again["config"]["absorb"] and again["training"]["steps"] == 2
    assert again["training"]["flows"] == meta["training"]["flows"] > 0 and again["pareto"]
    assert not (out / "train_state.pt").is_file()  # no step was run, so no checkpoint was written
    reloaded = Predictor(tiny)
    reloaded.router_path = out
    assert reloaded.method("par").available() is None and not reloaded.method("par").absorbs


def test_a_router_saved_before_absorbing_loads_with_it_off(tiny, config, tmp_path):
    save_router(MetaRouter(config), tmp_path)
    data = json.loads((tmp_path / "router.json").read_text())
    del data["config"]["absorb"]
    (tmp_path / "router.json").write_text(json.dumps(data))
    _, meta = load_router(tmp_path, tiny)
    assert meta["config"].absorb is False


def test_train_router_refuses_bad_data(tmp_path):
    from par_demo.training.questions import read_queries

    with pytest.raises(UserError, match="not found"):
        read_queries(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png"}\n')
    with pytest.raises(UserError, match="question"):
        read_queries(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="--images"):
        read_queries(tmp_path)  # a folder given as --data
    with pytest.raises(UserError, match="no images"):
        read_queries(images=tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.png").write_text("not an image")
    with pytest.raises(UserError, match="none of the 1 images can be read"):
        read_queries(images=tmp_path)
    Image.new("RGB", (32, 24)).save(tmp_path / "sub" / "x.WEBP", format="WEBP")  # recursive, any case of the suffix
    (tmp_path / "notes.txt").write_text("not an image")
    queries = read_queries(images=tmp_path, questions_per_image=3)  # the broken file is left out, said on stderr
    assert len(queries) == 3 and all(q.question is None and q.image.endswith("x.WEBP") for q in queries)


def test_par_budget_out_of_reach_is_one_clear_message(par_predictor, scene):
    with pytest.raises(UserError, match="below what par can reach"):
        par_predictor.predict(scene, QUESTION, "par", 0.01, max_new_tokens=1)


@pytest.mark.parametrize("budget", [0.8, 0.5, 0.35])
def test_ablations_route_only_their_part_within_the_budget(par_predictor, scene, budget):
    tokens_only = par_predictor.predict(scene, QUESTION, "par-tokens", budget, max_new_tokens=1)
    assert tokens_only.flops_ratio <= budget + 1e-9 and len(tokens_only.kept_layers) == 8
    assert len(tokens_only.kept_visual_tokens) < tokens_only.n_visual_tokens
    layers_only = par_predictor.predict(scene, QUESTION, "par-layers", budget, max_new_tokens=1)
    assert layers_only.flops_ratio <= budget + 1e-9 and len(layers_only.kept_visual_tokens) == 144
    assert len(layers_only.kept_layers) < 8 and 0 in layers_only.kept_layers and 7 in layers_only.kept_layers


def test_attention_prior_ablation_charges_its_attention_row_not_a_router(par_predictor, scene):
    prior = par_predictor.predict(scene, QUESTION, "par-prior", 0.5, max_new_tokens=1)
    assert prior.flops_ratio <= 0.5 + 1e-9
    k = prior.start_layer
    assert k >= 1 and k - 1 in prior.kept_layers  # FastV's row is read at layer K-1, so it runs
    query = par_predictor.engine.prepare(par_predictor.encode(scene, QUESTION))
    skip = [i for i in range(8) if i not in prior.kept_layers]
    kept = len(prior.kept_visual_tokens)
    assert kept < 144
    expected = par_predictor.flops.prefill(query, kept, skip, k, attention_rows=1)
    assert prior.flops == pytest.approx(expected)


def test_ablations_refuse_overrides_of_the_part_they_do_not_route(par_predictor, scene):
    with pytest.raises(UserError, match="par-tokens does not skip layers"):
        par_predictor.predict(scene, QUESTION, "par-tokens", 1.0, tokens=10, layers=4, max_new_tokens=1)
    with pytest.raises(UserError, match="par-layers does not prune tokens"):
        par_predictor.predict(scene, QUESTION, "par-layers", 1.0, tokens=10, max_new_tokens=1)


def test_the_relevance_prior_is_cdpruner_s_question_relevance(par_predictor, image_file):
    from par_demo.images import load_image
    from par_demo.methods.cdpruner import instruction_tokens, relevance
    from par_demo.training.targets import make_target

    target = make_target(par_predictor, image_file, QUESTION, start_layer=0, max_new_tokens=2, prior="relevance")
    query = par_predictor.engine.prepare(par_predictor.encode(load_image(image_file), QUESTION))
    torch.testing.assert_close(target.prior, relevance(query.image_features, instruction_tokens(query)))
    deeper = make_target(par_predictor, image_file, QUESTION, start_layer=0, max_new_tokens=2, prior_layer=3)
    assert deeper.prior.shape == (144,) and not torch.allclose(deeper.prior, target.prior)


def test_the_cdpruner_prior_ranks_tokens_in_cdpruner_s_own_pick_order(par_predictor, image_file):
    from par_demo.images import load_image
    from par_demo.methods.cdpruner import greedy_dpp, instruction_tokens, relevance
    from par_demo.methods.base import top_indices
    from par_demo.training.targets import make_target

    target = make_target(par_predictor, image_file, QUESTION, start_layer=0, max_new_tokens=2, prior="cdpruner")
    query = par_predictor.engine.prepare(par_predictor.encode(load_image(image_file), QUESTION))
    quality = relevance(query.image_features, instruction_tokens(query))
    assert bool((target.prior > 0).all())
    for k in (5, 20, 60):  # the prior's top k is CDPruner's selection of k, whatever k the flows keep
        picked = greedy_dpp(query.image_features, quality, k).sort().values
        assert top_indices(target.prior, k).tolist() == picked.tolist()


def test_a_dpp_router_keeps_a_diverse_set_of_its_best_tokens_and_pays_for_choosing(tiny, config, scene, tmp_path):
    from dataclasses import replace

    from par_demo.methods.base import Setting
    from par_demo.methods.cdpruner import dpp_flops, greedy_dpp
    from par_demo.methods.par import standardise
    from par_demo.predict import Predictor

    torch.manual_seed(0)
    predictor = Predictor(tiny)
    predictor.router_path = save_router(MetaRouter(replace(config, token_selection="dpp", start_layer=0)), tmp_path)
    p = predictor.predict(scene, QUESTION, "par", 0.4, max_new_tokens=1)
    assert p.flops_ratio <= 0.4
    par = predictor.method("par")
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    tokens, _ = par.route(query, 0.4)
    kept = len(p.kept_visual_tokens)
    expected = greedy_dpp(query.image_features, torch.sigmoid(standardise(tokens)), kept).sort().values
    assert p.kept_visual_tokens == expected.tolist()  # the 12 x 12 grid is row-major: cell = token index
    assert par.extra_flops(query, Setting(kept, frozenset(), 0)) == \
        par.router.flops(query.layout, query.n_text) + dpp_flops(144, kept, 128)



def test_par_prior_refuses_fewer_layers_than_it_runs_with_its_attention_row(par_predictor, scene):
    # its router's K is 2: layer 1, which the router may skip, runs for FastV's row, so 2 layers would run 3
    with pytest.raises(UserError, match="par-prior keeps at least 3 layers"):
        par_predictor.predict(scene, QUESTION, "par-prior", 1.0, layers=2, max_new_tokens=1)
    assert len(par_predictor.predict(scene, QUESTION, "par-prior", 1.0, layers=3, max_new_tokens=1).kept_layers) == 3
