"""Training checkpoints: atomic, resumable, tensors-only.

A checkpoint is a folder ``checkpoints/checkpoint-<step>`` holding

- ``adapter/`` — the identity adapter (:meth:`IdentityPreservingFlux.save_pretrained`: safetensors + JSON);
- ``trainable.safetensors`` — every trainable tensor by name (adapters, LoRA, and the simple model's transformer);
- ``optimizer.safetensors`` + ``ema.safetensors`` — optimiser moments and EMA weights as plain tensors;
- ``state.json`` — step, epoch, batch position, optimiser hyper-parameters, LR-scheduler state, RNG states, best
  metric so far.

It is written into a hidden temporary folder and renamed into place, so a kill (even SIGKILL) or a full disk never
leaves a torn checkpoint: a folder named ``checkpoint-*`` is complete. Nothing is unpickled when reading, and a
checkpoint damaged afterwards (a truncated file, a ``state.json`` of another form, NaN or infinite tensors, a
tensor of another shape, a missing EMA) is refused naming the file and key before any live object changes
(:func:`checkpoint_problem`, :func:`load_checkpoint`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from dtback.errors import CheckpointError
from dtback.io import remove_stale_temporaries, replace_folder, write_json

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class Progress:
    """Where training is: optimiser steps done, and the next batch to train on (``epoch``, ``batch``)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


CHECKPOINT_FILES = ("state.json", "trainable.safetensors", "optimizer.safetensors")
# state.json's keys that load_checkpoint reads, and the JSON type each must have.
STATE_KEYS = {"progress": dict, "optimizer": dict, "scheduler": dict, "rng": dict}


@dataclass
class _Contents:
    """A checkpoint's files as read and vetted by :func:`_read_checkpoint` (``shadow`` None: no EMA)."""

    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    opt_tensors: dict[str, torch.Tensor]
    shadow: list[torch.Tensor] | None


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of ``tensors`` holding NaN or an infinity (None: all finite)."""
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


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


def _read_checkpoint(folder: Path) -> _Contents:
    """Read and vet everything of a checkpoint that does not need the live model: ``state.json``'s structure,
    every tensor file readable and finite, the EMA file present when ``state.json`` says there is an EMA and
    matching the trainable tensors in count and shapes, optimiser keys in their ``<index>.<name>`` form.
    :class:`CheckpointError` (the message names the file and key, relative to ``folder``) for the first problem."""
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
    return _Contents(state, weights, opt_tensors, shadow)


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from (None: it can), naming the file and key: a file missing (the EMA's
    when ``state.json`` records one), ``state.json`` not the JSON object training wrote, a safetensors file that
    does not read (truncated by a full disk or a damaged copy), a tensor holding NaN or infinite values, EMA and
    trainable tensors that disagree. Reads the tensors once (what only the live model knows, the names and shapes
    it expects, :func:`load_checkpoint` checks)."""
    try:
        _read_checkpoint(Path(folder))
    except CheckpointError as err:
        return str(err)
    return None


def resumable_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of ``run_dir`` that :func:`checkpoint_problem` accepts; a damaged newer one is
    skipped with a warning naming it and why (the previous good one is used)."""
    for folder in reversed(list_checkpoints(run_dir)):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        logger.warning("checkpoint %s cannot be resumed from: %s; falling back to the one before it", folder, problem)
    return None


def checkpoint_record(folder: Path) -> dict[str, Any]:
    """The config and training-data fingerprint a checkpoint was written with (empty for older checkpoints)."""
    try:
        record = _read_state(Path(folder)).get("record")
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {err}") from err
    return record or {}


def _optimizer_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in _flat_items(values):
            if isinstance(value, torch.Tensor):  # a copy: safetensors refuses tensors that share memory (bnb's qmaps)
                tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _flat_items(values: dict, prefix: str = ""):
    """``(path, value)`` of a parameter's optimiser state; nested dicts (bitsandbytes' 8-bit AdamW keeps its
    quantized moments in one) become ``outer/inner`` paths."""
    for name, value in values.items():
        if isinstance(value, dict):
            yield from _flat_items(value, f"{prefix}{name}/")
        else:
            yield f"{prefix}{name}", value


def _optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        node = state.setdefault(int(index), {})
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict[str, Any]:
    state = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state()),
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


@dataclass
class Snapshot:
    """Everything a checkpoint stores of the live training objects, as full CPU tensors in the single-process
    layout whatever the number of ranks (:func:`take_snapshot`)."""

    adapter: dict[str, torch.Tensor]  # the identity model's adapter state (IdentityPreservingFlux.save_pretrained)
    trainable: dict[str, torch.Tensor]  # every trainable tensor by name
    optimizer: dict[str, Any]  # torch.optim's state_dict layout
    ema: dict[str, Any] | None  # EMAModel.state_dict(), shadow_params a list in ``trainable``'s order


def optimizer_order(module: torch.nn.Module, optimizer) -> list[str]:
    """The names of ``optimizer``'s parameters in its own order (the indices of its state dict)."""
    names = {id(param): name for name, param in module.named_parameters()}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    return [names[id(param)] for group in inner.param_groups for param in group["params"]]


