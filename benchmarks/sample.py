"""Sampling with identity: time with the identity adapters vs without, and peak memory with and without CPU offload.

Runs ``IdentityFluxPipeline`` (the code ``dtback generate`` runs) on a FLUX pipeline with random weights built from
configs, so nothing is downloaded:

- default: a scaled-down FLUX (4 double + 8 single blocks, width 384, adapters 128 wide, 16-channel VAE, small
  CLIP/T5, 32 text tokens) at 256 px that runs on a CPU in about a minute;
- ``--full``: the FLUX.1-dev architecture (transformer, VAE, CLIP-L, T5-XXL; 17 B parameters in bf16) at 1024 px,
  for a GPU with 40+ GB.

Three modes are timed in the same run, interleaved (ABCABC...) after one warm-up each, and compared by medians:
``base`` (the adapters detached: plain diffusers FluxPipeline), ``attached`` (hooks in place, no identity: what
``--no-identity`` costs) and ``identity`` (references encoded by the resampler, every adapter active). The identity
ratio ``identity / base`` is the issue's target (<= 1.05).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` of one identity sample with the pipeline on the GPU and
with ``enable_model_cpu_offload`` (each component moves to the GPU only while it runs); on a CPU the process's peak
RSS (offload is a GPU feature: there is nothing to offload to).

Usage: python benchmarks/sample.py [--full] [--repeats 5] [--steps N] [--size PX] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from adapter_overhead import BODY_DIM, BODY_TOKENS, FACE_DIM, FLUX_DEV
from dtback.config import IdentityConfig, ModelConfig
from dtback.identity.resampler import IdentityInputs
from dtback.inference.pipeline import IdentityFluxPipeline
from dtback.io import write_json
from dtback.model.flux import FLUX_SCHEDULER, build_simple_tokenizers
from dtback.model.identity_flux import IdentityPreservingFlux

# black-forest-labs/FLUX.1-dev vae/config.json, text_encoder/config.json (CLIP-L), text_encoder_2/config.json (T5-XXL)
FULL = dict(
    transformer=FLUX_DEV,
    vae=dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=16, norm_num_groups=32,
             scaling_factor=0.3611, shift_factor=0.1159),
    clip=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768),
    t5=dict(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, feed_forward_proj="gated-gelu",
            relative_attention_num_buckets=32),
    model={}, max_sequence_length=512, size=1024, steps=28,
)
# The same shape of model at a CPU's scale: FLUX's 1:2 double:single ratio, 64-wide heads, distilled guidance, the
# adapters' width a third of the transformer's (1024 of 3072 on FLUX.1-dev: adapter_dim's default caps it at 1024)
# and 1 text token per 8 image tokens (512 per 4096 for FLUX.1-dev at 1024 px).
SMALL = dict(
    transformer=dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=64,
                     num_attention_heads=6, joint_attention_dim=256, pooled_projection_dim=128, guidance_embeds=True,
                     axes_dims_rope=(8, 28, 28)),
    vae=dict(block_out_channels=[32, 64, 64, 64], layers_per_block=1, latent_channels=16, norm_num_groups=16,
             scaling_factor=1.0, shift_factor=0.0),
    clip=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2, projection_dim=128),
    t5=dict(d_model=256, d_ff=512, d_kv=64, num_heads=4, num_layers=2, relative_attention_num_buckets=32),
    model=dict(adapter_dim=128), max_sequence_length=32, size=256, steps=8,
)
PROMPT = "a photo of a person standing in a park in warm evening light"


@contextmanager
def building_on(device: torch.device, dtype: torch.dtype):
    """Create parameters directly on ``device`` in ``dtype`` (17 B fp32 parameters would not fit anywhere first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> FluxPipeline:
    clip_tokenizer, t5_tokenizer = build_simple_tokenizers()
    torch.manual_seed(seed)
    with building_on(device, dtype):
        transformer = FluxTransformer2DModel(**spec["transformer"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                            up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
                            **spec["vae"])
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                            bos_token_id=clip_tokenizer.bos_token_id,
                                            eos_token_id=clip_tokenizer.eos_token_id, **spec["clip"]))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, pad_token_id=t5_tokenizer.pad_token_id,
                                     eos_token_id=t5_tokenizer.eos_token_id, **spec["t5"]))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae=vae.eval(),
                        text_encoder=clip.eval(), tokenizer=clip_tokenizer, text_encoder_2=t5.eval(),
                        tokenizer_2=t5_tokenizer, transformer=transformer.eval())


