"""Losses: rectified-flow matching and the face/body identity terms on the one-step x0 prediction.

Flow matching (FLUX's training objective): ``x_t = (1 - σ)·x0 + σ·ε`` and the transformer predicts the velocity
``v = ε - x0``. Noise levels are drawn logit-normal (or uniform) and shifted up for larger images the way FLUX's
sampler shifts them, so training spends its steps where sampling does: FLUX.1's ``calculate_shift`` of the image
token count, or for FLUX.2 its ``compute_empirical_mu`` of the token count and the sampling step count.

Identity terms: ``x̂0 = x_t - σ·v̂`` is decoded by the VAE, the target's face and body are cropped at their boxes,
and the differentiable encoders compare them with the references: ``1 - cos(enc(x̂0 crop), enc(reference))``. Only
samples with ``σ < identity_loss_max_sigma`` contribute: at high noise x̂0 is a blur and its identity means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu
from diffusers.training_utils import compute_density_for_timestep_sampling

from dtback.config import TrainingConfig


def sample_sigmas(cfg: TrainingConfig, batch: int, image_seq_len: int, generator: torch.Generator,
                  scheduler_config: dict | None = None, empirical_mu_steps: int | None = None) -> torch.Tensor:
    """Noise levels ``σ (B,)`` in (0, 1): logit-normal or uniform, then FLUX's resolution shift when enabled: FLUX.1's
    from ``scheduler_config`` (the pipeline scheduler's), or, given ``empirical_mu_steps`` (FLUX.2, whose pipelines
    shift by the token count and the number of sampling steps), FLUX.2's at that many steps."""
    if cfg.timestep_sampling == "logit_normal":
        u = compute_density_for_timestep_sampling("logit_normal", batch, cfg.logit_mean, cfg.logit_std,
                                                  generator=generator)
    else:
        u = torch.rand(batch, generator=generator)
    u = u.clamp(1e-4, 1 - 1e-4)
    if not cfg.resolution_shift:
        return u
    sc = scheduler_config or {}
    if empirical_mu_steps is not None:
        mu = compute_empirical_mu(image_seq_len, empirical_mu_steps)
    else:
        mu = calculate_shift(image_seq_len, sc.get("base_image_seq_len", 256), sc.get("max_image_seq_len", 4096),
                             sc.get("base_shift", 0.5), sc.get("max_shift", 1.15))
    shift = torch.tensor(mu).exp()
    return shift / (shift + (1 / u - 1))


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - σ)·x0 + σ·ε`` for packed latents ``(B, L, C)`` and ``σ (B,)``."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def flow_matching_loss(prediction: torch.Tensor, latents: torch.Tensor, noise: torch.Tensor,
                       token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the predicted and the true velocity ``ε - x0``, per sample ``(B,)``; packed ``(B, L, C)``
    inputs may weight their tokens with ``token_weights (B, L)`` (see :func:`person_weights`)."""
    target = noise - latents
    error = (prediction.float() - target.float()).square()
    if token_weights is not None:
        error = error * token_weights.to(error.device).unsqueeze(-1)
    return error.flatten(1).mean(dim=1)


def person_weights(boxes: torch.Tensor, latent_size: tuple[int, int], weight: float,
                   patch_pixels: int = 16) -> torch.Tensor:
    """Per-token loss weights ``(B, L)`` of packed latents: ``weight`` for the tokens whose ``patch_pixels`` square
    (8x VAE, 2 x 2 packing: 16 px) overlaps a box ``(B, 4)`` (x1, y1, x2, y2 in training pixels), 1 elsewhere.
    Normalised to mean 1 per sample, so the loss keeps its scale and only its attention moves."""
    rows, cols = latent_size[0] // 2, latent_size[1] // 2
    ys = torch.arange(rows, dtype=torch.float32) * patch_pixels
    xs = torch.arange(cols, dtype=torch.float32) * patch_pixels
    b = boxes.float()
    inside_y = (ys[None] + patch_pixels > b[:, 1:2]) & (ys[None] < b[:, 3:4])  # (B, rows)
    inside_x = (xs[None] + patch_pixels > b[:, 0:1]) & (xs[None] < b[:, 2:3])  # (B, cols)
    inside = (inside_y[:, :, None] & inside_x[:, None, :]).flatten(1)
    weights = 1 + (weight - 1) * inside.float()
    return weights / weights.mean(dim=1, keepdim=True)


def predict_x0(noisy: torch.Tensor, prediction: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate ``x̂0 = x_t - σ·v̂``."""
    s = sigmas.view(-1, *([1] * (noisy.dim() - 1))).to(prediction.dtype)
    return noisy - s * prediction


@dataclass
class IdentityLossTerms:
    """Per-sample identity losses ``(B,)`` (zero where not applied), which samples were used, and how many samples
    would have had a face loss but their target has no usable face geometry."""

    face: torch.Tensor
    body: torch.Tensor
    face_used: torch.Tensor
    body_used: torch.Tensor
    face_skipped: int = 0


def cosine_identity_loss(embeddings: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` per sample between ``(B, D)`` predicted and ``(B, D)`` reference embeddings."""
    return 1 - F.cosine_similarity(embeddings.float(), references.float(), dim=-1)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 (still attached to the graph) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
