"""The documentation's runnable examples run: every fenced Python block right after a `<!-- runnable -->` line in
README.md and docs/*.md is executed as a script from the project's root, so an example that rots fails here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNABLE = re.compile(r"^<!-- runnable -->\n```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def runnable_blocks() -> list[tuple[str, str]]:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [(f"{page.relative_to(ROOT)}#{i}", code) for page in pages
            for i, code in enumerate(RUNNABLE.findall(page.read_text()), 1)]


def test_the_docs_have_runnable_examples_in_the_readme_and_the_api_page():
    names = [name for name, _ in runnable_blocks()]
    assert any(n.startswith("README.md#") for n in names)
    assert sum(n.startswith("docs/python-api.md#") for n in names) >= 4


@pytest.mark.parametrize("name, code", runnable_blocks(), ids=[name for name, _ in runnable_blocks()])
def test_runnable_example_runs(name, code):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
