"""Training-step speed, memory and MFU of the default identity adapters on the FLUX.1-dev transformer, per memory mode.

The transformer is built from FLUX.1-dev's config with random weights (no download; ``adapter_overhead.FLUX_DEV``),
the default identity adapters are attached (``IdentityPreservingFlux``, PuLID's layout), and one training step is

    forward of the frozen base with the adapters -> flow-matching-shaped MSE -> backward into the adapters
    -> AdamW step on the adapters and resamplers

on random latents (batch ``--batch``), 512 text tokens and one reference. Per image size and memory mode it reports
the median seconds of ``--steps`` steps after ``--warmup``, samples/s, the peak GPU memory
(``torch.cuda.max_memory_allocated``, weights included), and the model FLOPs utilisation: the step's analytic FLOPs
(``adapter_overhead.measure`` on the meta device: forward + backward, without checkpointing's recomputation) / time /
the device's dense bf16 peak from its name (H100 SXM: the 989.4 TFLOP/s spec, not the ~790 reachable in
practice; ``--peak-tflops`` overrides). The adapter overhead is measured in the same run: the same step through the
base alone (adapters detached, backward to the input latents, no optimiser) and the ratio of the two.

Memory modes (cumulative, as a 24 GB card needs them; :mod:`dtback.model.memory`):
  base             frozen base in bf16 (float32 on a CPU), adapters float32 under bf16 autocast on a GPU
  checkpointing    + gradient checkpointing of every block
  int8             + int8 base weights (torchao)
  int8_adamw8bit   + 8-bit AdamW (bitsandbytes): the 24 GB mode

Without CUDA (or with ``--scaled-down``) the same code runs on a scaled-down config (width 256, 2 double + 4 single
blocks, 256 px) in a few minutes, so it is always testable; ``--preset tiny`` is the test's 1-step smoke size.

Usage:
  python benchmarks/train_step.py --json train_step.json                       # full size on a GPU
  python benchmarks/train_step.py --scaled-down --json train_step_cpu.json     # CPU
  python benchmarks/train_step.py --sizes 512 --modes base --compile           # torch.compile the blocks (GPU)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from adapter_overhead import BODY_DIM, FACE_DIM, FLUX_DEV, identity_inputs, measure, transformer_inputs  # noqa: E402

from dtback.config import COMPILE_WITH_QUANTIZATION, IdentityConfig, ModelConfig, TrainingConfig  # noqa: E402
from dtback.devices import attention_backends  # noqa: E402
from dtback.errors import DtbackError  # noqa: E402
from dtback.io import write_json  # noqa: E402
from dtback.model.identity_flux import IdentityPreservingFlux  # noqa: E402
from dtback.model.memory import enable_checkpointing, make_adamw, quantize_base, weight_bytes  # noqa: E402

# Sizes that change; the input widths (latent channels, T5/CLIP widths, 512 text tokens) stay FLUX.1-dev's, so the
# FLOP count of adapter_overhead applies to every preset.
PRESETS = {
    "full": dict(FLUX_DEV),
    "scaled-down": {**FLUX_DEV, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 64,
                    "num_attention_heads": 4, "axes_dims_rope": (8, 28, 28)},
    "tiny": {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 32,
             "num_attention_heads": 2, "axes_dims_rope": (4, 14, 14)},
}
DEFAULT_SIZES = {"full": [512, 1024], "scaled-down": [256], "tiny": [64]}
MODES = {
    "base": dict(checkpointing=False, quantization=None, optimizer="adamw"),
    "checkpointing": dict(checkpointing=True, quantization=None, optimizer="adamw"),
    "int8": dict(checkpointing=True, quantization="int8", optimizer="adamw"),
    "int8_adamw8bit": dict(checkpointing=True, quantization="int8", optimizer="adamw8bit"),
}
# Dense bf16 tensor-core peak (TFLOP/s, no sparsity) by device name; the first match wins.
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("RTX 4090", 165.2)]


def device_peak_tflops(name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def cpu_name() -> str:
    model = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"CPU: {model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def build_transformer(params: dict, device: torch.device, dtype: torch.dtype, seed: int) -> FluxTransformer2DModel:
    """The transformer allocated once, directly on ``device`` in ``dtype``, with random weights: matrices
    N(0, 0.02), norm weights 1, biases 0 (the values only have to keep activations finite)."""
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the base dtype: no float32 copy, no cast afterwards
    try:
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**params)
    finally:
        torch.set_default_dtype(default_dtype)
    transformer = transformer.to_empty(device=device).requires_grad_(False).train()
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.02, generator=generator)
            else:
                param.fill_(0.0 if name.endswith("bias") else 1.0)
    return transformer


def random_inputs(size: int, batch: int, device: torch.device, dtype: torch.dtype, seed: int):
    """Transformer inputs of ``adapter_overhead`` filled with values: latents, text, ids on the latent grid."""
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device(device):
        inputs = transformer_inputs(FLUX_DEV, size, batch)
        identity = identity_inputs(batch)
    for key in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        inputs[key] = inputs[key].normal_(generator=generator).to(dtype)
    inputs["timestep"] = inputs["timestep"].uniform_(generator=generator).to(dtype)
    inputs["guidance"] = inputs["guidance"].fill_(3.5).to(dtype)
    side = size // 16
    rows, cols = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    inputs["img_ids"] = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(dtype)
    inputs["txt_ids"] = inputs["txt_ids"].zero_().to(dtype)
    for key in ("face_embeds", "body_pooled", "body_tokens"):
        setattr(identity, key, getattr(identity, key).normal_(generator=generator))
    target = torch.randn(inputs["hidden_states"].shape, generator=generator, device=device)
    return inputs, identity, target


def analytic_tflops(params: dict, sizes: list[int]) -> dict[int, dict]:
    """FLOPs per sample of the adapter step and the base step, counted on the meta device."""
    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**params).requires_grad_(False)
        model = identity_model(transformer)
        return {size: measure(transformer, model, size) for size in sizes}


def identity_model(transformer) -> IdentityPreservingFlux:
    """The default identity adapters and resamplers (real-FLUX layout) on ``transformer``."""
    return IdentityPreservingFlux.from_config(ModelConfig(use_simple_model=False), IdentityConfig(), transformer.config,
                                              face_dim=FACE_DIM, body_dim=BODY_DIM,
                                              body_token_dim=BODY_DIM).attach(transformer)


class StepRunner:
    """One training step with the adapters, and the same forward + backward through the base alone."""

    def __init__(self, transformer, model, optimizer, inputs, identity, target, autocast):
        self.transformer, self.model, self.optimizer = transformer, model, optimizer
        self.inputs, self.identity, self.target, self.autocast = inputs, identity, target, autocast

    def adapter_step(self) -> None:
        with self.autocast():
            prediction = self.model(identity=self.identity, **self.inputs)[0]
        F.mse_loss(prediction.float(), self.target).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def base_step(self) -> None:
        latents = self.inputs["hidden_states"].detach().requires_grad_(True)
        self.model.detach()
        try:
            with self.autocast():
                prediction = self.transformer(**{**self.inputs, "hidden_states": latents})[0]
            F.mse_loss(prediction.float(), self.target).backward()
        finally:
            self.model.attach(self.transformer)


def profile_step(runner: StepRunner, device: torch.device, title: str, path: Path) -> None:
    """Append torch.profiler's table of one adapter step (operators by self time, top 30) to ``path``: where the
    time of a step goes, for the MFU and adapter-overhead gaps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        runner.adapter_step()
        synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(f"=== {title}: one adapter step, sorted by {sort}\n{table}\n")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(fn, device: torch.device) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds of one call (on a shared CPU the latter ignores the waits)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start


