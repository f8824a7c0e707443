"""Adapter size and FLOPs on a full FLUX transformer (FLUX.1-dev, FLUX.2 [dev], FLUX.2 [klein] 4B / 9B), built on the
meta device (no weights, no GPU).

Counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and attention, from shapes alone) for

- a sampling step: one forward of the transformer, with and without the default identity adapters;
- a training step: forward + backward. The base is frozen, but its backward still runs for the activation
  gradients the adapters need, so the base step is "forward + backward of the base" (what any training through it
  costs) and the extra is what the adapters and resamplers compute themselves: their forward, their backward to
  their inputs and their weight gradients, counted on the adapter modules alone with the shapes of the real step.
  The whole adapter step is counted too: it is no larger than the base step, because backward stops at the first
  adapter instead of running down to the input.

Usage: python benchmarks/adapter_overhead.py [--base flux1-dev|flux2-dev|flux2-klein-4b|flux2-klein-9b]
           [--sizes 512 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode

from dtback.config import IdentityConfig, ModelConfig
from dtback.identity.resampler import IdentityInputs
from dtback.model.identity_flux import IdentityPreservingFlux

# black-forest-labs/FLUX.1-dev transformer/config.json
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
# FLUX.2: diffusers' scripts/convert_flux2_to_diffusers.py (get_flux2_transformer_config); the rest are
# Flux2Transformer2DModel's defaults (in_channels 128, head_dim 128, 4 rope axes of 32). docs/dev/flux2_notes.md.
FLUX2 = dict(patch_size=1, in_channels=128, attention_head_dim=128, timestep_guidance_channels=256, mlp_ratio=3.0,
             axes_dims_rope=(32, 32, 32, 32))
BASES = {
    "flux1-dev": ("FLUX.1-dev", FluxTransformer2DModel, FLUX_DEV),
    "flux2-dev": ("FLUX.2 [dev]", Flux2Transformer2DModel, dict(FLUX2, num_layers=8, num_single_layers=48,
                  num_attention_heads=48, joint_attention_dim=15360, guidance_embeds=True)),
    "flux2-klein-4b": ("FLUX.2 [klein] 4B", Flux2Transformer2DModel, dict(FLUX2, num_layers=5, num_single_layers=20,
                       num_attention_heads=24, joint_attention_dim=7680, guidance_embeds=False)),
    "flux2-klein-9b": ("FLUX.2 [klein] 9B", Flux2Transformer2DModel, dict(FLUX2, num_layers=8, num_single_layers=24,
                       num_attention_heads=32, joint_attention_dim=12288, guidance_embeds=False)),
}
TEXT_TOKENS = 512
FACE_DIM, BODY_DIM, BODY_TOKENS, REFERENCES = 512, 384, 256, 1  # antelopev2 ArcFace; DINOv2-small at 224 px


def transformer_inputs(config, size: int, batch: int = 1) -> dict:
    """One step's inputs for a transformer of ``config``: FLUX.1 takes a pooled text embedding and 3 position axes,
    FLUX.2 none and 4."""
    side = size // 16  # VAE /8, then 2x2 packing
    axes = len(config["axes_dims_rope"])
    inputs = dict(
        hidden_states=torch.empty(batch, side * side, config["in_channels"]),
        encoder_hidden_states=torch.empty(batch, TEXT_TOKENS, config["joint_attention_dim"]),
        timestep=torch.empty(batch), img_ids=torch.empty(side * side, axes), txt_ids=torch.empty(TEXT_TOKENS, axes),
        return_dict=False,
    )
    if config.get("pooled_projection_dim"):
        inputs["pooled_projections"] = torch.empty(batch, config["pooled_projection_dim"])
    if config["guidance_embeds"]:
        inputs["guidance"] = torch.empty(batch)
    return inputs


def identity_inputs(batch: int = 1) -> IdentityInputs:
    return IdentityInputs(
        face_embeds=torch.empty(batch, REFERENCES, FACE_DIM), face_mask=torch.ones(batch, REFERENCES, dtype=torch.bool),
        body_pooled=torch.empty(batch, REFERENCES, BODY_DIM), body_tokens=torch.empty(batch, REFERENCES, BODY_TOKENS, BODY_DIM),
        body_mask=torch.ones(batch, REFERENCES, dtype=torch.bool),
    )


def count(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(transformer, model: IdentityPreservingFlux, size: int) -> dict:
    inputs = transformer_inputs(transformer.config, size)
    identity = identity_inputs()

    # Forward-only counts freeze the adapters instead of using no_grad (FlopCounterMode's module tracker trips
    # over parameters that require grad inside no_grad); the FLOPs of a forward are the same either way.
    def base_forward():
        transformer(**inputs)

    def adapter_forward():
        model.requires_grad_(False)
        try:
            model(identity=identity, **inputs)
        finally:
            model.requires_grad_(True)

    def base_train():
        latents = inputs["hidden_states"].clone().requires_grad_(True)
        transformer(**{**inputs, "hidden_states": latents})[0].sum().backward()

    def adapter_train():
        model(identity=identity, **inputs)[0].sum().backward()

    def adapters_alone():
        tokens = model.encode_identity(identity)
        width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
        hidden = torch.empty(1, (size // 16) ** 2, width, requires_grad=True)
        scale = torch.ones(1)
        total = sum(adapter(hidden, tokens, scale, scale).sum() for adapter in model.adapters.values())
        (total + tokens.face.sum() + tokens.body.sum()).backward()

    flops = {}
    for name, fn in [("base_forward", base_forward), ("adapter_forward", adapter_forward),
                     ("base_train", base_train), ("adapter_train", adapter_train), ("adapters_alone", adapters_alone)]:
        flops[name] = count(fn)
        model.clear_identity()
    return {
        "size": size, "image_tokens": (size // 16) ** 2, **{k: v / 1e12 for k, v in flops.items()},
        "sampling_overhead": flops["adapter_forward"] / flops["base_forward"] - 1,
        "training_overhead": flops["adapters_alone"] / flops["base_train"],
        "whole_step_ratio": flops["adapter_train"] / flops["base_train"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=sorted(BASES), default="flux1-dev", help="which real transformer config")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    label, transformer_class, config = BASES[args.base]
    with torch.device("meta"):
        transformer = transformer_class(**config).requires_grad_(False)
        model = IdentityPreservingFlux.from_config(
            ModelConfig(use_simple_model=False), IdentityConfig(), transformer.config,
            face_dim=FACE_DIM, body_dim=BODY_DIM, body_token_dim=BODY_DIM,
        ).attach(transformer)
    base_params = sum(p.numel() for p in transformer.parameters())
    resampler = sum(p.numel() for p in model.resampler.parameters())
    adapters = sum(p.numel() for p in model.adapters.parameters())
    results = {
        "base": args.base, "base_parameters": base_params, "resampler_parameters": resampler, "adapter_parameters": adapters,
        "adapters": list(model.adapters), "trainable_fraction": (resampler + adapters) / base_params,
    }
    with torch.device("meta"):
        results["steps"] = [measure(transformer, model, size) for size in args.sizes]
    print(f"{label} transformer: {base_params / 1e9:.2f} B parameters; {len(model.adapters)} adapters "
          f"({', '.join(model.adapters)})")
    print(f"trainable: resamplers {resampler / 1e6:.1f} M + adapters {adapters / 1e6:.1f} M = "
          f"{(resampler + adapters) / 1e6:.1f} M ({results['trainable_fraction']:.2%} of the base)")
    print("| px | image tokens | base fwd TFLOP | with adapters | sampling overhead | base fwd+bwd TFLOP | "
          "adapters' own fwd+bwd TFLOP | training overhead | whole adapter step / base step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in results["steps"]:
        print(f"| {row['size']} | {row['image_tokens']} | {row['base_forward']:.2f} | {row['adapter_forward']:.2f} | "
              f"{row['sampling_overhead']:.2%} | {row['base_train']:.2f} | {row['adapters_alone']:.2f} | "
              f"{row['training_overhead']:.2%} | {row['whole_step_ratio']:.3f} |")
    print(f"({time.perf_counter() - start:.1f} s, meta device, nothing allocated)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
