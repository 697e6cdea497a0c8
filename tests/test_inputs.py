"""Checks of what a visitor or an API caller sends (`par_demo.inputs`): clean values or one clear `UserError`."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from par_demo import inputs as d
from par_demo.errors import UserError
from par_demo.methods import METHODS
from par_demo.service import load_examples


def test_examples_exist_and_load():
    examples = load_examples()
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


def test_method_choices_follow_the_registry():
    """Every registered method but the reference is offered, in registry order; a new one appears by itself."""
    assert [name for _, name in d.METHOD_CHOICES] == [name for name in METHODS if name != "full"]
    assert set(d.METHOD_LABELS) == set(METHODS)
