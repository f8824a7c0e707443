"""Dataset scan throughput: images decoded and verified per second, by number of decode threads.

    python benchmarks/scan_dataset.py [--images 400] [--size 512] [--repeats 3] [--data-dir DIR]

Writes a synthetic JPEG dataset (noise, so decoding does real work) to a temp folder unless --data-dir is given,
then times `scan_dataset` with 1, 2 and 4 threads in one run and prints medians and the ratio to 1 thread.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dtback.config import DataConfig
from dtback.data.layout import scan_dataset


def synthetic(root: Path, n_images: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    per_char = 10
    for i in range(n_images):
        folder = root / f"bundle{i // 200}" / f"char{i // per_char:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data-dir", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.data_dir or synthetic(Path(tmp), args.images, args.size)
        print(f"machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores")
        print(f"data: {root}")
        base = None
        for threads in (1, 2, 4):
            cfg = DataConfig(data_dir=root, scan_threads=threads, min_images_per_char=2)
            times, n = [], 0
            for _ in range(args.repeats):
                start = time.perf_counter()
                index = scan_dataset(cfg, seed=0, progress=False)
                times.append(time.perf_counter() - start)
                n = index.report()["totals"]["images_decoded"]
            median = statistics.median(times)
            base = base or median
            print(f"threads={threads}: {n} images, median {median:.3f} s, {n / median:.0f} img/s, x{base / median:.2f} vs 1 thread")


if __name__ == "__main__":
    main()
