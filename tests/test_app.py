"""The Gradio app: input checks, cache, compare, sweep, figures, errors, and the public `compare` API.

Runs on the tiny random LLaVA (`random:llava-tiny`, from conftest) so it is fast and needs no checkpoint.
The server tests launch the real `app.build_demo` in this process on 127.0.0.1 and call it with `gradio_client`.
"""

from __future__ import annotations

import dataclasses
import math

import gradio as gr
import numpy as np
import plotly.graph_objects as go
import pytest
from PIL import Image

from par_demo import demo as d
from par_demo import viz
from par_demo.errors import UserError
from par_demo.predict import Prediction
from conftest import served

EXAMPLE = str(d.EXAMPLES_DIR / "shapes_where.png")
QUESTION = "Where is the blue square?"
PREDICT_JSON_KEYS = {f.name for f in dataclasses.fields(Prediction)}  # what `predict --json` prints


class CountingPredictor:
    """Wraps the real predictor and counts calls per method, to see what the cache saves."""

    def __init__(self, inner):
        self.inner = inner
        self.calls: list[str] = []

    def available_methods(self):
        return self.inner.available_methods()

    def model_view(self, image):
        return self.inner.model_view(image)

    def predict(self, image, question, method="full", **kwargs):
        self.calls.append(method)
        return self.inner.predict(image, question, method, **kwargs)


SHORT_SWEEP = (1.0, 0.5, 0.2)  # the app sweeps ten budgets; three show the same behaviour, faster


@pytest.fixture(scope="module")
def service(tiny, predictor):
    # The random model never stops early: 4 new tokens instead of 16 keep the tests fast.
    return d.DemoService(CountingPredictor(predictor), tiny.name, tiny.n_layers, tiny.max_visual_tokens, cache_items=4,
                         max_new_tokens=4)


@pytest.fixture(scope="module")
def app(service):
    return d.DemoApp(service, sweep_budgets=SHORT_SWEEP)


# ------------------------------------------------------------------------------------------- input checks
def test_examples_exist_and_load():
    examples = d.load_examples()
    assert len(examples) >= 3
    for path, question in examples:
        assert d.load_image(path).size == (192, 192)
        assert question.endswith("?")


@pytest.mark.parametrize("source, message", [
    (None, "upload an image"),
    ("", "upload an image"),
    ("/nonexistent/x.png", "not found"),
])
def test_load_image_refuses_missing(source, message):
    with pytest.raises(UserError, match=message):
        d.load_image(source)


