"""The scenes both stages train on, rendered once, and each patch's labels (what stage A's heads must read)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from par_demo.base_training.config import GRID
from par_demo.shapes import COLORS, IMAGE_SIZE, QUADRANTS, SHAPES, draw_object, quadrant, render_scene

COLOR_NAMES = list(COLORS)
IGNORE = -100


def patch_labels(objects: list[dict], grid: int = GRID) -> np.ndarray:
    """[grid*grid, 4] int labels per patch: colour (0=bg), shape (0=bg), centre (0/1), quadrant (0=bg).

    A patch belongs to an object when the object covers >= 1/4 of it, to the background when < 1/16;
    in between it is ambiguous and ignored. The patch holding an object's box centre is always that object's.
    """
    p = IMAGE_SIZE // grid
    canvas = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(canvas)
    for k, obj in enumerate(objects):
        draw_object(draw, obj, k + 1)
    ids = np.asarray(canvas).reshape(grid, p, grid, p).transpose(0, 2, 1, 3).reshape(grid * grid, p * p)
    cover = np.stack([(ids == k + 1).sum(1) for k in range(len(objects))], 1)  # [patches, objects]
    owner = cover.argmax(1)
    best = cover.max(1)
    labels = np.zeros((grid * grid, 4), dtype=np.int64)
    labels[(best >= p * p // 16) & (best < p * p // 4)] = IGNORE

    def assign(patch: int, k: int) -> None:
        obj = objects[k]
        quad = quadrant(obj)
        labels[patch, 0] = COLOR_NAMES.index(obj["color"]) + 1
        labels[patch, 1] = SHAPES.index(obj["shape"]) + 1
        labels[patch, 3] = IGNORE if quad is None else QUADRANTS.index(quad) + 1
        if labels[patch, 2] != 1:
            labels[patch, 2] = 0

    for patch in np.nonzero(best >= p * p // 4)[0]:
        assign(int(patch), int(owner[patch]))
    for k, obj in enumerate(objects):
        cx, cy = obj["center"]
        patch = min(int(cy // p), grid - 1) * grid + min(int(cx // p), grid - 1)
        labels[patch, 2] = 1
        assign(patch, k)
    labels[labels[:, 0] == 0, 2] = 0
    return labels


@dataclass
class Pool:
    images: np.ndarray  # uint8 [N, H, W, 3]
    objects: list  # list of object lists
    labels: np.ndarray  # int64 [N, patches, 4]


def make_pool(n: int, seed: int, grid: int = GRID) -> Pool:
    rng = np.random.default_rng([seed, 1])
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    objects, labels = [], np.empty((n, grid * grid, 4), dtype=np.int64)
    for i in tqdm(range(n), desc="render scenes", leave=False):
        image, objs = render_scene(rng)
        images[i] = np.asarray(image)
        objects.append(objs)
        labels[i] = patch_labels(objs, grid)
    return Pool(images, objects, labels)
