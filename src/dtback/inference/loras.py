"""The LoRA files users load on the base (``dtback generate --lora``): which file diffusers reads, and what in it
is refused before diffusers applies it.

diffusers applies a LoRA whose weights hold NaN or inf without a word, and every image after it is NaN (black); one
whose ``lora_A`` and ``lora_B`` of a layer disagree on the rank stops inside peft with a multi-line size mismatch
about peft's parameter names. :func:`check_lora_weights` reads the file first and names the file and its key.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dtback.errors import DtbackError

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
NOT_LORA_FILES = ("scheduler", "optimizer", "checkpoint")  # names diffusers passes over in a LoRA folder
# One layer's two halves: A/down (rank, in, ...) and B/up (out, rank, ...); diffusers/peft, kohya and XLabs keys.
HALF = re.compile(r"^(?P<layer>.+)\.(?P<half>lora_A|lora_B|lora_down|lora_up|down|up)(?P<rest>(\.\w+)?\.weight)$")
SIDE = {"lora_A": "A", "lora_down": "A", "down": "A", "lora_B": "B", "lora_up": "B", "up": "B"}
KIND = {"lora_A": "lora_A/B", "lora_B": "lora_A/B", "lora_down": "down/up", "lora_up": "down/up", "down": "xlabs",
        "up": "xlabs"}


def lora_weights_file(path: Path) -> Path | None:
    """The safetensors file of the LoRA at ``path``: the file itself, or in a folder the one diffusers picks
    (``pytorch_lora_weights.safetensors``, else its only ``.safetensors`` file). None for a pickled LoRA (a ``.bin``
    file, or a folder without safetensors files), which diffusers reads itself. Raises :class:`DtbackError` for a
    folder with several candidates, of which diffusers would load whichever the file system lists first."""
    if not path.is_dir():
        return path if path.suffix == ".safetensors" else None
    candidates = sorted(child.name for child in path.iterdir() if child.name.endswith(".safetensors")
                        and not any(word in child.name for word in NOT_LORA_FILES))
    if LORA_WEIGHT_NAME in candidates:
        return path / LORA_WEIGHT_NAME
    if len(candidates) > 1:
        raise DtbackError(f"LoRA folder {path} holds {len(candidates)} weight files ({', '.join(candidates)}): pass "
                          f"the file to load")
    return path / candidates[0] if candidates else None


def check_lora_weights(path: str | Path) -> Path | None:
    """Refuse the LoRA at ``path`` (a file or folder) when a tensor holds NaN/inf or a layer's ``lora_A``/``lora_down``
    rank (dim 0) is not its ``lora_B``/``lora_up`` rank (dim 1): a :class:`DtbackError` names the file and key.
    Returns the safetensors file that was checked (None: a pickled LoRA, not checked here). A file safetensors cannot
    read is left to diffusers, whose error names what is wrong with it."""
    path = Path(path)
    file = lora_weights_file(path)
    if file is None:
        logger.info("LoRA %s: pickled weights, loaded by diffusers without dtback's NaN and rank checks", path)
        return None
    try:
        handle = safe_open(str(file), framework="pt", device="cpu")
    except (OSError, SafetensorError) as err:
        logger.debug("LoRA %s: safetensors cannot read it (%s); diffusers will say why", file, err)
        return file
    halves: dict[str, dict[tuple[str, str], tuple[str, int, list[int]]]] = {"A": {}, "B": {}}
    non_finite: list[tuple[str, int, int]] = []
    with handle:
        for key in handle.keys():
            tensor = handle.get_tensor(key)
            bad = _non_finite(tensor)
            if bad:
                non_finite.append((key, bad, tensor.numel()))
            match = HALF.match(key)
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
    return file


def _non_finite(tensor: torch.Tensor) -> int:
    """How many NaN/inf values ``tensor`` holds (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    if tensor.element_size() == 1:  # torch has no isfinite for float8
        tensor = tensor.float()
    return int((~torch.isfinite(tensor)).sum())
