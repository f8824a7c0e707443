"""Scan + split + record: what a run does with its dataset before any model is built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dtback.config import DataConfig
from dtback.data.layout import DatasetIndex, scan_dataset
from dtback.data.split import SPLIT_FILE, Split, read_split, split_characters, write_split
from dtback.errors import DatasetError
from dtback.io import write_json

log = logging.getLogger(__name__)

REPORT_FILE = "dataset_report.json"


@dataclass
class PreparedData:
    index: DatasetIndex
    split: Split
    split_path: Path
    report_path: Path


def prepare_dataset(cfg: DataConfig, seed: int, run_dir: Path, progress: bool = True,
                    after_main: bool = False) -> PreparedData:
    """Scan ``cfg.data_dir``, split by character and write ``split.json`` and ``dataset_report.json`` to ``run_dir``.

    A run folder that already has a split (a resumed run) must get the same split again, otherwise validation
    characters could leak into training; a mismatch is an error that names both. ``after_main``: this is a rank
    of several that prepares after the main one accepted (or wrote) the split, so a mismatch is this rank's view of
    the files, which its message says.
    """
    index = scan_dataset(cfg, seed, progress=progress)
    split = split_characters(index, cfg, seed)
    split_path = run_dir / SPLIT_FILE
    if split_path.exists():
        saved = read_split(split_path)
        if (saved.train, saved.val) != (split.train, split.val):
            changes = ", ".join(f"{part} +{sorted(set(now) - set(before))[:5]} -{sorted(set(before) - set(now))[:5]}"
                                for part, now, before in (("train", split.train, saved.train),
                                                          ("val", split.val, saved.val)))
            if after_main:
                raise DatasetError(
                    f"this rank splits {cfg.data_dir} otherwise than the main rank did into {split_path} ({changes}): "
                    "the ranks see other files (an image missing or unreadable here; the warnings above name the "
                    "skips); make data.data_dir the same for every rank and run again"
                )
            raise DatasetError(
                f"{split_path} was written for a different split than {cfg.data_dir} gives now ({changes}); "
                "use a new output.output_dir, or delete the split file to start over"
            )
    else:
        write_split(split, run_dir)
    report_path = write_report(index, run_dir / REPORT_FILE)
    log.info("split: %d train / %d val characters -> %s", len(split.train), len(split.val), split_path)
    return PreparedData(index=index, split=split, split_path=split_path, report_path=report_path)


def write_report(index: DatasetIndex, path: Path) -> Path:
    return write_json(path, index.report(), indent=2)
