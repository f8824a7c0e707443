"""Pretraining the world base (:mod:`dtback.world.base`): the project's own trainer fits the simple transformer to
world images of its own characters and seed by flow matching on their captions, with the identity branch off
(``identity_dropout: 1``, no identity losses), so it learns people, scenes and poses but no character."""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from dtback.config import load_config
from dtback.errors import MissingModelError
from dtback.io import replace_folder, write_json
from dtback.model.flux import SIMPLE_TRANSFORMER, build_simple_pipeline, save_pipeline_atomic
from dtback.training.features import encode_latents
from dtback.training.losses import flow_matching_loss, noisy_latents
from dtback.training.trainer import train
from dtback.world.base import INFO_FILE, REBUILD
from dtback.world.people import WORLD_VERSION, render_image, sample_characters
from dtback.world.vae import load_world_vae, to_model_range, world_vae_folder
from dtback.world_build.train import check_recipe

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class BaseRecipe:
    """The pretraining run: its own world (characters and seed disjoint from the embedded default's world seed 0)
    and the trainer settings that differ from the embedded default."""

    # 2,048 characters and 16,000 float32 steps (about 1 h 45 min on 2 threads): held-out flow loss 0.355, where
    # 1,024 and 4,000 steps gave 0.436, and the embedded default on it transfers more identity (benchmarks/README.md,
    # issue 14). bf16 compiled steps run ~1.5x as fast on a CPU with bf16 instructions: 25,000 steps took 1 h 47 min
    # and reached 0.339.
    characters: int = 2048
    images_per_character: int = 8
    world_seed: int = 7
    steps: int = 25000
    batch: int = 32
    lr: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 42
    # The transformer: the shipped base is the code's SIMPLE_TRANSFORMER (hidden 128). A wider one (width 192,
    # 2,048 characters, 5,000 steps: 80 min on 2 threads) drew better but was too slow to adapt within the embedded
    # default's 10 minutes.
    width: int = 128  # hidden size = heads x 32
    double_blocks: int = 2
    single_blocks: int = 4
    # torch.compile the blocks (training.compile): 1.22x the steps/s of this recipe on 2 CPU threads after ~70 s of
    # compiling, 1.49x with bf16 steps (benchmarks/README.md).
    compile: bool = True
    # training.mixed_precision: bf16 autocast where the CPU or GPU has bf16 instructions (float32 with a warning
    # elsewhere); the world's latents are encoded in float32 either way.
    mixed_precision: str = "bf16"

    def __post_init__(self) -> None:
        # A character needs a target and a reference image; the hidden size is heads x 32.
        check_recipe(self, {"characters": 2, "images_per_character": 2, "world_seed": 0, "steps": 1, "batch": 1,
                            "warmup": 0, "seed": 0, "width": SIMPLE_TRANSFORMER["attention_head_dim"],
                            "double_blocks": 0, "single_blocks": 0},
                     positive=("lr",), fractions=("ema_decay",), below_one=("ema_decay",),
                     multiples={"width": SIMPLE_TRANSFORMER["attention_head_dim"]})

    def transformer(self) -> dict[str, Any]:
        """Overrides of :data:`~dtback.model.flux.SIMPLE_TRANSFORMER` for :func:`build_simple_pipeline`."""
        return {"num_attention_heads": self.width // SIMPLE_TRANSFORMER["attention_head_dim"],
                "num_layers": self.double_blocks, "num_single_layers": self.single_blocks}

    def overrides(self, data_dir: Path, output_dir: Path, components: Path, start: Path) -> list[str]:
        """``--set`` overrides of the code defaults for this recipe; ``components`` is the world components folder
        whose VAE, encoders and reader the run uses; ``start`` the random pipeline of :meth:`transformer`'s size."""
        return [
            f"data.data_dir={data_dir}", f"data.world.components={components}", "data.input_size=128", "model.use_simple_model=true",
            "model.simple_vae=world", f"output.output_dir={output_dir}", f"seed={self.seed}",
            f"data.world.seed={self.world_seed}", f"data.world.characters={self.characters}",
            f"data.world.images_per_character={self.images_per_character}",
            f"model.simple_base={start}", "model.simple_model_dir=null",
            f"training.max_steps={self.steps}", f"training.batch_size={self.batch}",
            f"training.learning_rate={self.lr}", f"training.warmup_steps={self.warmup}",
            f"training.ema_decay={self.ema_decay}", "training.face_weight=0", "training.body_weight=0",
            "training.identity_dropout=1.0", f"training.validate_every={self.steps}",
            f"training.checkpoint_every={self.steps}", "training.keep_checkpoints=1",
            "training.num_val_characters=8", "training.log_every=100",
            f"training.compile={str(self.compile).lower()}", f"training.mixed_precision={self.mixed_precision}",
        ]


def build_world_base(folder: Path, recipe: BaseRecipe = BaseRecipe(), progress: bool = True) -> dict[str, Any]:
    """Pretrain the simple model on a world of its own (see the module docstring) and save it into ``folder``."""
    folder = Path(folder)
    # The run uses the VAE, encoders and reader of the components folder being built (the base's parent).
    with tempfile.TemporaryDirectory(prefix="dtback-world-base-") as tmp:
        work = Path(tmp)
        # Random weights; the transformer takes 2x2 packs of the components' VAE's latent channels (the run
        # replaces the random VAE by that one: model.simple_vae=world).
        channels = load_world_vae(world_vae_folder(folder.parent)).config.latent_channels
        transformer = {**recipe.transformer(), "in_channels": 4 * channels}
        initial = save_pipeline_atomic(build_simple_pipeline(recipe.seed, transformer=transformer), work / "start")
        cfg = load_config(None, recipe.overrides(work / "world", work / "run", folder.parent, initial))
        start = time.perf_counter()
        result = train(cfg, resume=None, progress_bar=progress)
        seconds = time.perf_counter() - start
        return save_world_base(result.run_dir, result.last_checkpoint, folder, recipe, seconds)


