"""Train/validation split by character: a validation identity is never trained on.

The random split orders characters by a hash of (seed, character key), so it does not depend on listing order,
and adding characters to the dataset moves at most a few of the existing ones. The split is written to the run
folder as ``split.json`` so that a resumed run keeps it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from dtback.config import DataConfig
from dtback.data.layout import CharacterEntry, DatasetIndex
from dtback.errors import DatasetError
from dtback.io import write_json

SPLIT_FILE = "split.json"


@dataclass(frozen=True)
class Split:
    """Character keys (``bundle/character``) of each side, sorted."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    method: str

    def characters(self, index: DatasetIndex, side: str) -> list[CharacterEntry]:
        keys = set(self.train if side == "train" else self.val)
        return [c for c in index.characters if c.key in keys]

    def to_json(self) -> dict:
        return {"method": self.method, "train": list(self.train), "val": list(self.val)}


def split_characters(index: DatasetIndex, cfg: DataConfig, seed: int) -> Split:
    """Split the kept characters of ``index``: ``cfg.val_characters`` when given, else ``cfg.val_fraction``."""
    keys = [c.key for c in index.characters]
    if cfg.val_characters:
        unknown = sorted(set(cfg.val_characters) - set(keys))
        if unknown:
            raise DatasetError(
                f"data.val_characters names characters not kept in {index.root}: {unknown} "
                f"(kept: {len(keys)}; dropped: {[d.character for d in index.drops][:10]})"
            )
        val = set(cfg.val_characters)
        method = "explicit"
    else:
        n_val = math.ceil(len(keys) * cfg.val_fraction) if cfg.val_fraction > 0 else 0
        n_val = min(n_val, len(keys) - 1)  # always leave a character to train on
        ranked = sorted(keys, key=lambda key: hashlib.sha256(f"{seed}:{key}".encode()).hexdigest())
        val = set(ranked[:n_val])
        method = f"val_fraction={cfg.val_fraction} seed={seed}"
    if not val:
        raise DatasetError(
            f"{index.root}: {len(keys)} usable character(s), none left to hold out for validation "
            f"(data.val_fraction={cfg.val_fraction} leaves at least one character to train on); validation needs an "
            "identity that is never trained on: add characters or name them in data.val_characters"
        )
    train = tuple(sorted(set(keys) - val))
    if not train:
        raise DatasetError(f"data.val_characters holds out every character of {index.root}: nothing left to train on")
    return Split(train=train, val=tuple(sorted(val)), method=method)


def write_split(split: Split, run_dir: Path) -> Path:
    return write_json(Path(run_dir) / SPLIT_FILE, split.to_json(), indent=2)


def read_split(path: Path) -> Split:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        split = Split(train=tuple(data["train"]), val=tuple(data["val"]), method=str(data["method"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{path}: not a readable split file ({type(err).__name__}: {err})") from None
    overlap = set(split.train) & set(split.val)
    if overlap:
        raise DatasetError(f"{path}: characters in both train and val: {sorted(overlap)}")
    return split
