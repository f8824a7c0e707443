"""The training recipe: config → data → caches → model → accelerate loop → checkpoints, validation, report.

Read top to bottom: :func:`train` sets everything up once (:func:`setup`), then runs optimiser steps until
``max_steps`` (or ``num_epochs``). Devices, mixed precision, gradient accumulation and DDP come from
``accelerate``; the loop itself stays plain PyTorch. Every random draw of a step comes from a generator seeded by
``(seed, step, micro-batch, rank)``, and the data position is ``(epoch, batch)``, so a resumed run reproduces the
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from dtback import backends, devices
from dtback.config import Config
from dtback.errors import ConfigError, DatasetError, DtbackError, TrainingDiverged
from dtback.model.memory import apply_checkpointing, make_adamw
from dtback.training.batches import draw_pair_references, epoch_batches, make_batch
from dtback.training import distributed
from dtback.training.checkpoint import Progress, first_non_finite, latest_checkpoint, save_checkpoint, take_snapshot
from dtback.training.checkpoint_load import load_checkpoint, resume_point
from dtback.training.resume import (
    best_model_missing, check_batch_split, check_data, check_resume, prepare_run_folder, run_folder_lock,
    set_aside_damaged_best, write_run_config,
)
from dtback.training.setup import BEST_MODEL, TRAINED_BASE, RunParts, setup
from dtback.training.step import TrainModule, compute_loss, step_generator
from dtback.training.trackers import TENSORBOARD_DIR, start_trackers, tracker_names

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    best_model: Path | None
    last_checkpoint: Path | None
    interrupted: bool = False
    is_main: bool = True  # the process that writes (rank 0); the others return the same run


def mixed_precision(cfg: Config) -> str:
    """accelerate's ``mixed_precision`` for ``training.mixed_precision``. ``bf16`` on a CPU without bf16 in
    hardware (:func:`dtback.devices.cpu_has_native_bf16`) trains in float32, with a warning: torch would emulate
    bf16 there, slower than float32."""
    choice = cfg.training.mixed_precision
    if choice == "auto":
        return devices.auto_mixed_precision()
    if choice == "bf16" and not _has_gpu() and not devices.cpu_has_native_bf16():
        logger.warning("training.mixed_precision=bf16: this CPU has no bf16 instructions (AVX512-BF16 or AMX), "
                       "where bf16 autocast is slower than float32; training in float32")
        return "no"
    return choice


def make_optimizer(cfg: Config, parts: RunParts) -> torch.optim.Optimizer:
    t = cfg.training
    groups = [{"params": [p for p in parts.model.trainable_parameters() if p.requires_grad], "lr": t.learning_rate}]
    if parts.base_trainable:
        groups.append({"params": [p for p in parts.pipeline.transformer.parameters() if p.requires_grad],
                       "lr": t.base_learning_rate or t.learning_rate})
    return make_adamw(groups, t)


def check_distributed(cfg: Config, accelerator: Accelerator) -> None:
    """Before any work: the launch and ``training.distributed`` fit together (dtback.training.distributed)."""
    from accelerate.utils import DistributedType  # noqa: PLC0415

    if accelerator.distributed_type == DistributedType.FSDP:
        raise ConfigError("accelerate was launched with its own FSDP (distributed_type: FSDP); dtback shards the model "
                          "itself: launch with train/accelerate/ddp.yaml (or torchrun) and set "
                          "training.distributed=fsdp")
    if not distributed.fsdp_enabled(cfg.training.distributed, accelerator.num_processes):
        return
    untested = [key for key, on in (("model.base_quantization", cfg.model.base_quantization is not None),
                                    ("training.optimizer=adamw8bit", cfg.training.optimizer == "adamw8bit"),
                                    ("model.lora_rank", cfg.model.lora_rank > 0)) if on]
    if untested:
        raise ConfigError(f"training.distributed=fsdp is not combined with {', '.join(untested)} (not supported "
                          "yet): shard the bfloat16 base with fsdp, or use ddp with the memory modes")


# What gloo says in the ranks left waiting in a collective when another rank's process ends (its error stops it).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer")


def check_same_data(accelerator: Accelerator, fingerprint: str, images: int) -> None:
    """Every rank read the same training images (a file removed or damaged while the ranks set up, storage one
    machine sees otherwise): else every rank stops with the same message, before any step. Ranks with other data
    would train on other image lists under the same indices, silently, or wait on each other for ever."""
    if accelerator.num_processes < 2:
        return
    from accelerate.utils import gather_object  # noqa: PLC0415

    seen = gather_object([(accelerator.process_index, fingerprint, images)])
    if len({fp for _, fp, _ in seen}) > 1:
        ranks = ", ".join(f"rank {rank}: {n} images (fingerprint {fp})" for rank, fp, n in sorted(seen))
        raise DatasetError(
            f"the ranks read different training data from {accelerator.num_processes} processes ({ranks}): an image "
            "changed, went away or became unreadable while they set up, or the machines see other files under "
            "data.data_dir; nothing was trained. Make data.data_dir the same for every rank and run again "
            "(the warnings above name the images skipped)"
        )


def _has_gpu() -> bool:
    return devices.accelerator() is not None


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    return cfg.training.max_steps or cfg.training.num_epochs * steps_per_epoch


def train(cfg: Config, resume: str | Path | None = "auto", progress_bar: bool = True) -> TrainResult:
    """Train the identity adapters (and the simple model's transformer) as ``cfg`` says; see the module docstring.

    ``resume``: ``"auto"`` continues from the latest checkpoint in the run folder when there is one, a path
    continues from that checkpoint, ``None`` starts at step 0. cuDNN attention is off while it runs unless
    ``training.cudnn_attention`` (:func:`dtback.devices.attention_backends`).
    """
    cfg, note = backends.photo_backends(cfg)  # never the world's encoders on photos, from Python as from the CLI
    if note:
        logger.warning(note)
    with devices.attention_backends(cudnn=cfg.training.cudnn_attention):
        return _train(cfg, resume, progress_bar)


def _train(cfg: Config, resume: str | Path | None, progress_bar: bool) -> TrainResult:
    t = cfg.training
    # On a machine without any GPU, accelerate only joins the processes torchrun starts (gloo) when told cpu=True.
    # Adapters are skipped for samples without identity (dropout, no face), so some parameters get no gradient
    # in some steps: DDP must look for them.
    # Logs go to accelerate's trackers (training.log_with); TensorBoard's events to <run>/tensorboard/dtback/.
    output_dir = Path(cfg.output.output_dir)
    project = ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / TENSORBOARD_DIR))
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another precision:
    # a second run in the same process (a notebook, a sweep) starts from a fresh one. The process group
    # (PartialState) stays.
    AcceleratorState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision(cfg), gradient_accumulation_steps=t.gradient_accumulation_steps,
                              cpu=not _has_gpu(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
                              log_with=tracker_names(cfg), project_config=project)
    check_distributed(cfg, accelerator)
    main = accelerator.is_main_process
    if main:
        prepare_run_folder(output_dir)  # a file, a read-only folder: said now, before any work
    with run_folder_lock(output_dir) if main else contextlib.nullcontext():
        try:
            return _run(cfg, accelerator, resume, progress_bar)
        except RuntimeError as err:  # torch.distributed's DistBackendError is one
            if accelerator.num_processes > 1 and any(sign in str(err) for sign in PEER_GONE):
                raise DtbackError(f"another rank stopped (its own error is above, or in its log) while this one "
                                  f"waited for it; nothing more was trained ({PEER_GONE[0]})") from None
            raise


def _run(cfg: Config, accelerator: Accelerator, resume: str | Path | None, progress_bar: bool) -> TrainResult:
    """The run, holding the output folder's lock (see :func:`train`)."""
    t = cfg.training
    output_dir = Path(cfg.output.output_dir)
    # The resume point and the config it was trained with are checked before any work; the data once it is read.
    # config.yaml is written only after both checks: a refused resume leaves the run folder as it was.
    # The checkpoint is read and vetted once, here, and held until it is loaded below (adapters and optimiser
    # moments: small next to the base): the tensors vetted are the ones loaded.
    checkpoint = resume_point(output_dir, resume)
    start = checkpoint.folder if checkpoint is not None else None
    record = checkpoint.record if checkpoint is not None else {}
    harmless = check_resume(start, record.get("config"), cfg.model_dump(mode="json")) if start is not None else []
    if start is not None:
        check_batch_split(start, record, accelerator.num_processes, t.gradient_accumulation_steps)
    set_seed(cfg.seed)
    parts = setup(cfg, accelerator, progress_bar)
    data_fingerprint = parts.store.fingerprint()
    check_same_data(accelerator, data_fingerprint, len(parts.store))
    if start is not None:
        check_data(start, record.get("data"), data_fingerprint)
    if accelerator.is_main_process:
        write_run_config(cfg, parts.run_dir / "config.yaml")
        for change in harmless:
            logger.info("resume applies a changed setting: %s", change)
    parts.record = {"config": cfg.model_dump(mode="json"), "data": data_fingerprint, "ranks": accelerator.num_processes,
                    "micro_batches_per_step": accelerator.num_processes * t.gradient_accumulation_steps}
    start_trackers(accelerator, cfg)
    run_dir = parts.run_dir
    module = TrainModule(parts.pipeline.transformer, parts.model)
    sharded = distributed.fsdp_enabled(t.distributed, accelerator.num_processes)
    if sharded:  # before the optimiser: its parameters are the shards (dtback.training.distributed)
        distributed.shard(module, accelerator.mixed_precision)
    optimizer = make_optimizer(cfg, parts)
    world = accelerator.num_processes
    per_step = world * t.gradient_accumulation_steps
    batches_per_epoch = len(epoch_batches(parts.store, parts.train_images, t.batch_size, cfg.seed, 0))
    steps_per_epoch = max(1, batches_per_epoch // per_step)
    steps = total_steps(cfg, steps_per_epoch)
    scheduler = get_scheduler("cosine" if t.lr_scheduler == "cosine" else "constant_with_warmup", optimizer,
                              num_warmup_steps=t.warmup_steps, num_training_steps=steps)
    trainable = {name: p for name, p in module.named_parameters() if p.requires_grad}
    ema = EMAModel(list(trainable.values()), decay=t.ema_decay) if t.ema_decay is not None else None
    progress = Progress()
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, trainable, optimizer, scheduler, ema, module if sharded else None)
        checkpoint = None  # its tensors are in the live objects now: not held for the whole run
        if accelerator.is_main_process:  # a best model that no longer reads is replaced, not kept
            set_aside_damaged_best(run_dir / BEST_MODEL, run_dir / TRAINED_BASE if cfg.model.use_simple_model else None,
                                   progress)
        accelerator.print(f"resuming from {start} (step {progress.step})")
    if sharded:
        optimizer = accelerator.prepare(optimizer)
    else:
        module, optimizer = accelerator.prepare(module, optimizer)
    parts.sharded_module = module if sharded else None
    if ema is not None:
        ema.to(accelerator.device)
    apply_checkpointing(parts.pipeline.transformer, t)
    if t.compile:  # each FLUX block (with its adapter hook) becomes one compiled region; the first steps compile
        parts.pipeline.transformer.compile_repeated_blocks()
    stop = _StopFlag()
    bar = tqdm(total=steps, initial=progress.step, desc="training", unit="step",
               disable=not (progress_bar and accelerator.is_main_process))
    last_checkpoint = start
    validated_at = None  # the step last validated by this run
    timer = time.perf_counter()
    try:
        while progress.step < steps and not stop.requested:
            batches = epoch_batches(parts.store, parts.train_images, t.batch_size, cfg.seed, progress.epoch)
            usable = len(batches) - len(batches) % per_step
            if progress.batch >= usable:
                progress.epoch, progress.batch = progress.epoch + 1, 0
                continue
            group = batches[progress.batch:progress.batch + per_step]
            mine = group[accelerator.process_index::world]  # micro-batch m of this rank is group[rank + m * world]
            terms = _optimizer_step(cfg, accelerator, module, optimizer, scheduler, ema, trainable, parts, mine,
                                    progress)
            progress.step += 1
            progress.batch += per_step
            bar.update(1)
            if accelerator.is_main_process and (progress.step % t.log_every == 0 or progress.step == steps):
                elapsed, timer = time.perf_counter() - timer, time.perf_counter()
                terms.update(step=progress.step, epoch=progress.epoch, lr=scheduler.get_last_lr()[0],
                             it_per_s=t.log_every / elapsed if elapsed > 0 else 0.0)
                parts.log(terms)
                bar.set_postfix(loss=f"{terms['loss']:.4f}")
            validating = progress.step % t.validate_every == 0 or progress.step == steps
            saving = progress.step % t.checkpoint_every == 0 or progress.step == steps
            if validating or saving:
                _check_finite_weights(accelerator, trainable, ema, progress, run_dir)
            if validating:
                parts.validate(progress, ema, accelerator, list(trainable.values()))
                validated_at = progress.step
            if saving:
                last_checkpoint = _checkpoint(accelerator, run_dir, progress, parts, trainable, optimizer, scheduler,
                                              ema, t.keep_checkpoints) or last_checkpoint
        if not stop.requested and validated_at != progress.step and \
                best_model_missing(accelerator, run_dir / BEST_MODEL, bool(parts.val_set.characters)):
            _check_finite_weights(accelerator, trainable, ema, progress, run_dir)
            parts.validate(progress, ema, accelerator, list(trainable.values()))
        if stop.requested:
            _check_finite_weights(accelerator, trainable, ema, progress, run_dir)
            last_checkpoint = _checkpoint(accelerator, run_dir, progress, parts, trainable, optimizer, scheduler, ema,
                                          t.keep_checkpoints) or last_checkpoint
            logger.warning("interrupted: saved %s; continue with --resume", last_checkpoint)
    finally:
        bar.close()
        stop.restore()
        parts.close()
    accelerator.wait_for_everyone()
    if sharded:  # the whole weights live on no rank: rank 0 gathers them
        full = distributed.gather_state(module, trainable.__contains__, accelerator.is_main_process)
        if accelerator.is_main_process:
            logger.info("FSDP over %d ranks: final trainable weights sha256 %s", world, weights_digest(full))
    else:
        logger.info("rank %d of %d: final trainable weights sha256 %s", accelerator.process_index, world,
                    weights_digest(trainable))
    if accelerator.is_main_process:
        parts.finish(progress)
    accelerator.end_training()  # the trackers were finished by parts.close(); this ends the process group
    best = run_dir / BEST_MODEL
    return TrainResult(run_dir, progress.step, best if best.exists() else None, last_checkpoint, stop.requested,
                       accelerator.is_main_process)


def _optimizer_step(cfg, accelerator, module, optimizer, scheduler, ema, trainable, parts, mine, progress) -> dict:
    t = cfg.training
    totals: dict[str, float] = {}
    for micro, targets in enumerate(mine):
        references = [draw_pair_references(parts.store, target, cfg.data.min_references, cfg.data.max_references,
                                           cfg.seed, progress.epoch) for target in targets]
        batch = make_batch(parts.store, targets, references)
        # Keyed by the micro-batch's place in the step's group, so 2 ranks x 1 and 1 rank x 2 accumulation steps
        # draw the same noise for the same images (the same training, sharded or not).
        generator = step_generator(cfg.seed, progress.step, accelerator.process_index + micro * accelerator.num_processes)
        with accelerator.accumulate(module), accelerator.autocast(), \
                devices.cpu_bf16_attention(accelerator.device, accelerator.mixed_precision):
            out = compute_loss(module, batch, parts.store, t, parts.identity_loss, generator, accelerator.device,
                               parts.guidance, parts.scheduler_config,
                               with_identity_loss=progress.step % t.identity_loss_every == 0,
                               empirical_mu_steps=parts.empirical_mu_steps)
            bad = accelerator.reduce((~torch.isfinite(out.loss.detach())).float().reshape(1), "sum")
            if bad.item() > 0:  # any rank: all ranks stop together
                raise TrainingDiverged(
                    f"loss is {out.loss.item()} at step {progress.step + 1} (terms {out.terms}); stopped without "
                    f"saving. The last good checkpoint is {latest_checkpoint(parts.run_dir) or 'none'}: lower "
                    "training.learning_rate or raise training.warmup_steps, then resume from it."
                )
            accelerator.backward(out.loss)
            if accelerator.sync_gradients:
                if t.max_grad_norm is not None:
                    norm = accelerator.clip_grad_norm_(list(trainable.values()), t.max_grad_norm)
                    totals["grad_norm"] = float(norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        for key, value in out.terms.items():
            totals[key] = totals.get(key, 0.0) + value / len(mine)
    if ema is not None:
        ema.step(list(trainable.values()))
    return totals


def weights_digest(trainable: dict[str, torch.Tensor]) -> str:
    """Short sha256 of the trainable weights: equal on every rank of a healthy DDP run."""
    digest = hashlib.sha256()
    for name in sorted(trainable):
        digest.update(name.encode())
        digest.update(trainable[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _check_finite_weights(accelerator, trainable, ema, progress, run_dir) -> None:
    """Before validation or a checkpoint: the weights they would use (the EMA's when there is one) are finite on
    every rank, else :class:`TrainingDiverged` (all ranks stop together): ``best_model.pt`` and the checkpoints
    are never written from NaN or infinite weights (validation would score such a model's black images as a face
    not found, which can beat the old best)."""
    weights = dict(zip(trainable, ema.shadow_params)) if ema is not None else trainable
    bad = first_non_finite({name: tensor.detach() for name, tensor in weights.items()})
    flag = torch.tensor([0.0 if bad is None else 1.0], device=accelerator.device)
    if accelerator.reduce(flag, "sum").item() > 0:
        which, first = "EMA" if ema is not None else "trainable", bad or "on another rank"
        raise TrainingDiverged(
            f"the {which} weights hold NaN or infinite values at step {progress.step} (first: {first}); "
            f"stopped without validating or saving, best_model.pt kept (step {progress.best_step}). The last good "
            f"checkpoint is {latest_checkpoint(run_dir) or 'none'}: lower training.learning_rate or raise "
            "training.warmup_steps, then resume from it."
        )


def _checkpoint(accelerator, run_dir, progress, parts, trainable, optimizer, scheduler, ema, keep):
    path = None
    sharded = parts.sharded_module is not None
    if sharded or accelerator.is_main_process:  # under FSDP every rank takes part in gathering the shards
        snapshot = take_snapshot(parts.model, trainable, optimizer, ema, parts.sharded_module,
                                 accelerator.is_main_process)
    if accelerator.is_main_process:
        path = save_checkpoint(run_dir, progress, parts.model, snapshot, scheduler, keep, parts.record,
                               parts.trained_base(snapshot.trainable))
        logger.info("checkpoint %s", path)
    accelerator.wait_for_everyone()
    return path


class _StopFlag:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing this step, then saving a checkpoint")

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
