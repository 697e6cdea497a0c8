"""Benchmarks of what the page shows, through its public API (`gradio_client` against the app served in-process).

    python scripts/bench_page.py compare --requests 50 --budgets 0.3,0.5,1.0
    python scripts/bench_page.py compare-all --repeats 5 --budget 0.5 [--extras baseline,ablation]

`compare`: `--requests` `/compare` calls per budget (budgets taken in turns, the shipped examples in turns), and per
budget the median and range of the prefill speed-up the page shows, against its FLOPs bound; `over bound` counts
speed-ups above the bound by more than their own shown spread, and `unmarked` those of them the page did not mark as
noise (it must be 0). `compare-all`: the wall time of a whole `/compare_all` request (every method at one budget),
as a client sees it, median of `--repeats`, one example per request so the full answer is never a cache hit;
by default the methods of the field, with `--extras` the simple baselines and/or PAR's ablations as well.

Timings depend on the machine's load: the script prints the load average; re-run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402

from par_demo.demo import DemoApp  # noqa: E402
from par_demo.methods.base import BUDGET_UNITS  # noqa: E402
from par_demo.service import DemoService, load_examples  # noqa: E402


def environment() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} CPU cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"load average {load}")


def bench_compare(client, examples: list[list[str]], budgets: list[float], requests: int, method: str) -> list[dict]:
    from gradio_client import handle_file

    replies: dict[float, list[dict]] = {b: [] for b in budgets}
    walls: dict[float, list[float]] = {b: [] for b in budgets}
    refused: dict[float, str] = {}  # a budget the method cannot reach: the page's one-line answer, once
    for i in range(requests):
        image, question = examples[i % len(examples)]
        for budget in [b for b in budgets if b not in refused]:  # in turns: a busy moment falls on every budget
            started = time.perf_counter()
            try:
                *_, stats, _ = client.predict(handle_file(image), question, method, budget, api_name="/compare")
            except Exception as exc:  # gradio_client re-raises the page's refusal (e.g. a budget out of reach)
                if replies[budget]:
                    raise
                refused[budget] = str(exc).strip().splitlines()[-1]
                continue
            walls[budget].append(time.perf_counter() - started)
            replies[budget].append(stats)
    rows = [{"budget": budget, "refused": message} for budget, message in refused.items()]
    for budget in [b for b in budgets if b not in refused]:
        speedups = [r["timing"]["prefill_speedup"] for r in replies[budget]]
        medians = [s["median"] for s in speedups]
        bound = statistics.median(r["timing"]["speedup_bound"] for r in replies[budget])
        over = [(s, r) for s, r in zip(speedups, replies[budget])
                if s["median"] - r["timing"]["speedup_bound"] > s["high"] - s["low"]]
        rows.append({
            "budget": budget, "requests": len(medians), "flops_ratio": statistics.median(
                r["flops_ratio"] for r in replies[budget]),
            "time_ratio": statistics.median(r["time_ratio"] for r in replies[budget])
            if replies[budget][0].get("time_ratio") is not None else None,
            "speedup_median": statistics.median(medians), "speedup_min": min(medians), "speedup_max": max(medians),
            "bound": bound, "marked_noise": sum(r["timing"]["noise"] for r in replies[budget]),
            "over_bound": len(over), "over_bound_unmarked": sum(not r["timing"]["noise"] for _, r in over),
            "request_s_median": statistics.median(walls[budget]),
        })
    return rows


def bench_compare_all(client, examples: list[list[str]], budget: float, repeats: int, extras: list[str]) -> dict:
    from gradio_client import handle_file

    walls, methods = [], []
    for i in range(repeats):
        image, question = examples[i % len(examples)]
        started = time.perf_counter()
        reply = client.predict(handle_file(image), question, budget, extras, api_name="/compare_all")
        walls.append(time.perf_counter() - started)
        methods.append(len(reply["methods"]))
        assert all(entry["flops_ratio"] <= budget + 1e-9 for entry in reply["methods"])
    return {"budget": budget, "repeats": repeats, "methods": min(methods), "wall_s_median": statistics.median(walls),
            "wall_s_min": min(walls), "wall_s_max": max(walls), "walls_s": walls}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    compare = sub.add_parser("compare", help="the page's prefill speed-up over many /compare requests")
    compare.add_argument("--requests", type=int, default=50, help="requests per budget")
    compare.add_argument("--budgets", default="0.3,0.5,1.0")
    compare.add_argument("--method", default="par")
    every = sub.add_parser("compare-all", help="wall time of a whole /compare_all request")
    every.add_argument("--repeats", type=int, default=5)
    every.add_argument("--budget", type=float, default=0.5)
    every.add_argument("--extras", default="", help="extra method groups to run as well: baseline, ablation")
    for p in (compare, every):
        p.add_argument("--model", default=None, help="default: the embedded model")
        p.add_argument("--budget-unit", default="flops", choices=BUDGET_UNITS,
                       help="what the page's budget is a fraction of (the app's --budget-unit)")
        p.add_argument("--json", action="store_true", help="print the rows as JSON as well")
    args = parser.parse_args(argv)

    import app as app_module
    from gradio_client import Client

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    service = DemoService.from_model(args.model, budget_unit=args.budget_unit)
    service.warm_up()
    examples = load_examples()
    print(f"# {environment()}; model {service.card.name if service.card else service.model_name}", flush=True)
    with app_module.served_locally(DemoApp(service)) as url:
        client = Client(url, verbose=False)
        if args.what == "compare":
            budgets = [float(b) for b in args.budgets.split(",")]
            rows = bench_compare(client, examples, budgets, args.requests, args.method)
            print(f"{args.method}, {args.requests} /compare requests per budget, {service.rounds} rounds each, "
                  f"{args.budget_unit} budgets")
            print("| budget | FLOPs | page's prefill speed-up: median | range (min–max) | FLOPs bound | marked noise "
                  "| over bound by > spread | of those unmarked | request, median |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                if "refused" in r:
                    print(f"| {r['budget']:g} | refused: {r['refused']} |||||||")
                    continue
                predicted = "" if r["time_ratio"] is None else f" (predicted time {r['time_ratio']:.2f})"
                print(f"| {r['budget']:g} | {r['flops_ratio']:.3f}{predicted} | {r['speedup_median']:.2f}× "
                      f"| {r['speedup_min']:.2f}–{r['speedup_max']:.2f}× | {r['bound']:.2f}× | {r['marked_noise']} "
                      f"| {r['over_bound']} | {r['over_bound_unmarked']} | {r['request_s_median'] * 1000:.0f} ms |")
        else:
            extras = [group for group in args.extras.split(",") if group]
            rows = [bench_compare_all(client, examples, args.budget, args.repeats, extras)]
            r = rows[0]
            print(f"/compare_all at budget {r['budget']}: {r['methods']} methods + the full model, "
                  f"{r['repeats']} requests (one example each, the full answer never cached)")
            print(f"wall time per request: median {r['wall_s_median']:.2f} s, min {r['wall_s_min']:.2f} s, "
                  f"max {r['wall_s_max']:.2f} s; all: " + ", ".join(f"{w:.2f}" for w in r["walls_s"]))
        print(f"# after: {environment()}")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
