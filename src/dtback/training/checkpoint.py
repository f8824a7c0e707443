"""Training checkpoints: atomic, resumable, tensors-only.

A checkpoint is a folder ``checkpoints/checkpoint-<step>`` holding

- ``adapter/`` — the identity adapter (:meth:`IdentityPreservingFlux.save_pretrained`: safetensors + JSON), whose
  config records the content fingerprint of the base it goes with: a co-trained simple base as it is at this step;
- ``trainable.safetensors`` — every trainable tensor by name (adapters, LoRA, and the simple model's transformer);
- ``optimizer.safetensors`` + ``ema.safetensors`` — optimiser moments and EMA weights as plain tensors;
- ``state.json`` — step, epoch, batch position, optimiser hyper-parameters, LR-scheduler state, RNG states, best
  metric so far.

It is written into a hidden temporary folder and renamed into place, so a kill (even SIGKILL) or a full disk never
leaves a torn checkpoint: a folder named ``checkpoint-*`` is complete. Reading one back, vetted, and restoring it
into the live objects is :mod:`dtback.training.checkpoint_load`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors.torch import save_file

from dtback.errors import CheckpointError
from dtback.io import WRITE_ERRORS, remove_stale_temporaries, replace_folder, write_failure, write_json
from dtback.model.flux import base_content_id

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


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor of ``tensors`` holding NaN or an infinity (None: all finite)."""
    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch's optimiser ``state_dict()`` as a checkpoint stores it: its tensors flat by ``<parameter index>.<name>``
    (``optimizer.safetensors``), and the rest, param groups and scalars by the same keys, as JSON (``state.json``);
    :func:`unflatten_optimizer_state` turns them back."""
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


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The optimiser ``state_dict()`` that :func:`flatten_optimizer_state` flattened into ``tensors`` and ``meta``."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        index, name = key.split(".", 1)
        node = state.setdefault(int(index), {})
        *parents, leaf = name.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# The names tests/model/test_memory.py still imports (another room's file): the same functions.
_optimizer_tensors, _optimizer_state = flatten_optimizer_state, unflatten_optimizer_state


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


def _trained_base_id(base: torch.nn.Module, scratch: Path) -> str:
    """The content fingerprint (:func:`~dtback.model.flux.base_content_id`) of a base folder holding the transformer
    ``base`` as it is now: saved into ``scratch`` as the run's ``base/`` would hold it, fingerprinted, removed."""
    base.save_pretrained(scratch / "transformer")
    try:
        return base_content_id(scratch)
    finally:
        shutil.rmtree(scratch)


@contextlib.contextmanager
def _recording_base(model, content_id: str | None) -> Iterator[None]:
    """While the block runs, ``model``'s adapter config records ``content_id`` as its base's fingerprint (None:
    the one it records)."""
    if content_id is None:
        yield
        return
    extra = model.spec.extra
    kept, extra.base_content_id = extra.base_content_id, content_id
    try:
        yield
    finally:
        extra.base_content_id = kept


def save_checkpoint(run_dir: Path, progress: Progress, model, snapshot: Snapshot, scheduler, keep: int,
                    record: dict[str, Any] | None = None, base: torch.nn.Module | None = None) -> Path:
    """Write ``checkpoint-<step>`` from ``snapshot`` atomically and delete all but the last ``keep``; returns the
    folder. ``model`` (the identity model) gives the adapter's config; ``record`` (the run's config and training
    data fingerprint, :mod:`dtback.training.resume`) goes into ``state.json``. ``base``: a co-trained base's
    transformer holding the snapshot's weights, whose fingerprint the adapter records (the ``base/`` of the best
    model is another step's, and a later checkpoint's adapter does not go with it); None: the base is frozen, and
    the adapter records what ``model`` does."""
    target = checkpoint_dir(run_dir, progress.step)
    try:
        # Folders of runs killed mid-save (hidden io temporaries) are removed once stale; a live save's are newer.
        remove_stale_temporaries(target.parent)
        # io.replace_folder: written under a hidden temporary name, files fsynced, swapped in whole (an existing
        # checkpoint of the same step is replaced only once the new one is complete); removed on any failure.
        with replace_folder(target) as tmp:
            content_id = _trained_base_id(base, tmp / "base") if base is not None else None
            with _recording_base(model, content_id):
                model.save_pretrained(tmp / "adapter", state=snapshot.adapter)
            save_file(snapshot.trainable, tmp / "trainable.safetensors")
            opt_tensors, opt_meta = flatten_optimizer_state(snapshot.optimizer)
            save_file(opt_tensors, tmp / "optimizer.safetensors")
            ema_meta = None
            if snapshot.ema is not None:
                ema_meta = {k: v for k, v in snapshot.ema.items() if k != "shadow_params"}
                save_file({str(i): t for i, t in enumerate(snapshot.ema["shadow_params"])}, tmp / "ema.safetensors")
            state = {"progress": asdict(progress), "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                     "ema": ema_meta, "rng": rng_state(), "record": record or {}}
            write_json(tmp / "state.json", state, indent=1, fsync=False)  # replace_folder fsyncs every file
    except WRITE_ERRORS as err:
        last = latest_checkpoint(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {target} ({write_failure(err)}); nothing torn was left. "
            f"The last good checkpoint is {last or 'none'}."
        ) from err
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target
