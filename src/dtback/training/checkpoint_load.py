"""Resuming from a checkpoint: read once, vetted before any work, restored into the live objects.

:func:`read_checkpoint` reads every file of a checkpoint (:mod:`dtback.training.checkpoint` writes them) and vets
what needs no live model: ``state.json`` of the form training wrote, every safetensors file readable (not truncated
by a full disk or a damaged copy) and finite (no NaN or infinite tensor), the EMA file present when ``state.json``
records an EMA and matching the trainable tensors. A damaged checkpoint is a :class:`CheckpointError` naming the
file and key. :func:`resume_point` picks the checkpoint a run continues from (a damaged newest one is skipped with a
warning, a folder of only damaged ones refused, nothing changed) and returns what it read: :func:`load_checkpoint`
restores exactly the tensors that were vetted, without reading them again, after checking their names and shapes
against the live model, and before any live object changes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dtback.errors import CheckpointError, DtbackError
from dtback.training.checkpoint import (
    CHECKPOINTS, Progress, first_non_finite, list_checkpoints, optimizer_order, set_rng_state,
    unflatten_optimizer_state,
)

logger = logging.getLogger(__name__)

# state.json's keys that load_checkpoint reads, and the JSON type each must have.
STATE_KEYS = {"progress": dict, "optimizer": dict, "scheduler": dict, "rng": dict}


@dataclass
class Checkpoint:
    """A checkpoint's files as read and vetted by :func:`read_checkpoint` (``shadow`` None: no EMA)."""

    folder: Path
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    opt_tensors: dict[str, torch.Tensor]
    shadow: list[torch.Tensor] | None

    @property
    def record(self) -> dict[str, Any]:
        """The config and training-data fingerprint it was written with (empty for older checkpoints)."""
        return self.state.get("record") or {}


def _read_state(folder: Path) -> dict[str, Any]:
    """``state.json`` as the JSON object :func:`load_checkpoint` needs; :class:`CheckpointError` naming the key
    (relative to ``folder``) else."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError("state.json is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"state.json is unreadable ({err})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"state.json is not a JSON object (got {type(state).__name__})")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind):
            got = "missing" if key not in state else type(state[key]).__name__
            raise CheckpointError(f"state.json: key {key!r} must be an object (got {got})")
    if "ema" not in state or not isinstance(state["ema"], (dict, type(None))):
        raise CheckpointError("state.json: key 'ema' must be an object or null")
    if not isinstance(state.get("record", {}), dict):
        raise CheckpointError("state.json: key 'record' must be an object")
    fields = set(Progress.__dataclass_fields__)
    unknown = sorted(set(state["progress"]) - fields)
    if unknown or not isinstance(state["progress"].get("step"), int):
        raise CheckpointError(f"state.json: key 'progress' must hold an integer 'step' and only {sorted(fields)} "
                              f"(got {sorted(state['progress'])})")
    opt = state["optimizer"]
    if not isinstance(opt.get("param_groups"), list) or not isinstance(opt.get("scalars"), dict):
        raise CheckpointError("state.json: key 'optimizer' must hold 'param_groups' (a list) and 'scalars' "
                              "(an object)")
    for key in ("python", "numpy", "torch"):
        if not isinstance(state["rng"].get(key), list):
            raise CheckpointError(f"state.json: key 'rng.{key}' must be a list")
    return state


def _read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    """The tensors of ``folder/name``, every floating one finite; :class:`CheckpointError` naming the file and the
    first bad key else."""
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{name} is missing")
    try:
        tensors = load_file(path)
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"{name} is unreadable ({err})") from err
    bad = first_non_finite(tensors)
    if bad is not None:
        raise CheckpointError(f"{name}: tensor {bad!r} holds NaN or infinite values")
    return tensors


def _read(folder: Path) -> Checkpoint:
    """:func:`read_checkpoint` with the message relative to ``folder``."""
    state = _read_state(folder)
    weights = _read_tensors(folder, "trainable.safetensors")
    opt_tensors = _read_tensors(folder, "optimizer.safetensors")
    for key in [*opt_tensors, *state["optimizer"]["scalars"]]:
        index, dot, _ = key.partition(".")
        if not (dot and index.isdigit()):
            raise CheckpointError(f"optimizer.safetensors: key {key!r} is not '<parameter index>.<name>'")
    shadow = None
    if state["ema"] is not None:
        if not (folder / "ema.safetensors").is_file():
            raise CheckpointError("ema.safetensors is missing (state.json records an EMA)")
        tensors = _read_tensors(folder, "ema.safetensors")
        if sorted(tensors) != sorted(str(i) for i in range(len(weights))):
            raise CheckpointError(f"ema.safetensors: keys must be 0..{len(weights) - 1}, one per trainable tensor "
                                  f"(got {len(tensors)} keys)")
        shadow = [tensors[str(i)] for i in range(len(tensors))]
        ema_shapes = sorted(tuple(t.shape) for t in shadow)
        if ema_shapes != sorted(tuple(t.shape) for t in weights.values()):
            odd = sorted(k for k, t in weights.items() if tuple(t.shape) not in ema_shapes)
            raise CheckpointError(f"trainable.safetensors and ema.safetensors disagree on tensor shapes "
                                  f"(e.g. {odd[:3] or 'counts'})")
    return Checkpoint(folder, state, weights, opt_tensors, shadow)


def read_checkpoint(folder: Path) -> Checkpoint:
    """Read and vet everything of the checkpoint ``folder`` that does not need the live model (see the module
    docstring; optimiser keys in their ``<index>.<name>`` form too). :class:`CheckpointError` naming the folder,
    file and key for the first problem."""
    try:
        return _read(Path(folder))
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {err}") from err


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None: it can), naming the file and key (relative to ``folder``)."""
    try:
        _read(Path(folder))
    except CheckpointError as err:
        return str(err)
    return None


