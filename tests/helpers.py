"""Test helpers: image writers, tiny dataset trees and the path of the real-photo fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PEOPLE = REPO.parent / "shared" / "data" / "people"


def write_image(path: Path, size=(64, 48), color=(200, 30, 30), fmt: str = "PNG", mode: str = "RGB", **save) -> Path:
    """Write a solid image of ``size`` (width, height) in ``fmt``, whatever the extension of ``path`` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt, **save)
    return path


def write_noise(path: Path, size=(64, 64), fmt: str = "JPEG", seed: int = 0) -> Path:
    """An image with real entropy, so that truncating the file loses pixel data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_dataset(root: Path, layout: dict[str, dict[str, int]], size=(64, 80)) -> Path:
    """``layout`` = {bundle: {character: n_images}}; images get distinct colours."""
    for b, (bundle, chars) in enumerate(layout.items()):
        for c, (char, n) in enumerate(chars.items()):
            for i in range(n):
                write_image(root / bundle / char / f"{i:03d}.png", size=size, color=(40 * b % 256, 30 * c % 256, 20 * i % 256))
    return root
