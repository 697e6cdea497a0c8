"""Why dropping visual tokens breaks counting, on the embedded model: "How many objects are there?" answered with
exactly the patches that touch an object kept, with those plus some random background patches, and with every patch.

    python scripts/probe_counting.py --scenes 200 --background 30

Scenes are drawn fresh (`par_demo.shapes.render_scene`, seed `--seed`), so each object's box is known; a patch
touches an object when its cell intersects the object's box. Tokens are dropped at K = 0, every layer runs, nothing
is absorbed (`PruningPlan.keep_visual` only); `--absorb` also runs each kept set with the dropped tokens absorbed
(proportional attention, `par_demo/methods/absorb.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import numpy as np  # noqa: E402
import torch  # noqa: E402

from par_demo.engine import PruningPlan  # noqa: E402
from par_demo.methods.absorb import absorbed_sizes  # noqa: E402
from par_demo.models import load_model  # noqa: E402
from par_demo.predict import Predictor  # noqa: E402
from par_demo.shapes import IMAGE_SIZE, NUMBER_WORDS, is_correct, render_scene  # noqa: E402

QUESTION = "How many objects are there?"


def object_cells(objects: list[dict], grid: int) -> np.ndarray:
    """Row-major indices of the grid cells whose square intersects any object's box."""
    cell = IMAGE_SIZE / grid
    hit = np.zeros((grid, grid), dtype=bool)
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        hit[int(y0 // cell):int(np.ceil(y1 / cell)), int(x0 // cell):int(np.ceil(x1 / cell))] = True
    return np.flatnonzero(hit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/models/shapes-llava")
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--background", type=int, default=30, help="random background patches added to the objects'")
    parser.add_argument("--absorb", action="store_true", help="also run each kept set with absorbing")
    parser.add_argument("--seed", type=int, default=4242)
    args = parser.parse_args()
    predictor = Predictor(load_model(args.model))
    engine, eos = predictor.engine, predictor.loaded.processor.tokenizer.eos_token_id
    rng = np.random.default_rng(args.seed)
    right: dict[str, int] = {}
    kept_counts = []
    for _ in range(args.scenes):
        image, objects = render_scene(rng)
        answer = NUMBER_WORDS[len(objects)]
        inputs = predictor.encode(image, QUESTION)
        query = engine.prepare(inputs)
        grid = int(round(query.n_visual ** 0.5))
        cells = object_cells(objects, grid)
        background = np.setdiff1d(np.arange(query.n_visual), cells)
        extra = rng.choice(background, size=min(args.background, background.size), replace=False)
        kept_counts.append(cells.size)
        settings = {"every patch": None, "object patches": cells,
                    f"objects + {args.background} background": np.union1d(cells, extra)}
        for name, keep in settings.items():
            runs = [(name, False)] + ([(name + ", absorbed", True)] if args.absorb and keep is not None else [])
            for label, absorb in runs:
                plan = PruningPlan()
                if keep is not None:
                    index = torch.tensor(keep, dtype=torch.long)
                    sizes = absorbed_sizes(query.image_features, index) if absorb else None
                    plan = PruningPlan(start_layer=0, keep_visual=index, kept_sizes=sizes)
                tokens = engine.generate(inputs, lambda q, p=plan: p, max_new_tokens=4, eos_token_id=eos).tokens
                right[label] = right.get(label, 0) + is_correct(predictor.decode(tokens), answer)
    print(f"{args.scenes} scenes, {np.mean(kept_counts):.1f} object patches of {query.n_visual} on average")
    for label, n in right.items():
        print(f"{label:40s} {100 * n / args.scenes:5.1f} % right")


if __name__ == "__main__":
    main()
