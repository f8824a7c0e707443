"""Training the world VAE (:mod:`dtback.world.vae`) on world renders: L1 reconstruction + a small KL term on crops
centred on people, then its latent statistics (``shift_factor``, ``scaling_factor``) and held-out PSNR."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm

from dtback.io import replace_folder, write_json
from dtback.world.people import WORLD_VERSION, WorldSet, render_world_set, sample_characters
from dtback.world.vae import INFO_FILE, latent_statistics, reconstruction_psnr, to_model_range, world_vae_config
from dtback.world_build.train import check_recipe, optimizer_step, training_history, warmup_cosine

log = logging.getLogger(__name__)


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
    latent_channels: int = 4
    eval_characters: int = 24
    eval_images: int = 4
    eval_seed: int = 6001

    def __post_init__(self) -> None:
        check_recipe(self, {"characters": 1, "images_per_character": 1, "size": 8, "seed": 0, "steps": 1, "batch": 1,
                            "crop": 8, "kl_weight": 0, "latent_channels": 1, "eval_characters": 1, "eval_images": 1,
                            "eval_seed": 0},
                     positive=("lr",), fractions=("focus",), multiples={"size": 8, "crop": 8})  # latents are 8x smaller


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
    config = config or world_vae_config(sample_size=recipe.size, latent_channels=recipe.latent_channels)
    vae = AutoencoderKL(**config)
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
    info = {"world_version": WORLD_VERSION, "recipe": asdict(recipe), "history": history,
            "held_out_psnr_db": round(psnr, 2), "shift_factor": shift, "scaling_factor": scale,
            "rebuild": "dtback world-components --out <folder> --only vae"}
    with replace_folder(folder) as tmp:
        vae.save_pretrained(tmp)
        write_json(tmp / INFO_FILE, info)
    log.info("world VAE -> %s: held-out PSNR %.2f dB, shift %.4f, scale %.4f; trained in %.0f s", folder, psnr, shift,
             scale, history["seconds"])
    return {"vae": history, "held_out_psnr_db": round(psnr, 2), "shift_factor": shift, "scaling_factor": scale}