def run_mode(transformer, model, mode: str, size: int, args, device, dtype, flops: dict) -> dict:
    """Warm up, measure peak memory, then time adapter and base steps interleaved; one result row."""
    spec = MODES[mode]
    row = {"size": size, "mode": mode, **spec, "batch": args.batch}
    if spec["checkpointing"]:
        enable_checkpointing(transformer, 1)
    elif transformer.gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    optimizer = make_adamw([{"params": list(model.parameters()), "lr": 1e-5}],
                           TrainingConfig(optimizer=spec["optimizer"]))
    inputs, identity, target = random_inputs(size, args.batch, device, dtype, args.seed)
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext)
    runner = StepRunner(transformer, model, optimizer, inputs, identity, target, autocast)
    try:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(max(1, args.warmup)):  # the first step creates the optimiser state: part of the peak
            runner.adapter_step()
        synchronize(device)
        row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        adapter_times, base_times = [], []
        for _ in range(max(1, args.warmup)):
            runner.base_step()
        for _ in range(args.steps):  # interleaved, so drift in the machine's speed hits both alike
            adapter_times.append(time_step(runner.adapter_step, device))
            base_times.append(time_step(runner.base_step, device))
        if args.profile:
            profile_step(runner, device, f"{size} px {mode}", Path(args.profile))
    except torch.cuda.OutOfMemoryError as err:
        row.update(status="out of memory", error=str(err).splitlines()[0])
        return row
    finally:
        del runner, optimizer
        model.zero_grad(set_to_none=True)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    seconds, base_seconds = (statistics.median(wall for wall, _ in times) for times in (adapter_times, base_times))
    if device.type == "cpu":
        row["cpu_seconds"], row["base_cpu_seconds"] = (statistics.median(cpu for _, cpu in times)
                                                       for times in (adapter_times, base_times))
    step_tflop = flops["adapter_train"] * args.batch
    achieved = step_tflop / seconds
    row.update(
        status="ok", seconds=seconds, seconds_all=[wall for wall, _ in adapter_times],
        samples_per_s=args.batch / seconds,
        step_tflop=step_tflop, achieved_tflops=achieved,
        mfu=achieved / args.peak_tflops if args.peak_tflops else None,
        base_seconds=base_seconds, base_seconds_all=[wall for wall, _ in base_times],
        base_step_tflop=flops["base_train"] * args.batch,
        adapter_overhead=seconds / base_seconds - 1,
    )
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), help="full (default on CUDA) or scaled-down (default "
                        "without CUDA); tiny: the test's smoke size")
    parser.add_argument("--scaled-down", action="store_true", help="same as --preset scaled-down")
    parser.add_argument("--sizes", type=int, nargs="+", help="image sides in px, multiples of 16")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median reported)")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--peak-tflops", type=float, help="device peak for MFU; default: by device name (GPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here (rewritten after every row)")
    parser.add_argument("--cudnn-attention", action="store_true", help="let attention use cuDNN (off, as in "
                        "training: its backward failed on an H100, see dtback.devices.attention_backends)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer's repeated blocks "
                        "(diffusers' compile_repeated_blocks; the first steps of each row compile)")
    parser.add_argument("--profile", help="append a torch.profiler table of one adapter step per row to this file")
    parser.add_argument("--time-limit", type=float, help="seconds: rows not started by then are recorded as skipped "
                        "(benchmarks/gpu_check.sh fits its window this way)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.scaled_down:
        args.preset = "scaled-down"
    args.preset = args.preset or ("full" if args.device.type == "cuda" else "scaled-down")
    args.sizes = args.sizes or DEFAULT_SIZES[args.preset]
    if any(size % 16 for size in args.sizes):
        parser.error(f"--sizes must be multiples of 16 (got {args.sizes})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with attention_backends(cudnn=args.cudnn_attention):
        return run(args)


def run(args: argparse.Namespace) -> int:
    device, params = args.device, PRESETS[args.preset]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    if args.peak_tflops is None and device.type == "cuda":
        args.peak_tflops = device_peak_tflops(device_name)
    started = time.perf_counter()
    flops = analytic_tflops(params, args.sizes)
    transformer = build_transformer(params, device, dtype, args.seed)
    torch.manual_seed(args.seed)
    model = identity_model(transformer).to(device)
    if args.compile:
        transformer.compile_repeated_blocks()
    results = {
        "preset": args.preset, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        "device": device_name, "peak_tflops": args.peak_tflops, "base_dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "cudnn_attention": args.cudnn_attention, "compile": args.compile,
        "base_parameters": sum(p.numel() for p in transformer.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters()),
        "base_weight_gb": weight_bytes(transformer) / 2**30, "rows": [],
    }
    quantized, longest_row = False, 0.0
    for mode in sorted(args.modes, key=lambda m: MODES[m]["quantization"] is not None):  # int8 is one way
        if MODES[mode]["quantization"] and not quantized and not args.compile:  # compiled: skipped below
            try:
                quantize_base(transformer, MODES[mode]["quantization"])
            except DtbackError as err:  # torchao missing: the int8 rows are reported as skipped, with the reason
                results["rows"] += [{"mode": m, "size": s, "status": f"skipped: {err}"} for m in args.modes
                                    if MODES[m]["quantization"] for s in args.sizes]
                break
            quantized = True
            results["base_weight_gb_int8"] = weight_bytes(transformer) / 2**30
        for size in args.sizes:
            elapsed = time.perf_counter() - started
            if args.time_limit is not None and elapsed + longest_row > args.time_limit:
                row = {"mode": mode, "size": size, "status": f"skipped: time limit ({elapsed:.0f} s + the longest "
                                                           f"row so far {longest_row:.0f} s > --time-limit "
                                                           f"{args.time_limit:.0f} s)"}
            elif args.compile and MODES[mode]["quantization"]:
                row = {"mode": mode, "size": size, "status": f"skipped: {COMPILE_WITH_QUANTIZATION}"}
            else:
                try:
                    row = run_mode(transformer, model, mode, size, args, device, dtype, flops[size])
                except DtbackError as err:  # bitsandbytes missing for adamw8bit
                    row = {"mode": mode, "size": size, "status": f"skipped: {err}"}
            longest_row = max(longest_row, time.perf_counter() - started - elapsed)
            results["rows"].append(row)
            print(format_row(row), flush=True)
            write_results(args.json, results, started)  # a run stopped from outside keeps the rows it finished
    results["seconds_total"] = time.perf_counter() - started
    print(f"{results['device']}, {args.preset} config ({results['base_parameters'] / 1e9:.3f} B base parameters, "
          f"{results['trainable_parameters'] / 1e6:.1f} M trainable), base {results['base_dtype']}, batch "
          f"{args.batch}, median of {args.steps} steps after {args.warmup}; {results['seconds_total']:.0f} s in all")
    print(markdown_table(results["rows"]))
    write_results(args.json, results, started)
    return 0


def write_results(path: str | None, results: dict, started: float) -> None:
    if path:
        results["seconds_total"] = time.perf_counter() - started
        write_json(Path(path), results, indent=2)


def format_row(row: dict) -> str:
    if row.get("status") != "ok":
        return f"{row['size']} px {row['mode']}: {row.get('status')}"
    memory = f"{row['peak_memory_gb']:.1f} GB" if row["peak_memory_gb"] is not None else "-"
    return (f"{row['size']} px {row['mode']}: {row['seconds']:.3f} s/step, {row['samples_per_s']:.2f} samples/s, "
            f"peak {memory}, {row['achieved_tflops']:.2f} TFLOP/s, adapter step / base step "
            f"{row['seconds'] / row['base_seconds']:.3f}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| px | mode | s/step | samples/s | peak GPU GB | TFLOP/step | TFLOP/s | MFU | base-only s | "
             "adapter step / base step | CPU s: adapter / base step |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if row.get("status") != "ok":
            lines.append(f"| {row['size']} | {row['mode']} | {row.get('status')} | | | | | | | | |")
            continue
        memory = f"{row['peak_memory_gb']:.1f}" if row["peak_memory_gb"] is not None else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        cpu = (f"{row['cpu_seconds']:.3f} / {row['base_cpu_seconds']:.3f} = "
               f"{row['cpu_seconds'] / row['base_cpu_seconds']:.3f}" if "cpu_seconds" in row else "-")
        lines.append(f"| {row['size']} | {row['mode']} | {row['seconds']:.3f} | {row['samples_per_s']:.2f} | {memory} | "
                     f"{row['step_tflop']:.3f} | {row['achieved_tflops']:.3f} | {mfu} | {row['base_seconds']:.3f} | "
                     f"{row['seconds'] / row['base_seconds']:.3f} | {cpu} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
