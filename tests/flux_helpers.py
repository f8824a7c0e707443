"""Tiny FLUX transformers and identity inputs for the model tests."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel

from dtback.config import IdentityConfig, ModelConfig
from dtback.identity.resampler import IdentityInputs
from dtback.model.identity_flux import IdentityPreservingFlux

TINY = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=4, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10, guidance_embeds=True,
            axes_dims_rope=(2, 2, 4))


def save_tiny_flux(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    FluxTransformer2DModel(**{**TINY, **overrides}).save_pretrained(folder)
    return folder


FACE_DIM, BODY_DIM, BODY_TOKEN_DIM = 6, 5, 5
BATCH, IMG_TOKENS, TXT_TOKENS, REFS = 2, 16, 5, 3


def make_model(transformer, lora_rank: int = 0, seed: int = 1, **model_overrides) -> IdentityPreservingFlux:
    torch.manual_seed(seed)
    model_cfg = ModelConfig(lora_rank=lora_rank, **model_overrides)
    identity_cfg = IdentityConfig(num_face_latents=3, num_body_latents=2)
    return IdentityPreservingFlux.from_config(model_cfg, identity_cfg, transformer.config, face_dim=FACE_DIM,
                                              body_dim=BODY_DIM, body_token_dim=BODY_TOKEN_DIM)


def randomise_outputs(model: IdentityPreservingFlux, seed: int = 2) -> None:
    """Give the zero-initialised output projections random weights and biases, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.to_out.weight.copy_(torch.randn(adapter.to_out.weight.shape, generator=generator) * 0.1)
            adapter.to_out.bias.copy_(torch.randn(adapter.to_out.bias.shape, generator=generator) * 0.1)


def identity_inputs(seed: int = 3, batch: int = BATCH) -> IdentityInputs:
    generator = torch.Generator().manual_seed(seed)
    return IdentityInputs(
        face_embeds=torch.randn(batch, REFS, FACE_DIM, generator=generator),
        face_mask=torch.ones(batch, REFS, dtype=torch.bool),
        body_pooled=torch.randn(batch, REFS, BODY_DIM, generator=generator),
        body_tokens=torch.randn(batch, REFS, 4, BODY_TOKEN_DIM, generator=generator),
        body_mask=torch.ones(batch, REFS, dtype=torch.bool),
    )


def transformer_inputs(seed: int = 4, batch: int = BATCH) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    side = int(IMG_TOKENS**0.5)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(float(side)), torch.arange(float(side)), indexing="ij"), -1)
    return dict(
        hidden_states=torch.randn(batch, IMG_TOKENS, TINY["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(batch, TXT_TOKENS, TINY["joint_attention_dim"], generator=generator),
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=generator),
        timestep=torch.rand(batch, generator=generator),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids.reshape(-1, 3).float(),
        txt_ids=torch.zeros(TXT_TOKENS, 3),
        return_dict=False,
    )
