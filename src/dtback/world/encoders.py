"""Face and body encoders for the identity world, behind the same interfaces as the photo encoders.

- :class:`WorldFaceEncoder` is a :class:`~dtback.identity.face.FaceEncoder`: a small CNN face detector (face-centre
  heatmap + box distances), a square crop around the face (the "aligned" 48 px crop: hair, face and beard), and a
  CNN embedder trained by metric learning on character ids -> 128-d unit vectors.
- :class:`WorldBodyEncoder` has the surface of :class:`~dtback.identity.body.BodyEncoder`: ``forward(pixels)`` ->
  :class:`~dtback.identity.body.BodyFeatures` and ``encode(image, face_box)``, over a person crop found from the face.

For the trainer's identity loss both have a differentiable path from whole images and face boxes:
``embed_pixels(pixels (B, 3, H, W) in [0, 1], face_boxes (B, 4) in pixels)``.

The weights live in the world components folder (:func:`~dtback.world.files.world_models_dir`); a missing one
raises :class:`~dtback.errors.MissingModelError` naming ``dtback world-components``, which builds it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from dtback.errors import MissingModelError
from dtback.identity.body import BodyEncoderBase, BodyFeatures, pil_to_pixels
from dtback.identity.crops import BodyCropRule, crop_square
from dtback.identity.face import Face, FaceChoice, FaceEncoder, FaceResult, _as_rgb_array, choose_face, file_digest, l2_normalise
from dtback.world.files import world_models_dir
from dtback.world.nets import (
    BODY_BOTTOM, BODY_HALF_WIDTH, BODY_TOP, Embedder, FaceDetectorNet, Net, body_crop_boxes, face_crop_boxes, load_net,
)
from dtback.world.people import WORLD_VERSION

log = logging.getLogger(__name__)

DETECTOR, FACE, BODY = "face_detector", "face_encoder", "body_encoder"
# Landmarks of a world face, as fractions of its box (x of width, y of height): eyes, nose tip, mouth corners.
LANDMARK_FRACTIONS = np.array([[0.28, 0.47], [0.72, 0.47], [0.5, 0.62], [0.38, 0.79], [0.62, 0.79]], np.float32)


def component_digest(folder: Path, name: str) -> str:
    """Short hash of a component's weights: part of encoder ids, so retrained weights never reuse cached embeddings."""
    return file_digest(Path(folder) / f"{name}.safetensors")


def load_component(folder: Path, name: str, cls: type[Net]) -> tuple[Net, str]:
    """``(network, id)`` of a saved world component, refused when trained on another world version; the id ends
    with the short hash of its weights."""
    net, meta = load_net(folder, name, cls)
    check_world_version(meta, folder, name)
    return net, f"{name}:{component_digest(folder, name)}"


def check_world_version(meta: dict[str, Any], folder: Path, name: str) -> None:
    if meta.get("world_version") != WORLD_VERSION:
        raise MissingModelError(
            f"{folder / (name + '.json')}: trained on world version {meta.get('world_version')}, the renderer is at "
            f"{WORLD_VERSION}; rebuild with `dtback world-components --out {folder}`"
        )


