"""A small ``diffusers.AutoencoderKL`` for the identity world, trained on world renders by the project's own code.

Four encoder/decoder blocks (scale factor 8) and 4 latent channels, so a 128 px world image is a ``(4, 16, 16)``
latent and the FLUX transformer, which packs 2 x 2 latent patches, sees ``in_channels = 16``. Saved with
``save_pretrained`` and loaded with ``from_pretrained`` like any diffusers VAE; ``scaling_factor`` and
``shift_factor`` in its config come from the statistics of its own latents on training renders, so that FLUX's
``(z - shift) * scale`` has zero mean and unit variance.

Folder: ``<world components>/vae`` (see :func:`~dtback.data.world_files.world_models_dir`), with
``world_vae.json`` beside the diffusers files (world version, recipe, training history, held-out PSNR).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from dtback.data.world import WORLD_VERSION, sample_characters
from dtback.data.world_files import read_component_info, world_models_dir
from dtback.identity.body import MissingModelError
from dtback.identity.world_train import WorldSet, optimizer_step, render_world_set, training_history, warmup_cosine

log = logging.getLogger(__name__)

VAE_FOLDER = "vae"
INFO_FILE = "world_vae.json"


def world_vae_config(block_out_channels: tuple[int, ...] = (16, 32, 64, 64), norm_num_groups: int = 1,
                     sample_size: int = 128) -> dict[str, Any]:
    """``AutoencoderKL`` keyword arguments of the world VAE (4 blocks: 8x downsampling; 4 latent channels).

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
        "latent_channels": 4,
        "norm_num_groups": norm_num_groups,
        "sample_size": sample_size,
        "mid_block_add_attention": False,  # attention over 16 x 16 latents costs more than it buys at this size
    }


