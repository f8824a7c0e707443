"""Scores of generated images, shared by training validation and ``dtback evaluate``.

- **identity similarity**: cosine of a recognizer's embedding of the generated image with the character's reference
  embedding (face: a face encoder, 0 when it finds no face; body: a body encoder over the person crop found from the
  face, or the whole image without a face);
- **attribute accuracy** (the identity world only): :func:`dtback.world.reader.attribute_accuracy`;
- **copy-paste score**: how close the generated image is, as a picture, to the reference image it was given (Pearson
  correlation of both images' pixels at 32 x 32 RGB); 1 is a copy of the reference, 0 unrelated pictures;
- **prompt adherence**: cosine of a CLIP model's image and text embeddings.

Encoders are handed in (any :class:`~dtback.identity.face.FaceEncoder` / body encoder); nothing here knows the
identity world. Training's validation imports this module, ``dtback evaluate`` builds on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dtback.errors import MissingModelError

COPY_SIZE = 32  # side of the downsampled images the copy-paste score compares


@dataclass
class FaceScores:
    """Per image: cosine to its reference (None where there is no reference; 0.0 where no face was found), whether
    a face was found, and the face box ``(4,)`` (None without a face)."""

    sims: list[float | None]
    detected: list[bool]
    boxes: list[np.ndarray | None]


def unit_mean(vectors: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` embeddings -> ``(D,)`` unit-norm mean: a character's reference embedding."""
    return F.normalize(vectors.float().mean(0), dim=-1)


def face_similarity(encoder, images: Sequence[Image.Image], references: Sequence[torch.Tensor | None]) -> FaceScores:
    """Face embedding of each image vs ``references[i]`` (``(D,)`` unit norm) with a face encoder (``.encode``)."""
    scores = FaceScores([], [], [])
    for image, reference in zip(images, references, strict=True):
        result = encoder.encode(np.asarray(image.convert("RGB")))
        scores.detected.append(result is not None)
        scores.boxes.append(None if result is None else result.face.box)
        if reference is None:
            scores.sims.append(None)
        elif result is None:
            scores.sims.append(0.0)
        else:
            scores.sims.append(float(torch.dot(torch.from_numpy(result.embedding).float(), reference.float())))
    return scores


def body_embedding(encoder, image: Image.Image, face_box: np.ndarray | None) -> torch.Tensor:
    """``(D,)`` unit-norm pooled body embedding of the person crop around ``face_box`` (whole image when None)."""
    pooled = encoder.encode(image.convert("RGB"), face_box).pooled[0].float().cpu()
    return F.normalize(pooled, dim=-1)


def body_similarity(encoder, images: Sequence[Image.Image], face_boxes: Sequence[np.ndarray | None],
                    references: Sequence[torch.Tensor]) -> list[float]:
    """Body embedding of each image (crop from its face box) vs ``references[i]`` (``(D,)`` unit norm)."""
    return [float(torch.dot(body_embedding(encoder, image, box), reference.float()))
            for image, box, reference in zip(images, face_boxes, references, strict=True)]


def copy_paste_score(image: Image.Image, reference: Image.Image, size: int = COPY_SIZE) -> float:
    """Pearson correlation of the two images' pixels after resizing both to ``size`` x ``size`` RGB, in [-1, 1].

    Whole-picture similarity, not identity: a generated image that repeats the reference's scene, pose and framing
    scores near 1 even when the prompt asked for another scene. A flat image (no variance) scores 0.
    """
    def pixels(picture: Image.Image) -> np.ndarray:
        small = picture.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        values = np.asarray(small, dtype=np.float64).ravel()
        return values - values.mean()

    a, b = pixels(image), pixels(reference)
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.clip(np.dot(a, b) / norm, -1.0, 1.0)) if norm > 0 else 0.0


class ClipScorer:
    """Prompt adherence: cosine of CLIP image and text embeddings (transformers ``CLIPModel`` from a local folder)."""

    def __init__(self, model: Any, processor: Any, name: str):
        self.model = model
        self.processor = processor
        self.name = name

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str = "cpu") -> "ClipScorer":
        from transformers import CLIPModel, CLIPProcessor  # noqa: PLC0415  (only when a CLIP model is given)

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise MissingModelError(f"--clip-model {folder}: not a transformers model folder (no config.json)")
        try:
            model = CLIPModel.from_pretrained(folder, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as err:
            raise MissingModelError(f"--clip-model {folder}: cannot load a CLIP model and processor ({err})") from err
        return cls(model.to(device).eval(), processor, f"clip:{folder.name}")

    @torch.no_grad()
    def similarity(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[float]:
        """Cosine of image ``i`` with prompt ``i``, each in [-1, 1]."""
        device = self.model.device
        inputs = self.processor(text=list(prompts), images=[image.convert("RGB") for image in images],
                                return_tensors="pt", padding=True, truncation=True)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        image_embeds = _embeds(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        text_embeds = _embeds(self.model.get_text_features(
            input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")))
        cosine = (F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)).sum(-1)
        return [float(v) for v in cosine.cpu()]


def _embeds(output: Any) -> torch.Tensor:
    """``get_*_features`` return a tensor in older transformers and a model output in newer ones."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")
    return pooled
