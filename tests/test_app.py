"""The app's model side and handlers: cache, timing in every request, compare, compare all, sweep, figures, errors.

Runs on the tiny random LLaVA (`random:llava-tiny`, from conftest) so it is fast and needs no checkpoint. The
public API through a real server is in test_app_api.py.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import gradio as gr
import plotly.graph_objects as go
import pytest

from par_demo import demo as d
from par_demo import panels, viz
from par_demo import service as s
from par_demo import zerogpu
from par_demo.errors import UserError
from par_demo.inputs import EXTRA_GROUPS, METHOD_CHOICES
from par_demo.predict import Predictor
from par_demo.model_card import ModelCard
from par_demo.predict import Prediction

EXAMPLE = str(s.EXAMPLES_DIR / "shapes_where.png")
QUESTION = "Where is the blue square?"
PREDICT_JSON_KEYS = {f.name for f in dataclasses.fields(Prediction)}  # what `predict --json` prints
ROUNDS = 2  # timed rounds per request in these tests (the app uses 5); enough to have a spread
NO_PROGRESS = dict(progress=lambda *a, **k: None)
OF_THE_FIELD = [name for _, name in METHOD_CHOICES if not any(name in group for group in EXTRA_GROUPS.values())]


class CountingPredictor:
    """Wraps the real predictor and records every model call: answers ("full") and timed runs ("timed full")."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[str] = []
        self.threads: set[int] = set()  # the threads the model ran on

    def available_methods(self):
        return self.inner.available_methods()

    def model_view(self, image):
        self.threads.add(threading.get_ident())
        return self.inner.model_view(image)

    def encode(self, image, question):
        return self.inner.encode(image, question)

    def predict(self, image, question, method="full", **kwargs):
        self.calls.append(method)
        self.threads.add(threading.get_ident())
        return self.inner.predict(image, question, method, **kwargs)

    def generate(self, image, question, method="full", **kwargs):
        self.calls.append(f"timed {method}")
        self.threads.add(threading.get_ident())
        return self.inner.generate(image, question, method, **kwargs)

    measure = Predictor.measure  # the real timing rounds, calling the counted `generate`


SHORT_SWEEP = (1.0, 0.5, 0.2)  # the app sweeps ten budgets; three show the same behaviour, faster


@pytest.fixture(scope="module")
def service(tiny, predictor):
    # The random model never stops early: 4 new tokens instead of 16 keep the tests fast.
    return s.DemoService(CountingPredictor(predictor), tiny.name, tiny.n_layers, tiny.max_visual_tokens,
                         cache_items=4, max_new_tokens=4, rounds=ROUNDS)


@pytest.fixture(scope="module")
def app(service):
    return d.DemoApp(service, sweep_budgets=SHORT_SWEEP)


def test_answer_agreement():
    assert s.answer_agreement("Bottom right.", "bottom right") == 1.0
    assert s.answer_agreement("red", "blue") == 0.0
    assert 0 < s.answer_agreement("top left", "bottom left") < 1


def test_lru_cache_is_bounded():
    cache = s.LRUCache(2)
    for key in "abc":
        cache.put(key, key.upper())
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "C"


# ------------------------------------------------------------------------------------------- the service
def test_full_answer_is_cached_but_its_timing_is_measured_in_every_request(service):
    calls = service.predictor.calls
    calls.clear()
    first = service.compare(EXAMPLE, QUESTION, "fastv", 0.6)
    second = service.compare(EXAMPLE, QUESTION, "random", 0.7)
    assert [c for c in calls if not c.startswith("timed")] == ["full", "fastv", "random"]  # one full answer
    assert calls.count("timed full") == 2 * ROUNDS  # ...but two full timings, one per request
    assert calls[2:2 + 2 * ROUNDS] == ["timed full", "timed fastv"] * ROUNDS  # in turns with the pruned run
    assert not first.full_from_cache and second.full_from_cache
    assert first.full.answer == second.full.answer
    assert first.full.timing is not second.full.timing
    assert second.pruned.method == "random" and second.pruned.flops_ratio <= 0.7 + 1e-6
    assert first.model_view.size[0] > 0 and first.prefill_speedup > 0


