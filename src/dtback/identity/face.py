"""Face identity: image -> faces (box, landmarks, score) -> the chosen face, aligned -> L2-normalised embedding.

Two backends behind one interface (:class:`FaceEncoder`):

- ``insightface``: SCRFD detection + ArcFace recognition ONNX models from a local model pack folder (antelopev2,
  buffalo_l), run by onnxruntime (:mod:`dtback.identity.insightface`). The weights are non-commercial; they are
  never downloaded at run time.
- ``dlib``: HOG (or CNN) detector + 5-point landmarks + ResNet descriptor from the ``face_recognition_models``
  package (``dlib-bin`` wheels). Works offline; the models are public domain (CC0). Its differentiable path is the
  same ResNet read into torch (:mod:`dtback.identity.dlib_torch`).

Images are ``(H, W, 3)`` uint8 RGB numpy arrays throughout.
"""

from __future__ import annotations

import hashlib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from dtback.errors import ConfigError
from dtback.identity.dlib_torch import dlib_models_dir  # noqa: F401  (re-exported: dtback.identity.face.dlib_models_dir)

log = logging.getLogger(__name__)

FaceChoice = Literal["largest", "score", "center"]


@dataclass(frozen=True)
class Face:
    """A detected face: ``box`` (4,) x1, y1, x2, y2 in pixels; ``landmarks`` (5, 2) x, y; detector ``score``.

    Landmark order is the backend's: ArcFace order (eyes, nose, mouth corners) for insightface; dlib's 5-point
    order (eye corners, nose base) for dlib.
    """

    box: np.ndarray
    landmarks: np.ndarray
    score: float

    @property
    def area(self) -> float:
        return float(max(0.0, self.box[2] - self.box[0]) * max(0.0, self.box[3] - self.box[1]))


@dataclass(frozen=True)
class FaceResult:
    """The chosen face of an image, its aligned crop (S, S, 3) uint8, its embedding (D,) float32 with norm 1,
    and how many faces the image held."""

    face: Face
    aligned: np.ndarray
    embedding: np.ndarray
    num_faces: int