def checkpoint_record(folder: Path) -> dict[str, Any]:
    """The config and training-data fingerprint a checkpoint was written with (empty for older checkpoints);
    reads ``state.json`` only."""
    try:
        record = _read_state(Path(folder)).get("record")
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {err}") from err
    return record or {}


def resumable_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` that reads and passes the checks, as read; a damaged newer one is
    skipped with a warning naming it and why (the previous good one is used)."""
    for folder in reversed(list_checkpoints(run_dir)):
        try:
            return _read(folder)
        except CheckpointError as err:
            logger.warning("checkpoint %s cannot be resumed from: %s; falling back to the one before it", folder, err)
    return None


def resume_point(run_dir: Path, resume) -> Checkpoint | None:
    """The checkpoint to resume from, read and vetted: ``auto`` the newest usable one of ``run_dir`` (a damaged
    newest one is skipped with a warning; checkpoints none of which is usable are refused, before any work), a path
    that checkpoint (refused, naming the problem, when it cannot be read); ``None`` none."""
    if resume is None:
        return None
    if resume == "auto":
        found = resumable_checkpoint(run_dir)
        damaged = list_checkpoints(run_dir)
        if found is None and damaged:  # starting at step 0 would overwrite them and best_model.pt
            raise CheckpointError(
                f"none of the checkpoints in {Path(run_dir) / CHECKPOINTS} can be resumed from "
                f"({', '.join(p.name for p in damaged)}: each damaged, see the warnings above); nothing was changed. "
                "To start over at step 0 in this folder, overwriting them, best_model.pt and the run's logs, rerun "
                "with --no-resume (resume=None from Python); to keep them, train into another output_dir."
            )
        return found
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise DtbackError(f"--resume {path}: not a checkpoint folder (no state.json)")
    try:
        return _read(path)
    except CheckpointError as err:
        raise DtbackError(f"--resume {path}: {err}; choose another checkpoint of {path.parent}") from err


def _fit_problem(contents: Checkpoint, trainable: dict[str, torch.nn.Parameter], ema) -> str | None:
    """Why the vetted ``contents`` do not fit the live trainable parameters (names, shapes) or EMA; None: they do."""
    missing = sorted(set(trainable) - set(contents.weights))
    if missing:
        return f"trainable.safetensors lacks trainable tensors {missing[:5]} (another model config?)"
    for name, param in trainable.items():
        if tuple(contents.weights[name].shape) != tuple(param.shape):
            return (f"trainable.safetensors: tensor {name!r} has shape {tuple(contents.weights[name].shape)}, the "
                    f"model's is {tuple(param.shape)}")
    if ema is None:
        return None
    if contents.shadow is None:
        return "state.json records no EMA but training.ema_decay is set"
    if len(contents.shadow) != len(trainable):
        return f"ema.safetensors holds {len(contents.shadow)} tensors, the model has {len(trainable)} trainable ones"
    for index, (name, param) in enumerate(trainable.items()):
        if tuple(contents.shadow[index].shape) != tuple(param.shape):
            return (f"ema.safetensors: tensor '{index}' ({name}) has shape {tuple(contents.shadow[index].shape)}, "
                    f"the model's is {tuple(param.shape)}")
    return None


@contextlib.contextmanager
def _not_fitting(folder: Path, key: str) -> Iterator[None]:
    """State of ``state.json``'s ``key`` that torch or diffusers refuse (other optimiser groups, EMA settings or RNG
    states of another form) becomes a :class:`CheckpointError` naming the file and key."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: state.json: key {key!r} does not fit "
                              f"this run ({type(err).__name__}: {err})") from err


def load_checkpoint(checkpoint: Checkpoint | Path, trainable: dict[str, torch.nn.Parameter], optimizer, scheduler,
                    ema, module=None) -> Progress:
    """Restore a checkpoint into live objects; returns the progress. ``checkpoint``: what :func:`read_checkpoint`
    (or :func:`resume_point`) read, or a folder to read now. ``module``: the FSDP-sharded training module (every
    rank then holds the full tensors and keeps its slices), None otherwise. Names and shapes are checked against
    ``trainable`` before any live object changes: a checkpoint that does not fit is a :class:`CheckpointError`
    naming the file and key."""
    contents = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    folder = contents.folder
    problem = _fit_problem(contents, trainable, ema)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {problem}")
    state, weights = contents.state, contents.weights
    optimizer_state = unflatten_optimizer_state(contents.opt_tensors, state["optimizer"])
    if module is None:
        with _not_fitting(folder, "optimizer"):  # checks its groups against the live ones: before the weights
            optimizer.load_state_dict(optimizer_state)
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(weights[name])
    else:
        from dtback.training import distributed  # noqa: PLC0415

        distributed.scatter_state(module, {name: weights[name] for name in trainable})
        distributed.scatter_optimizer(module, optimizer, optimizer_state, optimizer_order(module, optimizer))
    scheduler.load_state_dict(state["scheduler"])
    if ema is not None:
        shadows = contents.shadow
        if module is not None:
            from dtback.training import distributed  # noqa: PLC0415

            shadows = distributed.ema_shards(ema, list(trainable.values()), module, dict(zip(trainable, shadows)))
        with _not_fitting(folder, "ema"):
            ema.load_state_dict({**state["ema"], "shadow_params": shadows})
    with _not_fitting(folder, "rng"):
        set_rng_state(state["rng"])
    return Progress(**state["progress"])
