"""The scripts in examples/ run as a user runs them (a fresh process, from the project's root), on the embedded or
a tiny model, and write what they say they write."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str, refused: bool = False) -> str:
    """The script's output; with `refused`, the one error line it must end with instead (no traceback)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if refused:
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return done.stderr.strip().splitlines()[-1]
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_prune_your_model_prints_one_row_per_budget_with_the_answer():
    out = run_example("prune_your_model.py", "--budgets", "1.0,0.25", "--rounds", "1")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[0] for row in rows] == ["1.00", "0.25"]
    assert rows[0][2] == "576/576" and rows[0][3] == "12/12"  # the full model keeps everything
    assert float(rows[1][1]) <= 0.25 and rows[1][-2:] == ["bottom", "right"]  # the embedded model's answer


def test_compare_folder_writes_a_csv_row_per_image_and_method(tmp_path):
    out = tmp_path / "results.csv"
    run_example("compare_folder.py", "assets/examples", "--question", "How many objects are there?",
                "--out", str(out), "--methods", "par,fastv", "--budget", "0.3", "--rounds", "1")
    rows = list(csv.DictReader(out.open()))
    images = sorted(p.name for p in (ROOT / "assets" / "examples").glob("*.png"))
    assert sorted({row["image"] for row in rows}) == images
    assert [row["method"] for row in rows[:3]] == ["full", "par", "fastv"] and len(rows) == 3 * len(images)
    assert all(float(row["flops_ratio"]) <= 0.3 for row in rows if row["method"] != "full")
    assert any(row["agrees"] == "True" for row in rows if row["method"] == "par")


def test_compare_folder_notes_an_unreadable_image_and_refuses_bad_arguments_in_one_line(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes((ROOT / "assets" / "examples" / "shapes_count.png").read_bytes())
    (folder / "b.png").write_text("not an image")
    out = tmp_path / "results.csv"
    common = ["--question", "How many objects are there?", "--out", str(out), "--rounds", "1"]
    run_example("compare_folder.py", str(folder), *common, "--methods", "fastv")
    rows = {(row["image"], row["method"]): row for row in csv.DictReader(out.open())}
    assert set(rows) == {("a.png", "full"), ("a.png", "fastv"), ("b.png", "")} and rows[("b.png", "")]["skipped"]
    assert "leave full out" in run_example("compare_folder.py", str(folder), *common, "--methods", "fastv,full",
                                           refused=True)
    assert "is not a folder" in run_example("compare_folder.py", str(tmp_path / "missing"), *common, refused=True)


def test_prune_your_model_without_timed_rounds_shows_no_speed_up():
    out = run_example("prune_your_model.py", "--budgets", "0.5", "--rounds", "0")
    assert out.splitlines()[1].split()[4] == "-"
    assert run_example("prune_your_model.py", "--budgets", "0.5", "--rounds", "-1", refused=True).startswith("error:")


def test_train_router_from_photos_writes_a_router_that_par_then_uses(tmp_path, scene):
    photos = tmp_path / "photos"
    photos.mkdir()
    scene.save(photos / "a.png")
    scene.rotate(90).save(photos / "b.jpg")
    out = tmp_path / "router"
    stdout = run_example("train_router_from_photos.py", "--model", "random:llava-tiny", "--photos", str(photos),
                         "--out", str(out), "--", "--device", "cpu", "--steps", "1", "--batch", "2", "--flows", "3",
                         "--budgets-per-query", "1", "--max-new-tokens", "2", "--val", "1", "--pareto-low", "0.5",
                         "--pareto-high", "0.5", "--width", "16", "--questions-per-image", "1")
    assert json.loads((out / "router.json").read_text())["pareto"]
    assert "PAR at half the FLOPs" in stdout.splitlines()[-1]