def build_identity(pipeline: FluxPipeline, spec: dict, device: torch.device, dtype: torch.dtype, seed: int = 1):
    """The default adapters (PuLID's layout) with random output projections, and one reference's random features."""
    torch.manual_seed(seed)
    model_cfg = ModelConfig(use_simple_model=False, **spec["model"])
    model = IdentityPreservingFlux.from_config(model_cfg, IdentityConfig(), pipeline.transformer.config,
                                               face_dim=FACE_DIM, body_dim=BODY_DIM, body_token_dim=BODY_DIM)
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.to_out.weight.normal_(0, 0.02)  # trained adapters are not zero; compute is the same either way
    model.to(device=device, dtype=dtype).eval().attach(pipeline.transformer)
    pipe = IdentityFluxPipeline(pipeline, model, None, None, spec["max_sequence_length"])
    generator = torch.Generator().manual_seed(seed)
    references = IdentityInputs(
        face_embeds=torch.randn(1, 1, FACE_DIM, generator=generator), face_mask=torch.ones(1, 1, dtype=torch.bool),
        body_pooled=torch.randn(1, 1, BODY_DIM, generator=generator),
        body_tokens=torch.randn(1, 1, BODY_TOKENS, BODY_DIM, generator=generator),
        body_mask=torch.ones(1, 1, dtype=torch.bool),
    )
    return pipe, references


