"""Shared fixtures: a tiny random LLaVA built in code (no downloads), loaded once per test session."""

import contextlib

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
def random_models():
    """`get(preset)`: the `random:<preset>` model (exact architecture, random weights), loaded once per session."""
    from par_demo.models import load_model

    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = load_model(f"random:{preset}", device="cpu")
        return cache[preset]

    return get


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


@contextlib.contextmanager
def served(demo_app):
    """The real app (`app.build_demo`) launched in this process on a free 127.0.0.1 port, and a client for it."""
    from gradio_client import Client

    import app as app_module

    with app_module.served_locally(demo_app) as url:
        yield Client(url, verbose=False)


@pytest.fixture(scope="session")
def tiled(tmp_path_factory):
    """Tiny SmolVLM and InternVL3, each with an untrained router (PAR's plumbing on tiles is under test here)."""
    from par_demo.models import load_model
    from par_demo.predict import Predictor
    from par_demo.router import MetaRouter, RouterConfig, fingerprint, save_router

    predictors = {}
    for preset in ("smolvlm-tiny", "internvl3-tiny"):
        predictor = Predictor(load_model(f"random:{preset}", device="cpu"))
        torch.manual_seed(0)
        config = RouterConfig(lm_width=64, n_layers=6, width=16, heads=1, start_layer=0,
                              model=fingerprint(predictor.loaded))
        predictor.router_path = save_router(MetaRouter(config), tmp_path_factory.mktemp(f"{preset}-router"))
        predictors[preset] = predictor
    return predictors
