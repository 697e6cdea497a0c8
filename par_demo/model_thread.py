"""One thread for all of the app's model work: loading, calibration, warm-up and every request.

Why: on a CPU, PyTorch runs its kernels on an OpenMP thread team, and each Python thread that calls into PyTorch
gets a team of its own. The app used to load and calibrate the model on the main thread and answer on Gradio's
worker threads, so two teams of 2 threads shared 2 cores. GNU OpenMP then stops its threads from spin-waiting
between parallel regions, and every small kernel pays a wake-up: the embedded 576-token model's full prefill took
71-75 ms on a Gradio thread against 40 ms on the thread that loaded it, and a pruned prefill (more, smaller
kernels) paid more of that than a full one. With every model call on this one thread, one team exists and the
timings the page shows are the ones `bench` measures.

On a GPU the team only launches kernels, and on a ZeroGPU Space the model runs in the process `spaces` attaches a
GPU to, inside the request's context: there the calls simply run where they are made (`inline=True`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ModelThread:
    """Runs calls one at a time on one long-lived thread, and waits for their result (exceptions re-raised here).

    A call made from the model thread itself (e.g. warm-up steps that call the service's own methods) runs
    directly: queueing it behind its caller would wait forever."""

    def __init__(self, name: str = "par-demo-model", inline: bool = False):
        self._pool = None if inline else ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.ident = None if self._pool is None else self._pool.submit(threading.get_ident).result()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._pool is None or threading.get_ident() == self.ident:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()
