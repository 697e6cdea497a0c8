"""`eval`: accuracy of methods at budgets (FLOPs, or time with --budget-unit time) on a JSONL data set (ShapesVQA
format, or your own).

    python -m par_demo eval --data held_out/data.jsonl --methods full,fastv,random,layerdrop --budgets 0.25,0.5 --json

Each line of the file is {"image": path relative to the file, "question": ..., "answer": ..., "type": ...}.
Answers are scored by exact match after lower-casing and stripping whitespace and a trailing period.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from par_demo.bench import parse_list
from par_demo.errors import UserError
from par_demo.images import check_file, load_image
from par_demo.methods import method_class
from par_demo.methods.base import check_budget
from par_demo.arguments import add_budget_unit_argument, add_model_arguments, predictor_from_args
from par_demo.predict import Predictor, check_max_new_tokens
from par_demo.shapes import is_correct, load_jsonl


@dataclass
class EvalRow:
    method: str
    budget: float
    accuracy: float | None = 0.0  # None where the setting was not evaluated (`note`)
    flops_ratio: float | None = 0.0  # mean over samples
    n: int = 0
    budget_unit: str = "flops"
    time_ratio: float | None = None  # time budgets: predicted prefill time / the full model's, mean over samples
    by_type: dict[str, float] = field(default_factory=dict)
    n_by_type: dict[str, int] = field(default_factory=dict)
    note: str | None = None  # why a setting was not evaluated (e.g. a budget the method cannot reach)
    tokens: int | None = None  # fixed counts (`--tokens`, `--layers`) the method ran with instead of the budget
    layers: int | None = None


def settings(methods: list[str], budgets: list[float]) -> list[tuple[str, float]]:
    """(method, budget) pairs; `full` once, at budget 1.0."""
    pairs = []
    for name in methods:
        name = method_class(name).name
        for budget in ([1.0] if name == "full" else budgets):
            if (name, budget) not in pairs:
                pairs.append((name, budget))
    return pairs


def evaluate(predictor: Predictor, samples: list[dict], pairs: list[tuple[str, float]], tokens=None, layers=None,
             max_new_tokens: int = 8, progress: bool = False, budget_unit: str = "flops") -> list[EvalRow]:
    correct = defaultdict(lambda: defaultdict(int))
    count = defaultdict(lambda: defaultdict(int))
    ratios = defaultdict(float)
    time_ratios = defaultdict(float)
    notes: dict[tuple[str, float], str] = {}  # settings a method refuses (out of reach, counts it does not take)
    bar = tqdm(total=len(samples) * len(pairs), desc="eval", disable=not progress, file=sys.stderr)
    for sample in samples:
        image = load_image(sample["image"])
        for pair in pairs:
            bar.update()
            if pair in notes:
                continue
            # the full model is the reference: fixed counts are for the methods
            counts = (None, None) if pair[0] == "full" else (tokens, layers)
            try:
                p = predictor.predict(image, sample["question"], pair[0], pair[1], *counts,
                                      max_new_tokens=max_new_tokens, budget_unit=budget_unit)
            except UserError as exc:  # this method cannot run this setting (e.g. layer drop and --tokens): say so
                notes[pair] = str(exc)
                continue
            kind = sample.get("type", "all")
            correct[pair][kind] += is_correct(p.answer, sample["answer"])
            count[pair][kind] += 1
            ratios[pair] += p.flops_ratio
            time_ratios[pair] += p.time_ratio or 0.0
    bar.close()

    def fixed(pair) -> dict:  # the counts a pruning method ran with; the full model is the reference
        return {} if pair[0] == "full" else {"tokens": tokens, "layers": layers}

    rows = []
    for pair in pairs:
        if pair in notes:
            rows.append(EvalRow(method=pair[0], budget=pair[1], accuracy=None, flops_ratio=None,
                                budget_unit=budget_unit, note=notes[pair], **fixed(pair)))
            continue
        n = sum(count[pair].values())
        rows.append(EvalRow(
            method=pair[0], budget=pair[1], accuracy=sum(correct[pair].values()) / n, flops_ratio=ratios[pair] / n,
            n=n, by_type={k: correct[pair][k] / count[pair][k] for k in sorted(count[pair])},
            n_by_type=dict(sorted(count[pair].items())), budget_unit=budget_unit,
            time_ratio=time_ratios[pair] / n if budget_unit == "time" else None, **fixed(pair),
        ))
    return rows


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="JSONL file (image, question, answer, type)")
    parser.add_argument("--methods", default="full,fastv,random,layerdrop")
    parser.add_argument("--budgets", default="0.25,0.5")
    add_budget_unit_argument(parser)
    parser.add_argument("--tokens", type=int, default=None, help="fixed visual tokens kept (instead of budgets)")
    parser.add_argument("--layers", type=int, default=None, help="fixed decoder layers kept (instead of budgets)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N samples")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--json", action="store_true", help="one JSON object per row")


def run(args) -> int:
    methods = parse_list(args.methods, "methods")
    budgets = [check_budget(b) for b in parse_list(args.budgets, "budgets", float)]
    # fixed counts take the place of the budgets: one row per method, not the same run once per budget
    fixed = args.tokens is not None or args.layers is not None
    pairs = settings(methods, budgets[:1] if fixed else budgets)
    check_max_new_tokens(args.max_new_tokens)  # what every row would refuse: one error, not a note on each
    samples = load_jsonl(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise UserError("--limit must be at least 1")
        samples = samples[: args.limit]
    if not samples:
        raise UserError(f"{args.data} holds no samples")
    unreadable = []  # checked from their headers before the model loads, not partway through the run, losing it
    for sample in samples:
        try:
            check_file(sample["image"], f"'{Path(sample['image']).name}'")
        except UserError as exc:
            unreadable.append(str(exc))
    if unreadable:
        raise UserError(f"{len(unreadable)} of the {len(samples)} images in {args.data} cannot be read; the first: "
                        f"{unreadable[0]}")
    predictor = predictor_from_args(args)
    rows = evaluate(predictor, samples, pairs, args.tokens, args.layers, args.max_new_tokens,
                    progress=sys.stderr.isatty(), budget_unit=args.budget_unit)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row), allow_nan=False))  # strict JSON: a reader in any language parses it
    else:
        print(format_table(rows))
    if all(row.note for row in rows):  # a script must not read success from a run that evaluated nothing
        raise UserError("no setting could be evaluated (each row says why)")
    return 0


def format_table(rows: list[EvalRow]) -> str:
    """One line per setting; each per-type cell shows the accuracy and, in brackets, how many samples it rests on."""
    types = sorted({t for r in rows for t in r.by_type})
    timed = any(r.time_ratio is not None for r in rows)
    head = (f"{'method':<11}{'budget':>7}{'FLOPs':>7}" + (f"{'time*':>7}" if timed else "") + f"{'n':>6}{'acc':>7}"
            + "".join(f"{t[:13]:>15}" for t in types))
    lines = [head, "-" * len(head)]
    for r in rows:
        budget = "fixed" if r.tokens is not None or r.layers is not None else f"{r.budget:.2f}"
        if r.note:
            lines.append(f"{r.method:<11}{budget:>7}  not evaluated: {r.note}")
            continue
        cells = "".join(f"{_accuracy_cell(r, t):>15}" for t in types)
        predicted = f"{r.time_ratio:>7.2f}" if timed else ""
        lines.append(f"{r.method:<11}{budget:>7}{r.flops_ratio:>7.2f}{predicted}{r.n:>6}{r.accuracy:>7.1%}" + cells)
    lines.append("per type: accuracy (number of samples of that type)")
    counts = next(((r.tokens, r.layers) for r in rows if r.tokens is not None or r.layers is not None), None)
    if counts:
        lines.append(f"fixed: {counts[0] if counts[0] is not None else 'all'} visual tokens, "
                     f"{counts[1] if counts[1] is not None else 'all'} layers, in place of a budget")
    return "\n".join(lines)


def _accuracy_cell(row: EvalRow, kind: str) -> str:
    if kind not in row.by_type:
        return "-"
    return f"{row.by_type[kind]:.1%} ({row.n_by_type[kind]})"