def test_stats_carry_rounds_spread_and_the_speedup_of_medians(service):
    result = service.compare(EXAMPLE, QUESTION, "fastv", 0.5)
    for prediction in (result.full, result.pruned):
        t = prediction.timing
        assert t.rounds == ROUNDS
        assert t.prefill_s.low <= t.prefill_s.median <= t.prefill_s.high == prediction.timing.prefill_s.high
        assert prediction.prefill_s == t.prefill_s.median and prediction.total_s == t.total_s.median
    pruned = result.pruned.timing
    assert pruned.prefill_speedup.median == pytest.approx(result.full.prefill_s / result.pruned.prefill_s)
    assert pruned.speedup_bound == pytest.approx(1 / result.pruned.flops_ratio)
    assert result.full.timing.prefill_speedup is None  # the reference has no speed-up over itself
    stats = result.pruned.to_dict()
    assert set(stats["timing"]["prefill_s"]) == {"median", "low", "high"} and stats["timing"]["rounds"] == ROUNDS


def test_warm_up_runs_the_full_model_twice_and_every_available_method_once_then_finds_its_lowest_budget(
        service, app):
    service.predictor.calls.clear()
    service.warm_up()
    available = [name for _, name in METHOD_CHOICES if not service.available_methods().get(name)]
    # each method at 0.5, then planned at 0.01, which it refuses naming the smallest budget it can reach
    assert service.predictor.calls == ["full", "full", *[name for name in available for _ in range(2)]]
    assert service.rounds == ROUNDS  # rounds given when the service was built are kept
    assert set(service.reach) == set(available) and all(0.01 <= r < 1 for r in service.reach.values())
    assert service.reach["fastv"] > service.reach["random"]  # FastV's layers before K see every token
    note = app.budget_note("fastv")["info"]
    assert note.startswith(f"FastV goes down to about {service.reach['fastv']:.2f} here")
    assert app.budget_note("par")["info"] is None  # unavailable (no router for the tiny model): nothing measured


def test_warm_up_chooses_the_rounds_from_the_full_models_speed(service, monkeypatch):
    # not given: as many as fit half a second of runs (`timing.rounds_for`), from the full model's second, warm run
    monkeypatch.setattr(service, "rounds_given", False)  # the fixture is shared: both are restored afterwards
    monkeypatch.setattr(service, "rounds", service.rounds)
    seen = []
    monkeypatch.setattr(s.timing, "rounds_for", lambda full_s: seen.append(full_s) or 4)
    service.warm_up()
    assert service.rounds == 4 and len(seen) == 1 and seen[0] > 0


def test_every_model_call_runs_on_the_one_model_thread_whichever_thread_asks(service):
    # Gradio answers on worker threads and the warm-up runs on one of its own; on a CPU each thread that calls the
    # model would start an OpenMP team of its own, and two teams on 2 cores slow every kernel (par_demo.model_thread)
    service.predictor.threads.clear()
    service.view_cache = s.LRUCache(4)  # the model view is computed again, on the model thread
    askers = [threading.Thread(target=service.compare, args=(EXAMPLE, QUESTION, "fastv", budget))
              for budget in (0.5, 0.7)]
    askers.append(service.start_warm_up())
    for asker in askers[:2]:
        asker.start()
    for asker in askers:
        asker.join()
    service.compare(EXAMPLE, QUESTION, "random", 0.5)  # and from this thread
    assert service.predictor.threads == {service.model_thread.ident}
    assert service.model_thread.ident != threading.get_ident()


def test_the_model_is_loaded_on_the_thread_that_answers(tiny, monkeypatch):
    import par_demo.models

    loaded_on = []
    monkeypatch.setattr(par_demo.models, "load_model",
                        lambda spec, **options: loaded_on.append(threading.get_ident()) or tiny)
    service = s.DemoService.from_model("any", max_new_tokens=2, rounds=1)
    service.predictor = CountingPredictor(service.predictor)
    service.compare(EXAMPLE, QUESTION, "random", 0.5)
    assert loaded_on == [service.model_thread.ident] and service.predictor.threads == set(loaded_on)


