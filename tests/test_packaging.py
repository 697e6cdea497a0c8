"""pyproject.toml: the package's dependencies are requirements.txt's (so the app's install never brings lmms-eval),
the `par-demo` command is `python -m par_demo`, and lmms-eval finds the plugin through its entry-point group."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from par_demo.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


@pytest.fixture(scope="module")
def installed():
    try:
        return distribution("par-demo")
    except PackageNotFoundError:
        pytest.skip("par-demo is not installed (pip install -r requirements-dev.txt installs it, editable)")


def test_app_requirements_are_the_dependencies_and_lmms_eval_only_an_extra():
    assert PYPROJECT["project"]["name"] == "par-demo"
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    app = [Requirement(line).name for line in requirement_lines(ROOT / "requirements.txt")]
    assert "torch" in app and "lmms-eval" not in app
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras["eval"]] == ["lmms-eval"]
    assert "lmms-eval" not in [Requirement(r).name for r in extras["dev"]]  # comes --no-deps, never with torchvision
    assert requirement_lines(ROOT / "requirements-lmms-eval.txt") == ["lmms-eval==0.7.3"]


def test_installed_metadata_carries_exactly_the_app_requirements(installed):
    base = sorted(str(Requirement(r)) for r in installed.requires if "extra ==" not in r)
    assert base == sorted(str(Requirement(line)) for line in requirement_lines(ROOT / "requirements.txt"))
    plugins = {ep.name: ep.value for ep in installed.entry_points if ep.group == "lmms_eval.models"}
    assert plugins == {"par_demo": "par_demo.lmms:manifest"}


def test_console_script_is_python_m_par_demo(installed, monkeypatch):
    scripts = {ep.name: ep.value for ep in installed.entry_points if ep.group == "console_scripts"}
    assert scripts == {"par-demo": "par_demo.cli:main"}  # the function `python -m par_demo` runs
    script = Path(sys.executable).parent / "par-demo"
    if not script.exists():
        pytest.skip(f"no par-demo script beside {sys.executable}")
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps its help to the terminal's width
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout's par_demo, whatever the install points at
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stdout == build_parser().format_help()
