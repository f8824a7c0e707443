"""The ``identity`` section: face and body encoders, their cache, and the identity tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dtback.config.section import _Section


class IdentityConfig(_Section):
    """Face and body identity encoders, their embedding cache, and the identity tokens handed to the adapters."""

    num_face_latents: int = Field(8, ge=1, description="Face identity tokens produced by the face resampler.")
    num_body_latents: int = Field(8, ge=1, description="Body identity tokens produced by the body resampler.")
    face_backend: Literal["world", "dlib", "insightface"] = Field(
        "world",
        description="world: the identity world's own encoder (data.world.components); dlib: offline, licence-clean models; "
        "insightface: ONNX pack from face_model_dir.",
    )
    face_model_dir: Path | None = Field(
        None, description="InsightFace pack folder (e.g. models/antelopev2) with detection + recognition ONNX files."
    )
    face_detector: Literal["hog", "cnn"] = Field("hog", description="dlib detector: hog (fast) or cnn (slower, more poses).")
    face_upsample: int = Field(1, ge=0, le=3, description="dlib: upsample the image this many times before detection.")
    face_recognizer: Literal["torch", "dlib"] = Field(
        "torch", description="dlib: who runs its ResNet on the face chips; torch: dtback.identity.dlib_torch, batched, "
        "on identity.device (descriptors equal dlib's within cosine 0.9999999); dlib: dlib's own C++, one CPU.")
    face_det_size: int = Field(640, ge=32, description="insightface: detector input side (multiple of 32).")
    face_choice: Literal["largest", "score", "center"] = Field(
        "largest", description="Which face of an image is the character's when there are several."
    )
    body_model: str | None = Field(
        "world",
        description="Body backbone: 'world' (the identity world's own encoder), a local folder or hub id (cached, "
        "e.g. facebook/dinov2-small); null skips body identity.",
    )
    body_width_factor: float = Field(2.0, gt=0, description="Person crop: face centre +- this many face widths.")
    body_top_factor: float = Field(0.5, ge=0, description="Person crop: starts this many face heights above the face.")
    body_height_factor: float = Field(7.5, gt=0, description="Person crop: ends this many face heights below the face top.")
    cache_dir: Path | None = Field(None, description="Embedding cache folder; null means <output_dir>/cache.")
    device: str = Field("auto", description="Device for the encoders: auto (cuda when available), cpu, cuda, cuda:1...")

    @field_validator("face_det_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32 (the detector's largest stride)")
        return value

    @model_validator(mode="after")
    def _insightface_needs_models(self) -> "IdentityConfig":
        if self.face_backend == "insightface" and self.face_model_dir is None:
            raise ValueError("face_backend insightface needs face_model_dir (a folder with the ONNX model pack)")
        return self
