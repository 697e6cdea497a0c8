"""Train a PAR router for a model from a folder of your own photos, then prune with it.

    python examples/train_router_from_photos.py --model llava-hf/llava-1.5-7b-hf --photos my_photos/ --out my_router

No labels are needed: the questions come from the built-in bank and the targets are the frozen model's own
answers. Training is `python -m par_demo train-router` (options after `--` go to it, e.g. `-- --steps 600`);
see the router page of the docs for what it costs.
"""

import argparse

from pathlib import Path

import par_demo
from par_demo.cli import main as par_demo_command
from par_demo.training.questions import find_images  # the photo search train-router uses

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", required=True, help="local folder, hub id or random:<preset>")
parser.add_argument("--photos", required=True, help="folder of photos, searched recursively")
parser.add_argument("--out", required=True, help="where the router is written")
parser.add_argument("--question", default="What is in the picture?", help="asked of the first photo afterwards")
parser.add_argument("train_options", nargs="*", help="more train-router options, after --")
args = parser.parse_args()

status = par_demo_command(["train-router", "--model", args.model, "--images", args.photos, "--out", args.out,
                           *args.train_options])
if status:
    raise SystemExit(status)

pruner = par_demo.load(args.model, router=args.out)
photo = find_images(Path(args.photos))[0]
full = pruner.generate(photo, args.question, method="full", budget=1.0)
pruned = pruner.generate(photo, args.question, method="par", budget=0.5)
print(f"{photo}: full model {full.text!r}; PAR at half the FLOPs {pruned.text!r} "
      f"({len(pruned.kept_visual_tokens)}/{pruned.n_visual_tokens} tokens, {len(pruned.kept_layers)} layers)")
