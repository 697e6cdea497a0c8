"""Time budgets (`--budget-unit time`): every method takes the largest setting whose predicted prefill time fits the
budget, with a cost model read from the cache (written here, so the test is exact and takes no timing), and a budget
below the fastest setting names the smallest time budget within reach."""

from __future__ import annotations

import json

import pytest

import par_demo
from par_demo import cli, cost
from par_demo.disk_cache import cache_path, write_json
from par_demo.errors import BudgetOutOfReach
from par_demo.methods import METHODS
from par_demo.predict import Predictor

QUESTION = "What color is the circle?"
# A small model's shape of time: a third of the prefill fixed, a layer half fixed, half per row
FIXED, PER_LAYER, PER_ROW = 4e-3, 3e-4, 2e-6


@pytest.fixture
def timed(random_models, monkeypatch, tmp_path):
    """The tiny LLaVA with a known cost model in its cache (made up: the check of a cached fit against a fresh
    prefill is switched off)."""
    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path))
    monkeypatch.setattr(cost, "cache_drift", lambda *a, **k: 1.0)
    predictor = Predictor(random_models("llava-tiny"))
    query = predictor.engine.prepare(predictor.encode(cost.calibration_image(), cost.CALIBRATION_QUESTION))
    known = cost.PrefillCost(query.n_visual, query.n_text, predictor.engine.n_layers, FIXED, PER_LAYER, PER_ROW, 0.0,
                             cost.cost_key(predictor), overheads={name: 1e-4 for name in METHODS if name != "full"})
    write_json(cache_path(cost.CACHE_KIND, known.key), known.to_dict())
    monkeypatch.setattr(cost, "measure_splits", lambda *a, **k: pytest.fail("the cached cost model was not used"))
    return predictor, known


# With this cost model every token method reaches 0.95 and 0.9 (each layer keeps its fixed half, so 0.6 is layer
# drop's alone): the test checks all of them where they can run, and says which could not.
@pytest.mark.parametrize("budget, reachable", [
    (0.95, {"fastv", "random", "layerdrop", "visionzip", "divprune", "cdpruner", "downsample"}),
    (0.9, {"fastv", "random", "layerdrop", "visionzip", "divprune", "cdpruner", "downsample"}),
    (0.6, {"layerdrop"}),
])
def test_every_method_takes_the_largest_setting_whose_predicted_time_fits(timed, scene, budget, reachable):
    predictor, known = timed
    query = predictor.engine.prepare(predictor.encode(scene, QUESTION))
    full = known.full(query.n_visual, query.n_text)
    checked = set()
    for name in ("fastv", "random", "layerdrop", "visionzip", "divprune", "cdpruner", "downsample"):
        method = predictor.method(name)
        try:
            plan, setting = method.plan(query, budget, unit="time")
        except BudgetOutOfReach:
            continue
        checked.add(name)
        seconds = method.setting_cost(query, setting, "time")
        assert seconds <= budget * full * (1 + 1e-9), name
        layers_run = known.n_layers - len(setting.skip)
        assert seconds == pytest.approx(1e-4 + known.predict(setting.tokens, layers_run, setting.start_layer,
                                                              query.n_visual, query.n_text))
        richer = [s for s in method.candidates(query, setting.start_layer)
                  if method.setting_cost(query, s, "time") > seconds]
        assert all(method.setting_cost(query, s, "time") > budget * full for s in richer), name
    assert checked == reachable


def test_time_is_harder_to_save_than_flops_where_much_of_it_is_fixed(timed, scene):
    predictor, _ = timed
    by_flops = predictor.predict(scene, QUESTION, "fastv", 0.9, max_new_tokens=1)
    by_time = predictor.predict(scene, QUESTION, "fastv", 0.9, max_new_tokens=1, budget_unit="time")
    assert by_time.budget_unit == "time" and by_flops.time_ratio is None
    assert by_time.time_ratio <= 0.9 and len(by_time.kept_visual_tokens) < len(by_flops.kept_visual_tokens)
    assert by_time.flops_ratio < 0.9  # a tenth of the time saved took more than a tenth of the FLOPs


def test_a_time_budget_below_the_fixed_cost_names_the_smallest_reachable_one(timed, scene):
    predictor, _ = timed
    with pytest.raises(BudgetOutOfReach) as error:
        predictor.predict(scene, QUESTION, "fastv", 0.2, max_new_tokens=1, budget_unit="time")
    message = str(error.value)
    assert "\n" not in message and "of the full prefill time on this machine" in message
    reach = float(message.split("costs ")[1].split(" ")[0])
    assert 0.2 < reach < 1 and predictor.predict(scene, QUESTION, "fastv", reach + 0.01, max_new_tokens=1,
                                                 budget_unit="time").time_ratio <= reach + 0.01


