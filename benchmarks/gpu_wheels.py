"""Fetch the wheels `benchmarks/gpu_check.sh` carries to a GPU machine that has no package registry (issue 18).

The GPU image brings torch with CUDA; what dtback needs beyond it travels with the working tree in ``.whl/``
(git-ignored), which the check unpacks onto ``PYTHONPATH``. The device tool carries at most 64 MiB, so the
bitsandbytes wheel loses the libraries for CUDA 11/12, ROCm and XPU (43 -> 8 MB; the GPU images so far ran CUDA 13).

Usage (here, where the registry is reachable; then carry ``.whl`` with the device call):
  python benchmarks/gpu_wheels.py                       # -> .whl/ for CPython 3.12 on x86_64 Linux
  python benchmarks/gpu_wheels.py --python-version 3.11 --out /tmp/whl
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Pinned where the GPU runs of 2026-11-26/27 used these versions; the rest follow the registry.
PACKAGES = ["diffusers==0.42.1", "pydantic==2.13.4", "pydantic_core==2.46.4", "annotated-types", "typing-inspection",
            "importlib_metadata", "torchao", "bitsandbytes"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux_2_24_x86_64"]
DROP = {"bitsandbytes": ["bitsandbytes/libbitsandbytes_cuda1[12]*.so", "bitsandbytes/libbitsandbytes_rocm*",
                         "bitsandbytes/libbitsandbytes_xpu*"]}
LIMIT_MIB = 48  # the device tool carries 64 MiB with the working tree


def download(out: Path, python_version: str) -> None:
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, *platforms, "-d", str(out), *PACKAGES], check=True)


def trim(wheel: Path, patterns: list[str]) -> int:
    """Rewrite ``wheel`` without the members matching ``patterns`` (atomically); returns how many were dropped.
    The wheel's RECORD keeps their lines: the check unpacks wheels with zipfile, which does not read it."""
    with zipfile.ZipFile(wheel) as source:
        members = source.infolist()
        keep = [m for m in members if not any(fnmatch.fnmatch(m.filename, p) for p in patterns)]
        if len(keep) == len(members):
            return 0
        partial = wheel.with_name(wheel.name + ".partial")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
            for member in keep:
                target.writestr(member, source.read(member))
    os.replace(partial, wheel)
    return len(members) - len(keep)


def trim_all(out: Path) -> None:
    for wheel in sorted(out.glob("*.whl")):
        for package, patterns in DROP.items():
            if wheel.name.startswith(package + "-"):
                print(f"{wheel.name}: dropped {trim(wheel, patterns)} libraries")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / ".whl", help="wheel folder (default: REPO/.whl)")
    parser.add_argument("--python-version", default="3.12", help="the GPU image's Python (3.12 so far)")
    parser.add_argument("--no-download", action="store_true", help="only trim the wheels already in --out")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.no_download:
        download(args.out, args.python_version)
    trim_all(args.out)
    total = sum(wheel.stat().st_size for wheel in args.out.glob("*.whl")) / 2**20
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels, {total:.1f} MiB")
    if total > LIMIT_MIB:
        print(f"over {LIMIT_MIB} MiB: the device tool carries 64 MiB with the working tree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
