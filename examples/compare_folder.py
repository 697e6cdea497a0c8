"""Compare pruning methods on a folder of images and write one CSV row per (image, method).

    python examples/compare_folder.py assets/examples --question "How many objects are there?" --out results.csv

Every method runs at the same budget (a fraction of the full model's prefill FLOPs) and is timed in turns with the
full model on each image; `agrees` says whether its answer is the full model's.
"""

import argparse
import csv
import sys
from pathlib import Path

import par_demo
from par_demo.images import load_image

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("folder", help="images (PNG, JPEG, WebP)")
parser.add_argument("--question", required=True)
parser.add_argument("--out", default="results.csv")
parser.add_argument("--model", default=None, help="local folder, hub id or random:<preset> (default: the embedded model)")
parser.add_argument("--budget", type=float, default=0.5)
parser.add_argument("--methods", default=None, help="comma-separated (default: PAR and the methods of the field)")
parser.add_argument("--rounds", type=int, default=3)
args = parser.parse_args()

folder = Path(args.folder)
if not folder.is_dir():
    sys.exit(f"error: {folder} is not a folder")
images = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
if not images:
    sys.exit(f"error: no PNG, JPEG or WebP images in {folder}")
try:
    pruner = par_demo.load(args.model) if args.model else par_demo.load()
except par_demo.UserError as exc:
    sys.exit(f"error: {exc}")
methods = args.methods.split(",") if args.methods else None
with open(args.out, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["image", "method", "answer", "agrees", "flops_ratio", "visual_tokens", "layers",
                     "prefill_ms", "prefill_speedup", "skipped"])
    for path in images:
        try:
            image = load_image(path)
        except par_demo.UserError as exc:  # an unreadable image is noted, and the others go on
            writer.writerow([path.name, "", "", "", "", "", "", "", "", str(exc)])
            print(f"{path.name}: {exc}")
            continue
        try:
            result = pruner.compare(image, args.question, methods=methods, budget=args.budget, rounds=args.rounds)
        except par_demo.UserError as exc:  # the question, methods, budget or rounds: the same for every image
            sys.exit(f"error: {exc}")
        full = result.full
        writer.writerow([path.name, "full", full.text, True, 1.0, full.n_visual_tokens, full.n_layers,
                         round(full.prefill_s * 1000, 2), 1.0, ""])
        for name, p in result.results.items():
            writer.writerow([path.name, name, p.text, p.text == full.text, round(p.flops_ratio, 4),
                             len(p.kept_visual_tokens), len(p.kept_layers), round(p.prefill_s * 1000, 2),
                             round(p.timing.prefill_speedup.median, 3), ""])
        for name, reason in result.skipped.items():
            writer.writerow([path.name, name, "", "", "", "", "", "", "", reason])
        print(f"{path.name}: full says {full.text!r}; " + ", ".join(
            f"{name} {p.text!r}" for name, p in result.results.items()))
print(f"wrote {args.out}")
