"""The app's public API through a real server: `compare` and `compare_all`, their errors, and the server log.

Launches the real `app.build_demo` in this process on 127.0.0.1 (tiny random LLaVA) and calls it with
`gradio_client`, as a script would.
"""

from __future__ import annotations

import dataclasses

import pytest

from conftest import served
from par_demo import demo as d
from par_demo import service as s
from par_demo.inputs import METHOD_CHOICES
from par_demo.predict import Prediction

EXAMPLE = str(s.EXAMPLES_DIR / "shapes_where.png")
QUESTION = "Where is the blue square?"
PREDICT_JSON_KEYS = {f.name for f in dataclasses.fields(Prediction)}  # what `predict --json` prints


@pytest.fixture(scope="module")
def client(tiny, predictor):
    service = s.DemoService(predictor, tiny.name, tiny.n_layers, tiny.max_visual_tokens, cache_items=4,
                            max_new_tokens=4, rounds=2)
    with served(d.DemoApp(service, sweep_budgets=(1.0, 0.5))) as api:
        yield api


def compare(client, image, question, method, budget):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)) if image else None, question, method, budget, api_name="/compare")


def compare_all(client, image, question, budget, *extras):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)) if image else None, question, budget, *extras,
                          api_name="/compare_all")


def test_api_compare(client):
    full, pruned, stats, full_stats = compare(client, EXAMPLE, QUESTION, "fastv", 0.5)
    assert isinstance(full, str) and isinstance(pruned, str)
    assert set(stats) == PREDICT_JSON_KEYS and set(full_stats) == PREDICT_JSON_KEYS
    assert stats["method"] == "fastv" and stats["budget"] == 0.5 and stats["flops_ratio"] <= 0.5 + 1e-6
    assert full_stats["method"] == "full" and full_stats["answer"] == full
    assert stats["timing"]["rounds"] == 2 and full_stats["timing"]["rounds"] == 2  # both timed in this request


def test_api_reports_a_clipped_question_in_the_stats(client):
    *_, stats, full_stats = compare(client, EXAMPLE, "Where is it? " * 1000, "random", 0.6)
    assert any("shortened" in notice for notice in stats["notices"])
    assert stats["notices"] == full_stats["notices"]


def test_api_has_compare_and_compare_all(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert sorted(endpoints) == ["/compare", "/compare_all"]


def test_api_compare_all_gives_one_entry_per_method_with_the_predict_json_keys(client):
    reply = compare_all(client, EXAMPLE, QUESTION, 0.5)
    assert set(reply["full"]) == PREDICT_JSON_KEYS and reply["full"]["method"] == "full"
    ran = [entry["method"] for entry in reply["methods"]]
    skipped = [entry["method"] for entry in reply["skipped"]]
    # the methods of the field; the tiny model has no PAR router, so PAR is skipped and says why
    assert ran == ["fastv", "visionzip", "divprune", "cdpruner"] and skipped == ["par"]
    assert sorted(ran + skipped + reply["left_out"]) == sorted(name for _, name in METHOD_CHOICES)
    for entry in reply["methods"]:
        assert set(entry) == PREDICT_JSON_KEYS
        assert entry["flops_ratio"] <= 0.5 + 1e-9 and entry["budget"] == 0.5
        assert entry["timing"]["prefill_speedup"]["median"] > 0
    assert all("train-router" in entry["reason"] for entry in reply["skipped"])


def test_api_compare_all_adds_the_baselines_and_ablations_when_asked(client):
    reply = compare_all(client, EXAMPLE, QUESTION, 0.5, ["baseline", "ablation"])
    ran = [entry["method"] for entry in reply["methods"]]
    assert ran == ["fastv", "random", "layerdrop", "visionzip", "divprune", "cdpruner", "downsample", "cdpruner-absorb"]
    assert not reply["left_out"] and all("train-router" in entry["reason"] for entry in reply["skipped"])
    assert sorted(ran + [entry["method"] for entry in reply["skipped"]]) == sorted(n for _, n in METHOD_CHOICES)
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="^Unknown extra methods 'all'; choose from: baseline, ablation.$"):
        compare_all(client, EXAMPLE, QUESTION, 0.5, ["all"])


BAD_INPUTS = [  # (image, question, budget, the message /compare gives for it)
    ("not-an-image", QUESTION, 0.5, "not an image"),
    (None, QUESTION, 0.5, "upload an image"),
    (EXAMPLE, "", 0.5, "type a question"),
    (EXAMPLE, QUESTION, 1.5, "greater than maximum"),
    (EXAMPLE, QUESTION, "half", "must be a number"),
]


def _image(image, tmp_path):
    if image != "not-an-image":
        return image
    path = tmp_path / "photo.png"
    path.write_text("definitely not a PNG")
    return path


@pytest.mark.parametrize("image, question, budget, message", BAD_INPUTS)
def test_compare_and_compare_all_refuse_bad_input_with_the_same_line(client, tmp_path, image, question, budget,
                                                                     message):
    from gradio_client.exceptions import AppError

    image = _image(image, tmp_path)
    with pytest.raises(AppError, match=message) as by_compare:
        compare(client, image, question, "fastv", budget)
    with pytest.raises(AppError, match=message) as by_compare_all:
        compare_all(client, image, question, budget)
    assert str(by_compare.value) == str(by_compare_all.value)
    # ...and the app still answers afterwards.
    assert set(compare(client, EXAMPLE, QUESTION, "random", 0.6)[2]) == PREDICT_JSON_KEYS


@pytest.mark.parametrize("method, message", [("par", "train-router"), ("magic", "not in the list of choices")])
def test_api_compare_refuses_a_bad_method(client, method, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        compare(client, EXAMPLE, QUESTION, method, 0.5)


@pytest.mark.parametrize("image, question, method, budget", [
    (EXAMPLE, "", "fastv", 0.5), (EXAMPLE, QUESTION, "magic", 0.5), (EXAMPLE, QUESTION, "fastv", 1.5),
    ("not-an-image", QUESTION, "fastv", 0.5),
])
def test_a_refused_input_writes_one_log_line_and_no_traceback(client, tmp_path, caplog, capfd, image, question,
                                                              method, budget):
    from gradio_client.exceptions import AppError

    image = _image(image, tmp_path)
    capfd.readouterr()
    with caplog.at_level("WARNING"), pytest.raises(AppError):
        compare(client, image, question, method, budget)
    refused = [r for r in caplog.records if r.name == "par_demo.demo"]
    assert len(refused) == 1 and refused[0].levelname == "WARNING" and refused[0].exc_info is None
    assert "Traceback" not in capfd.readouterr().err


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