class WorldFaceEncoder(FaceEncoder):
    """Detector + embedder of world faces. Images are ``(H, W, 3)`` uint8 RGB; see the module docstring."""

    aligned_size = 48
    embedding_dim = 128

    def __init__(self, detector: FaceDetectorNet, embedder: Embedder, name: str, threshold: float = 0.4,
                 choice: FaceChoice = "largest"):
        super().__init__(choice)
        self.detector = detector
        self.embedder = embedder
        self.name = name
        self.threshold = threshold
        self.aligned_size = embedder.config.size
        self.embedding_dim = embedder.config.dim

    @classmethod
    def from_folder(cls, folder: Path, threshold: float = 0.4, choice: FaceChoice = "largest") -> "WorldFaceEncoder":
        """Load ``face_detector`` and ``face_encoder`` from a world components folder."""
        detector, detector_id = load_component(folder, DETECTOR, FaceDetectorNet)
        embedder, embedder_id = load_component(folder, FACE, Embedder)
        return cls(detector, embedder, f"world-face:{detector_id}:{embedder_id}", threshold=threshold, choice=choice)

    @property
    def encoder_id(self) -> str:
        return self.name

    def settings(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "choice": self.choice}

    @torch.no_grad()
    def detect(self, image: np.ndarray) -> list[Face]:
        return self.detect_pixels(image_pixels(image))[0]

    @torch.no_grad()
    def detect_pixels(self, pixels: torch.Tensor, max_faces: int = 4) -> list[list[Face]]:
        """Faces in each image of ``pixels (B, 3, H, W)`` in [0, 1], best first, boxes in that image's pixels."""
        size = self.detector.config.size
        height, width = pixels.shape[-2:]
        resized = torch.nn.functional.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True,
                                                  align_corners=False)
        scores, boxes = self.detector.decode(self.detector(resized.to(_device(self.detector))))
        boxes = boxes.cpu() * torch.tensor([width / size, height / size] * 2)
        found = []
        for score_row, box_row in zip(scores.cpu(), boxes):
            faces: list[Face] = []
            for i in torch.argsort(score_row, descending=True)[: 16 * max_faces].tolist():
                if score_row[i] < self.threshold or len(faces) == max_faces:
                    break
                box = box_row[i].numpy().astype(np.float32)
                if any(_iou(box, f.box) > 0.3 for f in faces):
                    continue
                faces.append(Face(box=box, landmarks=landmarks_from_box(box), score=float(score_row[i])))
            found.append(faces)
        return found

    def encode_batch(self, images: Sequence[np.ndarray],
                     on_image: Callable[[int], Any] | None = None) -> list[FaceResult | None]:
        """One detector pass and one embedder pass for images of one size (else image by image); ``on_image(n)``
        once the ``n`` images are done."""
        results = self._encode_batch(images)
        if on_image is not None:
            on_image(len(images))
        return results

    def _encode_batch(self, images: Sequence[np.ndarray]) -> list[FaceResult | None]:
        arrays = [_as_rgb_array(image) for image in images]
        if len({a.shape for a in arrays}) != 1:
            return [self.encode(a) for a in arrays]
        pixels = torch.cat([image_pixels(a) for a in arrays])
        detections = self.detect_pixels(pixels)
        chosen = [choose_face(faces, (a.shape[1], a.shape[0]), self.choice) if faces else None
                  for a, faces in zip(arrays, detections)]
        rows = [i for i, face in enumerate(chosen) if face is not None]
        results: list[FaceResult | None] = [None] * len(arrays)
        if rows:
            boxes = torch.from_numpy(np.stack([chosen[i].box for i in rows]))
            crops = crop_square(pixels[rows], face_crop_boxes(boxes), self.aligned_size)
            # Through uint8 like align() + embed(), so batched and one-by-one embeddings agree.
            aligned = (crops.permute(0, 2, 3, 1).clamp(0, 1) * 255 + 0.5).byte()
            with torch.no_grad():
                quantised = aligned.permute(0, 3, 1, 2).float() / 255.0
                embeddings = l2_normalise(self.embedder(quantised.to(_device(self.embedder))).cpu().numpy())
            aligned = aligned.numpy()
            for j, i in enumerate(rows):
                results[i] = FaceResult(face=chosen[i], aligned=aligned[j], embedding=embeddings[j],
                                        num_faces=len(detections[i]))
        return results

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        pixels = image_pixels(image)
        crop = crop_square(pixels, face_crop_boxes(torch.from_numpy(face.box)[None]), self.aligned_size)[0]
        return (crop.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy()

    @torch.no_grad()
    def embed(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        if not len(aligned):
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        crops = torch.cat([image_pixels(a) for a in aligned])
        return l2_normalise(self.embedder(crops.to(_device(self.embedder))).cpu().numpy())

    differentiable = True

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor,
                     landmarks: torch.Tensor | None = None) -> torch.Tensor:
        """Differentiable: images ``(B, 3, H, W)`` in [0, 1] and their face boxes ``(B, 4)`` (pixels of those
        images) -> ``(B, D)`` unit-norm face embeddings (world faces need no landmarks). Gradients flow to
        ``pixels``."""
        return self.embedder(crop_square(pixels, face_crop_boxes(face_boxes), self.aligned_size))

    def torch_module(self) -> Embedder:
        """The embedder alone: aligned crops ``(B, 3, S, S)`` in [0, 1] (resized to 48 px) -> ``(B, 128)``."""
        return self.embedder

    def to(self, device: str | torch.device) -> "WorldFaceEncoder":
        self.detector.to(device)
        self.embedder.to(device)
        return self


class WorldBodyEncoder(BodyEncoderBase):
    """Body embedder of the world behind :class:`~dtback.identity.body.BodyEncoder`'s surface.

    ``forward(pixels (B, 3, H, W) in [0, 1])`` takes person crops and gives ``pooled (B, 128)`` (unit norm) and
    ``tokens (B, 16, 128)`` (the 4 x 4 last feature map).
    """

    crop_rule = BodyCropRule(width_factor=BODY_HALF_WIDTH, height_factor=BODY_BOTTOM, top_factor=BODY_TOP)

    def __init__(self, embedder: Embedder, name: str):
        super().__init__()
        self.embedder = embedder
        self.name = name

    @classmethod
    def from_folder(cls, folder: Path) -> "WorldBodyEncoder":
        embedder, embedder_id = load_component(folder, BODY, Embedder)
        return cls(embedder, f"world-body:{embedder_id}")

    @property
    def encoder_id(self) -> str:
        return self.name

    @property
    def dim(self) -> int:
        return self.embedder.config.dim

    @property
    def input_size(self) -> int:
        return self.embedder.config.size

    @property
    def num_tokens(self) -> int:
        side = self.input_size // 2 ** len(self.embedder.config.widths)
        return side * side

    def forward(self, pixels: torch.Tensor) -> BodyFeatures:
        """Person crops ``(B, 3, H, W)`` in [0, 1] (resized to the input size) -> :class:`BodyFeatures`."""
        pooled, tokens = self.embedder.features(pixels)
        return BodyFeatures(pooled=pooled, tokens=tokens)

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor,
                     body_boxes: torch.Tensor | None = None) -> BodyFeatures:
        """Differentiable: whole images ``(B, 3, H, W)`` in [0, 1] + face boxes ``(B, 4)`` -> person-crop features
        (the world's own person box around the face, unclipped; ``body_boxes`` are not needed)."""
        return self(crop_square(pixels, body_crop_boxes(face_boxes), self.input_size))

    @torch.no_grad()
    def encode_batch(self, images: Sequence[Image.Image], face_boxes: Sequence[np.ndarray | None]) -> BodyFeatures:
        """Person-crop features of several PIL images (one batch when they share a size) -> ``B = len(images)``."""
        if len({image.size for image in images}) != 1:
            parts = [self.encode(image, box) for image, box in zip(images, face_boxes)]
            return BodyFeatures(torch.cat([p.pooled for p in parts]), torch.cat([p.tokens for p in parts]))
        pixels = torch.cat([pil_to_pixels(image) for image in images]).to(_device(self.embedder))
        width, height = images[0].size
        boxes = torch.stack([
            torch.tensor([0.0, 0.0, float(width), float(height)]) if box is None
            else body_crop_boxes(torch.as_tensor(np.asarray(box, np.float32)).reshape(1, 4))[0]
            for box in face_boxes
        ])
        return self(crop_square(pixels, boxes, self.input_size))

    @torch.no_grad()
    def encode(self, image: Image.Image, face_box: np.ndarray | None = None) -> BodyFeatures:
        """One PIL RGB image -> :class:`BodyFeatures` with B = 1 of its person crop (the whole image without face)."""
        pixels = pil_to_pixels(image).to(_device(self.embedder))
        if face_box is None:
            box = torch.tensor([[0.0, 0.0, float(image.width), float(image.height)]])
        else:
            box = body_crop_boxes(torch.as_tensor(np.asarray(face_box, np.float32)).reshape(1, 4))
        return self(crop_square(pixels, box, self.input_size))