def test_the_warm_up_times_the_split_grid_first_then_each_methods_own_work(tiny, monkeypatch, tmp_path):
    # the page is served once the model is loaded; the cost model (2 s on the default model, 13 methods' own work
    # 10 s more) is measured by the warm-up, while the page is served
    import par_demo.models
    from par_demo import cost

    monkeypatch.setenv("PAR_DEMO_CACHE", str(tmp_path))
    # Only "any" is the tiny model: a module that imports `load_model` by name while this patch holds (the CLI's
    # arguments, imported on first use) keeps the stand-in for the rest of the session, so it must load the others.
    real_load_model = par_demo.models.load_model
    monkeypatch.setattr(par_demo.models, "load_model",
                        lambda spec, *args, **kw: tiny if spec == "any" else real_load_model(spec, *args, **kw))
    timed = []
    monkeypatch.setattr(cost, "method_overhead",
                        lambda predictor, fitted, name, *a, **k: 0.0 if name == "full" else timed.append(name) or 1e-4)
    service = s.DemoService.from_model("any", max_new_tokens=2, rounds=1, budget_unit="time")
    assert service.predictor._time_budget is None  # nothing timed before the page is served
    grid_first = []
    real_calibrate = cost.calibrate
    monkeypatch.setattr(cost, "calibrate", lambda *a, **k: grid_first.append(list(timed)) or real_calibrate(*a, **k))
    service.warm_up()
    assert grid_first == [[]] and service.predictor.time_budget().cost.points  # the grid, before any method
    assert "fastv" in timed and "layerdrop" in timed


def test_cache_key_includes_the_question(service):
    service.predictor.calls.clear()
    service.compare(EXAMPLE, QUESTION, "fastv", 0.6)
    service.compare(EXAMPLE, "How many objects are there?", "fastv", 0.6)
    assert service.predictor.calls.count("full") == 1  # only the new question needed a full answer


def test_sweep_covers_all_budgets_and_times_the_full_model_at_each(service):
    assert s.SWEEP_BUDGETS == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    points = list(service.sweep(EXAMPLE, QUESTION, "random", budgets=(1.0, 0.5, 0.05), rounds=ROUNDS))
    assert [p["budget"] for p in points] == [1.0, 0.5, 0.05]
    done = [p for p in points if "skipped" not in p]
    assert done and all(0 < p["flops_ratio"] <= p["budget"] + 1e-6 for p in done)
    assert all(p["full_timing"].rounds == ROUNDS and p["timing"].prefill_speedup is not None for p in done)
    assert "below" in points[-1]["skipped"]  # no setting is that cheap (the vision tower alone costs more): noted


def test_compare_all_streams_every_method_then_times_them_together(service):
    service.predictor.calls.clear()
    states = [(dict(st.results), list(st.pending), st.timed) for st in service.compare_all(EXAMPLE, QUESTION, 0.6,
                                                                                          rounds=ROUNDS)]
    available = [name for name in OF_THE_FIELD if not service.available_methods().get(name)]
    assert states[0] == ({}, available, False)  # first an empty grid with every method waiting
    assert [len(results) for results, _, _ in states[1:-1]] == list(range(1, len(available) + 1))
    final, pending, timed = states[-1]
    assert timed and not pending and list(final) == available
    assert all(p.flops_ratio <= 0.6 + 1e-6 and p.timing.rounds == ROUNDS for p in final.values())
    # The answering pass (full, then each method) is the first round; the other rounds follow, in the same turns.
    assert service.predictor.calls == ["full", *available] + (["timed full"] + [f"timed {n}" for n in available]) * (
        ROUNDS - 1)


