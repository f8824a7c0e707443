"""Measure the faces of one builder item (a photo or a video frame) and decide whether it can join a character.

:func:`measure` runs the face encoder once and records everything the filters need, so that the record can be
cached and the filters re-applied with other thresholds without running the encoder again. The rules of
:func:`face_verdict`, in order (the first that fails names the skip reason):

- ``no_face``: the detector finds no face.
- ``face_too_small``: the chosen face box is narrower or shorter than ``min_face_size`` pixels (the recognizer
  and the person crop need detail). dlib's HOG detector finds faces down to ~40 px with upsample 1; with
  ``upscale_small_faces`` an image without a face (long side up to 2000 px) is searched again at 2x, which finds
  the ~20-30 px faces of full-body photos (skimage's astronaut shrunk to a 23 px face on a 300 x 500 canvas: none
  at 1x, found at 2x), so they are counted here with what to do, not as ``no_face``.
- ``blurred``: the face is soft. Sharpness is the variance of the 4-neighbour Laplacian of the inner 80 % of the
  face box, in grey, resized to 64 x 64 px (so it measures blur relative to the face, whatever its size), less the
  Laplacian variance of 8-bit rounding (20/12), and scaled by ``(32 / grey std)²`` when the crop's contrast is under
  a standard deviation of 32 grey levels (so it measures blur, not exposure: the Laplacian variance falls with the
  square of the contrast, and the 140 LFW / TV-still faces at a quarter of their brightness measured 6.7-120, 33 of
  38 under 40, without it). Real photos measure 74 or more (140 faces), at a quarter of their brightness 55 or
  more; the same photos after a Gaussian blur of radius 3 px measure 35 or less, darkened too 35 or less; the
  default threshold is 40.
- ``several_faces``: another face is at least ``max_other_face_ratio`` (0.3) times as large (in area) as the
  chosen one: a co-subject, not a passer-by. 0.3 is about 55 % of the chosen face's width. A two-person photo of
  issue 15 measured 0.489 (it passed the old 0.5 limit); LFW's Ariel_Sharon_0004, with girls' faces beside his,
  0.337; Arnold_Schwarzenegger_0007, two people side by side, 0.781. The other 138 shared photos have no second face
  at all. The chosen face is picked by ``identity.face_choice`` (default: the largest). Detections scoring below half
  the chosen face's score are not counted as faces: weak detections are mostly false positives (skimage's
  astronaut: her face scores 1.16, a patch on her suit 0.12; in LFW a real second face of similar size scores 1.54
  against 1.73).

A photo turned sideways or upside down without an EXIF orientation tag (a scan, an exported phone photo) shows no face
to the detector: upright, dlib's HOG finds none in 38 of 38 such LFW / TV-still photos turned 90 degrees and 37 of 38
turned 270, and in 27 of 38 turned 180 (its other 11 "faces" score 0.07-0.24, while upright faces of the shared photos
score 0.49 or more). So when the upright search (and its 2x retry) finds no face scoring at least
:data:`~dtback.identity.search.ROTATION_MIN_SCORE`, the picture is searched again turned by 90, 270 and 180 degrees at
1x, and the turn whose best face scores highest is used when it beats the upright one: every measurement is then of
the turned, upright picture (``rotation``), and the builder writes that picture. Turned searches run on a copy whose
long side is at most :data:`~dtback.identity.search.ROTATION_MAX_SIDE`, so they cost three detections of at most 1000
px, for pictures without an upright face only.

An over-exposed photo (a face in sunlight, a flash too close) whose highlights are clipped shows HOG too little
contrast: at 2.5x brightness 4 of the 38 photos gave no face at all, and 6 more only a weak one (0.13-0.29). So a
picture without a face scoring :data:`~dtback.identity.search.ROTATION_MIN_SCORE` whose median grey is at least 192 is
searched once more on a copy with the gamma that puts its median at mid-grey, counting faces from a score of 0.2 (the
one false face it gave scored 0.13); the face is then measured and cut from the photo itself
(:func:`dtback.identity.search.relit`; evidence in ``benchmarks/README.md``). The turned searches still run and win
when they score higher: a light upside-down photo's darkened copy showed a weak upside-down "face" (0.36). The search
itself (looks, sizes, thresholds) lives in :mod:`dtback.identity.search`, shared with ``dtback precompute``.

A photo longer than :data:`~dtback.identity.search.SEARCH_MAX_SIDE` (2400 px; a 12-50 MP phone photo is 4000-8200 px
long) is searched on a copy that long. HOG's time grows with the pixels it scans, four times the picture's at upsample
1: measuring a 6000 x 4000 photo took 9.4 s (median of 50 LFW photos made that large), with the 2400 px copy 1.8 s
(one CPU core). The copy finds face boxes down to ~40 px (:data:`FOUND_FACE_SIZE`: 32 px boxes in 19 of 20 LFW faces,
28 px in 7), so ~40 / 2400 of the photo's long side: 100 px in a 6000 x 4000 photo (LFW faces of 80-200 px pasted into
such photos: 40 of 40 found; on a 2000 px copy 4 of the 10 faces of 80 px, on a 1600 px one 3 of the 10 of 100 px), 67
px in a 4000 x 3000 one. A photo whose copy shows no face is searched again at full size (faces down to ~40 px, at the
old cost): a smaller face is still found, while the common photo, whose face the copy shows, costs a fifth. The faces
found are given in the photo's pixels, their landmarks placed again on the full picture (:meth:`FaceEncoder.refine`),
and the face chip, embedding and sharpness are taken from it: landmarks within 1 px of the full-size search's (6 px on
1600 px faces), embeddings at cosine 0.996 or more. The box may move by up to a quarter of its width (80 px faces;
0.14 at 125 px): HOG boxes snap to the 8 px cells of a pyramid level, and the full-size search's own box moves by as
much as 20 px of 108 when the photo is shifted by 3 px. Sharpness, taken in the box, moves with it (0.5-1.6 times the
full-size search's on those 50 photos; all 97 or more, against the threshold of 40). There is no 2x retry on such a
photo: it would cost four times the full-size search."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dtback.config import BuildConfig
from dtback.identity.face import FaceEncoder, choose_face
from dtback.identity.search import UPSCALE_MAX_SIDE, search_faces

SHARPNESS_SIZE = 64
SHARPNESS_INNER = 0.8
SHARPNESS_CONTRAST = 32.0  # grey std below which sharpness is scaled up to this contrast (module docstring)
ROUNDING_LAPLACIAN_VAR = 20 / 12  # Laplacian variance of uniform 8-bit rounding noise: 20 x 1/12
HASH_SIZE = 8  # 8 x 8 difference hash: 64 bits
OTHER_FACE_MIN_SCORE = 0.5  # of the chosen face's detector score, for another detection to count as a face
FOUND_FACE_SIZE = 40  # px: dlib's HOG at upsample 1 finds face boxes this small (32 px: 19 of 20 LFW faces; 28: 7)


@dataclass(frozen=True)
class FaceRecord:
    """What the builder knows about one item.

    ``size`` (width, height); ``dhash`` (64,) bool difference hash of the whole image. With a face:
    ``face_patch`` (14, 16) uint8 grey centre of the aligned face crop the embedding was computed from (eyes to
    mouth, :func:`face_patch`),
    ``embedding`` (D,) float32 unit norm, ``box`` (4,) x1, y1, x2, y2, ``landmarks`` (5, 2), ``score``,
    ``sharpness`` and ``other_face_ratio`` (largest other face area / chosen face area, counting detections that score
    at least half the chosen one's; 0 when alone). ``rotation``: degrees counter-clockwise the decoded picture was
    turned to stand upright (0, 90, 180, 270); ``size``, ``box``, ``landmarks`` and ``dhash`` are of the turned one.
    """

    size: tuple[int, int]
    num_faces: int
    dhash: np.ndarray
    embedding: np.ndarray | None = None
    box: np.ndarray | None = None
    landmarks: np.ndarray | None = None
    score: float = 0.0
    sharpness: float = 0.0
    other_face_ratio: float = 0.0
    face_patch: np.ndarray | None = None
    upscaled: bool = False
    rotation: int = 0

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Cache entry: the fields of :func:`dtback.identity.precompute.face_entry` but ``relit`` (``box`` and
        ``landmarks`` of the upright picture here), plus the builder's own."""
        entry = {"num_faces": torch.tensor(self.num_faces)}
        if self.num_faces:
            entry.update(
                embedding=torch.from_numpy(self.embedding.astype(np.float32)),
                box=torch.from_numpy(self.box.astype(np.float32)),
                landmarks=torch.from_numpy(self.landmarks.astype(np.float32)),
                score=torch.tensor(self.score, dtype=torch.float32),
                face_patch=torch.from_numpy(self.face_patch.astype(np.uint8)),
            )
        entry.update(
            size=torch.tensor(self.size, dtype=torch.int64),
            dhash=torch.from_numpy(self.dhash.astype(np.uint8)),
            sharpness=torch.tensor(self.sharpness, dtype=torch.float32),
            other_face_ratio=torch.tensor(self.other_face_ratio, dtype=torch.float32),
            upscaled=torch.tensor(self.upscaled),
            rotation=torch.tensor(self.rotation),
        )
        return entry

    @classmethod
    def from_tensors(cls, entry: dict[str, torch.Tensor]) -> FaceRecord:
        num_faces = int(entry["num_faces"])
        face = {}
        if num_faces:
            face = dict(
                embedding=entry["embedding"].numpy(),
                box=entry["box"].numpy(),
                landmarks=entry["landmarks"].numpy(),
                score=float(entry["score"]),
                face_patch=entry["face_patch"].numpy(),
            )
        return cls(
            size=tuple(int(v) for v in entry["size"]),
            num_faces=num_faces,
            dhash=entry["dhash"].numpy().astype(bool),
            sharpness=float(entry["sharpness"]),
            other_face_ratio=float(entry["other_face_ratio"]),
            upscaled=bool(entry["upscaled"]),
            rotation=int(entry.get("rotation", 0)),
            **face,
        )


def measure(encoder: FaceEncoder, image: np.ndarray, upscale: bool = False) -> FaceRecord:
    """Detect all faces of ``image`` (H, W, 3) uint8 RGB, choose one by the encoder's rule, embed it, measure it.
    The search is :func:`dtback.identity.search.search_faces` (module docstring): with ``upscale``, an image without
    a face whose long side is at most :data:`UPSCALE_MAX_SIDE` is searched again at twice its size (small faces of
    full-body photos); a large one on a smaller copy first; a light one without a face again darkened. Boxes and
    landmarks are given in ``image``'s pixels, or in those of ``image`` turned upright when no face was found
    upright (``rotation``)."""
    found = search_faces(encoder, image, upscale)
    picture = found.searched if found.rotation else image  # the photo turned upright, at full size
    size = (picture.shape[1], picture.shape[0])
    dhash = difference_hash(picture)
    if not found.faces:
        return FaceRecord(size=size, num_faces=0, dhash=dhash)
    searched, faces = found.searched, found.faces
    face = choose_face(faces, (searched.shape[1], searched.shape[0]), encoder.choice)
    chip = encoder.align(searched, face)
    embedding = encoder.embed([chip])[0]
    others = [other.area for other in faces if other is not face and other.score >= OTHER_FACE_MIN_SCORE * face.score]
    return FaceRecord(
        size=size,
        num_faces=len(faces),
        dhash=dhash,
        embedding=embedding,
        box=np.asarray(face.box, dtype=np.float32) / found.scale,
        landmarks=np.asarray(face.landmarks, dtype=np.float32) / found.scale,
        face_patch=face_patch(chip),
        score=face.score,
        sharpness=sharpness(searched, face.box),
        other_face_ratio=max(others) / max(face.area, 1e-6) if others else 0.0,
        upscaled=found.scale > 1,
        rotation=found.rotation,
    )


def turn_upright(picture: Image.Image, rotation: int) -> Image.Image:
    """``picture`` turned ``rotation`` degrees counter-clockwise (0, 90, 180, 270), as :func:`measure` turned it."""
    if rotation % 360 == 0:
        return picture
    return picture.rotate(rotation, expand=True)


def face_verdict(record: FaceRecord, cfg: BuildConfig) -> tuple[str, str] | None:
    """``(reason, detail)`` when ``record`` cannot join a character (rules in the module docstring), else None."""
    if record.num_faces == 0:
        long_side = max(record.size)
        upscaled = cfg.upscale_small_faces and long_side <= UPSCALE_MAX_SIDE
        return "no_face", (f"the face detector found no face{' (also at 2x)' if upscaled else ''}, nor turned 90, 180 "
                           f"or 270 degrees; faces under ~{FOUND_FACE_SIZE // 2 if upscaled else FOUND_FACE_SIZE} px "
                           "are not found: crop the photo closer to the person, or set identity.face_detector=cnn")
    width, height = record.box[2] - record.box[0], record.box[3] - record.box[1]
    if min(width, height) < cfg.min_face_size:
        return "face_too_small", (
            f"face box {width:.0f}x{height:.0f} px < min_face_size={cfg.min_face_size}: too small to tell who it is "
            "(a full-body photo?). Add closer photos of the person; lowering data.build.min_face_size lets such "
            "faces group, less reliably below ~40 px"
        )
    if record.sharpness < cfg.min_sharpness:
        return "blurred", f"face sharpness {record.sharpness:.1f} < min_sharpness={cfg.min_sharpness}"
    if record.other_face_ratio >= cfg.max_other_face_ratio:
        return (
            "several_faces",
            f"{record.num_faces} faces; another is {record.other_face_ratio:.2f}x the chosen one's area "
            f">= max_other_face_ratio={cfg.max_other_face_ratio}",
        )
    return None


def sharpness(image: np.ndarray, box: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of the inner 80 % of ``box`` in ``image`` (H, W, 3), grey, 64 x 64,
    less 8-bit rounding's and lifted to a contrast of :data:`SHARPNESS_CONTRAST` (module docstring)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = (x2 - x1) * SHARPNESS_INNER / 2, (y2 - y1) * SHARPNESS_INNER / 2
    height, width = image.shape[:2]
    left, top = int(max(0, cx - half_w)), int(max(0, cy - half_h))
    right, bottom = int(min(width, cx + half_w)), int(min(height, cy + half_h))
    if right - left < 3 or bottom - top < 3:
        return 0.0
    crop = Image.fromarray(image[top:bottom, left:right]).convert("L")
    grey = np.asarray(crop.resize((SHARPNESS_SIZE, SHARPNESS_SIZE), Image.Resampling.BILINEAR), dtype=np.float32)
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    lift = max(1.0, SHARPNESS_CONTRAST / max(float(grey.std()), 1e-3)) ** 2
    return max(0.0, float(laplacian.var()) - ROUNDING_LAPLACIAN_VAR) * lift


def face_patch(chip: np.ndarray) -> np.ndarray:
    """The eyes-to-mouth centre of an aligned face crop (S, S, 3): grey at 32 x 32, rows 9-22 and columns 8-23,
    (14, 16) uint8. Aligned by the landmarks, it is the same for a crop, a letterbox or a resize of one photo and
    differs between two photos (see :func:`dtback.curate.cluster.patch_correlation`)."""
    grey = Image.fromarray(chip).convert("L").resize((32, 32), Image.Resampling.BILINEAR)
    return np.asarray(grey, dtype=np.uint8)[9:23, 8:24].copy()


def difference_hash(image: np.ndarray) -> np.ndarray:
    """64-bit difference hash of an (H, W, 3) image: grey 9 x 8, is each pixel brighter than its left neighbour."""
    grey = Image.fromarray(image).convert("L").resize((HASH_SIZE + 1, HASH_SIZE), Image.Resampling.BILINEAR)
    pixels = np.asarray(grey, dtype=np.int16)
    return (pixels[:, 1:] > pixels[:, :-1]).reshape(-1)
