"""What a ``dtback dataset build`` run did: counts, every skip with its reason, the characters it made or grew.

The same report is printed as a table (:meth:`BuildReport.table`) and written as JSON (:meth:`BuildReport.to_json`).
``DATA_DIR/build_report.json`` holds only what the sources and settings decide (:meth:`BuildReport.dataset_json`),
so a rerun with the same sources writes the same bytes; what one run cost and changed (encoder runs, cache hits,
images added, seconds: :data:`RUN_FIELDS`) is printed and written only with ``--report``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from dtback.curate.characters import write_atomic
from dtback.curate.sources import ReadCounts, SourceSkip

# Every skip reason the builder reports, with its meaning.
SKIP_REASONS = {
    "hidden": "hidden file or folder, not read",
    "zero_byte": "empty file",
    "not_an_image": "neither a video (by suffix) nor an image (by content)",
    "truncated": "image file cut off",
    "corrupt": "image data damaged",
    "too_many_pixels": "image larger than data.max_image_pixels",
    "unreadable": "file cannot be read (permissions, I/O error)",
    "unreadable_video": "video cannot be opened or decoded (frames sampled before an error are used)",
    "no_face": "the face detector found no face",
    "face_too_small": "face box smaller than build.min_face_size",
    "blurred": "face sharpness below build.min_sharpness",
    "several_faces": "another face nearly as large as the chosen one (build.max_other_face_ratio)",
    "same_content": "the same bytes as an earlier picture",
    "duplicate": "near-duplicate of a kept picture (same face, nearly the same image)",
    "unclustered": "fewer than data.min_images_per_char similar faces yet; reconsidered on every rerun",
    "ambiguous": "close to the threshold or to two characters (build.cluster_margin); left out rather than guessed",
    "excluded": "excluded in corrections.yaml (by `dtback dataset fix exclude` or deleted by hand)",
    "source_missing": "the file vanished before it could be copied into its character",
}


# What one run did, left out of DATA_DIR/build_report.json (a rerun would change them).
RUN_FIELDS = ("already_in_dataset", "images_added", "joined_existing", "new_characters", "grown_characters", "seconds")
RUN_READ_FIELDS = ("encoder_calls", "cache_hits", "sources_unchanged")


@dataclass
class BuildReport:
    """Counts of one run. ``items`` are pictures (photos + sampled frames); ``faces_found`` of them had a face."""

    data_dir: str
    sources: list[str]
    settings: dict[str, Any]
    read: ReadCounts = field(default_factory=ReadCounts)
    items: int = 0
    faces_found: int = 0
    already_in_dataset: int = 0
    images_added: int = 0
    joined_existing: int = 0
    new_characters: list[str] = field(default_factory=list)
    grown_characters: list[str] = field(default_factory=list)
    characters: int = 0
    bundles: list[str] = field(default_factory=list)
    skips: list[SourceSkip] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def skipped_by_reason(self) -> dict[str, int]:
        return dict(sorted(Counter(skip.reason for skip in self.skips).items()))

    @property
    def faces_found_fraction(self) -> float:
        return self.faces_found / self.items if self.items else 0.0

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["skipped_by_reason"] = self.skipped_by_reason
        data["faces_found_fraction"] = round(self.faces_found_fraction, 4)
        data["skip_reasons"] = {reason: SKIP_REASONS[reason] for reason in self.skipped_by_reason}
        return data

    def dataset_json(self) -> dict[str, Any]:
        """:meth:`to_json` without the fields of this one run: a pure function of the sources and settings."""
        data = {name: value for name, value in self.to_json().items() if name not in RUN_FIELDS}
        data["skips"] = sorted(data["skips"], key=lambda skip: (skip["path"], skip["reason"], skip["detail"]))
        data["read"] = {name: value for name, value in data["read"].items() if name not in RUN_READ_FIELDS}
        return data

    def write(self, path: Path, run: bool = True) -> Path:
        """Write :meth:`to_json` (``run``) or :meth:`dataset_json` to ``path`` atomically."""
        data = self.to_json() if run else self.dataset_json()
        write_atomic(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
        return path

    def table(self) -> Table:
        """A summary for people: what was read, what was kept, what was skipped and why (with an example)."""
        table = Table(title=escape(f"dataset build -> {self.data_dir}"), show_lines=False)
        table.add_column("", justify="left")
        table.add_column("count", justify="right")
        table.add_column("detail", justify="left", overflow="fold")
        read = self.read
        unchanged = f"{read.sources_unchanged} unchanged since the last run"
        table.add_row("files", str(read.files), f"{read.images} images, {read.videos} videos ({unchanged})")
        table.add_row("pictures", str(self.items), f"photos + {read.frames} video frames")
        found = f"{100 * self.faces_found_fraction:.1f} % of pictures"
        cost = f"encoder runs {read.encoder_calls}, cache hits {read.cache_hits}"
        table.add_row("faces found", str(self.faces_found), f"{found}; {cost}", end_section=True)
        examples: dict[str, str] = {}
        for skip in self.skips:
            examples.setdefault(skip.reason, f"{skip.path}: {skip.detail}")
        for reason, count in self.skipped_by_reason.items():
            table.add_row(f"skipped: {reason}", str(count), escape(f"e.g. {examples[reason]}"))
        if self.skips:
            table.rows[-1].end_section = True
        table.add_row("already in the dataset", str(self.already_in_dataset), "pictures placed by earlier runs")
        table.add_row("images added", str(self.images_added), f"{self.joined_existing} joined existing characters")
        new = ", ".join(self.new_characters[:6]) + (" ..." if len(self.new_characters) > 6 else "")
        table.add_row("new characters", str(len(self.new_characters)), escape(new or "-"))
        grown = ", ".join(self.grown_characters[:6]) + (" ..." if len(self.grown_characters) > 6 else "")
        table.add_row("grown characters", str(len(self.grown_characters)), escape(grown or "-"))
        table.add_row("characters in total", str(self.characters), escape(f"bundles: {', '.join(self.bundles) or '-'}"))
        return table
