"""Fill the embedding cache once: every kept image -> face (box, landmarks, embedding) and body (pooled, tokens).

Run by ``dtback precompute``. Entries are keyed by image content, so a second run makes no encoder call, and an
image without a face is a counted skip of the face path only (the body path then crops the whole image).
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dtback.data.images import ImageSkip, load_rgb
from dtback.data.layout import DatasetIndex
from dtback.identity.body import BodyEncoderBase
from dtback.identity.cache import EmbeddingCache, content_hash
from dtback.identity.face import FaceEncoder, FaceResult

log = logging.getLogger(__name__)

BODY_TOKEN_DTYPE = torch.float16  # patch tokens dominate the cache size; half precision halves it


def face_entry(result: FaceResult | None) -> dict[str, torch.Tensor]:
    """Cache fields of one image's face; ``num_faces`` 0 marks "no face" (cached too, so it is not re-detected)."""
    if result is None:
        return {"num_faces": torch.tensor(0)}
    return {
        "num_faces": torch.tensor(result.num_faces),
        "embedding": torch.from_numpy(result.embedding.astype(np.float32)),
        "box": torch.from_numpy(result.face.box.astype(np.float32)),
        "landmarks": torch.from_numpy(result.face.landmarks.astype(np.float32)),
        "score": torch.tensor(result.face.score, dtype=torch.float32),
    }


@dataclass
class PrecomputeReport:
    images: int = 0
    unreadable: list[str] = field(default_factory=list)
    face_cache_hits: int = 0
    body_cache_hits: int = 0
    face_encoder_calls: int = 0
    body_encoder_calls: int = 0
    faces_found: int = 0
    no_face: list[str] = field(default_factory=list)
    seconds: float = 0.0
    face_cache: str = ""
    body_cache: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}


class IdentityPrecomputer:
    """Face and body encoders (built by :mod:`dtback.backends`) with their caches; :meth:`run` walks a dataset
    index. ``body`` None: no body identity."""

    def __init__(self, face: FaceEncoder, body: BodyEncoderBase | None, cache_dir: Path, max_image_pixels: int):
        self.face = face
        self.body = body
        self.max_image_pixels = max_image_pixels
        self.face_cache = EmbeddingCache(cache_dir / "face", self.face.encoder_id, self.face.settings())
        self.body_cache = None
        if self.body is not None:
            # The person crop comes from the face box, so body entries depend on the face encoder too.
            self.body_cache = EmbeddingCache(cache_dir / "body", self.body.encoder_id, {"face": self.face.encoder_id})

    def run(self, index: DatasetIndex, progress: bool = True, batch_size: int = 64) -> PrecomputeReport:
        report = PrecomputeReport(face_cache=str(self.face_cache.folder))
        report.body_cache = str(self.body_cache.folder) if self.body_cache is not None else None
        paths = [entry.path for character in index.characters for entry in character.images]
        start = time.perf_counter()
        with ExitStack() as caches:  # flushes what was computed even when interrupted
            for cache in (self.face_cache, self.body_cache):
                if cache is not None:
                    caches.enter_context(cache)
            bar = tqdm(total=len(paths), desc="identity embeddings", unit="img", disable=not progress)
            for first in range(0, len(paths), batch_size):
                chunk = paths[first:first + batch_size]
                moved = self._chunk(chunk, index.root, report, bar)
                bar.update(len(chunk) - moved)
            bar.close()
        report.seconds = time.perf_counter() - start
        return report

    def _chunk(self, paths: list[Path], root: Path, report: PrecomputeReport, bar: Any = None) -> int:
        """Encode the images of ``paths`` that are not cached yet, in one batch per encoder. The face encoder moves
        ``bar`` as it goes (per image where detection is per image, as dlib's); returns how far it moved it."""
        report.images += len(paths)
        items = [item for item in (self._hashed(path, path.relative_to(root).as_posix(), report) for path in paths)
                 if item is not None]
        images: dict[str, Any] = {}

        def image_of(path: Path, rel: str, key: str):
            if key not in images:
                images[key] = self._load(path, rel, report)
            return images[key]

        todo = _first_per_key(item for item in items if item[2] not in self.face_cache)
        report.face_cache_hits += len(items) - len(todo)  # a copy of an image in the same batch is a hit too
        todo = [item for item in todo if image_of(*item) is not None]
        moved = 0
        if todo:
            results = self.face.encode_batch([np.asarray(images[key]) for _, _, key in todo],
                                             on_image=bar.update if bar is not None else None)
            moved = len(todo) if bar is not None else 0
            report.face_encoder_calls += len(todo)
            for (_, _, key), result in zip(todo, results):
                self.face_cache.put(key, face_entry(result))
        faces = {}
        stored = self.face_cache.get_many([key for _, _, key in items])
        for path, rel, key in items:
            face = stored[key]
            if face is None:
                continue  # unreadable: counted by _load
            faces[key] = face
            if int(face["num_faces"]) > 0:
                report.faces_found += 1
            else:
                report.no_face.append(rel)
        if self.body_cache is None:
            return moved
        todo = _first_per_key(item for item in items if item[2] in faces and item[2] not in self.body_cache)
        report.body_cache_hits += sum(1 for item in items if item[2] in faces) - len(todo)
        todo = [item for item in todo if image_of(*item) is not None]
        if not todo:
            return moved
        boxes = [faces[key]["box"].numpy() if "box" in faces[key] else None for _, _, key in todo]
        batch = [images[key] for _, _, key in todo]
        features = self.body.encode_batch(batch, boxes)
        pooled, tokens = features.pooled, features.tokens
        report.body_encoder_calls += len(todo)
        for i, (_, _, key) in enumerate(todo):
            self.body_cache.put(key, {"pooled": pooled[i].float().cpu(), "tokens": tokens[i].to(BODY_TOKEN_DTYPE).cpu()})
        return moved

    def _hashed(self, path: Path, rel: str, report: PrecomputeReport) -> tuple[Path, str, str] | None:
        """``(path, rel, content key)``, or None, counted as unreadable, for an image that went away (or became
        unreadable) after the scan kept it: a counted skip like an image that no longer decodes, not a traceback."""
        try:
            return path, rel, content_hash(path)
        except OSError as err:
            log.warning("%s: unreadable (%s); no embedding", rel, err.strerror or err)
            report.unreadable.append(rel)
            return None

    def _load(self, path: Path, rel: str, report: PrecomputeReport):
        try:
            return load_rgb(path, self.max_image_pixels)
        except ImageSkip as skip:
            log.warning("%s: %s (%s); no embedding", rel, skip.reason.value, skip.detail)
            report.unreadable.append(rel)
            return None


def _first_per_key(items) -> list[tuple[Path, str, str]]:
    """``(path, rel, key)`` items with each content key once (the first), so identical files are encoded once."""
    seen: dict[str, tuple[Path, str, str]] = {}
    for item in items:
        seen.setdefault(item[2], item)
    return list(seen.values())