def test_load_image_refuses_non_images(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for path in (fake, empty):
        with pytest.raises(UserError):
            d.load_image(str(path))


def test_load_image_normalises_odd_images():
    tiny = d.load_image(np.zeros((1, 1), dtype=np.uint8))
    assert tiny.mode == "RGB" and min(tiny.size) >= d.MIN_SIDE
    rgba = d.load_image(Image.new("RGBA", (40, 30), (255, 0, 0, 0)))
    assert rgba.mode == "RGB" and rgba.getpixel((0, 0)) == (255, 255, 255)  # transparency -> white
    big = d.load_image(Image.new("RGB", (5000, 100)))
    assert max(big.size) == d.MAX_SIDE


@pytest.mark.parametrize("question, expected", [
    ("  What   color?\n", "What color?"),
    ("Where\x00 is it?", "Where is it?"),
    ("Is there a 🟥 square?", "Is there a 🟥 square?"),
])
def test_check_question_cleans(question, expected):
    assert d.check_question(question) == (expected, None)


def test_check_question_refuses_and_clips():
    for bad in ("", "   \n", None, 3):
        with pytest.raises(UserError):
            d.check_question(bad)
    text, notice = d.check_question("why " * 1000)
    assert len(text) == d.MAX_QUESTION_CHARS and "shortened" in notice


def test_check_method_accepts_names_and_labels():
    assert d.check_method("fastv") == "fastv"
    assert d.check_method("Layer Drop") == "layerdrop"
    assert d.check_method("random tokens") == "random"
    with pytest.raises(UserError, match="Unknown method"):
        d.check_method("magic")
    with pytest.raises(UserError, match="train-router"):
        d.check_method("PAR", {"par": "no router for this model; train one with: python -m par_demo train-router"})


@pytest.mark.parametrize("budget", [0, -0.5, 1.01, math.nan, math.inf, "abc", None, True, [0.5]])
def test_check_budget_refuses(budget):
    with pytest.raises(UserError, match="budget"):
        d.check_budget(budget)


def test_check_budget_and_counts_accept():
    assert d.check_budget(1) == 1.0 and d.check_budget("0.25") == 0.25
    assert d.check_count(0, "Tokens kept", 1, 64) is None  # 0 = from the budget
    assert d.check_count(12.0, "Tokens kept", 1, 64) == 12
    for bad in (65, 2.5, "x", math.nan):
        with pytest.raises(UserError, match="Tokens kept"):
            d.check_count(bad, "Tokens kept", 1, 64)


def test_answer_agreement():
    assert d.answer_agreement("Bottom right.", "bottom right") == 1.0
    assert d.answer_agreement("red", "blue") == 0.0
    assert 0 < d.answer_agreement("top left", "bottom left") < 1


def test_lru_cache_is_bounded():
    cache = d.LRUCache(2)
    for key in "abc":
        cache.put(key, key.upper())
    assert len(cache) == 2 and cache.get("a") is None and cache.get("c") == "C"


# ------------------------------------------------------------------------------------------- the service
def test_compare_caches_the_full_answer(service):
    service.predictor.calls.clear()
    first = service.compare(EXAMPLE, QUESTION, "fastv", 0.6)
    second = service.compare(EXAMPLE, QUESTION, "random", 0.7)
    assert service.predictor.calls == ["full", "fastv", "random"]  # the full model ran once
    assert not first.full_from_cache and second.full_from_cache
    assert first.full.answer == second.full.answer
    assert second.pruned.method == "random" and second.pruned.flops_ratio <= 0.7 + 1e-6
    assert first.model_view.size[0] > 0 and first.prefill_speedup > 0


def test_cache_key_includes_the_question(service):
    service.predictor.calls.clear()
    service.compare(EXAMPLE, QUESTION, "fastv", 0.6)
    service.compare(EXAMPLE, "How many objects are there?", "fastv", 0.6)
    assert service.predictor.calls.count("full") == 1  # only the new question needed a full run


def test_sweep_covers_all_budgets(service):
    assert d.SWEEP_BUDGETS == (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1)
    points = [point for _, point in service.sweep(EXAMPLE, QUESTION, "random", budgets=(1.0, 0.5, 0.05))]
    assert [p["budget"] for p in points] == [1.0, 0.5, 0.05]
    done = [p for p in points if "skipped" not in p]
    assert done and all(0 < p["flops_ratio"] <= p["budget"] + 1e-6 for p in done)
    assert "below" in points[-1]["skipped"]  # no setting is that cheap (the vision tower alone costs more): noted


# ------------------------------------------------------------------------------------------- handlers and figures
def test_run_handler_outputs(app):
    outputs = app.run(EXAMPLE, QUESTION, "fastv", 0.6, 0, 0, 2, d.PATCH_VIEWS[0], progress=lambda *a, **k: None)
    full, full_timing, pruned, pruned_timing, stats, patches, layers, latency, stats_json, state = outputs
    assert isinstance(full, str) and full
    assert "prefill" in full_timing and "×" in pruned_timing
    assert "FLOPs" in stats and "visual tokens" in stats
    assert all(isinstance(fig, go.Figure) for fig in (patches, layers, latency))
    assert "kept" in patches.layout.title.text
    assert set(stats_json) == PREDICT_JSON_KEYS
    scores_view = app.redraw_patches(state, d.PATCH_VIEWS[1])
    assert "attention score" in scores_view.layout.title.text  # FastV has per-patch scores
    assert any(isinstance(t, go.Heatmap) and t.showscale is not False for t in scores_view.data)


def test_run_handler_turns_errors_into_gr_error(app):
    with pytest.raises(gr.Error, match="question"):
        app.run(EXAMPLE, "  ", "fastv", 0.5, 0, 0, 2, d.PATCH_VIEWS[0], progress=lambda *a, **k: None)
    with pytest.raises(gr.Error, match="not available"):
        app.run(EXAMPLE, QUESTION, "par", 0.5, 0, 0, 2, d.PATCH_VIEWS[0], progress=lambda *a, **k: None)


def test_slider_before_any_input_does_nothing(app):
    outputs = app.rerun(None, "", "fastv", 0.5, 0, 0, 2, d.PATCH_VIEWS[0], progress=lambda *a, **k: None)
    assert len(outputs) == 10 and all(output == gr.skip() for output in outputs)


def test_out_of_memory_becomes_a_message_and_the_next_request_works(tiny, predictor):
    class RunsOutOnce(CountingPredictor):
        def predict(self, image, question, method="full", **kwargs):
            if not self.calls:
                self.calls.append("oom")
                raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return super().predict(image, question, method, **kwargs)

    app = d.DemoApp(d.DemoService(RunsOutOnce(predictor), tiny.name, tiny.n_layers, tiny.max_visual_tokens, max_new_tokens=2))
    args = (EXAMPLE, QUESTION, "random", 0.6, 0, 0, 2, d.PATCH_VIEWS[0])
    with pytest.raises(gr.Error, match="out of memory"):
        app.run(*args, progress=lambda *a, **k: None)
    assert set(app.run(*args, progress=lambda *a, **k: None)[8]) == PREDICT_JSON_KEYS


def test_sweep_handler_streams(app):
    updates = list(app.sweep(EXAMPLE, QUESTION, "random", 2, progress=lambda *a, **k: None))
    assert len(updates) == 1 + len(SHORT_SWEEP)  # an empty figure first, then one update per budget
    figure, table = updates[-1]
    assert isinstance(figure, go.Figure) and "budgets plotted" in figure.layout.title.text
    assert table.count("\n| ") == 1 + len(SHORT_SWEEP)  # header + one row per budget


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
    service = d.DemoService(predictor, tiny.name, tiny.n_layers, tiny.max_visual_tokens, max_new_tokens=2)
    return d.DemoApp(service)


def test_par_with_a_router_shows_router_scores(par_app):
    assert par_app.service.default_method() == "par"
    assert "unavailable" not in par_app.status_markdown()
    outputs = par_app.run(EXAMPLE, QUESTION, "PAR", 0.5, 0, 0, 2, d.PATCH_VIEWS[1], progress=lambda *a, **k: None)
    patches, layers, stats = outputs[5], outputs[6], outputs[8]
    assert stats["method"] == "par" and stats["flops_ratio"] <= 0.5 + 1e-6
    assert stats["token_scores"] and stats["layer_scores"]
    assert "router score" in patches.layout.title.text
    assert any("router score" in text for trace in layers.data for text in trace.customdata)


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


def test_on_gpu_is_a_no_op_without_spaces(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)

    def f(x):
        return x + 1

    assert d.on_gpu(f) is f and d.on_gpu(duration=5)(f) is f


def test_dim_dropped_darkens_exactly_the_dropped_patches():
    image = Image.new("RGB", (64, 64), (200, 200, 200))
    dimmed = np.asarray(viz.dim_dropped(image, (4, 4), kept=[0, 5]))
    assert tuple(dimmed[2, 2]) == (200, 200, 200)  # patch 0 (row 0, col 0) kept
    assert tuple(dimmed[20, 20]) == (200, 200, 200)  # patch 5 (row 1, col 1) kept
    assert dimmed[2, 20].max() == 50  # patch 1 dropped -> a quarter of the brightness


def test_layer_figure_colours():
    fig = viz.layer_figure(8, kept_layers=[0, 1, 2, 7], layer_scores=[0.1] * 8)
    by_name = {trace.name: trace for trace in fig.data}
    assert list(by_name["skipped"].x) == [3, 4, 5, 6] and by_name["skipped"].marker.color == viz.SKIPPED_COLOR
    assert "ran 4/8" in fig.layout.title.text


# ------------------------------------------------------------------------------------------- the server and its API
@pytest.fixture(scope="module")
def client(app):
    with served(app) as api:
        yield api


def test_api_compare(client):
    from gradio_client import handle_file

    full, pruned, stats, full_stats = client.predict(handle_file(EXAMPLE), QUESTION, "fastv", 0.5,
                                                     api_name="/compare")
    assert isinstance(full, str) and isinstance(pruned, str)
    assert set(stats) == PREDICT_JSON_KEYS and set(full_stats) == PREDICT_JSON_KEYS
    assert stats["method"] == "fastv" and stats["budget"] == 0.5 and stats["flops_ratio"] <= 0.5 + 1e-6
    assert full_stats["method"] == "full" and full_stats["answer"] == full


def test_api_reports_a_clipped_question_in_the_stats(client):
    from gradio_client import handle_file

    *_, stats, full_stats = client.predict(handle_file(EXAMPLE), "Where is it? " * 1000, "random", 0.6,
                                           api_name="/compare")
    assert any("shortened" in notice for notice in stats["notices"])
    assert stats["notices"] == full_stats["notices"]


def test_api_is_only_compare(client):
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == ["/compare"]


@pytest.mark.parametrize("image, question, method, budget, message", [
    ("not-an-image", QUESTION, "fastv", 0.5, "not an image"),
    (None, QUESTION, "fastv", 0.5, "upload an image"),
    (EXAMPLE, "", "fastv", 0.5, "type a question"),
    (EXAMPLE, QUESTION, "par", 0.5, "train-router"),
    (EXAMPLE, QUESTION, "magic", 0.5, "not in the list of choices"),
    (EXAMPLE, QUESTION, "fastv", 1.5, "greater than maximum"),
    (EXAMPLE, QUESTION, "fastv", "half", "must be a number"),
])
def test_api_compare_errors_are_clear(client, tmp_path, image, question, method, budget, message):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    if image == "not-an-image":
        image = tmp_path / "photo.png"
        image.write_text("definitely not a PNG")
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(str(image)) if image else None, question, method, budget, api_name="/compare")
    # ...and the app still answers afterwards.
    answer = client.predict(handle_file(EXAMPLE), QUESTION, "random", 0.6, api_name="/compare")
    assert set(answer[2]) == PREDICT_JSON_KEYS


def test_api_concurrent_calls_get_their_own_results(client):
    """Requests queued together each get the result of their own method, budget and question."""
    from gradio_client import handle_file

    requests = [(method, budget, question) for method in ("fastv", "random")
                for budget, question in ((0.9, QUESTION), (0.7, "How many objects are there?"), (0.6, "Hi?"))]
    jobs = [client.submit(handle_file(EXAMPLE), question, method, budget, api_name="/compare")
            for method, budget, question in requests]
    for (method, budget, _), job in zip(requests, jobs):
        _, _, stats, full_stats = job.result(timeout=60)
        assert (stats["method"], stats["budget"]) == (method, budget)
        assert full_stats["method"] == "full"
