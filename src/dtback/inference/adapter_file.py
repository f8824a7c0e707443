"""The adapter file a user hands ``dtback generate`` (``--model``), vetted before a base is loaded for it.

:func:`~dtback.model.identity_flux.read_adapter` reads what training writes; a file damaged or edited since ends
there in a traceback or, worse, in images: a safetensors file cut short, a config that is not UTF-8, a ``.pt``
whose ``state_dict`` holds lists (``weights_only`` unpickling lets plain Python containers through), NaN weights
(every image black), or blocks the recorded base does not have. :func:`read_checked_adapter` names each in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dtback.errors import AdapterMismatchError
from dtback.io import safetensors_problem
from dtback.model.identity_flux import LORA_PREFIX, WEIGHTS_FILE, AdapterSpec, IdentityPreservingFlux, read_adapter


def read_checked_adapter(path: Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """``read_adapter(path)`` (spec, state dict), or :class:`AdapterMismatchError` naming the file and the key that
    is wrong."""
    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path if path.suffix == ".safetensors" else None
    if weights is not None and weights.is_file():
        problem = safetensors_problem(weights)
        if problem:
            raise AdapterMismatchError(f"{weights}: {problem}; not a whole adapter (copy it again)")
    try:
        spec, state = read_adapter(path)
    except UnicodeDecodeError as err:  # the adapter_config.json of a folder
        raise AdapterMismatchError(f"{path}: the adapter config is not UTF-8 text ({err.reason} at byte "
                                   f"{err.start}); not a dtback adapter") from None
    _check_tensors(path, state)
    _check_blocks(path, spec)
    _check_shapes(path, spec, state)
    return spec, state


def _check_tensors(path: Path, state: dict[Any, Any]) -> None:
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise AdapterMismatchError(f"{path}: state_dict key {key!r} holds a {type(value).__name__}, not a tensor; "
                                       "not a dtback adapter")
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        more = f" (and {len(bad) - 1} more keys)" if len(bad) > 1 else ""
        raise AdapterMismatchError(f"{path}: key {bad[0]} holds NaN or infinite values{more}: a damaged adapter makes "
                                   "every image NaN; use an earlier checkpoint or an undamaged copy")


def _check_blocks(path: Path, spec: AdapterSpec) -> None:
    # attach() indexes the transformer's blocks with these; the base it records is compared with the real one later.
    for key, count_key, blocks in (("double_blocks", "num_layers", spec.double_blocks),
                                   ("single_blocks", "num_single_layers", spec.single_blocks)):
        count = spec.base.get(count_key)
        outside = [index for index in blocks if not isinstance(index, int) or count is None or not 0 <= index < count]
        if outside:
            raise AdapterMismatchError(f"{path}: adapter config {key} {list(blocks)} names blocks {outside} that its "
                                       f"base ({count_key} {count}) does not have; not a whole adapter")


def _check_shapes(path: Path, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> None:
    """The weights against the model their config builds, on the meta device (no memory, no base): loading would find
    the same mismatch only after the base is loaded, minutes for FLUX."""
    with torch.device("meta"):
        expected = IdentityPreservingFlux(spec).state_dict()
    own = {key: value for key, value in state.items() if not key.startswith(LORA_PREFIX)}
    wrong = [f"{key} {tuple(value.shape)} (the config makes {tuple(expected[key].shape)})"
             for key, value in own.items() if key in expected and value.shape != expected[key].shape]
    if wrong:
        raise AdapterMismatchError(f"{path}: weights of another shape than the adapter config: {'; '.join(wrong[:3])}"
                                   f"{' ...' if len(wrong) > 3 else ''}")
    missing, unexpected = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(f"{path}: weights do not match the adapter config (missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]})")
