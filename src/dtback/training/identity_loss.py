"""Face and body identity losses through differentiable encoders, on the decoded one-step prediction.

Which encoder path is differentiable:

- world encoders (the embedded default): ``embed_pixels(pixels, face_boxes)`` crops and embeds in torch;
- InsightFace: the ArcFace ONNX model converted to torch (``torch_recognizer``), after a similarity warp of the
  cached 5 landmarks onto ArcFace's 112 px template (``grid_sample``, differentiable w.r.t. the pixels);
- transformers body backbones (:class:`~dtback.identity.body.BodyEncoder`): the cached person box, squared and
  resampled, through ``forward``;
- dlib has no torch path: a face loss with the dlib backend is refused before training starts.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline

from dtback.config import TrainingConfig
from dtback.errors import ConfigError
from dtback.identity.body import BodyEncoder
from dtback.identity.face import FaceEncoder, InsightFaceEncoder
from dtback.identity.world_nets import crop_square
from dtback.training.batches import Batch
from dtback.training.features import decode_latents
from dtback.training.losses import IdentityLossTerms, cosine_identity_loss

# insightface.utils.face_align.arcface_dst: where ArcFace expects the 5 landmarks in its 112 x 112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama) mapping points ``src (N, 2)`` onto ``dst (N, 2)``: a (2, 3) matrix."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    matrix = np.zeros((2, 3), np.float32)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_to_template(pixels: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable ArcFace alignment: ``pixels (B, 3, H, W)``, ``landmarks (B, 5, 2)`` → ``(B, 3, size, size)``."""
    batch, _, height, width = pixels.shape
    thetas = []
    template = ARCFACE_TEMPLATE * (size / 112.0)
    for points in landmarks.detach().cpu().numpy():
        forward = np.vstack([similarity_transform(points, template), [0, 0, 1]])
        inverse = np.linalg.inv(forward)  # output pixel -> input pixel
        # Normalised output coords (align_corners=False) -> output pixels -> input pixels -> normalised input coords.
        to_out = np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])
        to_in = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
        thetas.append((to_in @ inverse @ to_out)[:2])
    theta = torch.tensor(np.stack(thetas), dtype=pixels.dtype, device=pixels.device)
    grid = F.affine_grid(theta, (batch, 3, size, size), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class IdentityLoss:
    """Decode the x0 prediction of the selected samples and score it against the references' embeddings."""

    def __init__(self, cfg: TrainingConfig, vae, face_encoder: FaceEncoder | None, body_encoder):
        self.cfg = cfg
        self.vae = vae
        self.face_encoder = face_encoder if cfg.face_weight > 0 else None
        self.body_encoder = body_encoder if cfg.body_weight > 0 else None
        self.recognizer = None
        if self.face_encoder is not None:
            if isinstance(self.face_encoder, InsightFaceEncoder):
                self.recognizer = self.face_encoder.torch_recognizer().requires_grad_(False)
            elif not hasattr(self.face_encoder, "embed_pixels"):
                raise ConfigError(
                    f"training.face_weight={cfg.face_weight} needs a differentiable face recognizer, but the "
                    f"{self.face_encoder.encoder_id} backend has none: use identity.face_backend insightface (or "
                    "world), or set training.face_weight=0"
                )

    @property
    def active(self) -> bool:
        return self.face_encoder is not None or self.body_encoder is not None

    def face_embed(self, pixels: torch.Tensor, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        """Unit-norm face embeddings of ``pixels (b, 3, H, W)`` in [0, 1] (the rows ``rows`` of the batch)."""
        if self.recognizer is not None:
            self.recognizer.to(pixels.device)
            aligned = warp_to_template(pixels, batch.face_landmarks[rows], 112)
            return F.normalize(self.recognizer.embed(aligned * 255.0), dim=-1)
        return F.normalize(self.face_encoder.embed_pixels(pixels, batch.face_boxes[rows].to(pixels.device)), dim=-1)

    def body_embed(self, pixels: torch.Tensor, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
        encoder = self.body_encoder
        if hasattr(encoder, "embed_pixels"):
            features = encoder.embed_pixels(pixels, batch.face_boxes[rows].to(pixels.device))
        elif isinstance(encoder, BodyEncoder):
            side = max(encoder.preprocess.size)
            features = encoder(crop_square(pixels, batch.body_boxes[rows].to(pixels.device), side))
        else:
            raise TypeError(f"body encoder {type(encoder).__name__} has no differentiable path")
        return F.normalize(features.pooled.float(), dim=-1)

    def __call__(self, x0_packed: torch.Tensor, batch: Batch, sigmas: torch.Tensor) -> IdentityLossTerms:
        device = x0_packed.device
        zeros = torch.zeros(len(batch.targets), device=device)
        low_noise = sigmas.to(device) < self.cfg.identity_loss_max_sigma
        face_rows = low_noise & batch.target_has_face.to(device) & batch.face_reference_valid.to(device)
        if self.face_encoder is None or batch.face_reference is None:
            face_rows = torch.zeros_like(low_noise)
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
        return IdentityLossTerms(face_loss, body_loss, face_rows, body_rows)