def test_compare_all_shows_the_image_first_and_caches_the_full_answer_for_compare(service):
    first = next(service.compare_all(EXAMPLE, QUESTION, 0.6, rounds=1))
    assert first.model_view is not None and not first.results and first.pending
    service.predictor.calls.clear()
    comparison = service.compare(EXAMPLE, QUESTION, "fastv", 0.6)
    assert comparison.full_from_cache and comparison.full.answer == first.full.answer
    assert service.predictor.calls[0] == "fastv"  # the full model did not answer again, only its timing rounds ran


def test_compare_all_runs_the_baselines_and_ablations_only_when_asked(service):
    *_, plain = service.compare_all(EXAMPLE, QUESTION, 0.6, rounds=1)
    extras = [name for names in EXTRA_GROUPS.values() for name in names]
    assert plain.left_out == [n for _, n in METHOD_CHOICES if n in extras] and "Not run this time" in (
        panels.all_methods_summary(plain))
    *_, every = service.compare_all(EXAMPLE, QUESTION, 0.6, rounds=1, extras=["baseline", "ablation"])
    assert not every.left_out and set(every.results) | set(every.skipped) == {n for _, n in METHOD_CHOICES}
    *_, baselines = service.compare_all(EXAMPLE, QUESTION, 0.6, rounds=1, extras="baseline")
    assert set(baselines.results) >= set(EXTRA_GROUPS["baseline"]) and baselines.left_out == EXTRA_GROUPS["ablation"]
    with pytest.raises(UserError, match="Unknown extra methods 'everything'"):
        next(service.compare_all(EXAMPLE, QUESTION, 0.6, extras=["everything"]))


def test_compare_all_lists_what_could_not_run_and_why(service):
    *_, state = service.compare_all(EXAMPLE, QUESTION, 0.12, rounds=1, extras=["baseline", "ablation"])
    assert "train-router" in state.skipped["par"]  # no router for the tiny model
    assert any("below what" in reason for reason in state.skipped.values())  # out of reach at this budget
    reply = state.to_dict()
    assert all(set(entry) == PREDICT_JSON_KEYS for entry in reply["methods"])
    assert {entry["method"] for entry in reply["methods"]} | set(state.skipped) == {n for _, n in METHOD_CHOICES}


def test_an_uploaded_photo_on_a_synthetic_only_model_gets_a_notice(tiny, predictor, scene, tmp_path):
    card = ModelCard(name="ShapesVQA LLaVA", source="embedded", family="LLaVA", parameters=1, visual_tokens=144,
                     layers=8, trained_on="synthetic shape scenes only", synthetic_only=True)
    service = s.DemoService(predictor, tiny.name, tiny.n_layers, tiny.max_visual_tokens, max_new_tokens=2, card=card,
                            rounds=1)
    photo = tmp_path / "mine.png"
    scene.save(photo)
    assert service.compare(EXAMPLE, QUESTION, "fastv", 0.6).image_notice is None  # an example: no notice
    notice = service.compare(str(photo), QUESTION, "fastv", 0.6).image_notice
    assert "synthetic shape scenes only" in notice and "guesses" in notice
    *_, every = service.compare_all(str(photo), QUESTION, 0.6, rounds=1)  # ...and next to all methods' answers
    assert every.notices == [notice] and notice in panels.all_methods_summary(every)
    # a question in words the model never saw (its tokenizer reads each as one unknown token): said the same way
    assert service.compare(EXAMPLE, QUESTION, "fastv", 0.6).question_notice is None
    asked = service.compare(EXAMPLE, "What is the capital of France?", "fastv", 0.6).question_notice
    assert "not “capital”, “of”, “France”" in asked and "guess" in asked


