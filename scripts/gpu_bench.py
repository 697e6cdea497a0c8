"""The GPU issue's device work as one prepared run: exactness, speed-only routers, `bench` rows, router-training
throughput, the cost model and time budgets, most needed first, each step under its own time limit, every result
appended to $OUT as soon as it exists.

    python scripts/device_wheels.py                               # here: the wheels the GPU machine lacks -> .whl/
    # device run, carry [".whl"], timeout_s 600:
    python3 scripts/gpu_bench.py --wheels .whl --minutes 9
    # a dry run of the same steps on this CPU with tiny presets (what it proves: flags, paths, JSON):
    python scripts/gpu_bench.py --device cpu --llava llava-tiny --qwen qwen2.5-vl-tiny --new-tokens 4 --minutes 5
    # (~2 minutes on 2 cores; the paper-versions step stops there with a clear error: the tiny LLaVA has 144 tokens)

Writes $OUT/bench.jsonl (one line per step: its command, seconds, exit status and its JSON result) and
$OUT/log.txt. Steps left when `--minutes` runs out are listed as skipped, so a second call can take them up
(`--from N`; a machine starts bare, so the data steps always run, and a router step runs again unless its router
is there). A bench step whose router is missing runs without `par`. Budgets, methods and versions are the issue's;
the `stock` rows time transformers' own `generate`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def steps(args) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed), in the order the issue's acceptance needs them."""
    py = [sys.executable, "-m", "par_demo"]
    dev = ["--device", args.device]
    data, big = f"{args.work}/shapes/data.jsonl", f"{args.work}/big.png"
    tokens = str(args.new_tokens)
    out = [
        ("data", py + ["make-shapes", f"{args.work}/shapes", "--n", "24", "--seed", "5"], 60),
        ("big image", [sys.executable, "-c", "from par_demo.bench import default_query; "
                       f"default_query()[0].resize((896, 896)).save('{big}')"], 30),
    ]
    if args.device != "cpu":
        out.append(("exactness", [sys.executable, "-m", "pytest", "-q", "tests/test_gpu.py"], 240))
    for preset in (args.llava, args.qwen):  # speed-only routers, as for the mid presets: a few steps
        out.append((f"router {preset}", py + ["train-router", "--model", f"random:{preset}", *dev, "--data", data,
                                             "--out", str(router_folder(args, preset)), "--steps", "4", "--val", "2"],
                    240))
    bench = lambda preset, *extra: py + ["bench", "--model", f"random:{preset}", *dev, "--json", *extra]  # noqa: E731
    core = ["--methods", "full,stock,fastv,par", "--budgets", "0.5,0.25"]
    time_budgets = ["--budget-unit", "time", "--methods", "full,stock,layerdrop,fastv,par", "--budgets", "0.5,0.25"]
    every = ["--methods", "full,stock,fastv,random,layerdrop,visionzip,divprune,par", "--budgets",
             "1.0,0.75,0.5,0.35,0.25"]
    out += [
        (f"bf16 {args.llava} {tokens} tokens", bench(args.llava, *core, "--new-tokens", tokens, "--repeats", "3"), 300),
        (f"bf16 {args.qwen} 896x896", bench(args.qwen, *core, "--image", big, "--new-tokens", "32", "--repeats", "3"),
         300),
        (f"4bit {args.llava} {tokens} tokens", bench(args.llava, *core, "--quant", "4bit", "--new-tokens", tokens,
                                                     "--repeats", "3"), 300),
        # router training: batched flows against one flow at a time, on the frozen model in bf16
        (f"train throughput {args.llava}", [sys.executable, "scripts/bench_train_router.py", "--model",
                                             f"random:{args.llava}", *dev, "--data", data, "--queries", "8",
                                             "--steps", "2", "--rounds", "2", "--json",
                                             f"{args.work}/router-throughput.json"], 300),
        # time budgets: the cost model measured on the GPU (its fit and its error on splits it was not fitted on),
        # then the budgets as shares of the GPU's full prefill time
        (f"calibrate {args.llava}", py + ["calibrate", "--model", f"random:{args.llava}", *dev, "--json"], 240),
        (f"time {args.llava}", bench(args.llava, *time_budgets, "--new-tokens", "32", "--repeats", "3"), 300),
        (f"calibrate {args.qwen}", py + ["calibrate", "--model", f"random:{args.qwen}", *dev, "--json"], 240),
        (f"time {args.qwen} 896x896", bench(args.qwen, *time_budgets, "--image", big, "--new-tokens", "32",
                                             "--repeats", "3"), 300),
        # beyond the acceptance: Qwen2.5-VL in 4-bit, LLaVA in 8-bit
        (f"4bit {args.qwen} 896x896", bench(args.qwen, *core, "--quant", "4bit", "--image", big, "--new-tokens", "32",
                                            "--repeats", "3"), 300),
        (f"8bit {args.llava}", bench(args.llava, *core, "--quant", "8bit", "--new-tokens", "32", "--repeats", "3"), 300),
        (f"bf16 {args.llava} every method, versions", bench(args.llava, *every, "--versions", "176:28,144:24,128:24",
                                                            "--new-tokens", "32", "--repeats", "3"), 600),
        (f"bf16 {args.qwen} every method", bench(args.qwen, *every, "--image", big, "--new-tokens", "32",
                                                 "--repeats", "3"), 600),
    ]
    return out


