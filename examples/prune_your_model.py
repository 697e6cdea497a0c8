"""Prune a model you loaded yourself with transformers: PAR at a few budgets, next to the full model.

    python examples/prune_your_model.py                       # the embedded ShapesVQA LLaVA
    python examples/prune_your_model.py --model llava-hf/llava-1.5-7b-hf --image photo.jpg --question "..."

Each answer is timed against the full model in turns (`rounds`), so the speed-up printed is measured here.
"""

import argparse
import sys

from transformers import AutoModelForImageTextToText, AutoProcessor

import par_demo
from par_demo.models import DEFAULT_MODEL

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--model", default=DEFAULT_MODEL, help="a local folder or hub id (default: the embedded model)")
parser.add_argument("--image", default="assets/examples/shapes_where.png")
parser.add_argument("--question", default="Where is the blue square?")
parser.add_argument("--budgets", default="1.0,0.5,0.25", help="fractions of the full prefill FLOPs")
parser.add_argument("--rounds", type=int, default=3, help="timed rounds, each method in turns with the full model")
args = parser.parse_args()

try:
    model = AutoModelForImageTextToText.from_pretrained(args.model)  # any dtype, device or bitsandbytes config
    processor = AutoProcessor.from_pretrained(args.model)
    pruner = par_demo.wrap(model, processor)
except (OSError, ValueError, par_demo.UserError) as exc:  # not found, not a vision-language model, ...
    sys.exit(f"error: {str(exc).splitlines()[0]}")

print(f"{'budget':>6}  {'FLOPs':>5}  {'tokens':>7}  {'layers':>6}  {'prefill x':>9}  answer")
try:
    for budget in (float(b) for b in args.budgets.split(",")):
        method = "full" if budget >= 1 else "par"
        result = pruner.generate(args.image, args.question, method=method, budget=budget, rounds=args.rounds)
        # with --rounds 0 nothing is timed against the full model, so there is no speed-up to show
        measured = result.timing is not None and result.timing.prefill_speedup is not None
        speedup = f"{result.timing.prefill_speedup.median:>8.2f}x" if measured else f"{'-':>9}"
        tokens = f"{len(result.kept_visual_tokens):>3}/{result.n_visual_tokens:<3}"
        layers = f"{len(result.kept_layers):>2}/{result.n_layers:<3}"
        print(f"{budget:>6.2f}  {result.flops_ratio:>5.2f}  {tokens}  {layers}  {speedup}  {result.text}")
except (par_demo.UserError, ValueError) as exc:  # a bad --budgets, --rounds, image or question: one line
    sys.exit(f"error: {exc}")
