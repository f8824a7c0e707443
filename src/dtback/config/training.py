"""The ``training`` section: optimisation, loss weights, checkpoints, validation and logging."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dtback.config.section import _Section


class TrainingConfig(_Section):
    """Optimisation and loss weights."""

    batch_size: int = Field(4, ge=1)
    num_epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    content_weight: float = Field(1.0, ge=0.0, description="Weight of the flow-matching loss.")
    face_weight: float = Field(0.1, ge=0.0, description="Weight of the face identity loss (1 - cos).")
    body_weight: float = Field(0.1, ge=0.0, description="Weight of the body identity loss (1 - cos).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (overrides num_epochs).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several ranks (torchrun / accelerate launch): ddp keeps the whole model on every rank; "
        "fsdp shards base, adapters, gradients and optimiser state across the ranks (torch FSDP2, per block), for "
        "bases that do not fit one device with room to train. One rank: no effect.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null: no clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, no mixed precision on a CPU. bf16 on a CPU "
        "without bf16 instructions (AVX512-BF16 or AMX) trains in float32, with a warning: emulated bf16 is slower."
    )
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_false(cls, value):
        # The loader reads a bare `no` as the word; `false` (or a config written for YAML 1.1) still means "no".
        return "no" if value is False else value

    cudnn_attention: bool = Field(
        False, description="Let scaled_dot_product_attention use cuDNN's attention while training. Off: on an H100 "
        "(torch 2.11, CUDA 13.0) its backward gave NaN gradients and an illegal memory access (benchmarks/README.md); "
        "flash / memory-efficient attention are used instead.",
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: AdamW moments in 8 bits through bitsandbytes (GPU or CPU; a memory mode)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    lr_scheduler: Literal["cosine", "constant"] = Field("cosine", description="After warmup: cosine decay or constant.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warmup steps.")
    base_learning_rate: float | None = Field(
        None, gt=0.0, description="Simple model only: learning rate of its transformer (trained too); null: learning_rate."
    )
    ema_decay: float | None = Field(
        0.999, ge=0.0, lt=1.0, description="EMA of the trainable weights (validation and best_model use it); null: off."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute transformer blocks in backward to save memory.")
    compile: bool = Field(
        False, description="torch.compile the transformer's repeated blocks (diffusers' compile_repeated_blocks; the "
        "adapters' hooks compile with their block). The first steps, and the first validation, compile; on the H200 "
        "the FLUX.1-dev step ran 18 % faster (benchmarks/README.md)."
    )
    gradient_checkpointing_every: int = Field(
        1, ge=1, description="With gradient_checkpointing: recompute every k-th transformer block (1: all; fewer "
        "saves less memory and less time)."
    )
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Train with an empty caption this often (CFG).")
    identity_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Train without identity this often, so sampling without identity works."
    )
    timestep_sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="How the noise level is drawn (SD3/FLUX: logit-normal)."
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal before the sigmoid.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: std of the normal before the sigmoid.")
    resolution_shift: bool = Field(
        True, description="Shift noise levels up for larger images, as FLUX samples (FLUX.2: also by "
        "training.val_sampling_steps, as its pipelines shift by the step count)."
    )
    person_loss_weight: float = Field(
        1.0, ge=1.0, description="Flow-matching loss weight of the latent patches inside the target's person box "
        "(1 elsewhere): where identity lives. 1 weighs every patch alike."
    )
    identity_loss_max_samples: int = Field(
        4, ge=1, description="Identity losses on at most this many low-noise samples per micro-batch (VAE decode cost)."
    )
    identity_loss_every: int = Field(
        1, ge=1, description="Identity losses on every k-th optimiser step only (1: every step); between them a step "
        "is the flow loss alone, without the VAE decode and the encoders' forward and backward.",
    )
    identity_loss_max_sigma: float = Field(
        0.6, ge=0.0, le=1.0, description="Identity losses only on samples with noise level sigma below this."
    )
    checkpoint_every: int = Field(500, ge=1, description="Write a checkpoint every N optimiser steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Keep the last K checkpoints.")
    validate_every: int = Field(500, ge=1, description="Validate (held-out identity similarity, sample grid) every N steps.")
    num_val_characters: int = Field(4, ge=1, description="Held-out characters in the validation grid and metrics.")
    val_sampling_steps: int = Field(20, ge=1, description="Sampling steps for validation images.")
    val_guidance: float = Field(3.5, ge=0.0, description="Guidance for validation images (distilled for FLUX.1-dev).")
    val_true_cfg: float = Field(
        1.0, ge=1.0, description="True CFG scale of validation images with identity, against the same prompt without "
        "identity (amplifies what the adapters add; 1 = off, one transformer call per step)."
    )
    log_every: int = Field(10, ge=1, description="Log losses every N optimiser steps.")
    log_with: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers that get the losses, validation metrics and grids, through accelerate: "
        "tensorboard (events in <output_dir>/tensorboard/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, "
        "trackio; all: every one installed; [] or null: none (metrics.jsonl and validation.jsonl are always written).",
    )

    @field_validator("adam_betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("each beta must be in [0, 1); the usual values are [0.9, 0.999]")
        return value

    @field_validator("log_with", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> list[str]:
        # accelerate's LoggerType values less "all" (not imported here: it would import torch for every config).
        trackers = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
        choices = f"choose from {', '.join(trackers)}, or 'all' (every one installed), or [] / null for none"
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of tracker names; {choices}")
        unknown = [name for name in value if name not in (*trackers, "all")]
        if unknown:
            raise ValueError(f"unknown tracker(s) {', '.join(repr(name) for name in unknown)}; {choices}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _some_loss(self) -> "TrainingConfig":
        if self.content_weight == 0 and self.face_weight == 0 and self.body_weight == 0:
            raise ValueError("content_weight, face_weight and body_weight are all 0: nothing would be trained")
        return self


# Why training.compile and model.base_quantization exclude each other (the benchmark's int8 rows say it too).
COMPILE_WITH_QUANTIZATION = ("torch.compile cannot compile a training step through torchao's quantized weights "
                             "(aliased outputs beside tensor-subclass inputs)")