SETUP = ("data", "big image")  # needed by every later step, and gone from a machine that started bare


def router_folder(args, preset: str) -> Path:
    return Path(args.work) / f"router-{preset}"


def prepare(name: str, command: list[str], args) -> tuple[list[str] | None, dict]:
    """The step's command as it should run now (None: nothing to do) and its environment."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")  # nothing can be fetched there: fail at once
    for preset in (args.llava, args.qwen):
        folder = router_folder(args, preset)
        if name == f"router {preset}":
            if (folder / "router.safetensors").is_file():
                return None, env
            shutil.rmtree(folder, ignore_errors=True)  # a run cut short: train-router refuses a used folder
        elif preset in name.split():
            if (folder / "router.safetensors").is_file():
                env["PAR_DEMO_ROUTER"] = str(folder)
            elif "--methods" in command:  # without its router, PAR cannot run: the other rows still can
                i = command.index("--methods") + 1
                command = command[:i] + [",".join(m for m in command[i].split(",") if m != "par")] + command[i + 1:]
    return command, env


def install_wheels(folder: str, log) -> None:
    wheels = sorted(str(p) for p in Path(folder).glob("*.whl"))
    if not wheels:
        return
    site = "/tmp/site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", site, *wheels], check=True, stdout=log, stderr=log)
    os.environ["PYTHONPATH"] = site + os.pathsep + os.environ.get("PYTHONPATH", "")
    sys.path.insert(0, site)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--llava", default="llava-1.5-7b")
    parser.add_argument("--qwen", default="qwen2.5-vl-7b")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--minutes", type=float, default=9.0, help="stop starting steps after this long")
    parser.add_argument("--from", dest="first", type=int, default=0, help="skip the steps before this one")
    parser.add_argument("--wheels", default=None, help="a folder of wheels to install first (device_wheels.py)")
    parser.add_argument("--work", default="/tmp/gpu-bench")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    out = Path(os.environ.get("OUT") or ROOT / "runs" / "gpu-bench")
    out.mkdir(parents=True, exist_ok=True)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(out / "log.txt", "a") as log, open(out / "bench.jsonl", "a") as results:
        if args.wheels:
            install_wheels(args.wheels, log)
        probe = subprocess.run([sys.executable, "-c", "import torch, transformers; print(torch.__version__, "
                                "transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() "
                                "else 'no GPU')"], capture_output=True, text=True, cwd=ROOT)
        print("environment:", probe.stdout.strip() or probe.stderr.strip()[-300:], flush=True)
        for index, (name, command, limit) in enumerate(steps(args)):
            left = args.minutes * 60 - (time.time() - start)
            command, env = prepare(name, command, args)
            needed_later = name in SETUP or name.startswith("router ")  # what a bare machine lacks for the rest
            if command is None or (index < args.first and not needed_later) or left < 30:
                print(f"[{index}] {name}: skipped", flush=True)
                results.write(json.dumps({"step": index, "name": name, "skipped": True}) + "\n")
                continue
            began = time.time()
            try:
                run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env,
                                     timeout=min(limit, left))
                status, stdout, stderr = run.returncode, run.stdout, run.stderr
            except subprocess.TimeoutExpired as exc:
                status, stdout, stderr = "timeout", exc.stdout or "", exc.stderr or ""
                stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
            seconds = round(time.time() - began, 1)
            log.write(f"== [{index}] {name} ({seconds} s, {status}): {' '.join(command)}\n{stdout[-4000:]}\n"
                      f"{stderr[-4000:]}\n")
            log.flush()
            result = None
            if "--json" in command and status == 0:  # bench, calibrate and the router script print one JSON
                try:
                    result = json.loads(stdout)
                except ValueError:
                    result = None
            results.write(json.dumps({"step": index, "name": name, "command": " ".join(command[1:]),
                                      "seconds": seconds, "status": status, "result": result}) + "\n")
            results.flush()
            print(f"[{index}] {name}: {status} in {seconds} s", flush=True)
            if result:
                for row in result.get("rows", []):
                    print(f"    {row['method']:<10} {row['budget']!s:<5} flops {row['flops_ratio']:.2f} "
                          f"prefill {row['prefill_s'] * 1e3:8.1f} ms  total {row['total_s'] * 1e3:8.1f} ms  "
                          f"x prefill {row['speedup_prefill']:.2f}  x total {row['speedup_total']:.2f}  "
                          f"eff {row['efficiency']:.2f}  peak {row['peak_mem_mb']:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