def test_predict_json_and_the_api_carry_the_unit_and_the_predicted_time(timed, scene, tmp_path, capsys):
    predictor, _ = timed
    image = tmp_path / "scene.png"
    scene.save(image)
    assert cli.main(["predict", "--model", "random:llava-tiny", "--device", "cpu", "--image", str(image),
                     "--question", QUESTION, "--method", "layerdrop", "--budget", "0.6", "--budget-unit", "time",
                     "--rounds", "1", "--json"]) == 0
    reply = json.loads(capsys.readouterr().out)
    assert reply["budget_unit"] == "time" and reply["time_ratio"] <= 0.6 and reply["flops_ratio"] < 0.6
    pruner = par_demo.Pruner(predictor)
    result = pruner.generate(scene, QUESTION, method="layerdrop", budget=0.6, budget_unit="time")
    assert {k: result.to_dict()[k] for k in ("kept_layers", "time_ratio", "budget_unit")} == {
        k: reply[k] for k in ("kept_layers", "time_ratio", "budget_unit")}
    with pytest.raises(par_demo.UserError, match="budget unit must be one of"):
        pruner.generate(scene, QUESTION, method="layerdrop", budget_unit="seconds")


def test_the_app_in_time_budgets_shows_the_predicted_time_and_times_the_same_settings(timed, scene, monkeypatch):
    import app as app_module
    from par_demo import panels
    from par_demo.demo import DemoApp
    from par_demo.service import DemoService

    predictor, _ = timed
    units = []
    real_generate = predictor.generate

    def recorded(*args, **kwargs):  # every run the service makes, the timing rounds included
        if kwargs.get("method", args[2] if len(args) > 2 else "full") != "full":
            units.append(kwargs.get("budget_unit"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(predictor, "generate", recorded)
    service = DemoService(predictor, "random:llava-tiny", predictor.engine.n_layers, predictor.loaded.max_visual_tokens,
                          max_new_tokens=2, rounds=2, budget_unit="time")
    comparison = service.compare(scene, QUESTION, "layerdrop", 0.6)
    assert comparison.pruned.budget_unit == "time" and comparison.pruned.time_ratio <= 0.6
    assert comparison.pruned.timing.rounds == 2 and comparison.full.timing.rounds == 2
    assert "predicted time" in panels.stats_markdown(comparison.pruned)
    *_, state = service.compare_all(scene, QUESTION, 0.9, rounds=1)
    assert state.results and all(p.budget_unit == "time" and p.time_ratio <= 0.9 for p in state.results.values())
    points = list(service.sweep(scene, QUESTION, "layerdrop", budgets=(0.9, 0.6), rounds=1))
    assert [p["budget"] for p in points] == [0.9, 0.6] and all("timing" in p for p in points)
    assert len(units) > 10 and set(units) == {"time"}  # answers and timing rounds alike ran time-budget plans

    monkeypatch.delenv("PAR_BUDGET_UNIT", raising=False)
    assert app_module.parse_args([]).budget_unit == "time"  # the app's default: what a visitor feels
    monkeypatch.setattr(app_module, "zerogpu_enabled", lambda: True)
    assert app_module.parse_args([]).budget_unit == "flops"  # ZeroGPU: no GPU at start-up to time
    monkeypatch.setenv("PAR_BUDGET_UNIT", "flops")
    assert app_module.parse_args(["--budget-unit", "time"]).budget_unit == "time"
    page = app_module.build_demo(DemoApp(service))
    assert app_module.BUDGET_LABELS["time"] in str(page.config)


def test_the_first_time_budget_call_measures_the_cost_model_before_its_prefill(random_models, scene, monkeypatch,
                                                                               tmp_path):
    """No cost model yet: it is measured (a few seconds) before the query's timed prefill, not inside it, and the
    measurement leaves no state behind (the second call chooses and answers the same)."""
    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path))
    predictor = Predictor(random_models("llava-tiny"))
    real_generate = predictor.engine.generate
    entered_with = []

    def watched(*args, **kwargs):
        entered_with.append(predictor._time_budget is not None and "fastv" in predictor._time_budget.overheads)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(predictor.engine, "generate", watched)
    first = predictor.predict(scene, QUESTION, "fastv", 0.95, max_new_tokens=2, budget_unit="time")
    assert entered_with and entered_with[-1]  # the query's own run began with the cost model in place
    second = predictor.predict(scene, QUESTION, "fastv", 0.95, max_new_tokens=2, budget_unit="time")
    assert first.kept_visual_tokens == second.kept_visual_tokens and first.time_ratio == second.time_ratio
    assert first.prefill_s < 20 * second.prefill_s  # the calibration's seconds are not in the first prefill