# ------------------------------------------------------------------------------------------- handlers and figures
def test_run_handler_outputs(app):
    outputs = app.run(EXAMPLE, QUESTION, "fastv", 0.6, 0, 0, 2, d.PATCH_VIEWS[0], **NO_PROGRESS)
    assert len(outputs) == d.DemoApp.N_RUN_OUTPUTS
    full, full_timing, pruned, pruned_timing, notice, stats, patches, layers, latency, stats_json, state = outputs
    assert isinstance(full, str) and full and pruned["label"] == "Pruned answer — FastV at budget 0.60"
    assert "prefill" in full_timing and f"medians of {ROUNDS} rounds" in full_timing
    assert "×" in pruned_timing and "FLOPs allow" in pruned_timing and "–" in pruned_timing  # spread shown
    assert notice == ""  # no model card saying the model is synthetic-only
    assert "FLOPs" in stats and "visual tokens" in stats
    assert all(isinstance(fig, go.Figure) for fig in (patches, layers, latency))
    assert "kept" in patches.layout.title.text
    assert set(stats_json) == PREDICT_JSON_KEYS
    by_hand = app.run(EXAMPLE, QUESTION, "fastv", 0.6, 9, 0, 2, d.PATCH_VIEWS[0], **NO_PROGRESS)[2]
    assert by_hand["label"] == "Pruned answer — FastV, visual tokens set by hand (budget not used)"
    scores_view = app.redraw_patches(state, d.PATCH_VIEWS[1])
    assert "attention score" in scores_view.layout.title.text  # FastV has per-patch scores
    assert any(isinstance(t, go.Heatmap) and t.showscale is not False for t in scores_view.data)


def test_a_refused_input_is_a_warning_that_leaves_the_page_as_it_was(app, monkeypatch):
    # an error badge over every output, the last result still under them, is what Gradio shows for a gr.Error
    warned = []
    monkeypatch.setattr(d.gr, "Warning", warned.append)
    outputs = app.run(EXAMPLE, "  ", "fastv", 0.5, 0, 0, 2, d.PATCH_VIEWS[0], **NO_PROGRESS)
    assert outputs == d.skip(d.DemoApp.N_RUN_OUTPUTS) and "question" in warned[-1]
    assert app.run(EXAMPLE, QUESTION, "par", 0.5, 0, 0, 2, d.PATCH_VIEWS[0], **NO_PROGRESS) == \
        d.skip(d.DemoApp.N_RUN_OUTPUTS) and "not available" in warned[-1]
    assert list(app.compare_all(EXAMPLE, "", 0.5, 2, **NO_PROGRESS)) == [d.skip(3)] and "question" in warned[-1]
    swept = list(app.sweep(None, QUESTION, "fastv", 2, **NO_PROGRESS))
    assert swept[-1] == (gr.skip(), gr.skip(), "") and "image" in warned[-1]  # the "Sweeping …" line cleared
    with pytest.raises(gr.Error, match="question"):  # the API's endpoint: a script must see the error
        app.api_compare(EXAMPLE, "  ", "fastv", 0.5)


def test_slider_before_any_input_does_nothing(app):
    outputs = app.rerun(None, "", "fastv", 0.5, 0, 0, 2, d.PATCH_VIEWS[0], **NO_PROGRESS)
    assert len(outputs) == d.DemoApp.N_RUN_OUTPUTS and all(output == gr.skip() for output in outputs)


def test_out_of_memory_becomes_a_message_and_the_next_request_works(tiny, predictor):
    class RunsOutOnce(CountingPredictor):
        def predict(self, image, question, method="full", **kwargs):
            if not self.calls:
                self.calls.append("oom")
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().predict(image, question, method, **kwargs)

    app = d.DemoApp(s.DemoService(RunsOutOnce(predictor), tiny.name, tiny.n_layers, tiny.max_visual_tokens,
                                  max_new_tokens=2, rounds=1))
    args = (EXAMPLE, QUESTION, "random", 0.6, 0, 0, 2, d.PATCH_VIEWS[0])
    with pytest.raises(gr.Error, match="out of memory"):
        app.run(*args, **NO_PROGRESS)
    assert set(app.run(*args, **NO_PROGRESS)[9]) == PREDICT_JSON_KEYS


