"""lmms-eval runs this project's methods through the `par_demo` plugin: on ShapesVQA the harness scores exactly as
`python -m par_demo eval` does, reports the mean prefill FLOPs next to the accuracy, and `accelerate launch` over
two processes gives the same result as one. Every run is a real `lmms-eval` process, offline, on the CPU."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.metadata import entry_points
from importlib.util import find_spec
from pathlib import Path

from dataclasses import asdict

import pytest
import torch
import yaml

from par_demo.errors import UserError
from par_demo.evaluate import evaluate, settings
from par_demo.lmms import MODEL_CLASS, MODEL_ID
from par_demo.lmms.task import PACKAGED_TASK, write_task
from par_demo.models import SMALL_MODEL, load_model
from par_demo.predict import Predictor
from par_demo.shapes import load_jsonl, make_dataset

ROOT = Path(__file__).resolve().parent.parent
N_SAMPLES = 60
TEST_SEED = 16_016  # used by this test only

needs_lmms_eval = pytest.mark.skipif(
    find_spec("lmms_eval") is None,
    reason="lmms-eval is not installed: pip install --no-deps -r requirements-lmms-eval.txt (README, Set-up)")


# ------------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shapesvqa")
    data = make_dataset(folder, n=N_SAMPLES, seed=TEST_SEED)
    write_task(data)
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Offline, caches in a temporary folder, one thread per process (so every run does the same arithmetic), and
    this checkout's par_demo first on the path whatever an installed par-demo points at."""
    home = tmp_path_factory.mktemp("hf-home")
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(home),
            "LMMS_EVAL_DATASETS_CACHE": str(home / "datasets"), "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def run(command: list[str], env: dict) -> str:
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def harness(shapes, env, out: Path, model_args: str, launcher: list[str] = ()) -> tuple[dict, str]:
    """One lmms-eval run on the ShapesVQA samples with the 144-token embedded model (the harness's plumbing is
    the same for any model; this one answers fastest): (its results file, its output)."""
    model_args = f"pretrained={SMALL_MODEL},{model_args}"
    command = [*(launcher or [sys.executable]), "-m", "lmms_eval", "--model", MODEL_ID, "--model_args", model_args,
               "--include_path", str(shapes), "--tasks", "shapesvqa", "--batch_size", "1", "--output_path", str(out)]
    output = run(command, env)
    [results] = out.rglob("*_results.json")
    return json.loads(results.read_text()), output


