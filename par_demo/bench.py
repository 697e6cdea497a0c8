"""`bench`: measured speed of methods and budgets on one model, in one run, against the full model.

    python -m par_demo bench --model random:llava-mid --methods full,fastv,layerdrop --budgets 0.5,0.25 --json

Every row is warmed up once, then the rows are timed round-robin (`--repeats` rounds, `par_demo.timing`'s
`time_interleaved`, the rounds the app uses too) so that machine noise falls on all of them alike; medians are
reported. Speed-ups are ratios to the full model timed in the same run;
`efficiency` = measured prefill speed-up / FLOPs speed-up (1.0 means the saved FLOPs became saved seconds).
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from par_demo.errors import BudgetOutOfReach, UserError
from par_demo.images import load_image
from par_demo.methods import method_class
from par_demo.methods.base import check_budget
from par_demo.arguments import add_budget_unit_argument, add_model_arguments, predictor_from_args
from par_demo.predict import Predictor
from par_demo.stock import StockRun, stock_generate
from par_demo.timing import time_interleaved

STOCK = "stock"  # a row of stock transformers `generate` (par_demo/stock.py), not a pruning method


@dataclass
class Row:
    method: str
    budget: float | None
    tokens: int | None = None
    layers: int | None = None
    flops_ratio: float = 0.0
    kept_visual_tokens: int = 0
    kept_layers: int = 0
    views: str = "1/1"  # views the vision tower ran on / the image's (tiles + global view)
    prefill_s: float = 0.0
    total_s: float = 0.0
    decode_tok_s: float = 0.0
    new_tokens: int = 0
    speedup_prefill: float = 0.0
    speedup_total: float = 0.0
    efficiency: float = 0.0
    kv_cache_mb: float = 0.0
    peak_mem_mb: float = 0.0
    time_ratio: float | None = None  # time budgets: the cost model's predicted prefill time / the full model's

    @property
    def label(self) -> str:
        if self.tokens is not None or self.layers is not None:
            return f"{self.method} T={self.tokens} L={self.layers}"
        return f"{self.method}@{self.budget:g}"


def parse_list(text: str, what: str, convert=str) -> list:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise UserError(f"no {what} given")
    try:
        return [convert(item) for item in items]
    except ValueError:
        raise UserError(f"cannot read {what} from '{text}'") from None


def parse_versions(text: str | None) -> list[tuple[int, int]]:
    """'176:28,144:24' -> [(176, 28), (144, 24)]: PAR-style fixed (tokens, layers) versions."""
    if not text:
        return []
    versions = []
    for item in parse_list(text, "versions"):
        try:
            tokens, layers = (int(x) for x in item.split(":"))
        except ValueError:
            raise UserError(f"a version is TOKENS:LAYERS, e.g. 176:28; got '{item}'") from None
        versions.append((tokens, layers))
    return versions


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # On CPU: the process's peak resident memory (ru_maxrss is in KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def default_query():
    from par_demo.shapes import render_scene

    image, _ = render_scene(np.random.default_rng(0))
    # 448 x 448 px: a fixed-grid model resizes it to its own size anyway; a dynamic-resolution one (Qwen2.5-VL)
    # gives 16 x 16 = 256 visual tokens, a realistic load rather than a thumbnail's few dozen.
    return image.resize((448, 448)), "What color is the circle?"


def time_row(predictor: Predictor, row: Row, image, question: str, new_tokens: int, unit: str = "flops"):
    answered = predictor.generate(image, question, row.method, row.budget or 1.0, row.tokens, row.layers,
                                  max_new_tokens=new_tokens, stop_at_eos=False, budget_unit=unit)
    return answered.generation, answered.flops / answered.flops_full, answered.time_ratio


def time_stock(predictor: Predictor, image, question: str, new_tokens: int) -> StockRun:
    return stock_generate(predictor.loaded, predictor.encode(image, question), new_tokens)


def run_bench(predictor: Predictor, rows: list[Row], image, question: str, new_tokens: int = 32,
              repeats: int = 5, progress: bool = False, unit: str = "flops") -> list[Row]:
    device = predictor.loaded.device
    bar = tqdm(total=len(rows) * (repeats + 1), desc="bench", disable=not progress, file=sys.stderr)
    full = next(r for r in rows if r.method == "full")
    rows = [full] + [r for r in rows if r is not full]  # warmed up first: the stock row copies its facts
    for i, row in enumerate(rows):  # warm-up, and the per-row facts that do not change between repeats
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if row.method == STOCK:  # the whole image through every layer, like the engine's full row
            stock = time_stock(predictor, image, question, new_tokens)
            row.flops_ratio, row.kept_visual_tokens, row.kept_layers, row.views = (
                1.0, full.kept_visual_tokens, full.kept_layers, full.views)
            row.kv_cache_mb, row.new_tokens = stock.kv_cache_bytes / 2**20, len(stock.tokens)
        else:
            generation, row.flops_ratio, row.time_ratio = time_row(predictor, row, image, question, new_tokens, unit)
            row.kept_visual_tokens = int(generation.kept_visual.numel())
            row.kept_layers = predictor.engine.n_layers - len(generation.plan.skip_layers)
            row.views = "{}/{}".format(*generation.views)
            row.kv_cache_mb = generation.kv_cache_bytes / 2**20
            row.new_tokens = len(generation.tokens)
        row.peak_mem_mb = peak_memory_mb(device)
        bar.update()

    def run(row: Row) -> tuple[float, float]:
        timed = (time_stock(predictor, image, question, new_tokens) if row.method == STOCK
                 else time_row(predictor, row, image, question, new_tokens, unit)[0])
        bar.update()
        return timed.prefill_s, timed.total_s

    times = time_interleaved(run, rows, repeats)
    bar.close()
    for i, row in enumerate(rows):
        row.prefill_s = statistics.median(t[0] for t in times[i])
        row.total_s = statistics.median(t[1] for t in times[i])
        decode_s = statistics.median(t[1] - t[0] for t in times[i])
        row.decode_tok_s = (row.new_tokens - 1) / decode_s if row.new_tokens > 1 and decode_s > 0 else 0.0
    for row in rows:
        row.speedup_prefill = full.prefill_s / row.prefill_s
        row.speedup_total = full.total_s / row.total_s
        row.efficiency = row.speedup_prefill / (1 / row.flops_ratio)
    return rows


def reachable_rows(predictor: Predictor, rows: list[Row], image, question: str,
                   unit: str = "flops") -> tuple[list[Row], list[str]]:
    """The rows whose budget the method can meet on this query, and one line for each it cannot (on a model whose
    vision path is a large share, e.g. Qwen2.5-VL, low budgets are out of reach for methods inside the decoder)."""
    inputs = predictor.encode(image, question)
    kept, notes = [], []
    for row in rows:
        if row.method == STOCK:
            kept.append(row)
            continue
        method = predictor.method(row.method)
        try:  # a fresh query each: a method that routes views encodes into it
            method.plan(predictor.engine.prepare(inputs, method.routes_views), row.budget or 1.0, row.tokens,
                        row.layers, unit=unit)
        except BudgetOutOfReach as exc:
            notes.append(f"{row.label}: {exc}")
            continue
        kept.append(row)
    return kept, notes


def build_rows(methods: list[str], budgets: list[float], versions: list[tuple[int, int]]) -> list[Row]:
    rows = [Row("full", 1.0)]
    for name in methods:
        if name == STOCK:
            rows.append(Row(STOCK, 1.0))
            continue
        name = method_class(name).name
        if name == "full":
            continue
        rows += [Row(name, budget) for budget in budgets]
    rows += [Row("par", None, tokens, layers) for tokens, layers in versions]
    return rows


def cpu_name() -> str:
    """The CPU's model name, and whether it has bf16 matrix units (AMX): CPU figures differ by several times
    between this project's machines (AMD EPYC, Intel Xeon with and without AMX), and bf16 most of all."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                platform.machine())
    return name + (" (AMX bf16)" if " amx_bf16" in info else "")


