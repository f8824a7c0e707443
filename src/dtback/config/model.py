"""The ``model`` section: the FLUX base, and the identity resamplers and adapters attached to it."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from dtback.config.section import _Section


def head_choices(width: int) -> list[int]:
    """Head counts that split ``width`` evenly (at most 12 shown), for messages."""
    found = [heads for heads in range(1, width + 1) if width % heads == 0]
    return found if len(found) <= 12 else found[:6] + found[-6:]


class ModelConfig(_Section):
    """The FLUX base, and the identity resamplers and adapters attached to it."""

    base: Literal["flux1", "flux2", "flux2_klein"] = Field(
        "flux1", description="The FLUX family: flux1 (FLUX.1 [dev]/[schnell]), flux2 (FLUX.2 [dev]), flux2_klein "
        "(FLUX.2 [klein] 4B/9B); the simple model is built for each."
    )
    use_simple_model: bool = Field(
        True, description="Build a small FLUX-architecture model in code (offline) instead of loading FLUX.1."
    )
    pretrained_model: str = Field(
        "black-forest-labs/FLUX.1-dev",
        description="Real FLUX (use_simple_model: false): a local diffusers folder or a hub id already downloaded.",
    )
    simple_model_dir: Path | None = Field(
        None, description="Where the simple model is saved in diffusers format; null means <output_dir>/simple_base."
    )
    simple_vae: str | None = Field(
        "world",
        description="Simple model only: its VAE. world: the identity world's trained VAE; a diffusers AutoencoderKL "
        "folder; null: random weights (tests).",
    )
    train_simple_base: bool = Field(
        True, description="Simple model only: train its transformer together with the adapters (base_learning_rate); "
        "false freezes it, as real FLUX always is."
    )
    simple_base: str | None = Field(
        "world",
        description="Simple model only: its starting weights. world: pretrained on the identity world without identity "
        "(like FLUX.1-dev for real photos; needs simple_vae: world); a diffusers FluxPipeline folder; null: random "
        "weights by seed.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Base weights dtype; auto: bfloat16 for real FLUX on a GPU, float32 otherwise."
    )
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="T5 prompt tokens; null: 512 for real FLUX, 32 for the simple model."
    )
    adapter_double_interval: int = Field(
        2, ge=0, description="Attach an identity adapter after every N-th double block (0: none), like PuLID."
    )
    adapter_single_interval: int = Field(
        4, ge=0, description="Attach an identity adapter after every N-th single block (0: none)."
    )
    adapter_double_blocks: list[int] | None = Field(
        None, description="Explicit double-block indices (overrides adapter_double_interval)."
    )
    adapter_single_blocks: list[int] | None = Field(
        None, description="Explicit single-block indices (overrides adapter_single_interval)."
    )
    adapter_dim: int | None = Field(
        None, ge=8, description="Inner width of each identity cross-attention; null: the transformer width, at most 1024."
    )
    adapter_heads: int | None = Field(
        None, ge=1, description="Heads of each identity cross-attention; null: adapter_dim / the transformer's head dim."
    )
    resampler_dim: int | None = Field(
        None, ge=8, description="Width of the perceiver resamplers; null: the transformer width, at most 1024."
    )
    resampler_depth: int = Field(2, ge=1, description="Perceiver layers per resampler.")
    resampler_heads: int = Field(8, ge=1, description="Heads of the perceiver resamplers.")
    tokens_per_embedding: int = Field(
        4, ge=1, description="Tokens each reference's global face/body vector is expanded to before the resampler."
    )
    face_scale: float = Field(1.0, ge=0.0, description="Strength of the face identity adapters (0: off).")
    body_scale: float = Field(1.0, ge=0.0, description="Strength of the body identity adapters (0: off).")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on the base transformer through peft (0: no LoRA).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: equal to the rank.")
    lora_targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="Module names LoRA wraps in the transformer "
        "(on FLUX.2 the default also wraps its single blocks' fused to_qkv_mlp_proj)."
    )
    base_quantization: Literal["int8"] | None = Field(
        None, description="Memory mode: int8 stores the frozen base's block weights in 8 bits (torchao, halves them); "
        "null: the base dtype. Real FLUX only (see dtback.model.memory)."
    )
    offload_after_cache: bool = Field(
        False, description="Memory mode: move the text encoders and the VAE encoder off the training device once the "
        "latent and text caches are built."
    )

    @model_validator(mode="after")
    def _check_blocks(self) -> "ModelConfig":
        for key in ("adapter_double_blocks", "adapter_single_blocks"):
            blocks = getattr(self, key)
            if blocks is not None and (any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks)):
                raise ValueError(f"{key} must hold distinct block indices >= 0 (got {blocks})")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        # Only explicit widths can be checked here; a width taken from the transformer is checked when it is loaded
        # (dtback.model.identity_flux.check_model_fits_base).
        for dim_key, heads_key in (("resampler_dim", "resampler_heads"), ("adapter_dim", "adapter_heads")):
            dim, heads = getattr(self, dim_key), getattr(self, heads_key)
            if dim is not None and heads is not None and dim % heads:
                raise ValueError(f"{heads_key}={heads} does not divide {dim_key}={dim}: attention splits the width "
                                 f"into equal heads; choose one of {head_choices(dim)} heads")
        return self

    @model_validator(mode="after")
    def _check_family(self) -> "ModelConfig":
        if self.use_simple_model and self.base != "flux1":
            for key in ("simple_vae", "simple_base"):
                if getattr(self, key) == "world":
                    raise ValueError(f"{key}=world is a FLUX.1 model (the identity world's), but base={self.base}: "
                                     f"set {key}: null (random weights) or a {self.base} folder")
        return self

    @model_validator(mode="after")
    def _check_simple_base(self) -> "ModelConfig":
        if self.use_simple_model and self.simple_base == "world" and self.simple_vae != "world":
            raise ValueError(f"simple_base=world was pretrained on the world VAE's latents, but simple_vae="
                             f"{self.simple_vae}: set simple_vae: world, or simple_base: null (random weights)")
        return self

    @model_validator(mode="after")
    def _check_quantization(self) -> "ModelConfig":
        if self.base_quantization is not None and self.use_simple_model:
            raise ValueError(f"base_quantization={self.base_quantization} needs a frozen base, but the simple model's "
                             "transformer is trained: set use_simple_model: false or base_quantization: null")
        if self.base_quantization is not None and self.lora_rank > 0:
            raise ValueError(f"base_quantization={self.base_quantization} with lora_rank={self.lora_rank}: LoRA on a "
                             "quantized base is not supported; set one of them off")
        return self
