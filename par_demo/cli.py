"""`python -m par_demo <command>`: one entry point, one sub-command per job.

Each command lives in its own module, which exposes `add_arguments(parser)` and `run(args) -> int`.
Errors the user can fix raise `UserError`; they are printed as one line, never as a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from par_demo.errors import UserError

# command name -> (module, one-line help)
COMMANDS = {
    "predict": ("par_demo.predict", "answer one question about one image under a pruning method"),
    "bench": ("par_demo.bench", "time methods and budgets on one model (prefill and end-to-end)"),
    "eval": ("par_demo.evaluate", "accuracy of methods and budgets on a JSONL data set"),
    "calibrate": ("par_demo.calibrate", "measure how long prefill splits take on this machine (the cost model)"),
    "make-shapes": ("par_demo.shapes", "write a ShapesVQA data set (images + JSONL)"),
    "train-base": ("par_demo.train_base", "train the embedded ShapesVQA LLaVA from scratch"),
    "train-router": ("par_demo.train_router", "train a PAR meta-router self-supervised"),
    "lmms-task": ("par_demo.lmms.task", "write an lmms-eval task file for a JSONL data set (ShapesVQA format)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m par_demo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            p.set_defaults(_missing=f"the '{name}' command is not available in this version")
            continue
        module.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"error: {args._missing}", file=sys.stderr)
        return 2
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`--json | head`): nothing more to say, and no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's flush at exit must not fail too
        return 1
