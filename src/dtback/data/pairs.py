"""(references, target) pairs of one character: the unit of identity training.

For each target image 1..K other images of the same character are drawn as references (never the target itself):
:func:`draw_references`, used by the trainer's batches (:mod:`dtback.training.batches`) with an rng seeded from
(seed, epoch, target) so that a resumed run sees the same pairs. The target's caption is its sidecar or the template.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from dtback.data.layout import CharacterEntry, ImageEntry
from dtback.errors import DatasetError


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
