"""The robustness corpus and concurrent users through the app's public `compare` API (gradio_client).

Every reply is a valid answer or one clear message; concurrent requests never see each other's results.
The tallies printed at the end (`-s` shows them) are the figures of the robustness report.
"""

import resource
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import served
from corpus import image_corpus, question_corpus
from par_demo import demo as d
from par_demo import service as s
from par_demo.shapes import render_scene

TALLY: Counter = Counter()
EXAMPLE = str(s.EXAMPLES_DIR / "shapes_where.png")


@pytest.fixture(scope="module")
def client(tiny, predictor):
    service = s.DemoService(predictor, tiny.name, tiny.n_layers, tiny.max_visual_tokens, cache_items=8,
                            max_new_tokens=4, rounds=2)
    with served(d.DemoApp(service, sweep_budgets=(1.0, 0.5))) as api:
        yield api


def compare(client, image, question, method="fastv", budget=0.5):
    from gradio_client import handle_file

    return client.predict(handle_file(str(image)) if image else None, question, method, budget, api_name="/compare")


def outcome(call) -> str:
    """'ok', or 'message' for an AppError carrying a specific message (Gradio's bare 'Error' would be a crash)."""
    from gradio_client.exceptions import AppError

    try:
        call()
        return "ok"
    except AppError as exc:
        message = str(exc)
        assert message and message.strip() not in ("Error", "None") and "Traceback" not in message
        return "message"


@pytest.mark.parametrize("kind, name, data, should_work", image_corpus(), ids=[c[1] for c in image_corpus()])
def test_every_image_through_the_api_works_or_gets_a_clear_message(client, tmp_path, kind, name, data, should_work):
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    result = outcome(lambda: compare(client, path, "What color is the circle?"))
    TALLY[f"api-image/{kind}/{result}"] += 1
    assert result == ("ok" if should_work else "message")


@pytest.mark.parametrize("name, question, should_work", question_corpus(), ids=[q[0] for q in question_corpus()])
def test_every_question_through_the_api_works_or_gets_a_clear_message(client, name, question, should_work):
    def call():
        *_, stats, _ = compare(client, EXAMPLE, question, "layerdrop", 0.9)
        assert stats["n_visual_tokens"] == 144
    result = outcome(call)
    TALLY[f"api-question/{result}"] += 1
    assert result == ("ok" if should_work else "message")


@pytest.mark.parametrize("method, budget", [(None, 0.5), ("fastv", "NaN"), ("fastv", -1), ("fastv", 0),
                                            ("fastv", [0.5]), (3, 0.5), ("fastv", None)])
def test_bad_api_parameters_get_a_clear_message(client, method, budget):
    result = outcome(lambda: compare(client, EXAMPLE, "What color is the circle?", method, budget))
    TALLY[f"api-parameter/{result}"] += 1
    assert result == "message"


def test_24_concurrent_users_each_get_their_own_answer(client, predictor, tmp_path):
    """Different images, questions, methods and budgets at once: each reply equals that request run alone."""
    questions = ["What color is the circle?", "How many objects are there?", "Where is the red square?",
                 "Is there a blue triangle?", "What shape is the green object?", "How many squares are there?"]
    requests = []
    for i in range(24):
        image, _ = render_scene(np.random.default_rng(1000 + i))
        path = tmp_path / f"scene{i}.png"
        image.save(path)
        method, budget = [("fastv", 0.5), ("layerdrop", 0.6), ("fastv", 0.8), ("layerdrop", 0.9)][i % 4]
        requests.append((path, questions[i % len(questions)], method, budget))
    from par_demo.images import load_image

    expected = []
    for path, question, method, budget in requests:  # alone, in-process: the reference answers
        image = load_image(str(path))
        expected.append((predictor.predict(image, question, "full", 1.0, max_new_tokens=4).answer,
                         predictor.predict(image, question, method, budget, max_new_tokens=4)))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=24) as pool:
        replies = list(pool.map(lambda r: compare(client, *r), requests))
    wall = time.perf_counter() - start
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    correct = 0
    for (full_answer, pruned), (full, answer, stats, full_stats) in zip(expected, replies):
        assert full == full_answer and full_stats["answer"] == full_answer
        assert answer == pruned.answer and stats["answer"] == pruned.answer
        assert (stats["method"], stats["budget"]) == (pruned.method, pruned.budget)
        assert stats["kept_visual_tokens"] == pruned.kept_visual_tokens and stats["kept_layers"] == pruned.kept_layers
        correct += 1
    assert len(set(r[1] for r in replies)) > 1  # the answers really differ, so cross-talk would show
    print(f"\nconcurrency: {len(requests)} requests, {correct} correct, wall {wall:.1f} s, "
          f"process peak RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MB")
    # ...and the app still answers afterwards.
    assert compare(client, EXAMPLE, "What color is the circle?")[2]["method"] == "fastv"


def test_tally(client):
    print("\napi robustness tally:", dict(sorted(TALLY.items())))


def test_server_paths_that_were_not_uploaded_are_never_read():
    """An API caller may name a server path instead of uploading; the image input reads uploads and examples only."""
    import gradio as gr
    from gradio.data_classes import ImageData

    image_input = d.SafeImage(type="filepath", image_mode=None)
    with pytest.raises(gr.Error, match="paths on the server are not read"):
        image_input.preprocess(ImageData(path="/etc/hostname"))
    assert image_input.preprocess(ImageData(path=EXAMPLE)) is not None
    TALLY["api-server-path/refused"] += 1