@pytest.fixture(scope="module")
def our_eval(shapes) -> dict:
    """`eval` (its function, with its defaults) on the same samples, one thread as in the harness's processes:
    {(method, budget): row}."""
    predictor = Predictor(load_model(SMALL_MODEL, device="cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = evaluate(predictor, load_jsonl(shapes / "data.jsonl"), settings(["full", "par"], [0.5]))
    finally:
        torch.set_num_threads(threads)
    return {(row.method, row.budget): asdict(row) for row in rows}


@pytest.fixture(scope="module")
def par_run(shapes, env, tmp_path_factory):
    return harness(shapes, env, tmp_path_factory.mktemp("lmms-par"), "method=par,budget=0.5,device=cpu")


def assert_same_scores(results: dict, row: dict) -> None:
    scores = results["results"]["shapesvqa"]
    assert scores["accuracy,none"] == pytest.approx(row["accuracy"], abs=1e-12)
    for qtype, accuracy in row["by_type"].items():
        assert scores[f"accuracy_{qtype},none"] == pytest.approx(accuracy, abs=1e-12), qtype


# ------------------------------------------------------------------------------------------------- harness
@needs_lmms_eval
def test_harness_scores_par_as_eval_does_and_reports_its_flops(par_run, our_eval):
    results, output = par_run
    row = our_eval[("par", 0.5)]
    assert row["n"] == N_SAMPLES
    assert_same_scores(results, row)
    efficiency = results["throughput"]
    assert efficiency["avg_flops_ratio"] == pytest.approx(row["flops_ratio"], rel=1e-9)
    assert efficiency["avg_flops_ratio"] <= 0.5
    assert efficiency["avg_visual_tokens_kept"] < 144 or efficiency["avg_layers_run"] < 12
    assert f"on shapesvqa: {N_SAMPLES} answers from 1 process," in output


@needs_lmms_eval
def test_harness_scores_the_full_model_as_eval_does(shapes, env, our_eval, tmp_path):
    results, _ = harness(shapes, env, tmp_path, "method=full,device=cpu")
    assert_same_scores(results, our_eval[("full", 1.0)])
    assert results["throughput"]["avg_flops_ratio"] == pytest.approx(1.0)
    assert results["throughput"]["avg_visual_tokens_kept"] == 144


@needs_lmms_eval
def test_two_processes_under_accelerate_give_the_single_process_result(shapes, env, par_run, tmp_path):
    with socket.socket() as sock:  # a free port: other runs on this machine may use accelerate's default
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # On a machine without GPUs accelerate starts one process unless told --multi_gpu (its torchrun launcher);
    # the plugin's Accelerator(cpu=True) then forms a CPU (gloo) group of the two.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]
    results, output = harness(shapes, env, tmp_path, "method=par,budget=0.5,device=cpu", launcher)
    assert f"on shapesvqa: {N_SAMPLES} answers from 2 processes," in output
    single, _ = par_run
    assert results["results"]["shapesvqa"]["accuracy,none"] == single["results"]["shapesvqa"]["accuracy,none"]
    assert results["throughput"]["avg_flops_ratio"] == pytest.approx(single["throughput"]["avg_flops_ratio"])


# ------------------------------------------------------------------------------------------------- plugin
@needs_lmms_eval
def test_lmms_eval_registry_finds_the_plugin_through_its_entry_point():
    names = [ep.name for ep in entry_points(group="lmms_eval.models")]
    assert MODEL_ID in names, f"lmms-eval cannot find --model {MODEL_ID}: install par-demo (pip install -e .)"
    from lmms_eval.models import get_model

    from par_demo.lmms.model import ParDemo

    assert get_model(MODEL_ID) is ParDemo
    assert f"{ParDemo.__module__}.{ParDemo.__name__}" == MODEL_CLASS


@needs_lmms_eval
def test_bad_model_arguments_are_one_clear_message():
    from par_demo.lmms.model import ParDemo

    with pytest.raises(UserError, match="unknown method 'prune'"):
        ParDemo(method="prune")
    with pytest.raises(UserError, match=r"budget must be in \(0, 1\]"):
        ParDemo(method="par", budget=2)
    with pytest.raises(UserError, match="does not take the model argument.*temperature"):
        ParDemo(temperature=0.2)
    with pytest.raises(UserError, match="batch size 1"):
        ParDemo(batch_size=8)
    with pytest.raises(UserError, match="tokens must be a positive integer"):
        ParDemo(tokens="many")


@needs_lmms_eval
def test_request_types_other_than_generation_are_refused_clearly():
    from par_demo.lmms.model import ParDemo

    for call in (ParDemo.loglikelihood, ParDemo.generate_until_multi_round):
        with pytest.raises(UserError, match="runs generation tasks .*generate_until.* only"):
            call(None, [])


@needs_lmms_eval
def test_a_document_must_bring_exactly_one_image(scene):
    from par_demo.lmms.model import _one_image

    assert _one_image([scene], "t", 0).size == scene.size
    assert _one_image([[scene]], "t", 0).size == scene.size  # some tasks nest their visuals
    for visuals in ([], [scene, scene], [b"video"]):
        with pytest.raises(UserError, match="exactly one image"):
            _one_image(visuals, "t", 3)


@needs_lmms_eval
def test_run_summary_gives_means_per_task_and_overall():
    from par_demo.lmms.model import AnswerStats, cut_at_stop_strings, report_metrics

    records = [AnswerStats("a", 0, 0.5, 90, 144, 9, 12, 2, 0.1), AnswerStats("a", 1, 0.3, 50, 144, 8, 12, 1, 0.1),
               AnswerStats("b", 0, 1.0, 144, 144, 12, 12, 1, 0.1)]
    metrics = report_metrics(records)
    assert metrics["flops_ratio"] == pytest.approx(0.6)
    assert metrics["flops_ratio[a]"] == pytest.approx(0.4) and metrics["flops_ratio[b]"] == 1.0
    assert metrics["visual_tokens_kept"] == pytest.approx(284 / 3) and metrics["num_requests"] == 3
    assert cut_at_stop_strings("yes\n\nUSER: more", ["\n\n"]) == "yes"
    assert cut_at_stop_strings("top left", None) == "top left"


# ------------------------------------------------------------------------------------------------- task file
def test_task_file_includes_the_packaged_task_and_names_the_data(shapes):
    config = yaml.safe_load((shapes / "shapesvqa.yaml").read_text())
    assert Path(config["include"]) == PACKAGED_TASK and PACKAGED_TASK.is_file()
    assert config["dataset_kwargs"]["data_files"]["test"] == str((shapes / "data.jsonl").resolve())
    assert config["lmms_eval_specific_kwargs"]["default"]["data_dir"] == str(shapes.resolve())


def test_task_file_for_a_bad_data_file_is_one_message_and_writes_nothing(tmp_path):
    bad = tmp_path / "data.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(UserError, match="not valid JSON"):
        write_task(bad)
    with pytest.raises(UserError, match="data file not found"):
        write_task(tmp_path / "missing.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]