def environment(predictor: Predictor) -> dict:
    device = predictor.loaded.device
    info = {"model": predictor.loaded.name, "quant": predictor.loaded.quant, "device": str(device),
            "dtype": str(predictor.loaded.model.lm_head.weight.dtype).replace("torch.", ""),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": cpu_name(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--methods", default="full,fastv,random,layerdrop",
                        help="comma-separated method names; 'stock' adds transformers' own generate, unpruned")
    parser.add_argument("--budgets", default="0.5,0.25",
                        help="comma-separated budgets in (0, 1]: fractions of the full prefill's FLOPs, or its time")
    add_budget_unit_argument(parser)
    parser.add_argument("--versions", default=None, help="PAR fixed versions TOKENS:LAYERS,... e.g. 176:28,144:24")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per query (EOS ignored)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up")
    parser.add_argument("--image", default=None, help="image file (default: a synthetic scene)")
    parser.add_argument("--question", default=None)
    parser.add_argument("--json", action="store_true", help="print one JSON object: environment and rows")


def run(args) -> int:
    methods = parse_list(args.methods, "methods")
    for name in methods:
        if name != STOCK:
            method_class(name)
    budgets = [check_budget(b) for b in parse_list(args.budgets, "budgets", float)]
    versions = parse_versions(args.versions)
    if not 1 <= args.new_tokens <= 1024 or not 1 <= args.repeats <= 1000:
        raise UserError("--new-tokens must be in [1, 1024] and --repeats in [1, 1000]")
    image, question = default_query()
    if args.image:
        image = load_image(args.image)
    question = args.question or question
    predictor = predictor_from_args(args)
    rows, unreachable = reachable_rows(predictor, build_rows(methods, budgets, versions), image, question,
                                       args.budget_unit)
    rows = run_bench(predictor, rows, image, question, args.new_tokens, args.repeats, progress=sys.stderr.isatty(),
                     unit=args.budget_unit)
    if args.json:
        print(json.dumps({"environment": environment(predictor), "budget_unit": args.budget_unit,
                          "new_tokens": args.new_tokens,
                          "repeats": args.repeats, "rows": [asdict(r) for r in rows], "unreachable": unreachable}))
    else:
        print("\n".join([format_table(rows)] + [f"not reachable: {line}" for line in unreachable]))
    return 0


def format_table(rows: list[Row]) -> str:
    head = (f"{'setting':<22}{'FLOPs':>7}{'time*':>7}{'tokens':>8}{'layers':>7}{'views':>7}{'prefill ms':>12}"
            f"{'total ms':>10}"
            f"{'x prefill':>10}{'x total':>9}{'effic.':>8}{'dec tok/s':>10}{'KV MB':>8}{'peak MB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        predicted = "" if r.time_ratio is None else f"{r.time_ratio:.2f}"
        lines.append(f"{r.label:<22}{r.flops_ratio:>7.2f}{predicted:>7}{r.kept_visual_tokens:>8}{r.kept_layers:>7}"
                     f"{r.views:>7}"
                     f"{r.prefill_s * 1e3:>12.1f}{r.total_s * 1e3:>10.1f}{r.speedup_prefill:>10.2f}"
                     f"{r.speedup_total:>9.2f}{r.efficiency:>8.2f}{r.decode_tok_s:>10.1f}{r.kv_cache_mb:>8.2f}"
                     f"{r.peak_mem_mb:>9.0f}")
    if any(r.time_ratio is not None for r in rows):
        lines.append("time*: the cost model's predicted prefill time as a fraction of the full model's")
    return "\n".join(lines)
