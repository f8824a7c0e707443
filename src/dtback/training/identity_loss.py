"""Face and body identity losses through differentiable encoders, on the decoded one-step prediction.

Every encoder offers one differentiable path, ``embed_pixels`` (:class:`~dtback.identity.face.FaceEncoder`,
:class:`~dtback.identity.body.BodyEncoderBase`), fed with the decoded pixels and the target's cached face box,
landmarks and person box:

- world encoders (the embedded default): crop around the face box and embed in torch;
- InsightFace: the ArcFace ONNX model converted to torch, after a similarity warp of the cached 5 landmarks onto
  ArcFace's 112 px template (``grid_sample``, differentiable w.r.t. the pixels);
- transformers body backbones: the cached person box, squared and resampled, through ``forward``;
- dlib: its face recognition ResNet read into torch, on chips cut like ``dlib.get_face_chip`` from the cached
  5 landmarks (``grid_sample``), so the licence-clean backend trains a face loss too.

Samples whose target has no usable face geometry (no face found, or landmarks that are not finite or span under
2 pixels) get no face loss and are counted (``face_skipped``), never fed to a warp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from dtback.config import TrainingConfig
from dtback.errors import ConfigError
from dtback.identity.body import BodyEncoderBase
from dtback.identity.face import FaceEncoder
from dtback.training.batches import Batch
from dtback.training.features import decode_latents
from dtback.training.losses import IdentityLossTerms, cosine_identity_loss

def usable_face_geometry(landmarks: torch.Tensor) -> torch.Tensor:
    """``(B, 5, 2)`` landmarks -> ``(B,)`` bool: finite and spanning at least 2 pixels, so a chip can be cut."""
    finite = torch.isfinite(landmarks).flatten(1).all(dim=1)
    spread = torch.nan_to_num(landmarks.amax(dim=1) - landmarks.amin(dim=1), nan=0.0).amax(dim=-1)
    return finite & (spread >= 2)


class IdentityLoss:
    """Decode the x0 prediction of the selected samples and score it against the references' embeddings."""

    def __init__(self, cfg: TrainingConfig, vae, face_encoder: FaceEncoder | None,
                 body_encoder: BodyEncoderBase | None):
        self.cfg = cfg
        self.vae = vae
        self.face_encoder = face_encoder if cfg.face_weight > 0 else None
        self.body_encoder = body_encoder if cfg.body_weight > 0 else None
        if self.face_encoder is not None:
            if not self.face_encoder.differentiable:
                raise ConfigError(
                    f"training.face_weight={cfg.face_weight} needs a differentiable face recognizer, but the "
                    f"{self.face_encoder.encoder_id} backend has none: use identity.face_backend dlib, insightface "
                    "or world, or set training.face_weight=0"
                )

    @property
    def active(self) -> bool:
        return self.face_encoder is not None or self.body_encoder is not None

    def face_embed(self, pixels: torch.Tensor, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Unit-norm face embeddings of ``pixels (b, 3, H, W)`` in [0, 1] (the rows ``rows`` of the batch)."""
        embeddings = self.face_encoder.embed_pixels(pixels, batch.face_boxes[rows].to(pixels.device),
                                                    batch.face_landmarks[rows].to(pixels.device))
        return F.normalize(embeddings.float(), dim=-1)

    def body_embed(self, pixels: torch.Tensor, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        features = self.body_encoder.embed_pixels(pixels, batch.face_boxes[rows].to(pixels.device),
                                                  batch.body_boxes[rows].to(pixels.device))
        return F.normalize(features.pooled.float(), dim=-1)

    def __call__(self, x0_packed: torch.Tensor, batch: Batch, sigmas: torch.Tensor) -> IdentityLossTerms:
        device = x0_packed.device
        zeros = torch.zeros(len(batch.targets), device=device)
        low_noise = sigmas.to(device) < self.cfg.identity_loss_max_sigma
        face_candidates = low_noise & batch.face_reference_valid.to(device)
        if self.face_encoder is None or batch.face_reference is None:
            face_candidates = torch.zeros_like(low_noise)
        geometry = batch.target_has_face.to(device) & usable_face_geometry(batch.face_landmarks.float()).to(device)
        face_rows = face_candidates & geometry
        face_skipped = int((face_candidates & ~geometry).sum())
        body_rows = low_noise if self.body_encoder is not None and batch.body_reference is not None else \
            torch.zeros_like(low_noise)
        rows = face_rows | body_rows
        if int(rows.sum()) > self.cfg.identity_loss_max_samples:  # keep the lowest-noise ones: sharpest x0 estimates
            order = torch.argsort(torch.where(rows, sigmas.to(device), torch.full_like(sigmas.to(device), 2.0)))
            keep = torch.zeros_like(rows)
            keep[order[: self.cfg.identity_loss_max_samples]] = True
            face_rows, body_rows, rows = face_rows & keep, body_rows & keep, rows & keep
        face_loss, body_loss = zeros.clone(), zeros.clone()
        if rows.any():
            height, width = batch.latent_size
            latents = FluxPipeline._unpack_latents(x0_packed[rows], height * 8, width * 8, 8)
            pixels = ((decode_latents(self.vae, latents).float() + 1) / 2).clamp(0, 1)
            selected = torch.nonzero(rows).flatten()
            if face_rows.any():
                pick = face_rows[rows]
                embeddings = self.face_embed(pixels[pick], batch, selected[pick].cpu())
                face_loss = face_loss.index_put((selected[pick],), cosine_identity_loss(
                    embeddings, batch.face_reference[selected[pick].cpu()].to(device)))
            if body_rows.any():
                pick = body_rows[rows]
                embeddings = self.body_embed(pixels[pick], batch, selected[pick].cpu())
                body_loss = body_loss.index_put((selected[pick],), cosine_identity_loss(
                    embeddings, batch.body_reference[selected[pick].cpu()].to(device)))
        return IdentityLossTerms(face_loss, body_loss, face_rows, body_rows, face_skipped)
