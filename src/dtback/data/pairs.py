"""(references, target) pairs of one character: the unit of identity training.

For each target image the dataset draws 1..K other images of the same character as references (never the target
itself), deterministically from (seed, epoch, index) so that a resumed run sees the same pairs.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from dtback.config import DataConfig
from dtback.data.buckets import assign_bucket, letterbox, make_buckets, resize_to_bucket
from dtback.data.images import ImageSkip, load_rgb
from dtback.data.layout import CharacterEntry, ImageEntry
from dtback.errors import DatasetError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairSpec:
    """Which images make one training example."""

    character: str
    target: ImageEntry
    references: tuple[ImageEntry, ...]
    caption: str


def caption_for(entry: ImageEntry, character: CharacterEntry, template: str) -> str:
    """The sidecar caption when there is one, else the template filled with the character and bundle names."""
    if entry.caption:
        return entry.caption
    return template.format(character=character.name, bundle=character.bundle)


def draw_references(n_images: int, target: int, k_min: int, k_max: int, rng: random.Random) -> list[int]:
    """Indices of 1..K reference images among ``n_images``, excluding ``target``; K is drawn in [k_min, k_max]
    and capped by the number of other images."""
    others = [i for i in range(n_images) if i != target]
    if not others:
        raise DatasetError(f"a character with {n_images} image(s) has no reference for its target")
    upper = min(k_max, len(others))
    lower = min(k_min, upper)
    return rng.sample(others, rng.randint(lower, upper))


def to_tensor(image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1] (the VAE's input range)."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class IdentityPairDataset(Dataset):
    """One item per target image of the given characters.

    ``__getitem__`` returns a dict: ``target`` (3, H, W) in [-1, 1] at the target's bucket size, ``references``
    (K, 3, R, R) letterboxed to ``reference_size``, ``caption``, ``character``, ``target_path`` and
    ``reference_paths``.
    """

    def __init__(self, characters: Sequence[CharacterEntry], cfg: DataConfig, seed: int):
        self.characters = list(characters)
        self.cfg = cfg
        self.seed = seed
        self.epoch = 0
        self.items = [(c, i) for c, char in enumerate(self.characters) for i in range(len(char.images))]
        if not self.items:
            raise DatasetError("no target images: the character list is empty")
        for char in self.characters:
            if len(char.images) < 2:
                raise DatasetError(f"character {char.key} has {len(char.images)} image(s); a pair needs at least 2")
        self.buckets = make_buckets(cfg.input_size, cfg.max_aspect_ratio, cfg.bucketing)
        self.bucket_of = [
            assign_bucket(self.characters[c].images[i].width, self.characters[c].images[i].height, self.buckets)
            for c, i in self.items
        ]
        self.runtime_skips: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pair(self, index: int) -> PairSpec:
        c, i = self.items[index]
        char = self.characters[c]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")
        refs = draw_references(len(char.images), i, self.cfg.min_references, self.cfg.max_references, rng)
        target = char.images[i]
        return PairSpec(
            character=char.key,
            target=target,
            references=tuple(char.images[r] for r in refs),
            caption=caption_for(target, char, self.cfg.caption_template),
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        spec = self.pair(index)
        bucket = self.buckets[self.bucket_of[index]]
        target = self._load(spec.target.path)
        if target is None:
            spec, target = self._substitute(index)
        references, reference_paths = [], []
        for ref in spec.references:
            image = self._load(ref.path)
            if image is not None:
                references.append(to_tensor(letterbox(image, self.cfg.reference_size)))
                reference_paths.append(str(ref.path))
        if not references:
            raise DatasetError(f"{spec.character}: none of the reference images could be read any more")
        return {
            "target": to_tensor(resize_to_bucket(target, bucket)),
            "references": torch.stack(references),
            "caption": spec.caption,
            "character": spec.character,
            "target_path": str(spec.target.path),
            "reference_paths": reference_paths,
        }

    def _load(self, path: Path):
        """Decode again at training time; a file changed since the scan is a counted skip, not a crash."""
        try:
            return load_rgb(path, self.cfg.max_image_pixels)
        except ImageSkip as skip:
            self.runtime_skips[skip.reason.value] += 1
            log.warning("skipping %s during training: %s (%s)", path, skip.reason.value, skip.detail)
            return None

    def _substitute(self, index: int):
        """Another target from the same bucket (so the batch still stacks) when the drawn one became unreadable."""
        bucket = self.bucket_of[index]
        same_bucket = [j for j, b in enumerate(self.bucket_of) if b == bucket and j != index]
        for j in same_bucket:
            spec = self.pair(j)
            image = self._load(spec.target.path)
            if image is not None:
                return spec, image
        raise DatasetError(f"every image in bucket {self.buckets[bucket]} became unreadable since the scan")


def collate_pairs(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack targets (one bucket per batch) and pad references to the largest K with a boolean mask.

    Returns ``target`` (B, 3, H, W), ``references`` (B, K, 3, R, R), ``reference_mask`` (B, K) and lists of the
    string fields.
    """
    sizes = {tuple(item["target"].shape) for item in batch}
    if len(sizes) != 1:
        raise ValueError(f"targets of different sizes in one batch {sorted(sizes)}: use BucketBatchSampler")
    k_max = max(item["references"].shape[0] for item in batch)
    ref_shape = batch[0]["references"].shape[1:]
    references = torch.zeros(len(batch), k_max, *ref_shape)
    mask = torch.zeros(len(batch), k_max, dtype=torch.bool)
    for b, item in enumerate(batch):
        k = item["references"].shape[0]
        references[b, :k] = item["references"]
        mask[b, :k] = True
    return {
        "target": torch.stack([item["target"] for item in batch]),
        "references": references,
        "reference_mask": mask,
        "caption": [item["caption"] for item in batch],
        "character": [item["character"] for item in batch],
        "target_path": [item["target_path"] for item in batch],
        "reference_paths": [item["reference_paths"] for item in batch],
    }
