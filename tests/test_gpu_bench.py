"""The prepared device run (`scripts/gpu_bench.py`), checked here where there is no GPU: a lent session has about 15
minutes of device time, so a step that would die on a renamed option or an unknown preset must fail now, not there.
The dry run of the same steps on tiny presets is in the script's docstring (it takes ~2 minutes, too long for CI)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def device_steps():
    gpu_bench = load_script("gpu_bench")
    return gpu_bench.steps(gpu_bench.build_parser().parse_args([]))


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_every_step_of_the_device_run_parses_with_its_commands_own_options(device_steps):
    from par_demo.bench import STOCK
    from par_demo.cli import build_parser
    from par_demo.families import preset_families
    from par_demo.methods import METHODS

    cli, router_script = build_parser(), load_script("bench_train_router").build_parser()
    presets = preset_families()
    checked = set()
    for name, command, seconds in device_steps:
        assert command[0] == sys.executable and 0 < seconds <= 600, name
        if command[1:3] == ["-m", "par_demo"]:
            args = cli.parse_args(command[3:])  # argparse exits (the test fails) on an option the command lacks
            checked.add(args.command)
        elif command[1] == "scripts/bench_train_router.py":
            args = router_script.parse_args(command[2:])
            checked.add("router throughput")
        else:
            continue
        model = getattr(args, "model", None) or ""
        if model.startswith("random:"):
            assert model.removeprefix("random:") in presets, f"{name}: no preset {model}"
        methods = getattr(args, "methods", None)
        if methods:
            unknown = set(methods.split(",")) - set(METHODS) - {STOCK}
            assert not unknown, f"{name}: unknown methods {unknown}"
    # the acceptance: exactness, speed in bf16 and 4-bit, routers, router training, time budgets
    assert {"bench", "train-router", "calibrate", "make-shapes", "router throughput"} <= checked
    names = [name for name, _, _ in device_steps]
    assert "exactness" in names and any(n.startswith("4bit") for n in names)


def test_the_device_run_asks_for_time_budgets_on_both_7b_presets_after_calibrating_them(device_steps):
    by_name = dict((name, command) for name, command, _ in device_steps)
    order = list(by_name)
    for preset in ("llava-1.5-7b", "qwen2.5-vl-7b"):
        calibrate = f"calibrate {preset}"
        timed = next(n for n in order if n.startswith(f"time {preset}"))
        assert order.index(calibrate) < order.index(timed)
        assert option(by_name[timed], "--budget-unit") == "time"
        assert "par" in option(by_name[timed], "--methods").split(",")
