"""Router-training throughput: pruning flows scored per second, the current path (each flow its own prefill through
the engine) against batched flows (`--flow-batch`), side by side in one run, on the same queries and flows.

    python scripts/bench_train_router.py --model assets/models/shapes-llava --steps 3 --rounds 3
    python scripts/bench_train_router.py --model random:llava-mid --batch 1 --budgets-per-query 1 --flows 4
    python scripts/bench_train_router.py --project --tflops 989 --mfu 0.4 --bandwidth 3350
    python scripts/bench_train_router.py --bf16    # also the batched path on the model loaded in bf16
    python scripts/bench_train_router.py --model random:llava-1.5-7b --device cuda --data shapes/data.jsonl  # bf16

`--project` measures nothing: it turns the analytic FLOPs of LLaVA-1.5-7B and Qwen2.5-VL-7B (`par_demo.flops`, the
counts the budgets use) into the hours a training run needs on a GPU of the given bf16 TFLOP/s, at an assumed share
of it (`--mfu`), with the questions' probing answers decoded at an assumed share of the memory bandwidth.

Each round runs `--steps` optimizer steps of every path in turns (router forward and backward, flow sampling,
scoring, preference loss: the whole step), from the same seeds, on targets computed once beforehand; a path's
figure is the median over rounds. `--bf16` adds the batched paths on a second copy of the model in bf16
(`train-router --dtype bf16`: targets and flows in bf16, the router in fp32), with its own targets; on a CPU with
bf16 matrix units (AMX) its products run several times faster than fp32, elsewhere they may run slower. The target of a query (the full model's answer and distributions) is timed
apart: once per query as now, and with the extra teacher-forced prefill the command used to run.

`--device cuda` runs the model in bf16 (`--dtype`, as `train-router` loads it) and the router on the GPU, with the GPU
synchronised before every clock reading. Timings depend on the machine's load: the script prints the load average;
re-run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout, no install needed

import torch  # noqa: E402

from par_demo.bench import cpu_name  # noqa: E402
from par_demo.engine import PruningPlan, synchronize  # noqa: E402
from par_demo.models import default_device, load_model, parse_dtype  # noqa: E402
from par_demo.predict import Predictor  # noqa: E402
from par_demo.router import MetaRouter  # noqa: E402
from par_demo.training.flows import Budgeter  # noqa: E402
from par_demo.training.loop import TrainConfig, batch_loss, build_router_config, new_stats  # noqa: E402
from par_demo.training.questions import PROBES, read_queries  # noqa: E402
from par_demo.training.targets import TargetCache  # noqa: E402

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def time_targets(predictor, cache: TargetCache) -> dict:
    """Seconds per target: as computed now, and with the teacher-forced prefill the command used to add."""
    device = predictor.loaded.device
    synchronize(device)
    start = time.perf_counter()
    targets = [cache[i] for i in range(len(cache))]
    synchronize(device)
    now = (time.perf_counter() - start) / len(targets)
    start = time.perf_counter()
    for t in targets:
        predictor.engine.prefill(t.query, PruningPlan(), n_logits=t.m)
    synchronize(device)
    extra = (time.perf_counter() - start) / len(targets)
    return {"target_s": round(now, 4), "target_s_with_forced_prefill": round(now + extra, 4)}, targets


def run_steps(router, targets, train, budgeter, predictor, layer_prior, steps: int, seed: int) -> tuple[int, float]:
    """(flows scored, seconds) for `steps` optimizer steps over `targets` in order."""
    optimizer = torch.optim.AdamW(router.parameters(), lr=train.lr)
    generator = torch.Generator().manual_seed(seed)
    device = predictor.loaded.device
    synchronize(device)
    flows, start = 0, time.perf_counter()
    for step in range(steps):
        chunk = [targets[(step * train.batch + j) % len(targets)] for j in range(train.batch)]
        loss, n = batch_loss(router, chunk, train, budgeter, predictor.engine, layer_prior, 0.5, generator,
                             new_stats())
        (loss / train.batch).backward()  # the step's mean over its queries, as train-router takes it
        optimizer.step()
        optimizer.zero_grad()
        flows += n
    synchronize(device)
    return flows, time.perf_counter() - start


def project(args) -> dict:
    """Projected GPU time of the default training run (and of its Pareto table) for the 7B presets."""
    from par_demo.families import preset_families
    from par_demo.flops import FlopsModel, Shape
    from par_demo.router import RouterConfig

    train = TrainConfig()
    rows = []
    for preset in ("llava-1.5-7b", "qwen2.5-vl-7b"):
        family = preset_families()[preset]
        config, _ = family.build_random(preset)
        flops = FlopsModel.from_config(config)
        if preset.startswith("qwen"):  # a 896 x 896 photo: 64 x 64 patches of 14 px, 1,024 tokens after the merger
            n_visual, vision = 1024, family.vision_flops(config, torch.tensor([[1, 64, 64]]))
        else:
            n_visual, vision = 576, family.vision_flops(config)
        shape = Shape(n_text=40, n_visual=n_visual, vision_flops=vision)  # a one-line question + an 8-token answer
        full = flops.full(shape)
        # a flow is a prefill at a budget (uniform in [budget_low, budget_high]) without the vision path, which
        # runs once per query (its target)
        mean_budget = (train.budget_low + train.budget_high) / 2
        flow = mean_budget * full - vision
        flows = args.project_steps * train.batch * train.budgets_per_query * train.flows
        routable = len(RouterConfig(flops.width, flops.n_layers, protected_first=max(1, round(flops.n_layers / 16)))
                       .routable())
        pareto_flows = args.project_val * 16 * (routable + 1) * 0.6  # 16 budgets; about 60 % of layer counts fit
        queries = args.project_steps * train.batch
        weights = 2 * 7.6e9  # bytes read per decoded token in bf16
        probe_s = len(PROBES) * 24 * weights / (args.bandwidth * 1e9 * 0.6)  # 4 probes of up to 24 tokens
        target_s = full / (args.tflops * 1e12 * args.mfu) + train.max_new_tokens * weights / (args.bandwidth * 1e9 * 0.6)
        speed = args.tflops * 1e12 * args.mfu
        rows.append({"model": preset, "visual_tokens": n_visual, "full_prefill_tflop": round(full / 1e12, 2),
                     "flow_tflop": round(flow / 1e12, 2), "flows_per_s": round(speed / flow, 1),
                     "training_flows": flows, "training_min": round(flows * flow / speed / 60, 1),
                     "targets_min": round(queries * target_s / 60, 1),
                     "photo_probes_min": round(queries / 2 * probe_s / 60, 1),
                     "pareto_min": round(pareto_flows * flow / speed / 60, 1)})
    return {"projected": True, "assumptions": {"tflops": args.tflops, "mfu": args.mfu, "bandwidth_gb_s": args.bandwidth,
                                               "steps": args.project_steps, "val": args.project_val}, "rows": rows}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/models/shapes-llava")
    parser.add_argument("--data", default="data/router-train/data.jsonl", help="JSONL with image + question")
    parser.add_argument("--queries", type=int, default=8, help="queries (targets computed once)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4, help="queries per step (the shipped router's)")
    parser.add_argument("--budgets-per-query", type=int, default=2)
    parser.add_argument("--flows", type=int, default=6)
    parser.add_argument("--flow-batches", default="16,64", help="batched paths to time (flows per forward)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="the model's: auto (bf16 on a GPU, fp32 on a CPU), fp32, bf16")
    parser.add_argument("--bf16", action="store_true", help="also time the batched paths on the model in bf16")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    parser.add_argument("--project", action="store_true", help="print the projected GPU cost for the 7B models")
    parser.add_argument("--tflops", type=float, default=989.0, help="--project: the GPU's dense bf16 TFLOP/s")
    parser.add_argument("--mfu", type=float, default=0.4, help="--project: share of it a batched forward reaches")
    parser.add_argument("--bandwidth", type=float, default=3350.0, help="--project: memory bandwidth, GB/s")
    parser.add_argument("--project-steps", type=int, default=600)
    parser.add_argument("--project-val", type=int, default=96, help="--project: held-out queries of the Pareto table")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.project:
        print(json.dumps(project(args), indent=1))
        return

    train = TrainConfig(batch=args.batch, budgets_per_query=args.budgets_per_query, flows=args.flows)
    queries = read_queries(args.data)[:args.queries]
    shape = Namespace(width=None, depth=2, protected_first=None, protected_last=1, start_layer=0,
                      token_selection="top")
    device = args.device or default_device()
    first = DTYPE_NAMES[parse_dtype(args.dtype, device)]  # the model's dtype on the "current" path
    setups, target_times = {}, {}
    for dtype in dict.fromkeys([first] + (["bf16"] if args.bf16 else [])):
        predictor = Predictor(load_model(args.model, device=device, dtype=dtype))
        target_times[dtype], targets = time_targets(predictor, TargetCache(predictor, queries, train, 0))
        config = build_router_config(predictor, shape, targets[0])
        setups[dtype] = (predictor, targets, config, Budgeter(predictor.flops, config),
                         torch.tensor(predictor.method("layerdrop").influence()))
    paths = {"current (each flow alone)": (first, 0)}
    for dtype in setups:
        suffix = "" if dtype == first else f", model in {dtype}"
        paths |= {f"batched ({b} flows per forward{suffix})": (dtype, int(b)) for b in args.flow_batches.split(",")}
    rates = {name: [] for name in paths}
    for round_ in range(args.rounds):
        for name, (dtype, flow_batch) in paths.items():  # in turns, so that a change of load hits every path alike
            predictor, targets, config, budgeter, layer_prior = setups[dtype]
            torch.manual_seed(0)
            router = MetaRouter(config).to(device)
            flows, seconds = run_steps(router, targets, replace(train, flow_batch=flow_batch), budgeter, predictor,
                                       layer_prior, args.steps, seed=round_)
            rates[name].append(flows / seconds)
    base = statistics.median(rates["current (each flow alone)"])
    environment = {"machine": platform.machine(), "cpu": cpu_name(), "cpu_cores": os.cpu_count(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "load_average": [round(x, 2) for x in os.getloadavg()], "device": device, "dtype": first}
    if device.startswith("cuda"):
        environment["gpu"] = torch.cuda.get_device_name(device)
    result = {"model": args.model, "environment": environment, "settings": vars(args), **target_times[first],
              **({"bf16_targets": target_times["bf16"]} if args.bf16 and first != "bf16" else {}),
              "paths": [{"path": name, "flows_per_s": round(statistics.median(r), 2),
                         "range": [round(min(r), 2), round(max(r), 2)],
                         "ratio": round(statistics.median(r) / base, 2)} for name, r in rates.items()]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
