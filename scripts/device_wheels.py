"""Wheels a lent GPU machine lacks, small enough to travel with the working tree (64 MiB in all, the tree ~25 MB).

    python scripts/device_wheels.py            # -> .whl/ (ignored by git), then carry ".whl" in the device call

That machine (Python 3.12, torch 2.11 + CUDA 13.0, no package registry) has transformers 5.17 and
huggingface_hub 1.x, no bitsandbytes. This fetches the versions this project runs with here (transformers and the
packages it needs that the machine lacks or has too old) and bitsandbytes cut down to its CUDA 13 libraries: the
stock wheel is 43 MB, mostly libraries for CUDA 11.8-12.8 that torch+cu130 never loads. Install there with
`python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

# What the machine lacks or has too old for transformers as installed here (read off its package list).
PACKAGES = ["transformers", "huggingface_hub", "httpx2", "httpcore2", "truststore", "kernels", "tomlkit",
            "bitsandbytes"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64"]
KEEP_CUDA = ("cuda130", "cuda132")  # torch 2.11+cu130 there; bitsandbytes picks its library by torch's CUDA


def download(folder: Path) -> None:
    pins = [f"{name}=={version(name)}" for name in PACKAGES]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(folder), *pins],
                   check=True)


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim_bitsandbytes(wheel: Path) -> None:
    """Rewrite the wheel without the native libraries the machine never loads (and their RECORD lines)."""
    def dropped(name: str) -> bool:
        lib = Path(name).name
        return lib.startswith("libbitsandbytes_") and lib.endswith(".so") and not any(k in lib for k in KEEP_CUDA)

    slim = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as out:
        record = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        lines = []
        for info in src.infolist():
            if dropped(info.filename) or info.filename == record:
                continue
            data = src.read(info)
            out.writestr(info, data)
            lines.append(record_line(info.filename, data))
        out.writestr(record, "\n".join(lines + [f"{record},,"]) + "\n")
    slim.replace(wheel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".whl")
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(exist_ok=True)
    download(folder)
    for wheel in folder.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    total = 0
    for wheel in sorted(folder.glob("*.whl")):
        total += wheel.stat().st_size
        print(f"{wheel.stat().st_size / 2**20:7.1f} MiB  {wheel.name}")
    print(f"{total / 2**20:7.1f} MiB in all")


if __name__ == "__main__":
    main()
