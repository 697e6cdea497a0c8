"""The CPU allocator settings (`par_demo.allocator`): freed tensors' pages are reused, not faulted in again."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from par_demo import allocator, cost
from par_demo.predict import Predictor

ROOT = Path(__file__).resolve().parent.parent

FAULTS = """
import resource, torch
from par_demo import allocator
from par_demo.images import load_image
from par_demo.models import DEFAULT_MODEL, load_model
from par_demo.predict import Predictor
torch.set_num_threads(2)
predictor = Predictor(load_model(DEFAULT_MODEL))
inputs = predictor.encode(load_image("assets/examples/shapes_where.png"), "Where is the blue square?")
for _ in range(3):
    predictor.engine.generate(inputs, None, max_new_tokens=1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    predictor.engine.generate(inputs, None, max_new_tokens=1)
print(allocator.mode(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def page_faults(setting: str) -> tuple[str, float]:
    """(the allocator's mode, minor page faults per full prefill of the default model) in a fresh process."""
    env = dict(os.environ, PAR_DEMO_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True,
                         timeout=120, cwd=ROOT).stdout.split()
    return out[0], float(out[1])


@pytest.mark.skipif(allocator.mode() == "unavailable", reason="glibc's mallopt is not available on this system")
def test_a_prefill_reuses_the_pages_the_last_one_freed():
    """With glibc's defaults 2,500-12,500 pages were faulted in again per full prefill of the default model; with
    the settings, 5-10 (measured)."""
    kept_mode, kept = page_faults("glibc")
    stock_mode, stock = page_faults("stock")
    assert (kept_mode, stock_mode) == ("glibc", "stock")
    assert kept < 100 and stock > 5 * kept


def test_a_cpu_models_timings_are_cached_per_allocator_setting(monkeypatch, random_models):
    predictor = Predictor(random_models("llava-tiny"))
    key = cost.cost_key(predictor)
    monkeypatch.setattr(allocator, "_applied", "glibc" if allocator.mode() == "stock" else "stock")
    assert cost.cost_key(predictor) != key
