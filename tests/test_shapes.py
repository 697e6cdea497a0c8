"""The ShapesVQA generator follows issue 3's spec: pixels, geometry, question wording and answer rules, files."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from par_demo import shapes
from par_demo.errors import UserError
from par_demo.shapes import (
    COLORS, NUMBER_WORDS, QUESTION_TYPES, SHAPES, is_correct, load_jsonl, make_dataset, normalize_answer, quadrant,
    render_scene, sample_question,
)


def scenes(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [render_scene(rng) for _ in range(n)]


def test_constants():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLORS == {
        "red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220),
        "yellow": (230, 200, 40), "purple": (150, 70, 190), "orange": (240, 140, 40),
    }
    assert len(QUESTION_TYPES) == 6 and len(set(QUESTION_TYPES)) == 6


def test_scene_geometry_and_counts():
    counts = Counter()
    for image, objects in scenes(300):
        assert image.size == (192, 192) and image.mode == "RGB"
        assert 1 <= len(objects) <= 5
        counts[len(objects)] += 1
        assert len({(o["shape"], o["color"]) for o in objects}) == len(objects)  # distinct pairs
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            s = o["size"]
            assert 26 <= s <= 44 and x1 - x0 == s and y1 - y0 == s
            assert x0 >= 4 and y0 >= 4 and x1 <= 192 - 4 and y1 <= 192 - 4
            assert o["center"] == [x0 + s / 2, y0 + s / 2]
        for i, a in enumerate(objects):
            for b in objects[i + 1:]:
                ax0, ay0, ax1, ay1 = a["box"]
                bx0, by0, bx1, by1 = b["box"]
                gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
                assert gap >= 6
    assert set(counts) == {1, 2, 3, 4, 5}
    assert min(counts.values()) > 30  # roughly uniform


def test_pixels_exact_colours_and_shapes():
    for image, objects in scenes(60, seed=1):
        px = np.asarray(image).astype(int)
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            cx, cy = int(o["center"][0]), int(o["center"][1])
            assert tuple(px[cy, cx]) == COLORS[o["color"]]  # box centre is inside every shape
            box = px[y0:y1, x0:x1]
            inside = np.all(box == COLORS[o["color"]], axis=-1)
            if o["shape"] == "square":
                assert inside.all()
            elif o["shape"] == "circle":
                assert not inside[0, 0] and not inside[-1, -1] and inside[0, o["size"] // 2]
            else:  # upward triangle: full base row, apex at the top middle, top corners empty
                assert inside[-1].all() and inside[0, (o["size"] - 1) // 2] and not inside[0, 0] and not inside[0, -1]


def test_background_gray_and_noise():
    image, objects = scenes(1, seed=3)[0]
    px = np.asarray(image).astype(float)
    mask = np.ones((192, 192), dtype=bool)
    for o in objects:
        x0, y0, x1, y1 = o["box"]
        mask[y0:y1, x0:x1] = False
    bg = px[mask]
    assert 200 - 3 <= bg.mean() <= 240 + 3
    assert 4.5 < bg.std() < 7.5  # sigma 6, one gray level for the whole image
    assert np.abs(bg.mean(0) - bg.mean()).max() < 1.0  # R = G = B


def _obj(shape, color, x, y, s=30):
    return {"shape": shape, "color": color, "size": s, "box": [x, y, x + s, y + s], "center": [x + s / 2, y + s / 2]}


def test_question_wording_and_answers():
    rng = np.random.default_rng(0)
    objs = [_obj("circle", "red", 10, 10), _obj("circle", "blue", 120, 10), _obj("square", "red", 10, 120),
            _obj("triangle", "green", 120, 120)]
    for _ in range(50):
        q, a = sample_question(objs, "color", rng)
        assert q in ("What color is the square?", "What color is the triangle?")  # circle is not unique
        assert a == {"What color is the square?": "red", "What color is the triangle?": "green"}[q]
        q, a = sample_question(objs, "shape", rng)
        assert q in ("What shape is the blue object?", "What shape is the green object?")  # red is not unique
        assert a == ("circle" if "blue" in q else "triangle")
        q, a = sample_question(objs, "count_shape", rng)
        shape = re.fullmatch(r"How many (circle|square|triangle)s are there\?", q).group(1)
        assert a == {"circle": "two", "square": "one", "triangle": "one"}[shape]
        assert sample_question(objs, "count_all", rng) == ("How many objects are there?", "four")
        q, a = sample_question(objs, "exists", rng)
        color, shape = re.fullmatch(r"Is there a (\w+) (\w+)\?", q).groups()
        assert a == ("yes" if any(o["color"] == color and o["shape"] == shape for o in objs) else "no")
        q, a = sample_question(objs, "where", rng)
        color, shape = re.fullmatch(r"Where is the (\w+) (\w+)\?", q).groups()
        assert a == {("red", "circle"): "top left", ("blue", "circle"): "top right",
                     ("red", "square"): "bottom left", ("green", "triangle"): "bottom right"}[(color, shape)]


def test_unaskable_questions_return_none():
    rng = np.random.default_rng(0)
    objs = [_obj("circle", "red", 10, 10), _obj("circle", "red", 120, 120)]  # (not a valid scene, but a rule check)
    assert sample_question(objs, "color", rng) is None
    assert sample_question(objs, "shape", rng) is None
    centred = [_obj("square", "blue", 81, 20)]  # centre x = 96: on the vertical centre line
    assert sample_question(centred, "where", rng) is None
    assert sample_question([_obj("square", "blue", 10, 10)], "count_shape", rng)[1] in ("zero", "one")
    with pytest.raises(UserError):
        sample_question(objs, "nonsense", rng)


def test_quadrant_deadzone_10px():
    assert quadrant(_obj("square", "red", 71, 10, s=30)) == "top left"  # centre x = 86: exactly 10 px away
    assert quadrant(_obj("square", "red", 72, 10, s=30)) is None  # centre x = 87: 9 px away
    assert quadrant(_obj("square", "red", 91, 91, s=30)) == "bottom right"  # centre (106, 106)
    assert quadrant(_obj("square", "red", 90, 120, s=30)) is None  # centre x = 105: 9 px away


def test_exists_balanced_and_counts_in_range():
    rng = np.random.default_rng(5)
    answers = Counter()
    for _, objects in scenes(400, seed=5):
        answers[sample_question(objects, "exists", rng)[1]] += 1
        assert sample_question(objects, "count_all", rng)[1] in NUMBER_WORDS[1:]
        assert sample_question(objects, "count_shape", rng)[1] in NUMBER_WORDS
    assert abs(answers["yes"] - answers["no"]) < 60


def test_dataset_round_trip_and_balance(tmp_path):
    path = make_dataset(tmp_path / "ds", n=24, seed=3)
    assert path == tmp_path / "ds" / "data.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == {"image", "question", "answer", "type"} for r in raw)
    assert all(not r["image"].startswith("/") for r in raw)
    assert Counter(r["type"] for r in raw) == {t: 4 for t in QUESTION_TYPES}
    rows = load_jsonl(path)
    assert len(rows) == 24
    for raw_row, row in zip(raw, rows):
        assert row["question"] == raw_row["question"] and row["answer"] == raw_row["answer"]
        assert Image.open(row["image"]).size == (192, 192)
    again = make_dataset(tmp_path / "ds2", n=24, seed=3)  # same seed, same data
    assert [json.loads(x)["question"] for x in again.read_text().splitlines()] == [r["question"] for r in raw]


def test_make_shapes_cli(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    shapes.add_arguments(parser)
    assert shapes.run(parser.parse_args([str(tmp_path / "cli"), "--n", "6", "--seed", "1"])) == 0
    rows = load_jsonl(tmp_path / "cli" / "data.jsonl")
    assert sorted(r["type"] for r in rows) == sorted(QUESTION_TYPES)


def test_scoring_normalisation():
    assert normalize_answer("  Red. ") == "red"
    assert is_correct("Top Left.", "top left")
    assert is_correct("yes", "Yes")
    assert not is_correct("top", "top left")
    assert not is_correct("red", "blue")


@pytest.mark.parametrize("content, message", [
    ("{not json}\n", "not valid JSON"),
    ('["a list"]\n', "JSON object"),
    ('{"image": "x.png", "question": "q"}\n', "answer"),
    ("\n", "no samples"),
])
def test_bad_jsonl_raises_user_error(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_jsonl(path)


def test_missing_file_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_module_exports_cli_hooks():
    assert callable(shapes.add_arguments) and callable(shapes.run)
