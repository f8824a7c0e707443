"""The one rule for ``auto`` devices and dtypes, used by every room (encoders, base, trainer, inference, evaluation).

- device ``auto``: the first accelerator torch finds (CUDA, then Apple MPS, then Intel XPU), else the CPU;
- dtype ``auto``: bfloat16 on a CUDA GPU where the caller allows low precision (real FLUX), float32 otherwise;
- mixed precision ``auto``: bf16 on a CUDA GPU that supports it, none elsewhere.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def accelerator() -> torch.device | None:
    """The first accelerator available (CUDA, MPS, XPU), or None on a CPU-only machine."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        return torch.device("xpu")
    return None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None): :func:`accelerator` or the CPU; anything else as torch reads it (``cpu``, ``cuda:1``)."""
    if name is None or name == "auto":
        return accelerator() or torch.device("cpu")
    return torch.device(name)


def available_device(name: str | None, flag: str = "--device") -> torch.device:
    """:func:`resolve_device`, refusing with :class:`DtbackError` (naming ``flag``) a device that cannot be named or
    that this machine does not have, before anything is loaded onto it."""
    from dtback.errors import DtbackError  # noqa: PLC0415

    try:
        device = resolve_device(name)
    except (RuntimeError, ValueError, TypeError) as err:
        raise DtbackError(f"{flag} {name!r} is not a device torch knows ({err}); use auto, cpu, cuda or cuda:N") from None
    found = _count(device.type)
    if device.type == "cpu":
        return device
    if found == 0:
        raise DtbackError(f"{flag} {name}: this machine has no {device.type} device; use auto or cpu")
    if device.index is not None and device.index >= found:
        raise DtbackError(f"{flag} {name}: this machine has {found} {device.type} device(s) "
                          f"({device.type}:0..{device.type}:{found - 1})")
    return device


def _count(kind: str) -> int:
    """How many devices of ``kind`` this machine has (0 for a kind torch does not support here)."""
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return 1 if mps is not None and mps.is_available() else 0
    module = getattr(torch, kind, None)
    available = getattr(module, "is_available", None)
    if available is None or not available():
        return 0
    count = getattr(module, "device_count", None)
    return count() if count is not None else 1


def resolve_dtype(name: str, device: str | torch.device = "cpu", low_precision_ok: bool = True) -> torch.dtype:
    """``auto``: bfloat16 on a CUDA device when ``low_precision_ok`` (weights made for it), else float32; a name
    (``float32``, ``bfloat16``, ``float16``) as given."""
    if name != "auto":
        return getattr(torch, name)
    on_gpu = torch.device(device).type == "cuda"
    return torch.bfloat16 if on_gpu and low_precision_ok else torch.float32


@contextlib.contextmanager
def attention_backends(cudnn: bool) -> Iterator[None]:
    """Inside, torch's cuDNN attention backend for ``scaled_dot_product_attention`` is on or off as ``cudnn`` says
    (flash and memory-efficient attention are left as they are); the previous setting is restored after.

    Training switches it off: on an H100 with torch 2.11 + CUDA 13.0 its backward gave NaN gradients on the world
    base and an illegal memory access on the FLUX.1-dev transformer at 512 px, while flash, memory-efficient and
    math attention trained both (benchmarks/README.md, GPU check of 2026-11-26). Without CUDA the switch is inert.
    """
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def auto_mixed_precision() -> str:
    """accelerate's ``mixed_precision`` for ``auto``: ``bf16`` on a CUDA GPU that supports it, else ``no``."""
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def cpu_bf16_attention(device: torch.device, mixed_precision: str):
    """The attention kernels of a training step: on a CPU under bf16 autocast, the math kernel (its backward is
    ~2x faster there than the CPU flash kernel's in bf16, benchmarks/README.md); elsewhere torch's choice."""
    if device.type == "cpu" and mixed_precision == "bf16":
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX), where bf16 autocast makes training
    faster; elsewhere torch emulates bf16 and float32 is the faster choice."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)
