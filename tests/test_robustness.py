"""Every hostile or unusual input through the library and the CLI: a valid answer or one clear message.

The tallies printed at the end (`-s` shows them) are the figures of the robustness report.
"""

from collections import Counter

import pytest

from corpus import image_corpus, parameter_corpus, question_corpus
from par_demo.cli import main
from par_demo.errors import UserError
from par_demo.images import load_image

TALLY: Counter = Counter()


def outcome(call):
    """'ok', or 'message' for a UserError; anything else (a crash) propagates and fails the test."""
    try:
        call()
        return "ok"
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message
        return "message"


@pytest.mark.parametrize("kind, name, data, should_work", image_corpus(), ids=[c[1] for c in image_corpus()])
def test_every_image_works_or_gets_a_clear_message_in_the_library(predictor, kind, name, data, should_work):
    def call():
        predictor.predict(load_image(data), "What color is the circle?", "fastv", 0.5, max_new_tokens=2)
    result = outcome(call)
    TALLY[f"image/{kind}/{result}"] += 1
    assert result == ("ok" if should_work else "message")


@pytest.mark.parametrize("kind, name, data, should_work", image_corpus(), ids=[c[1] for c in image_corpus()])
def test_every_image_file_works_or_gets_one_line_from_the_cli(tmp_path, capsys, kind, name, data, should_work):
    path = tmp_path / "upload.png"
    path.write_bytes(data)
    code = main(["predict", "--model", "random:llava-tiny", "--device", "cpu", "--image", str(path),
                 "--question", "How many objects are there?", "--max-new-tokens", "2", "--json"])
    captured = capsys.readouterr()
    TALLY[f"cli-image/{kind}/{'ok' if code == 0 else 'message'}"] += 1
    if should_work:
        assert code == 0, captured.err
    else:
        assert code == 2 and len(captured.err.strip().splitlines()) == 1 and captured.err.startswith("error:")


@pytest.mark.parametrize("name, question, should_work", question_corpus(), ids=[q[0] for q in question_corpus()])
def test_every_question_works_or_gets_a_clear_message(predictor, scene, name, question, should_work):
    def call():
        p = predictor.predict(scene, question, "full", 1.0, max_new_tokens=2)
        assert p.n_visual_tokens == 144  # never an extra image slot
        assert bool(p.notices) == (len(question) > 1000)  # a clipped question says so
    result = outcome(call)
    TALLY[f"question/{result}"] += 1
    assert result == ("ok" if should_work else "message")


@pytest.mark.parametrize("name, kwargs", parameter_corpus(), ids=[c[0] for c in parameter_corpus()])
def test_every_bad_parameter_is_refused_with_a_message(predictor, scene, name, kwargs):
    args = dict(question="What color is the circle?", method="fastv", budget=0.5) | kwargs
    result = outcome(lambda: predictor.predict(scene, **args))
    TALLY[f"parameter/{result}"] += 1
    assert result == "message"


def test_the_library_still_answers_after_the_whole_corpus(predictor, scene):
    assert predictor.predict(scene, "What color is the circle?", "full", max_new_tokens=2).new_tokens >= 1
    print("\nrobustness tally:", dict(sorted(TALLY.items())))
