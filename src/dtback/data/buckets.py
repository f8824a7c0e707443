"""Aspect-ratio buckets and a batch sampler that keeps each batch inside one bucket.

A photo is resized to cover its bucket and centre-cropped, so a portrait stays a portrait instead of losing its
head and feet to a square crop. Bucket sides are multiples of 16 (FLUX: 8x VAE, 2x2 patches) and each bucket holds
about ``input_size ** 2`` pixels, so every batch costs about the same.
"""

from __future__ import annotations

import math
import random
from typing import Iterator, Sequence

from PIL import Image
from torch.utils.data import Sampler

from dtback.config import FLUX_PIXEL_MULTIPLE

# Common photo shapes as width:height; those wider than max_aspect_ratio (or taller than its inverse) are left out.
PHOTO_ASPECTS = ((1, 2), (9, 16), (2, 3), (3, 4), (1, 1), (4, 3), (3, 2), (16, 9), (2, 1), (3, 1), (1, 3))


def make_buckets(input_size: int, max_aspect_ratio: float, enabled: bool = True) -> list[tuple[int, int]]:
    """(width, height) buckets of about ``input_size**2`` pixels, sorted by aspect ratio; ``[(S, S)]`` if disabled."""
    if not enabled:
        return [(input_size, input_size)]
    area = input_size * input_size
    buckets = set()
    for w_ratio, h_ratio in PHOTO_ASPECTS:
        aspect = w_ratio / h_ratio
        if aspect > max_aspect_ratio + 1e-9 or 1 / aspect > max_aspect_ratio + 1e-9:
            continue
        width = _round16(math.sqrt(area * aspect))
        height = _round16(math.sqrt(area / aspect))
        buckets.add((width, height))
    return sorted(buckets, key=lambda wh: wh[0] / wh[1])


def _round16(value: float) -> int:
    return max(FLUX_PIXEL_MULTIPLE, int(round(value / FLUX_PIXEL_MULTIPLE)) * FLUX_PIXEL_MULTIPLE)


def assign_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to width/height (in log space)."""
    target = math.log(width / height)
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - target))


def resize_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover ``size`` = (width, height) keeping the aspect ratio, then centre-crop. The crop is taken in
    the source's coordinates (PIL's ``box``), so a 1,000,000 x 1 px strip never becomes a 96,000,000 px wide
    intermediate: memory stays that of the bucket whatever the shape."""
    scale, left, top = bucket_transform(image.width, image.height, size)
    scale_y = _covering_size(image.width, image.height, size)[1] / image.height
    width, height = size
    box = (left / scale, top / scale_y, (left + width) / scale, (top + height) / scale_y)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def letterbox(image: Image.Image, side: int, fill: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Fit the whole image into a ``side`` x ``side`` square (nothing cropped), padding with ``fill``."""
    scale = side / max(image.width, image.height)
    new_w = max(1, round(image.width * scale))
    new_h = max(1, round(image.height * scale))
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image.resize((new_w, new_h), Image.Resampling.LANCZOS), ((side - new_w) // 2, (side - new_h) // 2))
    return canvas


class BucketBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices that share a bucket.

    The order depends only on (seed, epoch), so a resumed run can skip the batches it already trained on with
    :meth:`set_position` and see exactly the batches an uninterrupted run would have seen.
    """

    def __init__(self, bucket_of: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.bucket_of = list(bucket_of)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_batch = 0

    def set_position(self, epoch: int, batch: int) -> None:
        """Resume inside ``epoch``: the next iteration starts at batch number ``batch``."""
        self.epoch = epoch
        self.start_batch = batch

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")
        members: dict[int, list[int]] = {}
        for index, bucket in enumerate(self.bucket_of):
            members.setdefault(bucket, []).append(index)
        batches = []
        for bucket in sorted(members):
            indices = members[bucket]
            if self.shuffle:
                rng.shuffle(indices)
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                if len(chunk) == self.batch_size or not self.drop_last:
                    batches.append(chunk)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)[self.start_batch :]

    def __len__(self) -> int:
        return len(self.batches(self.epoch)) - self.start_batch


def bucket_transform(width: int, height: int, size: tuple[int, int]) -> tuple[float, float, float]:
    """``(scale, left, top)`` of :func:`resize_to_bucket`: a point (x, y) of the original image lands at
    ``(x * scale - left, y * scale - top)`` in the bucket image."""
    new_w, new_h = _covering_size(width, height, size)
    # the covering size is rounded to whole pixels; use the per-axis scale that rounding gives.
    return new_w / width, (new_w - size[0]) // 2, (new_h - size[1]) // 2


def _covering_size(width: int, height: int, size: tuple[int, int]) -> tuple[int, int]:
    """The whole-pixel size that covers the bucket ``size`` at the image's aspect ratio."""
    bucket_w, bucket_h = size
    scale = max(bucket_w / width, bucket_h / height)
    return max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))