def take_snapshot(identity, trainable: dict[str, torch.nn.Parameter], optimizer, ema, module=None,
                  main: bool = True) -> Snapshot | None:
    """The :class:`Snapshot` of a run: ``identity`` (the identity model), its ``trainable`` parameters by name, the
    optimiser and the EMA. Under FSDP, ``module`` is the sharded training module
    (:class:`~dtback.training.step.TrainModule`): every rank must call it (the shards are all-gathered) and only
    ``main`` gets the snapshot. Without ``module`` it reads the live objects (call it on the main process)."""
    from dtback.training import distributed  # noqa: PLC0415

    if module is None:
        ema_state = None
        if ema is not None:
            ema_state = ema.state_dict()
            ema_state["shadow_params"] = [t.detach().cpu().contiguous() for t in ema_state["shadow_params"]]
        return Snapshot(identity.adapter_state_dict(),
                        {k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                        optimizer.state_dict(), ema_state)
    keep = trainable.__contains__
    weights = distributed.gather_state(module, keep, main)
    own = distributed.gather_state(identity, lambda name: True, main)
    opt = distributed.gather_optimizer(module, getattr(optimizer, "optimizer", optimizer),
                                       optimizer_order(module, optimizer))
    ema_state = None
    if ema is not None:
        with distributed.weights_swapped(ema, list(trainable.values())):
            shadow = distributed.gather_state(module, keep, main)
        ema_state = {**{k: v for k, v in ema.state_dict().items() if k != "shadow_params"},
                     "shadow_params": [shadow[name] for name in trainable] if main else []}
    if not main:
        return None
    prefix = "transformer."
    transformer_state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    return Snapshot(identity.adapter_state_dict(own=own, transformer_state=transformer_state), weights, opt,
                    ema_state)


def save_checkpoint(run_dir: Path, progress: Progress, model, snapshot: Snapshot, scheduler, keep: int,
                    record: dict[str, Any] | None = None) -> Path:
    """Write ``checkpoint-<step>`` from ``snapshot`` atomically and delete all but the last ``keep``; returns the
    folder. ``model`` (the identity model) gives the adapter's config; ``record`` (the run's config and training
    data fingerprint, :mod:`dtback.training.resume`) goes into ``state.json``."""
    target = checkpoint_dir(run_dir, progress.step)
    try:
        # Folders of runs killed mid-save (hidden io temporaries) are removed once stale; a live save's are newer.
        remove_stale_temporaries(target.parent)
        # io.replace_folder: written under a hidden temporary name, files fsynced, swapped in whole (an existing
        # checkpoint of the same step is replaced only once the new one is complete); removed on any failure.
        with replace_folder(target) as tmp:
            model.save_pretrained(tmp / "adapter", state=snapshot.adapter)
            save_file(snapshot.trainable, tmp / "trainable.safetensors")
            opt_tensors, opt_meta = _optimizer_tensors(snapshot.optimizer)
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            ema_meta = None
            if snapshot.ema is not None:
                ema_meta = {k: v for k, v in snapshot.ema.items() if k != "shadow_params"}
                save_file({str(i): t for i, t in enumerate(snapshot.ema["shadow_params"])}, tmp / "ema.safetensors")
            state = {"progress": asdict(progress), "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                     "ema": ema_meta, "rng": rng_state(), "record": record or {}}
            write_json(tmp / "state.json", state, indent=1, fsync=False)  # replace_folder fsyncs every file
    except (OSError, SafetensorError) as err:  # a full disk reaches safetensors' writer as its own error type
        last = latest_checkpoint(run_dir)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CheckpointError(
            f"could not write checkpoint {target} ({reason}); nothing torn was left. "
            f"The last good checkpoint is {last or 'none'}."
        ) from err
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _fit_problem(contents: _Contents, trainable: dict[str, torch.nn.Parameter], ema) -> str | None:
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


def load_checkpoint(folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer, scheduler, ema,
                    module=None) -> Progress:
    """Restore everything :func:`save_checkpoint` wrote into live objects; returns the progress. ``module``: the
    FSDP-sharded training module (every rank then reads the full tensors and keeps its slices), None otherwise.
    Everything is read and checked (:func:`checkpoint_problem`, then names and shapes against ``trainable``)
    before any live object changes: a damaged checkpoint is a :class:`CheckpointError` naming the file and key."""
    folder = Path(folder)
    try:
        contents = _read_checkpoint(folder)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {err}") from err
    problem = _fit_problem(contents, trainable, ema)
    if problem is not None:
        raise CheckpointError(f"checkpoint {folder} cannot be resumed from: {problem}")
    state, weights = contents.state, contents.weights
    optimizer_state = _optimizer_state(contents.opt_tensors, state["optimizer"])
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