def test_par_takes_the_most_accurate_scored_split_that_fits_the_time(timed, scene, tmp_path):
    """PAR's time budgets choose among every split its Pareto measurement scored, not only the best of each FLOPs
    budget: here the FLOPs-best row (6 of 8 layers) fits 0.7 of the time with a handful of tokens, while a scored
    4-layer split agreed more often with the full model and fits with most tokens kept."""
    from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router

    predictor, _ = timed
    config = RouterConfig(lm_width=128, n_layers=8, width=16, heads=1, start_layer=0,
                          model=fingerprint(predictor.loaded))
    best = [{"budget": 0.3, "layers": 6, "tokens": 8, "kl": 0.2, "agreement": 0.90}]
    scored = best + [{"budget": 0.3, "layers": 4, "tokens": 30, "kl": 0.1, "agreement": 0.97},
                     {"budget": 0.5, "layers": 8, "tokens": 40, "kl": 0.0, "agreement": 1.0}]  # does not fit 0.7
    kept = {}
    for name, extra in (("scored", {"training": {"pareto_all": scored}}), ("best only", {})):
        predictor.router_path = save_router(MetaRouter(config), tmp_path / name, best, extra)
        predictor.methods.clear()
        p = predictor.predict(scene, QUESTION, "par", 0.7, max_new_tokens=1, budget_unit="time")
        assert p.time_ratio <= 0.7 + 1e-9
        kept[name] = (len(p.kept_layers), len(p.kept_visual_tokens))
    assert kept["scored"][0] == 4 and kept["scored"][1] > 30  # the 4-layer split, as many tokens as fit
    assert kept["best only"][0] == 6 and kept["best only"][1] < 30  # a router without its scored splits: as before


def test_par_routes_a_time_budget_once_at_the_flops_budget_its_split_was_scored_at(timed, scene, tmp_path,
                                                                                    monkeypatch):
    """The router is conditioned on a budget; the Pareto measurement scored each split with the router at that
    split's FLOPs budget. A time budget's split is routed the same way (and once), not at the time budget."""
    from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router

    predictor, _ = timed
    config = RouterConfig(lm_width=128, n_layers=8, width=16, heads=1, start_layer=0,
                          model=fingerprint(predictor.loaded))
    scored = [{"budget": 0.3, "layers": 4, "tokens": 30, "kl": 0.1, "agreement": 0.97},
              {"budget": 0.5, "layers": 8, "tokens": 40, "kl": 0.0, "agreement": 1.0}]  # does not fit 0.7
    predictor.router_path = save_router(MetaRouter(config), tmp_path / "router", scored[:1],
                                        {"training": {"pareto_all": scored}})
    predictor.methods.clear()
    routed_at = []
    real_forward = MetaRouter.forward

    def recorded(self, visual, text, budgets, layout):
        routed_at.append(budgets.tolist())
        return real_forward(self, visual, text, budgets, layout)

    monkeypatch.setattr(MetaRouter, "forward", recorded)
    p = predictor.predict(scene, QUESTION, "par", 0.7, max_new_tokens=1, budget_unit="time")
    assert len(p.kept_layers) == 4 and routed_at == [[pytest.approx(0.3)]]


def test_only_undominated_scored_splits_are_searched_best_first():
    from par_demo.methods.par import undominated

    rows = [{"layers": 6, "tokens": 40, "kl": 0.1, "agreement": 0.95},
            {"layers": 8, "tokens": 40, "kl": 0.2, "agreement": 0.95},  # more layers, no better: never the choice
            {"layers": 6, "tokens": 60, "kl": 0.1, "agreement": 0.90},  # more tokens, worse
            {"layers": 8, "tokens": 50, "kl": 0.0, "agreement": 0.99},
            {"layers": 4, "tokens": 20, "kl": 0.5, "agreement": 0.80},
            {"layers": 4, "tokens": 20, "kl": 0.5, "agreement": 0.80}]  # a duplicate
    assert [(r["layers"], r["tokens"]) for r in undominated(rows)] == [(8, 50), (6, 40), (4, 20)]


def test_the_readmes_accuracy_against_time_table_is_what_the_shipped_measurements_give(tmp_path):
    """scripts/plot_accuracy_time.py on the JSON files under docs/benchmarks/ prints the README's table (and writes
    the figure's HTML): the README shows the measurements, not numbers typed in by hand."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "scripts/plot_accuracy_time.py",
                           "--eval", "docs/benchmarks/cpu-eval-time-budget-embedded-576-epyc.jsonl",
                           "--bench", "docs/benchmarks/cpu-time-budget-embedded-576-epyc.json",
                           "--html", str(tmp_path / "figure.html")], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    table = done.stdout.strip()
    assert table.count("\n") >= 9 and table in (root / "README.md").read_text()
    assert (tmp_path / "figure.html").stat().st_size > 100_000  # plotly.js inside: it opens offline