def sample_once(pipe: IdentityFluxPipeline, references, mode: str, size: int, steps: int,
                device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds for one image in ``mode`` (base: adapters detached, diffusers' FluxPipeline
    called as ``IdentityFluxPipeline`` calls it; attached: hooks in place, no identity; identity). CPU seconds are
    what a shared CPU machine measures fairly: time spent waiting for other people's processes is not in them."""
    if mode == "base":
        pipe.model.detach()
    try:
        _sync(device)
        wall, cpu = time.perf_counter(), time.process_time()
        if mode == "base":
            pipe.pipeline(prompt=[PROMPT], num_inference_steps=steps, height=size, width=size,
                          generator=torch.Generator().manual_seed(0), max_sequence_length=pipe.max_sequence_length,
                          output_type="pil")
        else:
            pipe(PROMPT, references if mode == "identity" else None, num_inference_steps=steps, height=size,
                 width=size, seed=0, face_scale=1.0, body_scale=1.0)
        _sync(device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        if mode == "base":
            pipe.model.attach(pipe.pipeline.transformer)
    return wall, cpu


def time_modes(pipe, references, size: int, steps: int, repeats: int, device: torch.device,
               deadline: float | None = None) -> dict:
    """Medians of ``repeats`` interleaved samples per mode; past ``deadline`` (a ``perf_counter`` time) no further
    repeat starts, after the first."""
    modes = ("base", "attached", "identity")
    for mode in modes:  # warm-up: allocator, kernels, lazy imports
        sample_once(pipe, references, mode, size, steps, device)
    wall: dict[str, list[float]] = {mode: [] for mode in modes}
    cpu: dict[str, list[float]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        if repeat and deadline is not None and time.perf_counter() > deadline:
            print(f"time limit: stopped after {repeat} of {repeats} repeats", flush=True)
            break
        order = modes if repeat % 2 == 0 else modes[::-1]  # no mode always runs first or last
        for mode in order:
            seconds = sample_once(pipe, references, mode, size, steps, device)
            wall[mode].append(seconds[0])
            cpu[mode].append(seconds[1])
        print(f"repeat {repeat + 1}/{repeats}: " + ", ".join(f"{m} {wall[m][-1]:.2f} s (cpu {cpu[m][-1]:.2f})"
                                                            for m in modes), flush=True)
    medians = {mode: statistics.median(values) for mode, values in wall.items()}
    cpu_medians = {mode: statistics.median(values) for mode, values in cpu.items()}
    paired = [i / b for i, b in zip(wall["identity"], wall["base"])]
    return {"repeats_done": len(wall["base"]), "seconds": wall, "cpu_seconds": cpu, "median_s": medians,
            "median_cpu_s": cpu_medians,
            "identity_ratio": medians["identity"] / medians["base"],
            "attached_ratio": medians["attached"] / medians["base"], "paired_ratio_median": statistics.median(paired),
            "identity_ratio_cpu_time": cpu_medians["identity"] / cpu_medians["base"]}


def peak_memory(pipe, references, size: int, device: torch.device) -> dict:
    """Peak bytes of one 2-step identity sample, on the GPU and with model CPU offload (CUDA), or peak RSS (CPU)."""
    if device.type != "cuda":
        return {"process_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                "note": "CPU: peak RSS of the whole process (all samples); CPU offload is a GPU feature"}
    result = {}
    for offload in (False, True):
        if offload:
            pipe.pipeline.enable_model_cpu_offload(device=device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        pipe(PROMPT, references, num_inference_steps=2, height=size, width=size, seed=0)
        torch.cuda.synchronize(device)
        key = "model_cpu_offload" if offload else "on_gpu"
        result[key] = {"peak_gb": torch.cuda.max_memory_allocated(device) / 1e9,
                       "seconds_2_steps": time.perf_counter() - start}
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the FLUX.1-dev architecture at 1024 px (a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per mode (after one warm-up each)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 8, or 28 with --full)")
    parser.add_argument("--size", type=int, help="image side in px (default: 256, or 1024 with --full)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--time-limit", type=float, help="seconds from the start after which no further timed "
                        "repeat starts (at least one runs; the memory measurement always does)")
    args = parser.parse_args(argv)
    spec = FULL if args.full else SMALL
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    size, steps = args.size or spec["size"], args.steps or spec["steps"]
    start = time.perf_counter()
    pipeline = build_pipeline(spec, device, dtype)
    pipe, references = build_identity(pipeline, spec, device, dtype)
    pipeline.set_progress_bar_config(disable=True)
    params = {name: sum(p.numel() for p in getattr(pipeline, name).parameters())
              for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    adapters = sum(p.numel() for p in pipe.model.parameters())
    print(f"{'FLUX.1-dev' if args.full else 'scaled-down FLUX'}: transformer {params['transformer'] / 1e6:.1f} M "
          f"parameters, identity model {adapters / 1e6:.1f} M ({len(pipe.model.adapters)} adapters); {size} px, "
          f"{steps} steps, {device} {dtype}; built in {time.perf_counter() - start:.1f} s", flush=True)
    deadline = start + args.time_limit if args.time_limit is not None else None
    timing = time_modes(pipe, references, size, steps, args.repeats, device, deadline)
    results = {
        "config": "full" if args.full else "small", "size": size, "steps": steps, "repeats": args.repeats,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else
        platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "parameters": params, "identity_parameters": adapters, "adapters": list(pipe.model.adapters), **timing,
        "memory": None, "load_average_1_5_15": os.getloadavg(),
    }
    if args.json:  # the timings are kept if the memory measurement is stopped from outside
        write_json(Path(args.json), results, indent=2)
    results["memory"] = memory = peak_memory(pipe, references, size, device)
    results["seconds_total"] = time.perf_counter() - start
    medians = timing["median_s"]
    print(f"median s/image: base {medians['base']:.3f}, attached (no identity) {medians['attached']:.3f}, "
          f"identity {medians['identity']:.3f}")
    print(f"ratio identity/base {timing['identity_ratio']:.3f} (paired median {timing['paired_ratio_median']:.3f}, "
          f"process CPU time {timing['identity_ratio_cpu_time']:.3f}; target <= 1.05), "
          f"attached/base {timing['attached_ratio']:.3f}")
    print(f"memory: {json.dumps(memory)}")
    print(f"({time.perf_counter() - start:.1f} s in all; load average now {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores)")
    if args.json:
        write_json(Path(args.json), results, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