def save_world_base(run_dir: Path, checkpoint: Path, folder: Path, recipe: BaseRecipe,
                    seconds: float) -> dict[str, Any]:
    """The pretraining run's final transformer (its EMA weights, from ``checkpoint``) into ``folder`` with the run's
    text encoders and tokenizers but no VAE, and ``world_base.json`` with the recipe and held-out figures."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    validation = json.loads((run_dir / "validation.jsonl").read_text().splitlines()[-1])
    pipeline = FluxPipeline.from_pretrained(run_dir / "simple_base")
    _load_final_ema(pipeline.transformer, Path(checkpoint))
    seen = sample_characters(recipe.characters, recipe.world_seed)
    flow_loss = held_out_flow_loss(pipeline, exclude=seen)
    random_flow_loss = held_out_flow_loss(_random_like(pipeline, recipe), exclude=seen)
    pipeline.vae = None  # the world VAE ships once, in vae/
    pipeline.register_modules(vae=None)
    pipeline.transformer.to(torch.float16)  # stored in half precision (4.4 MB); loaded back as float32
    folder = Path(folder)
    flows = [m["loss/flow"] for m in metrics if "loss/flow" in m]
    figures = {
        "history": {"seconds": round(seconds, 1), "steps": recipe.steps, "batch": recipe.batch,
                    "flow_loss_first": round(flows[0], 4), "flow_loss_last": round(flows[-1], 4)},
        # Samples of held-out characters' captions: how often the world face detector finds a face in them.
        "held_out": {"flow_loss": round(flow_loss, 4), "flow_loss_random_weights": round(random_flow_loss, 4),
                     "face_detected": validation.get("val/face_detected_no_id"),
                     "reader_face": validation.get("val/reader_face_no_id"),
                     "reader_body": validation.get("val/reader_body_no_id")},
    }
    info = {"world_version": WORLD_VERSION, "recipe": dataclasses.asdict(recipe), **figures,
            "rebuild": REBUILD.format(folder=folder.parent)}
    with replace_folder(folder) as tmp:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        _drop_source_paths(tmp)
        write_json(tmp / INFO_FILE, info)
    log.info("world base -> %s: %s", folder, figures)
    return figures


def _drop_source_paths(folder: Path) -> None:
    """diffusers records the folder a pipeline was loaded from (``_name_or_path``): a temporary run folder here,
    meaningless in a shipped asset."""
    for path in folder.rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict) and "_name_or_path" in data:
            data.pop("_name_or_path")
            write_json(path, data, indent=2, sort_keys=True)


def _load_final_ema(transformer, checkpoint: Path) -> None:
    """The EMA weights of the transformer from a trainer checkpoint. The EMA holds every trainable tensor in the
    order of the training module's parameters, the transformer's first (``TrainModule``); names and shapes are
    checked against ``trainable.safetensors``."""
    trainable = load_file(checkpoint / "trainable.safetensors")
    shadow = load_file(checkpoint / "ema.safetensors")
    state = {}
    for i, (name, param) in enumerate(transformer.named_parameters()):
        raw = trainable.get(f"transformer.{name}")
        ema = shadow.get(str(i))
        if raw is None or ema is None or ema.shape != param.shape or raw.shape != param.shape:
            raise MissingModelError(f"{checkpoint}: EMA tensor {i} does not match transformer.{name} "
                                    "(not a simple-model checkpoint of this architecture)")
        state[name] = ema
    transformer.load_state_dict(state)


def _random_like(pipeline: FluxPipeline, recipe: BaseRecipe) -> FluxPipeline:
    random = build_simple_pipeline(0, vae=pipeline.vae, transformer=recipe.transformer())
    random.text_encoder, random.text_encoder_2 = pipeline.text_encoder, pipeline.text_encoder_2
    return random


@torch.no_grad()
def held_out_flow_loss(pipeline: FluxPipeline, characters: int = 16, per_character: int = 2, seed: int = 9101,
                       exclude=()) -> float:
    """Mean flow-matching loss of ``pipeline``'s transformer on world renders of characters of ``seed`` (none of
    them in ``exclude``), at fixed noise and noise levels spread over (0, 1): how well the model knows the world.
    A random transformer scores about 2.4; lower is better."""
    chosen = sample_characters(characters, seed, exclude=exclude)
    renders = [render_image(char, i, 128, seed) for char in chosen for i in range(per_character)]
    pixels = torch.stack([torch.from_numpy(np.array(r.image)).permute(2, 0, 1) for r in renders])
    captions = [r.caption for r in renders]
    latents = encode_latents(pipeline.vae, to_model_range(pixels))
    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    prompt_embeds, pooled, text_ids = pipeline.encode_prompt(captions, captions, max_sequence_length=32)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(packed.shape, generator=generator)
    sigmas = (torch.arange(batch, dtype=torch.float32) + 0.5) / batch
    transformer = pipeline.transformer
    extra = {"guidance": torch.full((batch,), 3.5)} if transformer.config.guidance_embeds else {}
    prediction = transformer(hidden_states=noisy_latents(packed, noise, sigmas), timestep=sigmas,
                             encoder_hidden_states=prompt_embeds, pooled_projections=pooled, txt_ids=text_ids,
                             img_ids=image_ids, return_dict=False, **extra)[0]
    return float(flow_matching_loss(prediction, packed, noise).mean())