def test_sweep_handler_streams(app):
    updates = list(app.sweep(EXAMPLE, QUESTION, "random", 2, **NO_PROGRESS))
    assert len(updates) == 1 + len(SHORT_SWEEP)  # empty figures first, then one update per budget
    latency, agreement, table = updates[-1]
    assert isinstance(latency, go.Figure) and isinstance(agreement, go.Figure)
    assert "random tokens: latency vs FLOPs" in latency.layout.title.text
    assert "random tokens: same answer" in agreement.layout.title.text and "3 budgets run" in agreement.layout.title.text
    assert table.count("\n| ") == 1 + len(SHORT_SWEEP)  # header + one row per budget
    assert table.startswith("**random tokens**") and f"{len(SHORT_SWEEP)}/{len(SHORT_SWEEP)} budgets in" in table
    names = [trace.name for trace in latency.data]
    assert "full model prefill" in names and "full model total" in names  # measured along the sweep


def test_a_sweep_budget_out_of_reach_says_what_the_method_can_reach_and_is_counted_apart():
    from par_demo.errors import BudgetOutOfReach
    refused = BudgetOutOfReach("fastv", 0.1, 0.2734, unit="time")
    assert refused.reach == 0.2734 and "its cheapest setting costs 0.27 of the full prefill time" in str(refused)
    point = {"budget": 0.1, "skipped": str(refused), "reach": refused.reach, "full_answer": "red"}
    table = panels.sweep_table([point], time.perf_counter(), 10, "FastV")
    assert table.startswith("**FastV**") and "1/10 budgets (1 out of reach)" in table
    assert "| not reachable: its cheapest setting costs 0.27 |" in table  # whole, not cut at 120 characters


def test_sweep_plots_agreement_against_the_measured_prefill_time(service):
    points = [p for p in service.sweep(EXAMPLE, QUESTION, "layerdrop", budgets=(1.0, 0.4), rounds=ROUNDS)
              if "skipped" not in p]
    for p in points:  # the pruned prefill over the full model's, both medians of the same interleaved rounds
        assert p["time_ratio"] == pytest.approx(p["timing"].prefill_s.median / p["full_timing"].prefill_s.median)
    figure = viz.sweep_agreement_figure(points, "layerdrop")
    assert list(figure.data[0].x) == [p["time_ratio"] for p in points]
    assert figure.layout.xaxis.title.text.startswith("measured time")
    assert all(f"FLOPs {p['flops_ratio']:.2f}" in hover for p, hover in zip(points, figure.data[0].customdata))


def test_compare_all_handler_streams_a_grid_and_offers_the_run_as_json(app):
    import json

    updates = list(app.compare_all(EXAMPLE, QUESTION, 0.6, 2, **NO_PROGRESS))
    grid, summary, download = updates[-1]
    available = [n for n in OF_THE_FIELD if not app.service.available_methods().get(n)]
    for name in ["full", *available]:
        assert grid.count(f'data-method="{name}"') == 1
    assert grid.count("<img ") == 1 + len(available)  # a patch view per cell
    assert "methods give the same answer" in summary and f"medians of {s.COMPARE_ALL_ROUNDS} rounds" in summary
    data = json.loads(open(download["value"]).read())
    assert [entry["method"] for entry in data["methods"]] == available and data["budget"] == 0.6
    assert all(update[2] == gr.skip() for update in updates[:-1])  # the download comes once all are timed


def test_par_with_a_router_shows_router_scores(par_app):
    assert par_app.service.default_method() == "par"
    assert "unavailable" not in par_app.model_markdown()
    outputs = par_app.run(EXAMPLE, QUESTION, "PAR", 0.5, 0, 0, 2, d.PATCH_VIEWS[1], **NO_PROGRESS)
    patches, layers, stats = outputs[6], outputs[7], outputs[9]
    assert stats["method"] == "par" and stats["flops_ratio"] <= 0.5 + 1e-6
    assert stats["token_scores"] and stats["layer_scores"]
    assert "router score" in patches.layout.title.text
    assert any("router score" in text for trace in layers.data for text in trace.customdata)


