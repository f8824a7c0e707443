"""One training step's computation: noise the target latents, run FLUX with identity, score the prediction.

:class:`TrainModule` is what the accelerator wraps (DDP): it holds the transformer and the identity model, so one
forward runs the whole graph, including the adapter hooks inside the transformer blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dtback.config import TrainingConfig
from dtback.model.flux2 import image_ids as flux2_image_ids
from dtback.model.flux2 import text_ids as flux2_text_ids
from dtback.model.identity_flux import IdentityPreservingFlux
from dtback.training.batches import Batch
from dtback.training.features import FeatureStore
from dtback.training.identity_loss import IdentityLoss
from dtback.training.losses import (
    flow_matching_loss, masked_mean, noisy_latents, person_weights, predict_x0, sample_sigmas,
)


class TrainModule(nn.Module):
    """``forward(**transformer inputs, identity, face_scale, body_scale)`` → predicted velocity ``(B, L, C)``."""

    def __init__(self, transformer: nn.Module, identity_model: IdentityPreservingFlux):
        super().__init__()
        self.transformer = transformer
        self.identity_model = identity_model

    def forward(self, identity, face_scale, body_scale, **transformer_kwargs) -> torch.Tensor:
        return self.identity_model(identity=identity, face_scale=face_scale, body_scale=body_scale,
                                   return_dict=False, **transformer_kwargs)[0]


@dataclass
class StepOutput:
    loss: torch.Tensor
    terms: dict[str, float]


def step_generator(seed: int, step: int, index: int) -> torch.Generator:
    """Noise, noise levels and dropout of a micro-batch depend only on these (``index``: its place among the
    step's micro-batches over all ranks), so a resumed run, and the same step on another number of ranks, draw the
    same."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 1009 + index * 101) % (2**63))


def compute_loss(
    module: nn.Module,
    batch: Batch,
    store: FeatureStore,
    cfg: TrainingConfig,
    identity_loss: IdentityLoss | None,
    generator: torch.Generator,
    device: torch.device,
    guidance: float | None,
    scheduler_config: dict,
    with_identity_loss: bool = True,
    empirical_mu_steps: int | None = None,
) -> StepOutput:
    """Total loss of one micro-batch and its terms (floats, for logging); ``with_identity_loss`` False leaves the
    identity losses out of this step (``training.identity_loss_every``); ``empirical_mu_steps``: FLUX.2's noise
    shift (:func:`~dtback.training.losses.sample_sigmas`)."""
    batch_size = len(batch.targets)
    latents = batch.latents.to(device)
    noise = torch.randn(latents.shape, generator=generator).to(device)
    sigmas = sample_sigmas(cfg, batch_size, latents.shape[1], generator, scheduler_config, empirical_mu_steps)
    drop_caption = torch.rand(batch_size, generator=generator) < cfg.caption_dropout
    drop_identity = torch.rand(batch_size, generator=generator) < cfg.identity_dropout
    caption = torch.where(drop_caption, torch.zeros_like(batch.caption), batch.caption)
    noisy = noisy_latents(latents, noise, sigmas.to(device))
    keep = (~drop_identity).float().to(device)
    transformer_inputs = dict(
        hidden_states=noisy,
        timestep=sigmas.to(device),
        encoder_hidden_states=store.prompt_embeds[caption].to(device).float(),
        txt_ids=torch.zeros(store.prompt_embeds.shape[1], 3, device=device),
        img_ids=batch.image_ids.to(device),
    )
    if store.family == "flux2":  # no pooled text; positions on 4 axes, text along the last
        transformer_inputs.update(txt_ids=flux2_text_ids(store.prompt_embeds.shape[1], device),
                                  img_ids=flux2_image_ids(transformer_inputs["img_ids"]))
    else:
        transformer_inputs["pooled_projections"] = store.pooled_embeds[caption].to(device).float()
    if guidance is not None:
        transformer_inputs["guidance"] = torch.full((batch_size,), guidance, device=device)
    prediction = module(identity=batch.identity, face_scale=keep, body_scale=keep, **transformer_inputs)
    weights = None
    if cfg.person_loss_weight != 1.0:
        weights = person_weights(batch.body_boxes, batch.latent_size, cfg.person_loss_weight)
    flow = flow_matching_loss(prediction, latents, noise, weights).mean()
    total = cfg.content_weight * flow
    terms = {"loss/flow": flow.item()}
    if with_identity_loss and identity_loss is not None and identity_loss.active:
        identity_terms = identity_loss(predict_x0(noisy, prediction, sigmas.to(device)), batch, sigmas)
        kept = ~drop_identity.to(device)
        face = masked_mean(identity_terms.face, identity_terms.face_used & kept)
        body = masked_mean(identity_terms.body, identity_terms.body_used & kept)
        total = total + cfg.face_weight * face + cfg.body_weight * body
        # A term is logged only when some sample of the batch had it: a 0 would read as a perfect score.
        if (identity_terms.face_used & kept).any():
            terms["loss/face"] = face.item()
        if (identity_terms.body_used & kept).any():
            terms["loss/body"] = body.item()
        if identity_loss.face_encoder is not None:
            terms["identity/face_skipped"] = float(identity_terms.face_skipped)  # no face geometry in the target
        terms["identity_loss_fraction"] = (identity_terms.face_used | identity_terms.body_used).float().mean().item()
    terms["loss"] = total.item()
    return StepOutput(total, terms)
