"""Memory modes for training identity adapters on a frozen full-size FLUX base (FLUX.1-dev: 12 B parameters).

One config key each; a run combines them freely. Bytes are for FLUX.1-dev and the default adapters (439 M
trainable parameters):

- ``training.gradient_checkpointing`` (+ ``training.gradient_checkpointing_every: k``): the activations inside
  every k-th block (1: all 57) are not kept; their forward runs again in backward.
- ``model.base_quantization: int8``: the block weights in int8 with one scale per output channel (torchao
  weight-only), 24 -> 12 GB; a dequantise per matmul, and outputs drift slightly (tested).
- ``training.optimizer: adamw8bit``: AdamW moments in 8 bits (bitsandbytes), 3.5 -> 0.9 GB.
- ``model.offload_after_cache: true``: the text encoders (T5-XXL: 9.5 GB in bf16) and the VAE encoder leave the
  device once the latent and text caches are built, and the transformer arrives only then; training reads the
  caches. The VAE decoder stays: the identity loss and validation decode with it.
- several GPUs: ``training.distributed: fsdp`` shards the base block by block (:mod:`dtback.training.distributed`).

Functions here change the modules they are given and nothing else; :mod:`dtback.training.setup` and the trainer
call them.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from dtback.config import ModelConfig, TrainingConfig
from dtback.errors import ConfigError, DtbackError

logger = logging.getLogger(__name__)

# The transformer's repeated blocks: quantized, checkpointed and (FSDP) wrapped. Embedders, norms and the output
# projection are small and the most sensitive to precision, so they keep the base dtype.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
INSTALL_HINT = "pip install 'dtback[memory]'"


# ------------------------------------------------------------------------------------------- 8-bit base weights


def quantize_base(transformer: nn.Module, mode: str | None) -> int:
    """Quantize the ``nn.Linear`` weights in the transformer blocks in place (``mode``: ``model.base_quantization``);
    returns how many layers were quantized (0 for ``None``). The base must be frozen: int8 weights take no gradient,
    but gradients still flow through them to the adapters' inputs."""
    if mode is None:
        return 0
    if mode != "int8":
        raise ConfigError(f"model.base_quantization: unknown mode {mode!r}; expected null or int8")
    trainable = [name for name, p in transformer.named_parameters() if p.requires_grad]
    if trainable:
        raise DtbackError(f"model.base_quantization={mode} needs a frozen base; trainable: "
                          f"{', '.join(trainable[:3])}")
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: PLC0415
    except ImportError as err:
        raise DtbackError(f"model.base_quantization=int8 needs torchao: {INSTALL_HINT} "
                          "(or pip install torchao)") from err
    count = 0
    for name in BLOCK_LISTS:
        blocks = getattr(transformer, name)
        count += sum(isinstance(module, nn.Linear) for module in blocks.modules())
        quantize_(blocks, Int8WeightOnlyConfig())
    logger.info("base quantized to %s: %d linear layers in the transformer blocks", mode, count)
    return count


def weight_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers as stored (int8 weights count their int8 data and scales)."""
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        inner = _inner_tensors(tensor)
        total += sum(t.numel() * t.element_size() for t in inner)
    return total


def _inner_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors behind a tensor subclass (torchao's quantized weights), or the tensor itself."""
    if type(tensor) in (torch.Tensor, nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [t for name in names for t in _inner_tensors(getattr(tensor, name))]


# ------------------------------------------------------------------------------------------ gradient checkpointing


def transformer_blocks(transformer: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` for the double blocks, then the single blocks, in execution order."""
    return [(f"{name}.{index}", block)
            for name in BLOCK_LISTS for index, block in enumerate(getattr(transformer, name))]


def enable_checkpointing(transformer: nn.Module, every: int = 1) -> list[str]:
    """Gradient checkpointing on every ``every``-th block (counting double then single blocks from 0; 1: all), through
    diffusers' own switch with a checkpoint function that skips the other blocks. Returns the checkpointed blocks'
    names. Hooks on a checkpointed block (the identity adapters) run again in its recomputation."""
    if every < 1:
        raise ConfigError(f"training.gradient_checkpointing_every must be >= 1 (got {every})")
    named = transformer_blocks(transformer)
    chosen = {id(block) for index, (_, block) in enumerate(named) if index % every == 0}

    def checkpoint_some(block: nn.Module, *args: Any):
        if id(block) in chosen:
            return checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    transformer.enable_gradient_checkpointing(checkpoint_some)
    names = [name for index, (name, _) in enumerate(named) if index % every == 0]
    logger.info("gradient checkpointing on %d of %d blocks (every %d)", len(names), len(named), every)
    return names


def apply_checkpointing(transformer: nn.Module, cfg: TrainingConfig) -> list[str]:
    """``training.gradient_checkpointing`` (+ ``_every``): enable it, or make sure it is off; returns the names."""
    if not cfg.gradient_checkpointing:
        if getattr(transformer, "gradient_checkpointing", False):
            transformer.disable_gradient_checkpointing()
        return []
    return enable_checkpointing(transformer, cfg.gradient_checkpointing_every)


# ------------------------------------------------------------------------------------------------ 8-bit AdamW


def make_adamw(groups: list[dict], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over parameter ``groups`` as ``training.optimizer`` says: ``adamw`` (torch) or ``adamw8bit``
    (bitsandbytes: moments in 8 bits for tensors of 4096+ elements, 32 bits for smaller ones; CPU or GPU)."""
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415
        except ImportError as err:
            raise DtbackError(f"training.optimizer=adamw8bit needs bitsandbytes: {INSTALL_HINT} "
                              "(or pip install bitsandbytes)") from err
        return bnb.optim.AdamW8bit(groups, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # torch's fused kernel, on CPUs as on GPUs: one pass over each tensor (the embedded default's 276 tensors:
        # 3.7 ms a step against 15.5 ms for the per-tensor loop on 2 CPU threads; benchmarks/README.md)
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() and type(p.data) is torch.Tensor
                    for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, betas=cfg.adam_betas, weight_decay=cfg.weight_decay, fused=fused or None)
    raise ConfigError(f"training.optimizer: unknown optimizer {cfg.optimizer!r}; expected adamw or adamw8bit")


# ------------------------------------------------------------------------------------- placement and offloading


def place_for_caching(pipeline, device: str | torch.device, cfg: ModelConfig) -> None:
    """Move the pipeline to ``device`` to build the caches. With ``model.offload_after_cache`` the transformer stays
    on the CPU until :func:`finish_caching`, so the device never holds the text encoders and the base together."""
    if not cfg.offload_after_cache:
        pipeline.to(device)
        return
    for name in ("text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.to(device)


def finish_caching(pipeline, device: str | torch.device, cfg: ModelConfig) -> list[str]:
    """After the caches: offload the encoders when ``model.offload_after_cache`` asks, then make sure the
    transformer is on ``device``. Returns the offloaded components' names."""
    moved = offload_encoders(pipeline) if cfg.offload_after_cache else []
    pipeline.transformer.to(device)
    return moved


def offload_encoders(pipeline, to: str | torch.device = "cpu") -> list[str]:
    """Move the text encoders and the VAE encoder (+ its ``quant_conv``) to ``to`` and release the device's cached
    memory. The VAE decoder stays: the identity loss and validation decode. Returns the moved components' names."""
    moved = []
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.to(to)
            moved.append(name)
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        for name in ("encoder", "quant_conv"):
            module = getattr(vae, name, None)
            if isinstance(module, nn.Module):
                module.to(to)
                moved.append(f"vae.{name}")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("offloaded after caching to %s: %s", to, ", ".join(moved))
    return moved
