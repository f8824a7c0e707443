"""The simple model pretrained on the identity world: a small FLUX that draws world people, without identity.

Real FLUX.1-dev arrives pretrained and an identity adapter only has to steer it; the simple model would otherwise
start from random weights and spend a CPU's first ten minutes learning to draw people at all, leaving nothing for
identity. This component plays FLUX.1-dev's part for the embedded default: the project's own trainer
(:func:`dtback.training.trainer.train`) fits the simple transformer to world images of its own characters and seed
by flow matching on their captions, with the identity branch switched off (``identity_dropout: 1``, no identity
losses), so it learns people, scenes and poses but no character.

Folder: ``<world components>/base`` — a diffusers ``FluxPipeline`` folder without its VAE (the world VAE lives in
``vae/`` next to it) and ``world_base.json`` (world version, recipe, training history, held-out figures).
``model.simple_base: world`` copies it into the run's ``simple_model_dir`` on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import FluxPipeline

from dtback.model.flux import DTYPE_KWARG, check_latent_channels
from dtback.world.files import read_component_info, world_models_dir
from dtback.world.vae import load_world_vae, world_vae_folder

log = logging.getLogger(__name__)

BASE_FOLDER = "base"
INFO_FILE = "world_base.json"
REBUILD = "dtback world-components --out {folder} --only base"


def world_base_folder(folder: Path | str | None = None) -> Path:
    """``<world components>/base`` (None: the shipped components)."""
    return world_models_dir(folder) / BASE_FOLDER


def load_world_base(folder: Path | str | None = None) -> FluxPipeline:
    """The pretrained simple model with the world VAE from the world components ``folder`` (None: the shipped one),
    after checking both were trained on the current world (else :class:`~dtback.errors.MissingModelError` with the
    command that rebuilds them)."""
    base = world_base_folder(folder)
    read_component_info(base / INFO_FILE, REBUILD.format(folder=base.parent),
                        "pretrained world base (or set model.simple_base: null for random weights)")
    vae = load_world_vae(world_vae_folder(folder))
    pipeline = FluxPipeline.from_pretrained(base, vae=vae, local_files_only=True, **{DTYPE_KWARG: torch.float32})
    return check_latent_channels(pipeline, f"world base {base} ({REBUILD.format(folder=base.parent)})")
