"""The world VAE: a diffusers AutoencoderKL with scale factor 8 and 4 latent channels, saved and loaded through
``save_pretrained`` / ``from_pretrained``, with latent statistics in its config, and a recorded held-out PSNR."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from dtback.world.files import world_models_dir
from dtback.world.vae import (
    INFO_FILE, VAE_FOLDER, load_world_vae, reconstruction_psnr, round_trip, world_vae_config, world_vae_folder,
)
from dtback.world_build.vae import VaeRecipe, render_pixels

TINY = world_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=32)


def test_config_gives_scale_factor_8_and_16_packed_channels():
    config = world_vae_config()
    assert len(config["block_out_channels"]) == 4 and config["latent_channels"] == 4
    vae = AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mode()
    assert latent.shape == (1, 4, 16, 16)  # FLUX packs 2 x 2 latents: in_channels = 16


@pytest.mark.slow
def test_shipped_vae_reconstructs_held_out_renders():
    vae = load_world_vae(world_vae_folder())
    recipe = VaeRecipe()
    assert vae.config.latent_channels == 4 and len(vae.config.block_out_channels) == 4
    held = render_pixels(12, 2, 128, seed=779)
    psnr = reconstruction_psnr(vae, held)
    info = json.loads((world_models_dir() / VAE_FOLDER / INFO_FILE).read_text())
    assert psnr >= 22.0 and info["held_out_psnr_db"] >= 22.0, (psnr, info["held_out_psnr_db"])
    assert info["recipe"]["seed"] == recipe.seed
    decoded = round_trip(vae, held[:2])
    assert decoded.dtype == torch.uint8 and decoded.shape == (2, 3, 128, 128)
    with torch.no_grad():
        latents = vae.encode(held[:2].float() / 127.5 - 1).latent_dist.mode()
    normalised = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(normalised.mean())) < 0.3 and 0.6 < float(normalised.std()) < 1.5  # FLUX-ready statistics
