"""Where the faces of a real photo are: upright, on a copy of a large photo, at 2x, darkened, or turned.

Shared by the dataset builder (:func:`dtback.curate.faces.measure`, which writes the picture upright) and by
``dtback precompute`` on hand-made folders (:mod:`dtback.identity.precompute`, which keeps the file as it is and maps
the face back into its pixels with :func:`in_file_pixels`). The evidence for every size and threshold is in
:mod:`dtback.curate.faces` and ``benchmarks/README.md`` ("Real-photo variants").

Order of the looks; the second and third run when the upright search found no face scoring at least
:data:`ROTATION_MIN_SCORE`:

1. upright (:func:`upright_search`): on a copy :data:`SEARCH_MAX_SIDE` long when the photo is longer, at full size
   when the copy shows none, else on the photo, at 2x when asked (``upscale``) and it shows none;
2. darkened (:func:`relit`), for a light picture only (median grey at least :data:`RELIGHT_MIN_MEDIAN`): an
   over-exposed face whose highlights are clipped shows HOG too little contrast, and a gamma that puts the median
   grey at mid-grey brings back what is left in the unclipped pixels. Its faces count from
   :data:`RELIGHT_MIN_SCORE`, and are cut from the photo itself;
3. turned 90, 270 and 180 degrees (:data:`ROTATIONS`) on a copy at most :data:`ROTATION_MAX_SIDE` long: a photo
   turned without an EXIF orientation tag shows no face upright.

The look whose best face scores highest wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from dtback.identity.face import Face, FaceEncoder

UPSCALE_MAX_SIDE = 2000  # px: a larger image searched at 2x would cost too much; its faces are rarely that small
ROTATION_MIN_SCORE = 0.3  # a best upright face scoring less is searched for darkened and turned (module docstring)
ROTATIONS = (90, 270, 180)  # degrees counter-clockwise; sideways first, the common case
ROTATION_MAX_SIDE = 1000  # px: turned searches run on a copy no longer than this (a sideways portrait's face is big)
SEARCH_MAX_SIDE = 2400  # px: a longer photo is searched on a copy this long (curate.faces docstring)
# Median grey (0-255) from which a picture without a face is searched again darkened. The 38 LFW / TV photos at
# 2-3x brightness whose faces only the darkened copy showed had medians of 245-255; the originals' are 16-200.
RELIGHT_MIN_MEDIAN = 192
RELIGHT_MAX_MEDIAN = 250 / 255  # the median is taken as at most this, so a white picture gets a finite gamma (~34)
# A face of the darkened copy counts from this score: its true faces on those photos scored 0.23-0.70 (two more 0.10
# and 0.13), the one false face it gave (skimage's astronaut at 2.5x brightness, on her suit) 0.13.
RELIGHT_MIN_SCORE = 0.2


@dataclass(frozen=True)
class Search:
    """The faces of one look: ``faces`` in the pixels of ``searched``, which is the photo turned ``rotation``
    degrees counter-clockwise (0, 90, 180, 270) and enlarged ``scale`` times (1 or 2); ``relit``: found on the
    darkened copy (``searched`` is the photo itself, for the face crop)."""

    faces: list[Face]
    searched: np.ndarray
    scale: int = 1
    rotation: int = 0
    relit: bool = False

    @property
    def best_score(self) -> float:
        return max((face.score for face in self.faces), default=float("-inf"))


def search_faces(encoder: FaceEncoder, image: np.ndarray, upscale: bool = False) -> Search:
    """The faces of ``image`` (H, W, 3) uint8 RGB by the looks of the module docstring, in order."""
    found = upright_search(encoder, image, upscale)
    return second_look(encoder, image, found) if found.best_score < ROTATION_MIN_SCORE else found


def second_look(encoder: FaceEncoder, image: np.ndarray, upright: Search) -> Search:
    """``upright`` (the upright search of ``image``, without a face scoring :data:`ROTATION_MIN_SCORE`) or the
    darkened or turned look whose best face scores higher. The turned looks' faces are placed again on the photo
    turned at full size (:func:`at_full_size`), so their crops keep its resolution."""
    best = upright
    darker = relit(image)
    if darker is not None:
        faces = upright_search(encoder, darker, upscale=False).faces
        score = max((face.score for face in faces), default=float("-inf"))
        if score >= RELIGHT_MIN_SCORE and score > best.best_score:
            best = Search(faces=faces, searched=image, relit=True)
    # The turned looks run even when the darkened copy found a face: a light upside-down photo's darkened copy can
    # show a weak upside-down "face" (0.36 on one LFW photo turned 180, cosine 0.87), which its turn beats.
    small = resized(image, ROTATION_MAX_SIDE)
    turned_best: tuple[list[Face], np.ndarray, int] | None = None
    for angle in ROTATIONS:
        turned = np.ascontiguousarray(np.rot90(small, angle // 90))
        faces = encoder.detect(turned)
        if faces and max(face.score for face in faces) > max(best.best_score, _best(turned_best)):
            turned_best = faces, turned, angle
    if turned_best is None:
        return best
    faces, turned, angle = turned_best
    whole = np.ascontiguousarray(np.rot90(image, angle // 90))
    return Search(faces=at_full_size(encoder, whole, faces, turned.shape), searched=whole, rotation=angle)


def _best(found: tuple[list[Face], np.ndarray, int] | None) -> float:
    return max((face.score for face in found[0]), default=float("-inf")) if found else float("-inf")


def upright_search(encoder: FaceEncoder, image: np.ndarray, upscale: bool) -> Search:
    """Faces of the upright ``image``: on a copy :data:`SEARCH_MAX_SIDE` long when it is longer (given in
    ``image``'s pixels; on ``image`` itself when the copy shows none), else on ``image``, retried at 2x when there
    are none and ``upscale`` (up to :data:`UPSCALE_MAX_SIDE`)."""
    check_rgb(image)
    if max(image.shape[:2]) > SEARCH_MAX_SIDE:
        small = resized(image, SEARCH_MAX_SIDE)
        faces = encoder.detect(small)  # a face too small for the copy: the full-size search, at its old cost
        return Search(faces=at_full_size(encoder, image, faces, small.shape) if faces else encoder.detect(image),
                      searched=image)
    faces = encoder.detect(image)
    if not faces and upscale and max(image.shape[:2]) <= UPSCALE_MAX_SIDE:
        height, width = image.shape[:2]
        larger = np.asarray(Image.fromarray(image).resize((width * 2, height * 2), Image.Resampling.LANCZOS))
        return Search(faces=encoder.detect(larger), searched=larger, scale=2)
    return Search(faces=faces, searched=image)


def relit(image: np.ndarray) -> np.ndarray | None:
    """``image`` with a gamma that puts its median grey at mid-grey, when that median is at least
    :data:`RELIGHT_MIN_MEDIAN` (an over-exposed picture); None for any other picture."""
    grey = np.asarray(Image.fromarray(image).convert("L"))
    median = float(np.median(grey))
    if median < RELIGHT_MIN_MEDIAN:
        return None
    gamma = np.log(0.5) / np.log(min(median / 255, RELIGHT_MAX_MEDIAN))
    table = np.clip(255 * (np.arange(256) / 255) ** gamma + 0.5, 0, 255).astype(np.uint8)
    return table[image]


def check_rgb(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")


def resized(image: np.ndarray, max_side: int) -> np.ndarray:
    """``image`` shrunk (Lanczos) so that its long side is at most ``max_side``; itself when it already is."""
    shrink = max_side / max(image.shape[:2])
    if shrink >= 1:
        return image
    size = (max(1, round(image.shape[1] * shrink)), max(1, round(image.shape[0] * shrink)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


def at_full_size(encoder: FaceEncoder, image: np.ndarray, faces: list[Face], searched: tuple[int, ...]) -> list[Face]:
    """``faces`` found on a resized copy of ``image`` (of shape ``searched``), in ``image``'s pixels: box edges
    scaled, landmarks placed again on ``image`` by the encoder (:meth:`FaceEncoder.refine`), so that the face chip
    and the sharpness are taken from the full-resolution picture."""
    fx, fy = image.shape[1] / searched[1], image.shape[0] / searched[0]
    if fx == 1 and fy == 1:
        return faces
    edges = np.array([fx, fy, fx, fy], dtype=np.float32)
    centres = np.array([fx, fy], dtype=np.float32)  # a pixel centre x maps to (x + 0.5) * f - 0.5
    return [encoder.refine(image, Face(box=face.box * edges, landmarks=(face.landmarks + 0.5) * centres - 0.5,
                                       score=face.score)) for face in faces]


def in_file_pixels(face: Face, found: Search) -> Face:
    """``face`` of ``found`` (in the pixels of ``found.searched``) in the pixels of the photo as it was given:
    scaled down by ``found.scale`` and turned back by ``found.rotation``. The box stays the face's box (a quarter
    turn keeps a box a box); the landmarks stay on the same eyes, nose and mouth, so the aligned crop cut from the
    photo as it is (the similarity transform of the landmarks) is the one cut from the upright picture."""
    box = np.asarray(face.box, dtype=np.float32) / found.scale
    # A landmark is a pixel centre: (x + 0.5) is its continuous position, the one scaling and turning act on.
    points = (np.asarray(face.landmarks, dtype=np.float32) + 0.5) / found.scale
    height, width = (side // found.scale for side in found.searched.shape[:2])
    for _ in range((4 - found.rotation // 90) % 4):  # turning back: the remaining counter-clockwise quarter turns
        corners = _quarter_turn(box.reshape(2, 2), width)
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
        points = _quarter_turn(points, width)
        width, height = height, width
    return Face(box=box.astype(np.float32), landmarks=(points - 0.5).astype(np.float32), score=face.score)


def _quarter_turn(points: np.ndarray, width: int) -> np.ndarray:
    """Continuous positions (N, 2) x, y in a picture ``width`` wide, after turning it 90 degrees counter-clockwise
    (as ``np.rot90``): the left edge becomes the bottom, so (x, y) -> (y, width - x)."""
    return np.stack([points[:, 1], width - points[:, 0]], axis=1)
