"""`lmms-task`: an lmms-eval task file for a JSONL data set in `eval`'s format (ShapesVQA, as `make-shapes` writes it).

    python -m par_demo make-shapes data/shapes-eval --n 60 --seed 777
    python -m par_demo lmms-task data/shapes-eval/data.jsonl      # writes data/shapes-eval/shapesvqa.yaml
    lmms-eval --model par_demo --model_args method=par,budget=0.5 --include_path data/shapes-eval --tasks shapesvqa

The file includes the task shipped with the package (`shapesvqa/shapesvqa.yaml`) and adds where the samples are:
lmms-eval reads the JSONL with `datasets`, which knows nothing of the image paths in it being relative to it.
Paths are written absolute, so the file works from any folder (write it again after moving the data).
lmms-eval 0.7.3 loads a task file given to --tasks by its path but then reports it as not found, hence
--include_path (the folder) and the task's name.
"""

from __future__ import annotations

import json
from pathlib import Path

from par_demo.errors import UserError
from par_demo.shapes import load_jsonl

PACKAGED_TASK = Path(__file__).resolve().parent / "shapesvqa" / "shapesvqa.yaml"


def write_task(data, out=None, name: str = "shapesvqa") -> Path:
    """Write the task file for the JSONL file `data` (default: `<its folder>/<name>.yaml`) and return its path."""
    data = Path(data).resolve()
    load_jsonl(data)  # a missing or malformed file is one clear message, before anything is written
    if not name.replace("_", "").replace("-", "").isalnum():
        raise UserError(f"task name must be letters, digits, '_' or '-', got {name!r}")
    out = Path(out) if out else data.parent / f"{name}.yaml"
    if out.is_dir():  # a folder given for --out: the task file goes in it, named after the task
        out = out / f"{name}.yaml"
    if not out.parent.is_dir():
        raise UserError(f"folder {out.parent} does not exist")
    # JSON strings are valid YAML scalars: any path is quoted correctly.
    out.write_text(
        f"# lmms-eval task: ShapesVQA on {data.name}, written by `python -m par_demo lmms-task`.\n"
        f"include: {json.dumps(str(PACKAGED_TASK))}\n"
        f"task: {json.dumps(name)}\n"
        f"dataset_kwargs:\n"
        f"  data_files:\n"
        f"    test: {json.dumps(str(data))}\n"
        f"lmms_eval_specific_kwargs:\n"
        f"  default:\n"
        f"    data_dir: {json.dumps(str(data.parent))}\n"
    )
    return out


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("data", help="JSONL file (image, question, answer, type), e.g. from make-shapes")
    parser.add_argument("--out", default=None, help="task file to write (default: <data folder>/<name>.yaml)")
    parser.add_argument("--name", default="shapesvqa", help="task name lmms-eval reports (default: shapesvqa)")


def run(args) -> int:
    path = write_task(args.data, args.out, args.name)
    print(f"wrote {path}\nrun it with: lmms-eval --model par_demo --model_args method=par,budget=0.5 "
          f"--include_path {path.parent} --tasks {args.name} --batch_size 1")
    return 0
