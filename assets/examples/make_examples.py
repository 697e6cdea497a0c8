"""Writes the app's example images and questions: `python assets/examples/make_examples.py`.

The scenes follow the ShapesVQA spec of the embedded model (192×192, gray background with noise, 1–5 coloured
circles/squares/triangles), so the embedded model can answer them (the questions are ones its full model answers correctly).
Each example stores the true answer too.
Drawing is done here (not with par_demo.shapes) so that the examples stay fixed when the data generator changes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent
SIZE = 192
COLORS = {"red": (220, 50, 50), "green": (50, 170, 70), "blue": (50, 90, 220), "yellow": (230, 200, 40),
          "purple": (150, 70, 190), "orange": (240, 140, 40)}

# (file name, gray level, noise seed, objects as (shape, color, x, y, side), question, answer)
EXAMPLES = [
    ("shapes_where.png", 222, 1,
     [("circle", "red", 24, 20, 40), ("square", "blue", 120, 118, 42), ("triangle", "yellow", 118, 24, 36)],
     "Where is the blue square?", "bottom right"),
    ("shapes_color.png", 210, 2,
     [("triangle", "green", 30, 110, 44), ("circle", "orange", 110, 40, 34)],
     "Where is the green triangle?", "bottom left"),
    ("shapes_count.png", 232, 3,
     [("circle", "purple", 16, 16, 30), ("square", "red", 80, 30, 32), ("triangle", "blue", 140, 20, 34),
      ("circle", "yellow", 40, 120, 38), ("square", "green", 130, 130, 36)],
     "How many objects are there?", "five"),
    ("shapes_shape.png", 204, 4,
     [("square", "orange", 70, 70, 44), ("circle", "blue", 14, 140, 30)],
     "What shape is the blue object?", "circle"),
    ("shapes_exists.png", 238, 5,
     [("triangle", "red", 20, 130, 40), ("circle", "green", 130, 24, 36), ("square", "purple", 120, 130, 30)],
     "Is there a purple square?", "yes"),
]


def draw_scene(gray: int, seed: int, objects: list[tuple[str, str, int, int, int]]) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.full((SIZE, SIZE, 3), gray, dtype=np.float64) + rng.normal(0, 6, (SIZE, SIZE, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for shape, color, x, y, side in objects:
        box = (x, y, x + side - 1, y + side - 1)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:  # upward triangle: apex top middle, base along the bottom edge
            draw.polygon([(x + (side - 1) / 2, y), (x, y + side - 1), (x + side - 1, y + side - 1)], fill=fill)
    return image


def main() -> None:
    records = []
    for name, gray, seed, objects, question, answer in EXAMPLES:
        draw_scene(gray, seed, objects).save(HERE / name, optimize=True)
        records.append({"image": name, "question": question, "answer": answer})
    (HERE / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {len(records)} examples to {HERE}")


if __name__ == "__main__":
    main()
