"""Shared fixtures: a tiny random LLaVA built in code (no downloads), loaded once per test session."""

import contextlib
import socket

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


@contextlib.contextmanager
def served(demo_app):
    """The real app (`app.build_demo`) launched in this process on a free 127.0.0.1 port, and a client for it."""
    from gradio_client import Client

    import app as app_module

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    blocks = app_module.build_demo(demo_app)
    blocks.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                  **app_module.launch_options())
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False)
    finally:
        blocks.close()
