"""A small ``diffusers.AutoencoderKL`` for the identity world, trained on world renders by the project's own code.

Four encoder/decoder blocks (scale factor 8) and 4 latent channels, so a 128 px world image is a ``(4, 16, 16)``
latent and the FLUX transformer, which packs 2 x 2 latent patches, sees ``in_channels = 16``. Saved with
``save_pretrained`` and loaded with ``from_pretrained`` like any diffusers VAE; ``scaling_factor`` and
``shift_factor`` in its config come from the statistics of its own latents on training renders, so that FLUX's
``(z - shift) * scale`` has zero mean and unit variance.

Folder: ``<world components>/vae`` (see :func:`~dtback.world.files.world_models_dir`), with
``world_vae.json`` beside the diffusers files (world version, recipe, training history, held-out PSNR).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from dtback.errors import MissingModelError
from dtback.world.files import read_component_info, world_models_dir

log = logging.getLogger(__name__)

VAE_FOLDER = "vae"
INFO_FILE = "world_vae.json"


def world_vae_config(block_out_channels: tuple[int, ...] = (16, 32, 64, 64), norm_num_groups: int = 1,
                     sample_size: int = 128, latent_channels: int = 4) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments of the world VAE (4 blocks: 8x downsampling; ``latent_channels``: 4 as
    FLUX.1's predecessors, 16 as FLUX.1's own VAE; the simple transformer takes 2x2 packs of them).

    One normalisation group: with 16-64 channels, smaller groups normalise colour away (the decoder's last
    GroupNorm sees 2 channels per group at 8 groups); one group kept large flat areas in their colour (+0.7 dB).
    """
    blocks = len(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * blocks,
        "up_block_types": ("UpDecoderBlock2D",) * blocks,
        "block_out_channels": tuple(block_out_channels),
        "layers_per_block": 1,
        "latent_channels": latent_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "mid_block_add_attention": False,  # attention over 16 x 16 latents costs more than it buys at this size
    }


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float in [-1, 1] (the range diffusers VAEs work in)."""
    return images.float() / 127.5 - 1.0


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: mean of the posterior means and 1 / their standard deviation."""
    latents = torch.cat([vae.encode(to_model_range(images[i : i + batch])).latent_dist.mean
                         for i in range(0, len(images), batch)])
    return float(latents.mean()), float(1.0 / latents.std().clamp(min=1e-6))


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """uint8 ``images (N, 3, H, W)`` -> encode (posterior mean) -> decode -> uint8 ``(N, 3, H, W)``: what an image
    looks like after the latent space, and what generated images look like at best."""
    out = []
    for i in range(0, len(images), batch):
        recon = vae.decode(vae.encode(to_model_range(images[i : i + batch])).latent_dist.mode()).sample
        out.append(((recon.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> float:
    """Mean PSNR in dB of :func:`round_trip` over uint8 ``images (N, 3, H, W)``."""
    error = (round_trip(vae, images, batch).float() - images.float()) / 255.0
    mse = error.pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return float((10 * torch.log10(1.0 / mse)).mean())


def load_world_vae(folder: Path) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained(folder)`` (the ``vae`` folder of the world components, see
    :func:`world_vae_folder`) after checking it was trained on the current world; a missing or outdated VAE raises
    :class:`~dtback.errors.MissingModelError` with the command that builds it."""
    folder = Path(folder)
    rebuild = f"dtback world-components --out {folder.parent} --only vae"
    read_component_info(folder / INFO_FILE, rebuild, "world VAE")
    if not (folder / "config.json").is_file():
        raise MissingModelError(f"no world VAE in {folder} (no config.json); build it with `{rebuild}`")
    return AutoencoderKL.from_pretrained(folder).eval()


def world_vae_folder(folder: Path | None = None) -> Path:
    """``<world components>/vae`` (None: the shipped components)."""
    return world_models_dir(folder) / VAE_FOLDER
