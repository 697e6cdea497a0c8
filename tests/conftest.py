"""Shared fixtures: a tiny random LLaVA built in code (no downloads), loaded once per test session."""

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    from par_demo.models import load_model

    return load_model("random:llava-tiny", device="cpu")


@pytest.fixture(scope="session")
def predictor(tiny):
    from par_demo.predict import Predictor

    return Predictor(tiny)


@pytest.fixture(scope="session")
def scene():
    from par_demo.shapes import render_scene

    image, objects = render_scene(np.random.default_rng(123))
    return image


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Keep calibration caches (layer drop) out of the user's home during tests."""
    import os

    os.environ["PAR_DEMO_CACHE"] = str(tmp_path_factory.mktemp("par-demo-cache"))