def image_pixels(image: np.ndarray) -> torch.Tensor:
    """An ``(H, W, 3)`` uint8 RGB image (copied: PIL-backed arrays are read-only) -> ``(1, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.array(_as_rgb_array(image))).permute(2, 0, 1)[None].float() / 255.0


def landmarks_from_box(box: np.ndarray) -> np.ndarray:
    """(5, 2) landmarks of a world face from its box (world faces are drawn to fixed proportions)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return (np.array([x1, y1], np.float32) + LANDMARK_FRACTIONS * np.array([x2 - x1, y2 - y1], np.float32))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


# ------------------------------------------------------------------------------------------------------- loading


def load_world_face_encoder(folder: Path | None = None, threshold: float = 0.4,
                            choice: FaceChoice = "largest") -> WorldFaceEncoder:
    """The world face encoder from the world components ``folder`` (None: the shipped one). A missing or outdated
    component raises :class:`~dtback.errors.MissingModelError` with the command that builds it."""
    return WorldFaceEncoder.from_folder(world_models_dir(folder), threshold=threshold, choice=choice)


def load_world_body_encoder(folder: Path | None = None) -> WorldBodyEncoder:
    """The world body encoder from the world components ``folder`` (None: the shipped one); see
    :func:`load_world_face_encoder`."""
    return WorldBodyEncoder.from_folder(world_models_dir(folder))
