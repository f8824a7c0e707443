"""Training on several ranks: DDP (every rank holds the whole model) or FSDP (torch's FSDP2, ``fully_shard``: every
rank holds a 1/N slice of each parameter, gradient and optimiser moment), chosen by ``training.distributed``.

**Why dtback shards itself.** accelerate's own FSDP path is GPU-only (its state accepts ``distributed_type: FSDP``
only for GPU-like devices), so it cannot be tested on the CPU ranks of a laptop or CI; torch's ``fully_shard``
runs the same on GPUs (NCCL) and CPU ranks (gloo). accelerate still launches, places, casts (``autocast``) and
accumulates; under FSDP only the optimiser goes through ``accelerator.prepare`` and the module is sharded here.

**What is sharded.** One FSDP unit per FLUX transformer block (double and single), per identity adapter and for
the resampler, then the whole training module (the transformer's embedders and output layers, and the rest) as the
root. The frozen base and the trainable adapters are sharded alike; the optimiser, created after sharding, keeps
state only for its rank's slices. On GPUs the parameters are all-gathered in bfloat16 (or float16) under
``training.mixed_precision`` and gradients are reduced in float32 (:func:`shard`).

**Checkpoints stay whole.** Whatever the number of ranks, a checkpoint holds full tensors in the single-process
layout (:func:`gather_trainable`, :func:`gather_optimizer`, :func:`gather_ema`, all ranks taking part, rank 0
writing), so a run saved on 2 ranks resumes on 1 and the reverse, and ``best_model.pt`` is one file that
``dtback generate`` loads on one device. Loading (:func:`scatter_trainable`, ...) hands every rank the full tensors
read from disk and keeps its slice.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)


def fsdp_enabled(distributed: str, num_processes: int) -> bool:
    """FSDP only when asked for and there is more than one rank (one rank has nothing to shard across)."""
    return distributed == "fsdp" and num_processes > 1


def shard(module: nn.Module, mixed_precision: str) -> nn.Module:
    """Apply FSDP2 to the training module (:class:`dtback.training.step.TrainModule`) in place; see the module
    docstring for the units. Call before creating the optimiser: the parameters become sharded ``DTensor``s."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
    transformer, identity = module.transformer, module.identity_model
    units = [*transformer.transformer_blocks, *transformer.single_transformer_blocks,
             *identity.adapters.values(), identity.resampler]
    # FSDP2 warns whenever a unit returns a view (the blocks' token slices, a Linear's output): harmless unless the
    # caller modifies it in place, which neither diffusers' FLUX nor the adapter hooks do (out-of-place sums);
    # tests/training/test_fsdp.py checks the sharded run against one rank.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for unit in units:
        fully_shard(unit, mp_policy=policy)
    fully_shard(module, mp_policy=policy, reshard_after_forward=False)
    logger.info("FSDP: %d units + the root, mixed precision %s", len(units), dtype or "off")
    return module


def _options(**extra: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions  # noqa: PLC0415

    return StateDictOptions(**{"full_state_dict": True, "cpu_offload": True, **extra})


def gather_state(module: nn.Module, keep, main: bool) -> dict[str, torch.Tensor]:
    """Full CPU copies of the entries of ``module.state_dict()`` whose name ``keep(name)`` accepts (never the whole
    frozen base: 12 B parameters do not belong in a checkpoint). Every rank must call it (a sharded tensor is
    all-gathered, in the same order everywhere); ``main`` gets the tensors, the other ranks an empty dict."""
    from torch.distributed.tensor import DTensor  # noqa: PLC0415

    state = {}
    for name, tensor in module.state_dict().items():
        if not keep(name):
            continue
        if isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        if main:
            state[name] = tensor.detach().to("cpu", copy=True).contiguous()
    return state


def scatter_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full tensors (each rank passes the same ``state``, read from disk) into the sharded ``module``; names
    not in ``state`` keep their values."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict  # noqa: PLC0415

    set_model_state_dict(module, state, options=_options(strict=False, cpu_offload=False))


def gather_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, order: list[str]) -> dict[str, Any]:
    """The optimiser's full state in ``torch.optim``'s own layout (state keyed by the position of each parameter in
    ``order``, the parameter names in the single-process optimiser's order), on rank 0; {} elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict  # noqa: PLC0415

    full = get_optimizer_state_dict(module, optimizer, options=_options())
    if not full:
        return {}
    index = {name: i for i, name in enumerate(order)}
    groups = []
    for group in full["param_groups"]:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": [index[name] for name in group["params"]]})
    return {"state": {index[name]: value for name, value in full["state"].items()}, "param_groups": groups}


def scatter_optimizer(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                      order: list[str]) -> None:
    """Load a full optimiser state in ``torch.optim``'s layout (see :func:`gather_optimizer`) on every rank."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict  # noqa: PLC0415

    named = {"state": {order[int(i)]: value for i, value in state["state"].items()},
             "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                               "params": [order[int(i)] for i in group["params"]]} for group in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, named, options=_options(strict=False, cpu_offload=False))


@contextlib.contextmanager
def weights_swapped(ema, params: list[nn.Parameter]) -> Iterator[None]:
    """Inside, ``params`` hold the EMA weights (every rank: its slices), restored on exit."""
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def ema_shards(ema, params: list[nn.Parameter], module: nn.Module, shadow: dict[str, torch.Tensor]) -> list:
    """This rank's slices of the full EMA weights ``shadow`` (by parameter name), sharded like ``params``: loaded
    into the live parameters, copied out, then the live weights are put back."""
    ema.store(params)
    try:
        scatter_state(module, shadow)
        return [p.detach().clone() for p in params]
    finally:
        ema.restore(params)


@contextlib.contextmanager
def unsharded(module: nn.Module, enabled: bool) -> Iterator[None]:
    """Inside, the root unit's own parameters (the transformer's embedders and output layers) are whole, so the
    transformer can be called directly (validation sampling through the diffusers pipeline, which bypasses the
    training module's forward); the blocks, adapters and resampler gather themselves as they run."""
    if not enabled:
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()


def whole_pipeline(pipeline, transformer_state: dict[str, torch.Tensor]):
    """A copy of the diffusers ``pipeline`` whose transformer is an unsharded one holding ``transformer_state`` (the
    full weights gathered from the shards), for ``save_pretrained``; the other components are shared."""
    sharded = pipeline.transformer
    whole = type(sharded).from_config(sharded.config)
    whole.load_state_dict(transformer_state)  # copies into float32 parameters: the simple model's dtype
    return type(pipeline)(**{**pipeline.components, "transformer": whole})
