"""ShapesVQA: the synthetic visual question answering task the embedded model is trained and measured on.

A scene is a 192x192 noisy gray canvas with 1-5 flat-coloured shapes, each a distinct (shape, color) pair.
Six question templates ask about colour, shape, counts, existence and position. Everything here follows
the spec of issue 3 exactly; `python -m par_demo make-shapes OUT --n N --seed S` writes a data set.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from par_demo.errors import UserError

IMAGE_SIZE = 192
BACKGROUND_RANGE = (200, 240)  # gray level g, inclusive
NOISE_SIGMA = 6.0
MAX_OBJECTS = 5
BOX_SIDE_RANGE = (26, 44)  # inclusive
MARGIN = 4  # px between a box and the image border
GAP = 6  # px between two boxes
QUADRANT_DEADZONE = 10  # "where" is only asked when the centre is this far from both centre lines

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 50, 50),
    "green": (50, 170, 70),
    "blue": (50, 90, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 70, 190),
    "orange": (240, 140, 40),
}
QUESTION_TYPES = ("color", "shape", "count_shape", "count_all", "exists", "where")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")


# ----------------------------------------------------------------------------------------------------------
# scenes


def _boxes_apart(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """True when two square boxes (x, y, side) are at least GAP px apart along x or along y."""
    ax, ay, asz = a
    bx, by, bsz = b
    gap_x = max(bx - (ax + asz), ax - (bx + bsz))
    gap_y = max(by - (ay + asz), ay - (by + bsz))
    return max(gap_x, gap_y) >= GAP


def _place_boxes(n: int, rng: np.random.Generator) -> list[tuple[int, int, int]] | None:
    """Rejection-sample n boxes inside the margins and apart from each other; None if the canvas got crowded."""
    boxes: list[tuple[int, int, int]] = []
    for _ in range(200 * n):
        side = int(rng.integers(BOX_SIDE_RANGE[0], BOX_SIDE_RANGE[1] + 1))
        hi = IMAGE_SIZE - MARGIN - side  # inclusive upper bound of the top-left corner
        box = (int(rng.integers(MARGIN, hi + 1)), int(rng.integers(MARGIN, hi + 1)), side)
        if all(_boxes_apart(box, other) for other in boxes):
            boxes.append(box)
            if len(boxes) == n:
                return boxes
    return None


def quadrant(obj: dict) -> str | None:
    """The quadrant of the box centre, or None when it is within QUADRANT_DEADZONE px of a centre line."""
    cx, cy = obj["center"]
    mid = IMAGE_SIZE / 2
    if abs(cx - mid) < QUADRANT_DEADZONE or abs(cy - mid) < QUADRANT_DEADZONE:
        return None
    return ("top" if cy < mid else "bottom") + " " + ("left" if cx < mid else "right")


def draw_object(draw: ImageDraw.ImageDraw, obj: dict, fill) -> None:
    """Draw one object's shape into its box (no anti-aliasing, so object pixels keep the exact colour)."""
    x0, y0, x1, y1 = obj["box"]  # x1, y1 exclusive
    last_x, last_y = x1 - 1, y1 - 1
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, last_x, last_y], fill=fill)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, last_x, last_y], fill=fill)
    else:  # upward triangle: apex at the top middle, base along the bottom edge
        draw.polygon([((x0 + last_x) / 2, y0), (x0, last_y), (last_x, last_y)], fill=fill)


