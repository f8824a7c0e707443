"""The world VAE: a diffusers AutoencoderKL with scale factor 8 and 4 latent channels, saved and loaded through
``save_pretrained`` / ``from_pretrained``, with latent statistics in its config, and a recorded held-out PSNR."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import AutoencoderKL

from dtback.errors import MissingModelError
from dtback.world.files import world_models_dir
from dtback.world.vae import (
    INFO_FILE, VAE_FOLDER, load_world_vae, reconstruction_psnr, round_trip, world_vae_config, world_vae_folder,
)
from dtback.world_build.vae import VaeRecipe, build_world_vae, render_pixels

TINY = world_vae_config(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, sample_size=32)


def test_config_gives_scale_factor_8_and_16_packed_channels():
    config = world_vae_config()
    assert len(config["block_out_channels"]) == 4 and config["latent_channels"] == 4
    vae = AutoencoderKL(**TINY).eval()
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 128, 128)).latent_dist.mode()
    assert latent.shape == (1, 4, 16, 16)  # FLUX packs 2 x 2 latents: in_channels = 16


@pytest.mark.slow
def test_build_saves_and_from_pretrained_round_trips(tmp_path):
    recipe = VaeRecipe(characters=4, images_per_character=2, size=32, steps=2, batch=2, crop=32, eval_characters=2,
                       eval_images=1)
    figures = build_world_vae(tmp_path / "vae", recipe, config=TINY, progress=False)
    assert figures["scaling_factor"] > 0 and "held_out_psnr_db" in figures
    loaded = load_world_vae(tmp_path / "vae")
    assert isinstance(loaded, AutoencoderKL)
    assert loaded.config.scaling_factor == pytest.approx(figures["scaling_factor"])
    assert loaded.config.shift_factor == pytest.approx(figures["shift_factor"])
    again = AutoencoderKL.from_pretrained(tmp_path / "vae").eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.decode(loaded.encode(x).latent_dist.mode()).sample,
                           again.decode(again.encode(x).latent_dist.mode()).sample)
    info = json.loads((tmp_path / "vae" / INFO_FILE).read_text())
    (tmp_path / "vae" / INFO_FILE).write_text(json.dumps({**info, "world_version": -1}))
    with pytest.raises(MissingModelError, match="world version -1.*rebuild with `dtback world-components"):
        load_world_vae(tmp_path / "vae")


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
