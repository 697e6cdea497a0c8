"""Where the prefill time of an embedded-model-shaped LLaVA goes on this machine, for other widths and grids.

    python scripts/embedded_time_profile.py --configs 128x16,384x16,512x16,128x8,256x8 --json out.json

Each config WIDTHxPATCH is the embedded model's architecture (`par_demo.base_training.model.build_model`: CLIP tower 2 x 64,
12 Llama layers) with the decoder WIDTH wide (heads of 32, MLP 4x) and the 192-px image cut in PATCH-px patches
(16: 12 x 12 = 144 visual tokens, as shipped; 8: LLaVA-1.5's 24 x 24 = 576), random weights (time does not
depend on them). The cost model of `par_demo.cost` is fitted on each (the same grid of timed splits as
`calibrate`) and split into what pruning cannot touch (`fixed`: tower, projector, LM head, per-call work), what
only skipping a layer saves (`per layer`: a layer's cost whatever its row count, reading its weights and launching
its kernels) and what dropping tokens saves (`rows`). A model whose time is mostly `rows` turns FLOPs into time as
an LVLM on a GPU does; one whose time is `fixed` and `per layer` does not, whatever its FLOPs say.

Timings depend on the machine's load: the script prints the load average; re-run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402

from par_demo.api import load  # noqa: E402
from par_demo.cost import CALIBRATION_QUESTION, calibration_image, cost_key, fit, grid, measure_splits  # noqa: E402
from par_demo.shapes import IMAGE_SIZE  # noqa: E402
from par_demo.tokenizer import build_processor  # noqa: E402
from par_demo.base_training.config import ModelConfig, grid_of  # noqa: E402
from par_demo.base_training.model import build_model  # noqa: E402


def build(width: int, patch: int, folder: Path) -> int:
    """Save a random-weight embedded-shaped model; returns its parameter count."""
    processor = build_processor(IMAGE_SIZE, patch)
    torch.manual_seed(0)
    model = build_model(ModelConfig(patch_size=patch, text_width=width, text_heads=max(4, width // 32),
                                    text_mlp=4 * width), processor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def profile(width: int, patch: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        params = build(width, patch, Path(tmp))
        predictor = load(tmp).predictor
        image = calibration_image()
        query = predictor.engine.prepare(predictor.encode(image, CALIBRATION_QUESTION))
        splits = grid(query.n_visual, predictor.engine.n_layers)
        seconds = measure_splits(predictor, image, splits, rounds, None)
        cost = fit([(t, n, s) for (t, n), s in zip(splits, seconds)], query.n_visual, query.n_text,
                   predictor.engine.n_layers, cost_key(predictor))
    n_v, n_layers = cost.n_visual, cost.n_layers
    full = cost.full(n_v, cost.n_text)
    per_layer = n_layers * cost.per_layer_s
    return {
        "width": width, "patch": patch, "grid": grid_of(patch), "visual_tokens": n_v, "params_m": params / 1e6,
        "full_prefill_ms": full * 1e3,
        "fixed_share": cost.fixed_s / full, "per_layer_share": per_layer / full,
        "rows_share": (full - cost.fixed_s - per_layer) / full,
        # what each kind of pruning buys: half the visual tokens with every layer, half the layers with every token
        "half_tokens_time": cost.predict(n_v // 2, n_layers, 0, n_v, cost.n_text) / full,
        "half_layers_time": cost.predict(n_v, n_layers // 2, 0, n_v, cost.n_text) / full,
        "cost": cost.to_dict(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="128x16,384x16,512x16,128x8,256x8",
                        help="comma-separated WIDTHxPATCH (decoder width x patch size in px)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per split")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    load_avg = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load average {load_avg}")
    rows = []
    print("| width | patch (tokens) | params | full prefill | fixed | per layer | rows | half tokens | half layers |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.configs.split(","):
        width, patch = (int(x) for x in spec.lower().split("x"))
        row = profile(width, patch, args.rounds)
        rows.append(row)
        print(f"| {width} | {patch} ({row['visual_tokens']}) | {row['params_m']:.1f} M | {row['full_prefill_ms']:.1f} ms "
              f"| {row['fixed_share']:.0%} | {row['per_layer_share']:.0%} | {row['rows_share']:.0%} "
              f"| {row['half_tokens_time']:.2f} | {row['half_layers_time']:.2f} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(sys.argv), "environment": load_avg,
                                               "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
