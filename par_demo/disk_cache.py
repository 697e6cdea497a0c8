"""Measurements kept on disk between runs (layer drop's block influence, the prefill cost model): one folder, JSON
files, and a cache that can always be measured again (a damaged or unwritable file only costs a re-measurement).

The folder is $PAR_DEMO_CACHE, else ~/.cache/par-demo.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("PAR_DEMO_CACHE", Path.home() / ".cache" / "par-demo"))


def cache_path(kind: str, key: str) -> Path:
    """Where the `kind` measurement named by `key` (any text) is kept: a readable start of the key and a hash of
    all of it (long keys differ at their end: threads, versions)."""
    readable = re.sub(r"[^\w.-]+", "_", key)[:80]
    return cache_dir() / kind / f"{readable}-{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def read_json(path: Path) -> dict | None:
    """The cached object, or None when there is none or it cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    """Write through a temporary file and rename, so a reader never sees half a file; a read-only home is no
    error (the measurement is simply made again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    except OSError:
        pass


def weights_digest(model, samples: int = 64) -> str:
    """A short hash of a model's weights, for keys of measurements made on them. Each parameter gives its name,
    shape, dtype and `samples` values spread evenly over it, a few reads per tensor however large the model: it
    tells a fine-tune that moved whole matrices (full, or LoRA merged into the attention layers with the LM head
    frozen) from its base, not one that changed a few rows only. Parameters, not the state dict with its buffers
    (bitsandbytes' quantization state among them)."""
    import torch

    digest = hashlib.sha1()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            flat = tensor.detach().reshape(-1)
            n = flat.numel()
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            if n:
                k = min(samples, n)  # integer positions: the same on every device, however long the tensor
                picks = torch.arange(k, device=flat.device) * (n - 1) // max(k - 1, 1)
                digest.update(flat[picks].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