def choose_face(faces: Sequence[Face], image_size: tuple[int, int], rule: FaceChoice = "largest") -> Face:
    """Pick one face: the largest box (default; the subject of a photo is usually the biggest face), the highest
    detector score, or the one nearest the image centre. ``image_size`` is (width, height)."""
    if not faces:
        raise ValueError("no faces to choose from")
    if rule == "largest":
        return max(faces, key=lambda f: f.area)
    if rule == "score":
        return max(faces, key=lambda f: f.score)
    centre = np.array(image_size, dtype=np.float64) / 2
    return min(faces, key=lambda f: float(np.linalg.norm((f.box[:2] + f.box[2:]) / 2 - centre)))


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D) float32 rows of unit length."""
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


class FaceEncoder(ABC):
    """The face encoder interface of every backend: detect -> choose -> align -> embed (:meth:`encode`, a batch
    with :meth:`encode_batch`), and :meth:`embed_pixels`, the differentiable path the identity loss uses (backends
    with one set ``differentiable``). Subclasses set ``aligned_size`` and ``embedding_dim``."""

    aligned_size: int
    embedding_dim: int
    differentiable: bool = False

    def __init__(self, choice: FaceChoice = "largest"):
        self.choice = choice

    @property
    @abstractmethod
    def encoder_id(self) -> str:
        """Identifies the models (names + content hashes) for cache keys."""

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Every setting that changes the output, for cache keys."""

    @abstractmethod
    def detect(self, image: np.ndarray) -> list[Face]:
        """All faces in an (H, W, 3) uint8 RGB image."""

    def refine(self, image: np.ndarray, face: Face) -> Face:
        """``face`` found on a smaller copy of ``image``, its box and landmarks already scaled to ``image``'s pixels:
        the landmarks placed again on ``image`` itself where the backend places them apart from detection (dlib's
        shape predictor), else ``face`` unchanged."""
        return face

    @abstractmethod
    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        """The recognizer's aligned crop of ``face``: (S, S, 3) uint8 RGB."""

    @abstractmethod
    def embed(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        """Aligned crops -> (N, D) float32 L2-normalised embeddings."""

    def encode(self, image: np.ndarray) -> FaceResult | None:
        """The chosen face of ``image`` with its embedding, or None when no face is found."""
        image = _as_rgb_array(image)
        faces = self.detect(image)
        if not faces:
            return None
        face = choose_face(faces, (image.shape[1], image.shape[0]), self.choice)
        aligned = self.align(image, face)
        embedding = self.embed([aligned])[0]
        return FaceResult(face=face, aligned=aligned, embedding=embedding, num_faces=len(faces))

    def encode_batch(self, images: Sequence[np.ndarray],
                     on_image: Callable[[int], Any] | None = None) -> list[FaceResult | None]:
        """:meth:`encode` of each image, the found faces' crops embedded in one :meth:`embed` call;
        ``on_image(1)`` after each image's detection (a progress bar's ``update``)."""
        found: list[tuple[int, Face, np.ndarray, int]] = []
        for index, image in enumerate(images):
            image = _as_rgb_array(image)
            faces = self.detect(image)
            if faces:
                face = choose_face(faces, (image.shape[1], image.shape[0]), self.choice)
                found.append((index, face, self.align(image, face), len(faces)))
            if on_image is not None:
                on_image(1)
        results: list[FaceResult | None] = [None] * len(images)
        embeddings = self.embed([aligned for _, _, aligned, _ in found])
        for (index, face, aligned, count), embedding in zip(found, embeddings):
            results[index] = FaceResult(face=face, aligned=aligned, embedding=embedding, num_faces=count)
        return results

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """Differentiable: images ``(B, 3, H, W)`` in [0, 1] with each one's face box ``(B, 4)`` and 5 landmarks
        ``(B, 5, 2)`` (pixels of those images) -> ``(B, D)`` embeddings; gradients flow to ``pixels``."""
        raise ConfigError(f"the {self.encoder_id} face encoder has no differentiable path (a face identity loss "
                          "needs identity.face_backend dlib, insightface or world; or set training.face_weight=0)")


def _as_rgb_array(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {array.shape} dtype {array.dtype}")
    return np.ascontiguousarray(array)


def file_digest(path: Path, length: int = 12) -> str:
    """Short sha256 of a model file, so that a replaced model never reuses cached embeddings."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


# --------------------------------------------------------------------------------------------------- dlib backend


class DlibFaceEncoder(FaceEncoder):
    """dlib: HOG or CNN detector, 5-point landmarks, 150 px face chip, ResNet descriptor (128-d).

    ``upsample`` doubles the image that many times before detection (finds faces down to ~40 px with 1).
    ``recognizer`` runs the ResNet: ``torch`` (:mod:`dtback.identity.dlib_torch`, batches of ``batch_size`` chips on
    ``device``; the same descriptors, worst cosine 0.99999992 over the shared photos, and faster even on a CPU:
    ``benchmarks/README.md``) or ``dlib`` (its own C++). The differentiable :meth:`embed_pixels` is always torch.
    """

    aligned_size = 150
    embedding_dim = 128
    CHIP_PADDING = 0.25  # dlib's default for the descriptor it was trained with

    def __init__(self, detector: Literal["hog", "cnn"] = "hog", upsample: int = 1, choice: FaceChoice = "largest",
                 recognizer: Literal["torch", "dlib"] = "torch", device: str | torch.device = "cpu",
                 batch_size: int = 32):
        super().__init__(choice)
        import dlib

        if recognizer not in ("torch", "dlib"):
            raise ConfigError(f"dlib face recognizer {recognizer!r}: choose torch or dlib")
        self.recognizer, self.device, self.batch_size = recognizer, torch.device(device), batch_size

        self._dlib = dlib
        self.models = dlib_models_dir()
        self.detector_kind = detector
        self.upsample = upsample
        if detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(str(self.models / "mmod_human_face_detector.dat"))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(self.models / "shape_predictor_5_face_landmarks.dat"))
        self._recognizer = dlib.face_recognition_model_v1(str(self.models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._torch = None  # the torch recognizer, read on first use

    @cached_property
    def encoder_id(self) -> str:
        digest = file_digest(self.models / "dlib_face_recognition_resnet_model_v1.dat")
        return f"dlib-resnet-v1:{digest}:{self.detector_kind}"

    def settings(self) -> dict[str, Any]:
        return {"detector": self.detector_kind, "upsample": self.upsample, "choice": self.choice,
                "recognizer": self.recognizer}

    def detect(self, image: np.ndarray) -> list[Face]:
        image = _as_rgb_array(image)
        if self.detector_kind == "cnn":
            detections = [(d.rect, float(d.confidence)) for d in self._detector(image, self.upsample)]
        else:
            rects, scores, _ = self._detector.run(image, self.upsample, 0.0)
            detections = list(zip(rects, (float(s) for s in scores)))
        faces = []
        for rect, score in detections:
            shape = self._shape(image, rect)
            landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
            box = np.array([rect.left(), rect.top(), rect.right() + 1, rect.bottom() + 1], dtype=np.float32)
            faces.append(Face(box=box, landmarks=landmarks, score=score))
        return faces

    def refine(self, image: np.ndarray, face: Face) -> Face:
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        shape = self._shape(_as_rgb_array(image), self._dlib.rectangle(x1, y1, x2 - 1, y2 - 1))
        landmarks = np.array([[p.x, p.y] for p in shape.parts()], dtype=np.float32)
        return Face(box=face.box, landmarks=landmarks, score=face.score)

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        dlib = self._dlib
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        rect = dlib.rectangle(x1, y1, x2 - 1, y2 - 1)
        points = [dlib.point(int(round(x)), int(round(y))) for x, y in face.landmarks]
        shape = dlib.full_object_detection(rect, points)
        return np.asarray(dlib.get_face_chip(_as_rgb_array(image), shape, self.aligned_size, self.CHIP_PADDING))

    differentiable = True

    def torch_recognizer(self):
        """The recognizer as a torch module (:class:`~dtback.identity.dlib_torch.DlibResNet`): chips
        ``(N, 3, 150, 150)`` RGB 0..255 -> the (unnormalised) descriptors dlib computes."""
        from dtback.identity.dlib_torch import MODEL_FILE, load_dlib_resnet

        return load_dlib_resnet(self.models / MODEL_FILE)

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """dlib's ResNet in torch on chips cut like ``get_face_chip`` from dlib's 5 landmarks
        (:func:`~dtback.identity.dlib_torch.cut_face_chips`, a differentiable warp); ``face_boxes`` is not needed."""
        from dtback.identity.dlib_torch import cut_face_chips

        net = self._torch_net(pixels.device)
        chips = cut_face_chips(pixels.float(), landmarks.to(pixels.device), self.aligned_size, self.CHIP_PADDING)
        return net(chips * 255.0)

    def _torch_net(self, device: torch.device) -> torch.nn.Module:
        if self._torch is None:
            self._torch = self.torch_recognizer()
        return self._torch.to(device)

    def embed(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        chips = [_as_rgb_array(chip) for chip in aligned]
        if not chips:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        if self.recognizer == "dlib":
            descriptors = np.array([np.array(d) for d in self._recognizer.compute_face_descriptor(chips)])
        else:
            net = self._torch_net(self.device)
            with torch.no_grad():
                descriptors = torch.cat([
                    net(torch.from_numpy(np.stack(chips[i:i + self.batch_size])).to(self.device)
                        .permute(0, 3, 1, 2).float()).float().cpu()
                    for i in range(0, len(chips), self.batch_size)
                ]).numpy()
        return l2_normalise(descriptors)
