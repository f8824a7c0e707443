"""Read the builder's sources: photo files and video frames -> items with a cached :class:`FaceRecord` each.

An **item** is one picture: a photo file, or a frame sampled from a video (:mod:`dtback.curate.video`). Its key is the
sha256 of its bytes (for a frame: of the JPEG the frame is stored as), which is also its *embedding id* in the
cache, so a photo copied under another name is recognised and never measured twice.

What each source gave is remembered per path in the build state (size, modification time, sampling settings,
item keys, or the reason it was skipped), so a rerun neither re-hashes unchanged photos nor decodes unchanged
videos again. Frames with a face are kept as JPEG in the state folder (``frames/<key>.jpg``) until they are copied
into a character.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from dtback.config import BuildConfig
from dtback.curate.faces import FaceRecord, measure
from dtback.data.images import ImageSkip, entry_problem, load_rgb, shown
from dtback.curate.video import VideoError, is_video, sample_frames
from dtback.errors import DatasetError
from dtback.identity.cache import EmbeddingCache, content_hash
from dtback.identity.face import FaceEncoder
from dtback.io import is_inside, write_bytes

log = logging.getLogger(__name__)

FRAME_JPEG_QUALITY = 95


@dataclass(frozen=True)
class Item:
    """One picture: ``key`` (sha256 of its bytes), its source file (absolute) and ``time`` in the video (s)."""

    key: str
    source: str
    time: float | None = None

    @property
    def label(self) -> str:
        return self.source if self.time is None else f"{self.source}@{self.time:.3f}s"


@dataclass(frozen=True)
class SourceSkip:
    """A file or item left out: where (a path, or ``path@time`` for a frame), why (a reason code) and details."""

    path: str
    reason: str
    detail: str


@dataclass
class ReadCounts:
    """What reading the sources cost: files by kind, frames sampled, encoder runs and cache hits."""

    files: int = 0
    images: int = 0
    videos: int = 0
    frames: int = 0
    encoder_calls: int = 0
    cache_hits: int = 0
    sources_unchanged: int = 0


def list_files(paths: list[Path], exclude: Path) -> tuple[list[Path], list[SourceSkip]]:
    """Every file under ``paths`` (folders are walked recursively, in sorted order), absolute, without duplicates,
    leaving out anything inside ``exclude`` (the output folder). Hidden files and folders, names that are not UTF-8,
    symlink loops and FIFOs, sockets and devices (never opened: a FIFO blocks its reader) are counted skips. A
    source that is the output folder or inside it is refused: the builder would read its own dataset."""
    exclude = _resolved(exclude, "--out")
    files: dict[Path, None] = {}
    skips: list[SourceSkip] = []
    for path in check_sources(paths, exclude):
        if path.is_file():
            files.setdefault(path)
            continue
        for folder, subfolders, names in os.walk(path):
            here = Path(folder)
            if here == exclude or exclude in here.parents:
                subfolders[:] = []
                continue
            kept = []
            for name in sorted(subfolders):
                problem = ("hidden", "hidden folder is not read") if name.startswith(".") else \
                    _entry_problem(here / name)
                if problem is not None:
                    skips.append(SourceSkip(shown(here / name), *problem))
                else:
                    kept.append(name)
            subfolders[:] = kept
            for name in sorted(names):
                if name.startswith("."):
                    skips.append(SourceSkip(shown(here / name), "hidden", "hidden file is not read"))
                    continue
                problem = _entry_problem(here / name, folder_ok=False)
                if problem is not None:
                    skips.append(SourceSkip(shown(here / name), *problem))
                else:
                    files.setdefault(here / name)
    return sorted(files), skips


def check_sources(paths: list[Path], out: Path) -> list[Path]:
    """The ``--from`` paths, resolved; raises :class:`DatasetError` for one that is missing, a symlink loop, not a
    file or folder (a FIFO), or the output folder ``out`` or inside it (the builder would read the dataset it
    writes). An output folder inside a source is fine: it is left out of the walk."""
    out = _resolved(out, "--out")
    resolved = []
    for given in paths:
        path = _resolved(Path(given), "--from")
        if not path.exists():
            raise DatasetError(f"--from {shown(given)}: no such file or folder")
        if is_inside(path, out):
            raise DatasetError(f"--from {shown(given)} is the output folder --out {shown(out)} or inside it: the "
                               "builder would read the dataset it writes; give a folder of new photos and videos")
        problem = entry_problem(path)
        if problem is not None:
            raise DatasetError(f"--from {shown(given)}: {problem[1]}")
        resolved.append(path)
    return resolved


def _resolved(path: Path, flag: str) -> Path:
    try:
        return Path(path).resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError("Symlink loop ...")
        raise DatasetError(f"{flag} {shown(path)} cannot be resolved: {err}") from None


def _entry_problem(path: Path, folder_ok: bool = True) -> tuple[str, str] | None:
    """(reason, detail) of :func:`~dtback.data.images.entry_problem` as a source skip; None when it is read."""
    problem = entry_problem(path, folder_ok)
    return None if problem is None else (problem[0].value, problem[1])


@dataclass
class SourceReader:
    """Turns source files into items, measuring each new item once with ``encoder`` into ``cache``.

    ``known`` is the build state's record per source path; it is updated in place.
    """

    encoder: FaceEncoder
    cache: EmbeddingCache
    frames_dir: Path
    cfg: BuildConfig
    max_image_pixels: int
    known: dict[str, dict[str, Any]]
    progress: bool = True
    counts: ReadCounts = field(default_factory=ReadCounts)

    def read(self, path: Path) -> tuple[list[Item], list[SourceSkip]]:
        """Items of one source file and the skips it produced (an unreadable file, a video that broke off)."""
        self.counts.files += 1
        video = is_video(path)
        if video:
            self.counts.videos += 1
        else:
            self.counts.images += 1
        stat = path.stat()
        entry = {"kind": "video" if video else "image", "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if video:
            entry["sampling"] = {"fps": self.cfg.video_fps, "max_frames": self.cfg.max_frames_per_video}
        previous = self.known.get(str(path))
        if previous is not None and self._unchanged(previous, entry):
            self.counts.sources_unchanged += 1
            self.counts.cache_hits += len(previous["items"])  # each item's face record is read from the cache
            self.counts.frames += len(previous["items"]) if video else 0
            entry = previous
        else:
            entry.update(self._read_video(path) if video else self._read_image(path))
            self.known[str(path)] = entry
        items = [Item(key=i["key"], source=str(path), time=i.get("time")) for i in entry["items"]]
        skips = [SourceSkip(str(path), s["reason"], s["detail"]) for s in entry.get("skips", [])]
        return items, skips

    def record(self, key: str) -> FaceRecord:
        entry = self.cache.get(key)
        if entry is None:
            raise KeyError(f"no cached face record for item {key}")
        return FaceRecord.from_tensors(entry)

    def _unchanged(self, previous: dict[str, Any], entry: dict[str, Any]) -> bool:
        same = all(previous.get(name) == value for name, value in entry.items())
        return same and all(item["key"] in self.cache for item in previous["items"])

    def _read_image(self, path: Path) -> dict[str, Any]:
        try:
            key = content_hash(path)
        except OSError as err:
            return {"items": [], "skips": [{"reason": "unreadable", "detail": str(err)}]}
        if key in self.cache:
            self.counts.cache_hits += 1
            return {"items": [{"key": key}]}
        try:
            image = np.asarray(load_rgb(path, self.max_image_pixels))
        except ImageSkip as skip:
            return {"items": [], "skips": [{"reason": skip.reason.value, "detail": skip.detail}]}
        self._measure(key, image)
        return {"items": [{"key": key}]}

    def _read_video(self, path: Path) -> dict[str, Any]:
        items, skips = [], []
        bar = tqdm(desc=f"frames of {path.name}", unit="frame", disable=not self.progress, leave=False)
        try:
            for frame in sample_frames(path, self.cfg.video_fps, self.cfg.max_frames_per_video):
                self.counts.frames += 1
                bar.update()
                jpeg = _jpeg_bytes(frame.pixels)
                key = _sha256(jpeg)
                record = self._cached_or_measure(key, frame.pixels)
                if record.num_faces:
                    self._stage(key, jpeg)
                items.append({"key": key, "time": frame.time})
        except VideoError as err:
            kept = f"; the {err.frames} frames sampled before are used" if err.frames else ""
            skips.append({"reason": "unreadable_video", "detail": err.detail + kept})
            log.warning("%s: unreadable video: %s%s", path, err.detail, kept)
        finally:
            bar.close()
        return {"items": items, "skips": skips}

    def _cached_or_measure(self, key: str, pixels: np.ndarray) -> FaceRecord:
        entry = self.cache.get(key)
        if entry is not None:
            self.counts.cache_hits += 1
            return FaceRecord.from_tensors(entry)
        return self._measure(key, pixels)

    def _measure(self, key: str, pixels: np.ndarray) -> FaceRecord:
        record = measure(self.encoder, pixels, self.cfg.upscale_small_faces)
        self.counts.encoder_calls += 1
        self.cache.put(key, record.to_tensors())
        return record

    def _stage(self, key: str, jpeg: bytes) -> None:
        path = self.frames_dir / f"{key}.jpg"
        if path.exists():
            return
        write_bytes(path, jpeg)  # whole or absent: staged frames are hard-linked into the dataset later


def _jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=FRAME_JPEG_QUALITY)
    return buffer.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