@dataclass(frozen=True)
class VaeRecipe:
    """Training renders (own characters and seed), optimisation, and the held-out set for the PSNR figure."""

    characters: int = 300
    images_per_character: int = 6
    size: int = 128
    seed: int = 5001
    steps: int = 4000  # held-out PSNR grows ~0.7 dB per 1000 steps here (2500: 22.2 dB, 6000: 24.4 dB at 8 groups)
    batch: int = 8
    crop: int = 64  # random crops (multiples of 8) of the renders: 4x cheaper steps than whole images
    lr: float = 7e-4
    focus: float = 0.75  # share of crops centred on the person (identity lives there; +1.9 dB on people, 1000 steps)
    bf16: bool = True  # bfloat16 autocast: about 1.4x faster steps on a CPU, same PSNR per step
    kl_weight: float = 1e-6
    eval_characters: int = 24
    eval_images: int = 4
    eval_seed: int = 6001


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float in [-1, 1] (the range diffusers VAEs work in)."""
    return images.float() / 127.5 - 1.0


def render_pixels(characters: int, per_character: int, size: int, seed: int, exclude=()) -> torch.Tensor:
    """World renders as uint8 ``(N, 3, size, size)``."""
    chosen = sample_characters(characters, seed, exclude=exclude, exclude_bodies=False)
    return render_world_set(chosen, per_character, size, seed).images


def training_crops(world: WorldSet, index: torch.Tensor, crop: int, focus: float,
                   gen: torch.Generator) -> torch.Tensor:
    """uint8 ``(B, 3, crop, crop)`` crops at offsets that are multiples of 8 (latent-aligned). With probability
    ``focus`` a crop holds the person's head and torso (jittered), else it is anywhere: people, the part that carries
    identity, get most of the training."""
    side = world.images.shape[-1]
    crops = []
    for i in index.tolist():
        if torch.rand(1, generator=gen).item() < focus:
            box = world.face_boxes[i]
            centre = torch.stack([(box[0] + box[2]) / 2, box[3]]) + torch.randint(-crop // 4, crop // 4 + 1, (2,),
                                                                                  generator=gen)
            ox, oy = ((centre - crop / 2).clamp(0, side - crop) / 8).round().long().mul(8).tolist()
        else:
            ox, oy = (torch.randint(0, (side - crop) // 8 + 1, (2,), generator=gen) * 8).tolist()
        crops.append(world.images[i, :, oy : oy + crop, ox : ox + crop])
    return torch.stack(crops)


def train_world_vae(world: WorldSet, recipe: VaeRecipe, config: dict[str, Any] | None = None,
                    progress: bool = True) -> tuple[AutoencoderKL, dict[str, Any]]:
    """Train a world VAE on ``world``'s renders: L1 reconstruction + ``kl_weight`` x KL, on crops
    (see :func:`training_crops`). Returns the VAE (eval mode) and a history (seconds, CPU seconds, first/last loss).
    """
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    vae = AutoencoderKL(**(config or world_vae_config(sample_size=recipe.size)))
    with torch.no_grad():  # start with a small posterior std: decoder inputs are not drowned in noise early on
        vae.quant_conv.bias[vae.config.latent_channels:].fill_(-6.0)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = warmup_cosine(opt, recipe.steps, warmup=0.02)
    crop = min(recipe.crop, world.images.shape[-1])
    losses, start, cpu_start = [], time.perf_counter(), time.process_time()
    vae.train()
    for _ in tqdm(range(recipe.steps), desc="world VAE", unit="step", disable=not progress):
        index = torch.randint(len(world), (recipe.batch,), generator=gen)
        x = to_model_range(training_crops(world, index, crop, recipe.focus, gen))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16 and x.device.type == "cpu"):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample.float()
        loss = (recon - x).abs().mean() + recipe.kl_weight * posterior.kl().float().mean()
        losses.append(optimizer_step(loss, opt, sched))
    history = training_history(losses, start, cpu_start, steps=recipe.steps, batch=recipe.batch, crop=crop)
    return vae.eval(), history


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


def build_world_vae(folder: Path, recipe: VaeRecipe = VaeRecipe(), config: dict[str, Any] | None = None,
                    progress: bool = True) -> dict[str, Any]:
    """Train on renders, set scaling/shift factors, measure held-out PSNR, ``save_pretrained`` into ``folder``."""
    train_chars = sample_characters(recipe.characters, recipe.seed)
    world = render_world_set(train_chars, recipe.images_per_character, recipe.size, recipe.seed)
    vae, history = train_world_vae(world, recipe, config, progress=progress)
    shift, scale = latent_statistics(vae, world.images[:512])
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    held = render_pixels(recipe.eval_characters, recipe.eval_images, recipe.size, recipe.eval_seed, exclude=train_chars)
    psnr = reconstruction_psnr(vae, held)
    folder = Path(folder)
    vae.save_pretrained(folder)
    info = {"world_version": WORLD_VERSION, "recipe": asdict(recipe), "history": history,
            "held_out_psnr_db": round(psnr, 2), "shift_factor": shift, "scaling_factor": scale,
            "rebuild": "dtback world-components --out <folder> --only vae"}
    (folder / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    log.info("world VAE -> %s: held-out PSNR %.2f dB, shift %.4f, scale %.4f; trained in %.0f s", folder, psnr, shift,
             scale, history["seconds"])
    return {"vae": history, "held_out_psnr_db": round(psnr, 2), "shift_factor": shift, "scaling_factor": scale}


def load_world_vae(folder: Path) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained(folder)`` after checking it was trained on the current world."""
    folder = Path(folder)
    rebuild = f"dtback world-components --out {folder.parent} --only vae"
    read_component_info(folder / INFO_FILE, rebuild, "world VAE")
    if not (folder / "config.json").is_file():
        raise MissingModelError(f"no world VAE in {folder} (no config.json); build it with `{rebuild}`")
    return AutoencoderKL.from_pretrained(folder).eval()


def load_or_train_world_vae(cache_dir: Path | None = None, recipe: VaeRecipe = VaeRecipe(),
                            progress: bool = True) -> AutoencoderKL:
    """The world VAE from ``<cache_dir>/vae`` (None: :func:`world_models_dir`), trained there first when missing."""
    folder = world_models_dir(cache_dir) / VAE_FOLDER
    if not (folder / INFO_FILE).is_file():
        log.info("world VAE not found in %s: training it (a few minutes on one core) ...", folder)
        build_world_vae(folder, recipe, progress=progress)
    return load_world_vae(folder)
