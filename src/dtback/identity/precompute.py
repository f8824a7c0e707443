"""Fill the embedding cache once: every kept image -> face (box, landmarks, embedding) and body (pooled, tokens).

Run by ``dtback precompute``. Entries are keyed by image content, so a second run makes no encoder call, and an
image without a face is a counted skip of the face path only (the body path then crops the whole image).

Hand-made folders hold what ``dtback dataset build`` would have turned upright: a photo turned without an EXIF
orientation tag (a sideways scan, an exported phone photo) shows the detector no face. An image whose chosen face
scores under :data:`~dtback.identity.search.ROTATION_MIN_SCORE` (none, or a weak one) is given the builder's second
look (:func:`dtback.identity.search.second_look`: darkened when over-exposed, turned 90, 270 and 180 degrees), so an
upright face costs nothing more. A face found turned is embedded from the upright picture (the identity vector does
not depend on the orientation once the face is aligned) and cached with its box and landmarks in the file's own
pixels, so body and training crops of the file as it is stay on the face; the photo is named in the report
(``turned``) with what to do, because the file is still trained on as it lies. A face found only darkened is named
too (``overexposed``).
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
from dtback.identity.face import FaceEncoder, FaceResult, choose_face
from dtback.identity.search import ROTATION_MIN_SCORE, Search, in_file_pixels, second_look

log = logging.getLogger(__name__)

BODY_TOKEN_DTYPE = torch.float16  # patch tokens dominate the cache size; half precision halves it
# Part of both caches' keys: bump when the face search changes which face an image gets, so entries cached by an
# older search (a sideways photo's "no face", and the body crop of its whole image) are not reused.
FACE_SEARCH_VERSION = "2"  # 2: second look, darkened and turned


def face_entry(result: FaceResult | None, rotation: int = 0, relit: bool = False) -> dict[str, torch.Tensor]:
    """Cache fields of one image's face; ``num_faces`` 0 marks "no face" (cached too, so it is not re-detected).
    ``box`` and ``landmarks`` are in the file's pixels; ``rotation``: degrees counter-clockwise the file had to be
    turned for the face to be found (0 upright), ``relit``: found on a darkened copy only."""
    if result is None:
        return {"num_faces": torch.tensor(0)}
    return {
        "num_faces": torch.tensor(result.num_faces),
        "embedding": torch.from_numpy(result.embedding.astype(np.float32)),
        "box": torch.from_numpy(result.face.box.astype(np.float32)),
        "landmarks": torch.from_numpy(result.face.landmarks.astype(np.float32)),
        "score": torch.tensor(result.face.score, dtype=torch.float32),
        "rotation": torch.tensor(rotation),
        "relit": torch.tensor(relit),
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
    turned: dict[str, int] = field(default_factory=dict)  # image -> degrees counter-clockwise its face was found at
    overexposed: list[str] = field(default_factory=list)  # faces found only on a darkened copy
    seconds: float = 0.0
    face_cache: str = ""
    body_cache: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {**asdict(self), "images_per_second": round(self.images_per_second, 2)}

    def notes(self) -> list[str]:
        """One line per image whose face was found only by the second look, with what to do about it."""
        return ([f"sideways: {rel}: face found turned {angle} degrees; rotate the file or build with dtback dataset "
                 "build" for rel, angle in self.turned.items()]
                + [f"over-exposed: {rel}: face found only on a darkened copy; a better-exposed photo trains better"
                   for rel in self.overexposed])


class IdentityPrecomputer:
    """Face and body encoders (built by :mod:`dtback.backends`) with their caches; :meth:`run` walks a dataset
    index. ``body`` None: no body identity."""

    def __init__(self, face: FaceEncoder, body: BodyEncoderBase | None, cache_dir: Path, max_image_pixels: int):
        self.face = face
        self.body = body
        self.max_image_pixels = max_image_pixels
        self.face_cache = EmbeddingCache(cache_dir / "face", self.face.encoder_id,
                                         {**self.face.settings(), "search": FACE_SEARCH_VERSION})
        self.body_cache = None
        if self.body is not None:
            # The person crop comes from the face box, so body entries depend on the face encoder (and search) too.
            self.body_cache = EmbeddingCache(cache_dir / "body", self.body.encoder_id,
                                             {"face": self.face.encoder_id, "search": FACE_SEARCH_VERSION})

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
        for note in report.notes()[:20]:  # the file is trained on as it lies: say so where the user looks
            log.warning("%s", note)
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
                self.face_cache.put(key, face_entry(*self._second_look(np.asarray(images[key]), result)))
        faces = {}
        stored = self.face_cache.get_many([key for _, _, key in items])
        for path, rel, key in items:
            face = stored[key]
            if face is None:
                continue  # unreadable: counted by _load
            faces[key] = face
            if int(face["num_faces"]) > 0:
                report.faces_found += 1
                if int(face["rotation"]):
                    report.turned[rel] = int(face["rotation"])
                if bool(face["relit"]):
                    report.overexposed.append(rel)
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

    def _second_look(self, image: np.ndarray, result: FaceResult | None) -> tuple[FaceResult | None, int, bool]:
        """``(result, rotation, relit)``: ``result`` of the upright image when its face scores at least
        :data:`ROTATION_MIN_SCORE`, else the second look's face when it scores higher (module docstring), embedded
        from the picture it was found in, its box and landmarks in ``image``'s pixels."""
        if result is not None and result.face.score >= ROTATION_MIN_SCORE:
            return result, 0, False
        upright = Search(faces=self.face.detect(image) if result is not None else [], searched=image)
        if upright.best_score >= ROTATION_MIN_SCORE:
            return result, 0, False  # the chosen face is weak but another is not: the image is upright
        found = second_look(self.face, image, upright)
        if found is upright:
            return result, 0, False
        searched = found.searched
        face = choose_face(found.faces, (searched.shape[1], searched.shape[0]), self.face.choice)
        aligned = self.face.align(searched, face)
        embedding = self.face.embed([aligned])[0]
        turned_back = FaceResult(face=in_file_pixels(face, found), aligned=aligned, embedding=embedding,
                                 num_faces=len(found.faces))
        return turned_back, found.rotation, found.relit

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
