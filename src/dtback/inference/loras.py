"""The LoRA files users load on the base (``dtback generate --lora``): which file diffusers reads, and what in it
is refused before diffusers applies it.

diffusers applies a LoRA whose weights hold NaN or inf without a word, and every image after it is NaN (black); one
whose ``lora_A`` and ``lora_B`` of a layer disagree on the rank stops inside peft with a multi-line size mismatch
about peft's parameter names. :func:`check_lora_weights` reads the file first and names the file and its key.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dtback.errors import DtbackError
from dtback.io import safetensors_problem
from dtback.model.adapter_file import TORCH_LOAD_ERRORS, non_finite_count

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
LORA_PICKLE_NAME = "pytorch_lora_weights.bin"  # diffusers' LORA_WEIGHT_NAME: its choice in a folder of no safetensors
NOT_LORA_FILES = ("scheduler", "optimizer", "checkpoint")  # names diffusers passes over in a LoRA folder
# One layer's two halves: A/down (rank, in, ...) and B/up (out, rank, ...); diffusers/peft, kohya and XLabs keys.
HALF = re.compile(r"^(?P<layer>.+)\.(?P<half>lora_A|lora_B|lora_down|lora_up|down|up)(?P<rest>(\.\w+)?\.weight)$")
SIDE = {"lora_A": "A", "lora_down": "A", "down": "A", "lora_B": "B", "lora_up": "B", "up": "B"}
KIND = {"lora_A": "lora_A/B", "lora_B": "lora_A/B", "lora_down": "down/up", "lora_up": "down/up", "down": "xlabs",
        "up": "xlabs"}


def lora_weights_file(path: Path) -> Path:
    """The weights file of the LoRA at ``path`` that diffusers reads: the file itself, or in a folder the one diffusers
    picks (``pytorch_lora_weights.safetensors``, else its only ``.safetensors`` file, else
    ``pytorch_lora_weights.bin``). Raises :class:`DtbackError` for a folder with several candidates, of which
    diffusers would load whichever the file system lists first, and for a folder with none."""
    if not path.is_dir():
        return path
    candidates = sorted(child.name for child in path.iterdir() if child.name.endswith(".safetensors")
                        and not any(word in child.name for word in NOT_LORA_FILES))
    if LORA_WEIGHT_NAME in candidates:
        return path / LORA_WEIGHT_NAME
    if len(candidates) > 1:
        raise DtbackError(f"LoRA folder {path} holds {len(candidates)} weight files ({', '.join(candidates)}): pass "
                          f"the file to load")
    if candidates:
        return path / candidates[0]
    if (path / LORA_PICKLE_NAME).is_file():
        return path / LORA_PICKLE_NAME
    raise DtbackError(f"LoRA folder {path} holds no LoRA weights (no .safetensors file, no {LORA_PICKLE_NAME}): "
                      "pass the LoRA file")


def check_lora_weights(path: str | Path) -> Path:
    """Refuse the LoRA at ``path`` (a file or folder) when a tensor holds NaN/inf or a layer's ``lora_A``/``lora_down``
    rank (dim 0) is not its ``lora_B``/``lora_up`` rank (dim 1): a :class:`DtbackError` names the file and key.
    A safetensors file cut short and a pickled file (``.bin``, ``.pt``) holding anything but tensors (read with
    ``weights_only``: never unpickled as Python objects) are refused too. Returns the file that was checked, the
    one diffusers is to load. A safetensors file whose whole header and size are right but safetensors cannot read
    is left to diffusers, whose error names what is wrong with it."""
    path = Path(path)
    file = lora_weights_file(path)
    if file.suffix == ".safetensors":
        problem = safetensors_problem(file)
        if problem:
            raise DtbackError(f"LoRA {file}: {problem}")
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except (OSError, SafetensorError) as err:
            logger.debug("LoRA %s: safetensors cannot read it (%s); diffusers will say why", file, err)
            return file
        with handle:
            _check_tensors(file, ((key, handle.get_tensor(key)) for key in handle.keys()))
        return file
    _check_tensors(file, _pickled_tensors(file).items())
    return file


def _pickled_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled LoRA, read as diffusers reads it (``weights_only``), or a one-line refusal."""
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:  # a foreign, torn or hostile pickle
        # torch's weights_only refusal runs to a page and suggests weights_only=False, which dtback never does
        first = (str(err).strip().splitlines() or [""])[0][:200]
        why = "damaged, or it holds Python objects beyond tensors, which dtback never unpickles" \
            if isinstance(err, pickle.UnpicklingError) else f"{type(err).__name__}: {first}".rstrip(": ")
        raise DtbackError(f"LoRA {file}: not a tensors-only LoRA file ({why}); a .safetensors file is safest") from None
    if not isinstance(payload, dict):
        raise DtbackError(f"LoRA {file}: holds a {type(payload).__name__}, not a mapping of LoRA tensors")
    for key, value in payload.items():
        if not isinstance(value, torch.Tensor):
            raise DtbackError(f"LoRA {file}: key {key!r} holds a {type(value).__name__}, not a tensor; not a LoRA")
    return payload


def _check_tensors(file: Path, tensors) -> None:
    """NaN/inf values and rank mismatches in ``tensors`` ((key, tensor) pairs), named with ``file``."""
    halves: dict[str, dict[tuple[str, str], tuple[str, int, list[int]]]] = {"A": {}, "B": {}}
    non_finite: list[tuple[str, int, int]] = []
    for key, tensor in tensors:
        bad = non_finite_count(tensor)
        if bad:
            non_finite.append((key, bad, tensor.numel()))
        match = HALF.match(key) if isinstance(key, str) else None
        if match and tensor.dim() >= 2:
            side = SIDE[match["half"]]
            rank = tensor.shape[0] if side == "A" else tensor.shape[1]
            halves[side][(match["layer"], KIND[match["half"]] + match["rest"])] = (key, rank, list(tensor.shape))
    if non_finite:
        key, bad, numel = non_finite[0]
        more = f" (and {len(non_finite) - 1} more keys)" if len(non_finite) > 1 else ""
        raise DtbackError(f"LoRA {file}: key {key} holds {bad} NaN/inf of {numel} values{more}: a diverged or "
                          f"damaged LoRA would make every image NaN; use an earlier or undamaged file")
    for layer, (a_key, a_rank, a_shape) in sorted(halves["A"].items()):
        b_key, b_rank, b_shape = halves["B"].get(layer, (None, a_rank, None))
        if b_rank != a_rank:
            raise DtbackError(f"LoRA {file}: key {a_key} has rank {a_rank} (shape {a_shape}) but {b_key} has rank "
                              f"{b_rank} (shape {b_shape}): one layer's lora_A and lora_B must share the rank")