@pytest.fixture(scope="module")
def par_app(tiny, tmp_path_factory):
    """The app on the tiny model with an (untrained, random) PAR router, so PAR is available."""
    import torch

    from par_demo.predict import Predictor
    from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router

    config = RouterConfig(lm_width=tiny.config.text_config.hidden_size, n_layers=tiny.n_layers,
                          width=16, heads=1, model=fingerprint(tiny))
    torch.manual_seed(0)
    predictor = Predictor(tiny)
    predictor.router_path = save_router(MetaRouter(config), tmp_path_factory.mktemp("router"))
    service = s.DemoService(predictor, tiny.name, tiny.n_layers, tiny.max_visual_tokens, max_new_tokens=2, rounds=1)
    return d.DemoApp(service)


def test_friendly_errors_maps_every_exception():
    def boom(exc):
        raise exc

    wrapped = d.friendly_errors(boom)
    with pytest.raises(gr.Error, match="bad thing"):
        wrapped(UserError("bad thing"))
    with pytest.raises(gr.Error, match="out of memory"):
        wrapped(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    with pytest.raises(gr.Error, match="Something went wrong"):
        wrapped(KeyError("internal"))


def test_a_user_error_is_one_log_line_and_a_fault_is_a_traceback(caplog):
    def boom(exc):
        raise exc

    with caplog.at_level("WARNING", logger="par_demo.demo"):
        with pytest.raises(gr.Error) as refused:
            d.friendly_errors(boom)(UserError("Please type a question about the image."))
    assert [(r.levelname, r.getMessage(), r.exc_info) for r in caplog.records] == [
        ("WARNING", "input refused: Please type a question about the image.", None)]
    assert refused.value.print_exception is False  # and Gradio prints no traceback for it
    caplog.clear()
    with caplog.at_level("WARNING", logger="par_demo.demo"), pytest.raises(gr.Error):
        d.friendly_errors(boom)(KeyError("internal"))
    assert caplog.records[0].levelname == "ERROR" and caplog.records[0].exc_info  # a real fault: traceback


def test_on_gpu_is_a_no_op_without_spaces(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def f(x):
        return x + 1

    assert zerogpu.on_gpu(f) is f and zerogpu.on_gpu(duration=5)(f) is f


def test_dim_dropped_darkens_exactly_the_dropped_patches():
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (64, 64), (200, 200, 200))
    dimmed = np.asarray(viz.dim_dropped(image, (4, 4), kept=[0, 5]))
    assert tuple(dimmed[2, 2]) == (200, 200, 200)  # patch 0 (row 0, col 0) kept
    assert tuple(dimmed[20, 20]) == (200, 200, 200)  # patch 5 (row 1, col 1) kept
    assert dimmed[2, 20].max() == 50  # patch 1 dropped -> a quarter of the brightness


def test_dim_dropped_follows_a_non_square_grid():
    import numpy as np
    from PIL import Image

    image = Image.new("RGB", (90, 40), (200, 200, 200))
    dimmed = np.asarray(viz.dim_dropped(image, (2, 3), kept=[2]))  # 2 rows x 3 cols: patch 2 = top right
    assert tuple(dimmed[5, 80]) == (200, 200, 200) and dimmed[5, 5].max() == 50 and dimmed[35, 80].max() == 50


def test_layer_figure_colours():
    fig = viz.layer_figure(8, kept_layers=[0, 1, 2, 7], layer_scores=[0.1] * 8)
    by_name = {trace.name: trace for trace in fig.data}
    assert list(by_name["skipped"].x) == [3, 4, 5, 6] and by_name["skipped"].marker.color == viz.SKIPPED_COLOR
    assert "ran 4/8" in fig.layout.title.text


def test_compare_all_draws_each_method_on_its_own_grid_for_another_family(tmp_path):
    """Qwen2.5-VL gives a tall photo a tall grid (13 x 9 cells): every cell of the grid view follows it."""
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    from par_demo.models import load_model
    from par_demo.predict import Predictor
    from par_demo.shapes import render_scene

    qwen = load_model("random:qwen2.5-vl-tiny", device="cpu")
    service = s.DemoService(Predictor(qwen), qwen.name, qwen.n_layers, qwen.max_visual_tokens, max_new_tokens=2,
                            rounds=1)
    image, _ = render_scene(np.random.default_rng(5))
    path = tmp_path / "tall.png"
    image.resize((252, 364)).save(path)
    *_, state = service.compare_all(str(path), "What color is the circle?", 0.9, rounds=1)
    assert "fastv" in state.results and all(tuple(p.grid) == (13, 9) for p in state.results.values())
    thumbnails = re.findall(r'src="data:image/png;base64,([^"]+)"', panels.all_methods_html(state))
    assert len(thumbnails) == 1 + len(state.results)
    for data in thumbnails:
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert height > width  # tall like the image the model saw


def test_the_gpu_side_functions_are_given_a_key_not_the_model(service, monkeypatch):
    # on ZeroGPU their arguments are pickled to a forked worker: the model must stay where the worker inherits it
    given = []
    real_call = service.model_thread.call
    monkeypatch.setattr(service.model_thread, "call",
                        lambda fn, *args, **kw: given.append((fn, args)) or real_call(fn, *args, **kw))
    service.compare(EXAMPLE, QUESTION, "random", 0.5)
    on_device = [args for fn, args in given if fn in (zerogpu.predict_on_device, zerogpu.measure_on_device)]
    assert on_device and all(isinstance(args[0], int) for args in on_device)
    assert not any(isinstance(a, (Predictor, CountingPredictor)) for args in on_device for a in args)


def test_a_bad_gradio_port_in_the_environment_is_one_line_not_a_traceback_from_gradio():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GRADIO_SERVER_PORT": "abc"}
    done = subprocess.run([sys.executable, "app.py"], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "app.py: error: GRADIO_SERVER_PORT='abc': give a port number"


def test_a_refusal_on_the_gpu_side_comes_back_whole_as_a_value(service):
    """A ZeroGPU worker returns a raised exception to the app only as a generic "ZeroGPU worker error"."""
    import pickle

    from par_demo.errors import BudgetOutOfReach
    from par_demo.images import load_image

    kwargs = {"method": "fastv", "budget": 0.01, "max_new_tokens": 1}
    refused = zerogpu.predict_on_device(service._key, load_image(EXAMPLE), QUESTION, kwargs)
    assert isinstance(refused, BudgetOutOfReach)
    again = pickle.loads(pickle.dumps(refused))  # as the worker sends it back
    assert type(again) is BudgetOutOfReach and str(again) == str(refused) and again.reach == refused.reach
    with pytest.raises(BudgetOutOfReach):
        zerogpu.answer_or_raise(again)
    with pytest.raises(BudgetOutOfReach):  # and the service raises it on its side, as the sweep expects
        service._run(load_image(EXAMPLE), QUESTION, **kwargs)


@pytest.mark.parametrize("env, value, message", [
    ("PAR_MAX_TILES", "1e6", "argument --max-tiles: invalid int value"),
    ("PAR_MIN_PIXELS", "abc", "argument --min-pixels: invalid int value"),
    ("PAR_BUDGET_UNIT", "Time", "PAR_BUDGET_UNIT='Time': choose one of flops, time"),
    ("PAR_QUANT", "3bit", "PAR_QUANT='3bit': choose one of none, 4bit, 8bit"),
])
def test_app_options_from_the_environment_are_checked_as_the_flags_are(monkeypatch, capsys, env, value, message):
    import app as app_module

    monkeypatch.setenv(env, value)
    with pytest.raises(SystemExit) as stopped:  # before any model is loaded, in one line
        app_module.parse_args([])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_on_zerogpu_the_app_imports_spaces_before_torch(tmp_path):
    """ZeroGPU's `spaces` patches CUDA when imported and refuses to once CUDA is up: it must come first."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "spaces.py").write_text(
        "import sys\nprint('torch before spaces' if 'torch' in sys.modules else 'spaces first')\n"
        "def GPU(duration=60):\n    return lambda func: func\n")
    env = {**os.environ, "SPACES_ZERO_GPU": "1", "PYTHONPATH": os.pathsep.join([str(tmp_path), str(root)])}
    done = subprocess.run([sys.executable, "-c", "import app"], cwd=root, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == "spaces first"
