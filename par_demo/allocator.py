"""CPU inference keeps the memory it freed: two glibc malloc settings, so a prefill does not fault its pages in again.

Why: a prefill allocates its activations and its KV cache (the embedded model's full one: tensors of 0.3-1.2 MB)
and frees them when it returns. By default glibc hands large blocks back to the kernel (blocks above
M_MMAP_THRESHOLD are mapped and unmapped one by one; a free top of the heap above M_TRIM_THRESHOLD is trimmed), so
the next prefill gets fresh pages, each one zeroed in a page fault. On this project's 2-core CPU the default model's
full prefill took 44.6-57.5 ms that way and 40.1-41.4 ms with the settings below (four pairs of processes, 40 rounds
each, `time_interleaved`); PAR at time budget 0.25 15.1-16.6 ms and 14.0-14.6 ms. The times also stopped drifting
from one process to the next, which the cost model's calibration relies on (`par_demo.cost`).

The price: freed memory stays in the process (up to `KEEP_FREED`), so its resident size stays near its peak between
requests instead of falling back. PyTorch's CPU performance guide recommends a caching allocator (jemalloc, tcmalloc)
for the same reason; these two calls get the effect without preloading a library. Linux with glibc only (elsewhere
nothing changes); the settings are process-wide and made once. `PAR_DEMO_MALLOC=stock` keeps glibc's defaults (to
measure what this buys).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "PAR_DEMO_MALLOC"
M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MAP_BELOW = 256 << 20  # blocks up to 256 MiB come from the heap (the default lets glibc map blocks from 128 KiB up)
KEEP_FREED = 1 << 30  # up to 1 GiB of free heap top is kept, not given back

_applied: str | None = None  # what `keep_freed_memory` did in this process ("glibc", "stock", "unavailable")


def mode() -> str:
    """What the allocator does in this process: "glibc" (the settings above), "stock" (glibc's defaults, by
    PAR_DEMO_MALLOC=stock) or "unavailable" (no glibc); `keep_freed_memory` not called yet: what it would do."""
    if _applied is not None:
        return _applied
    if os.environ.get(ENV, "glibc") == "stock":
        return "stock"
    return "glibc" if _glibc() is not None else "unavailable"


def keep_freed_memory() -> str:
    """Apply the settings once per process (CPU inference); returns `mode()`."""
    global _applied
    if _applied is None:
        wanted = mode()
        libc = _glibc() if wanted == "glibc" else None
        done = (libc is not None and libc.mallopt(M_MMAP_THRESHOLD, MAP_BELOW) == 1
                and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED) == 1)
        _applied = "glibc" if done else ("stock" if wanted == "stock" else "unavailable")
    return _applied


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc, not musl: mallopt's parameters are glibc's
        return libc
    except (OSError, AttributeError):
        return None