def render_scene(rng: np.random.Generator) -> tuple[Image.Image, list[dict]]:
    """Draw a random scene; returns the image and its objects (shape, color, box, size, center)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    boxes = None
    while boxes is None:
        boxes = _place_boxes(n, rng)
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    objects = []
    for (x, y, side), k in zip(boxes, chosen):
        shape, color = pairs[int(k)]
        objects.append({
            "shape": shape, "color": color, "size": side,
            "box": [x, y, x + side, y + side], "center": [x + side / 2, y + side / 2],
        })
    gray = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1] + 1))
    noise = rng.normal(0.0, NOISE_SIGMA, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    canvas = np.clip(np.rint(gray + noise), 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")
    draw = ImageDraw.Draw(image)
    for obj in objects:
        draw_object(draw, obj, COLORS[obj["color"]])
    return image, objects


# ----------------------------------------------------------------------------------------------------------
# questions


def sample_question(objects: list[dict], qtype: str, rng: np.random.Generator) -> tuple[str, str] | None:
    """One (question, answer) of the given type about the scene, or None when the type cannot be asked."""
    if qtype == "color":
        shapes = [s for s in SHAPES if sum(o["shape"] == s for o in objects) == 1]
        if not shapes:
            return None
        shape = shapes[int(rng.integers(len(shapes)))]
        obj = next(o for o in objects if o["shape"] == shape)
        return f"What color is the {shape}?", obj["color"]
    if qtype == "shape":
        colors = [c for c in COLORS if sum(o["color"] == c for o in objects) == 1]
        if not colors:
            return None
        color = colors[int(rng.integers(len(colors)))]
        obj = next(o for o in objects if o["color"] == color)
        return f"What shape is the {color} object?", obj["shape"]
    if qtype == "count_shape":
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        return f"How many {shape}s are there?", NUMBER_WORDS[sum(o["shape"] == shape for o in objects)]
    if qtype == "count_all":
        return "How many objects are there?", NUMBER_WORDS[len(objects)]
    if qtype == "exists":
        present = {(o["shape"], o["color"]) for o in objects}
        want_yes = bool(rng.integers(2))  # a fair coin keeps yes/no balanced
        pool = sorted(present) if want_yes else [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        shape, color = pool[int(rng.integers(len(pool)))]
        return f"Is there a {color} {shape}?", "yes" if want_yes else "no"
    if qtype == "where":
        placed = [o for o in objects if quadrant(o) is not None]
        if not placed:
            return None
        obj = placed[int(rng.integers(len(placed)))]
        return f"Where is the {obj['color']} {obj['shape']}?", quadrant(obj)
    raise UserError(f"unknown question type {qtype!r}; expected one of {', '.join(QUESTION_TYPES)}")


def sample_example(qtype: str, rng: np.random.Generator) -> tuple[Image.Image, list[dict], str, str]:
    """A fresh scene with one question of the given type (scenes that cannot ask it are redrawn)."""
    while True:
        image, objects = render_scene(rng)
        qa = sample_question(objects, qtype, rng)
        if qa is not None:
            return image, objects, qa[0], qa[1]


def _type_schedule(n: int, per_type, rng: np.random.Generator) -> list[str]:
    """Which question type each sample gets: balanced round-robin, or explicit counts, then shuffled."""
    if per_type is None:
        types = [QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(n)]
    else:
        counts = per_type if isinstance(per_type, dict) else {t: int(per_type) for t in QUESTION_TYPES}
        unknown = set(counts) - set(QUESTION_TYPES)
        if unknown:
            raise UserError(f"unknown question type(s) {sorted(unknown)}; expected {', '.join(QUESTION_TYPES)}")
        types = [t for t in QUESTION_TYPES for _ in range(int(counts.get(t, 0)))]
    order = rng.permutation(len(types))
    return [types[int(i)] for i in order]


def make_dataset(out_dir, n: int, seed: int, per_type=None) -> Path:
    """Write n samples (PNG images + data.jsonl) to out_dir and return the JSONL path.

    Types are balanced round-robin (exactly when n is a multiple of 6). `per_type` (an int, or a dict
    type -> count) overrides n with explicit per-type counts.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    schedule = _type_schedule(n, per_type, rng)
    path = out / "data.jsonl"
    partial = out / "data.jsonl.tmp"  # an interrupted run leaves no shorter data.jsonl that reads as whole
    with open(partial, "w") as f:
        for i, qtype in enumerate(schedule):
            image, _, question, answer = sample_example(qtype, rng)
            rel = f"images/{i:06d}.png"
            image.save(out / rel)
            f.write(json.dumps({"image": rel, "question": question, "answer": answer, "type": qtype}) + "\n")
    partial.replace(path)
    return path


def load_jsonl(path, require: tuple[str, ...] = ("image", "question", "answer")) -> list[dict]:
    """Read a data-set file; image paths come back absolute (resolved relative to the file).

    `require` names the string fields every line must have (router training reads no answers).
    """
    path = Path(path)
    if path.is_dir():  # a make-shapes output folder, say
        raise UserError(f"{path} is a folder: give the data file in it (make-shapes writes data.jsonl)")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object per line")
            missing = [k for k in require if not isinstance(row.get(k), str)]
            if missing:
                raise UserError(f"{path}:{lineno}: missing or non-string field(s): {', '.join(missing)}")
            row["image"] = image_path(path.parent, row["image"])
            row.setdefault("type", "unknown")
            rows.append(row)
    if not rows:
        raise UserError(f"{path}: no samples in file")
    return rows


def image_path(data_dir, image: str) -> str:
    """A data-set line's image as an absolute path: relative paths are relative to the folder of the JSONL file."""
    image = Path(image)
    return str(image if image.is_absolute() else (Path(data_dir) / image).resolve())


def normalize_answer(s: str) -> str:
    """Lower-case, strip whitespace and one trailing period (the issue's scoring rule)."""
    s = s.strip().lower()
    if s.endswith("."):
        s = s[:-1].strip()
    return s


def is_correct(pred: str, answer: str) -> bool:
    return normalize_answer(pred) == normalize_answer(answer)


# ----------------------------------------------------------------------------------------------------------
# CLI: python -m par_demo make-shapes OUT --n N --seed S


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", help="output folder (gets data.jsonl and images/)")
    parser.add_argument("--n", type=int, default=1200, help="number of samples (multiples of 6 are balanced)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")


def run(args) -> int:
    if args.n <= 0:
        raise UserError("--n must be positive")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UserError(f"{args.out} is a file: give the folder to write data.jsonl and images/ into")
    path = make_dataset(args.out, args.n, args.seed)
    print(f"wrote {args.n} samples to {path}")
    return 0
