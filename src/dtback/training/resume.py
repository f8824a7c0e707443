"""What a resumed run may change, and the run folder as a record.

A checkpoint stores the config it was trained with and a fingerprint of its training data (``state.json``). On
resume the new config is compared with it, key by key:

- **harmless** keys (:data:`HARMLESS`: how often to log, validate and checkpoint, the trackers, devices, caches, the
  number of ranks and how the step's micro-batches are spread over them) are applied, and each change is logged; the
  micro-batches of a step (ranks x ``training.gradient_accumulation_steps``) stay the checkpoint's
  (:func:`check_batch_split`);
- every other change (shapes, data, schedule, losses, seeds) would silently do something else than the run that
  wrote the checkpoint (a size mismatch at load, a learning rate that the restored scheduler ignores, another
  dataset under the same character names): the run is refused before any work, naming every such key with both
  values, and told how to start a new run instead.

The run's ``config.yaml`` is written only after these checks pass, so a refused resume leaves the folder as it was,
and only when it does not already hold the config (a resume with the run's own file keeps it byte for byte). A
resumed run's best model that no longer reads (``best_model.pt``, or a weight file of the simple model's ``base/``
beside it, e.g. cut short by a full disk) is named as damaged, renamed aside and written anew at the next validation
(:func:`set_aside_damaged_best`), or at the run's end when it has no step left to validate at
(:func:`best_model_missing`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterator

from dtback.config import Config, load_config
from dtback.errors import ConfigError, DtbackError
from dtback.io import WRITE_ERRORS, move_aside, output_problem, remove_stale_temporaries, write_failure
from dtback.model.flux import base_content_id, damaged_weights
from dtback.model.identity_flux import read_adapter
from dtback.training.checkpoint import CHECKPOINTS, Progress
from dtback.training.setup import BEST_MODEL, METRICS_FILE, VALIDATION_FILE

logger = logging.getLogger(__name__)

# Keys (``section.key``, or a section followed by a dot for all its keys) that a resume may change.
HARMLESS = (
    "training.log_every", "training.validate_every", "training.checkpoint_every", "training.keep_checkpoints",
    "training.num_val_characters", "training.val_sampling_steps", "training.val_guidance", "training.val_true_cfg",
    "training.log_with", "training.gradient_accumulation_steps", "training.distributed", "training.cudnn_attention",
    "training.gradient_checkpointing", "training.gradient_checkpointing_every", "training.compile", "identity.device",
    "identity.cache_dir", "data.scan_threads", "model.offload_after_cache", "output.",
    "data.data_dir",  # the folder may move: the training data's fingerprint (check_data) decides
)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    if not isinstance(node, dict):
        return {prefix.rstrip("."): node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}{key}."))
    return flat


def _harmless(key: str, config: dict[str, Any]) -> bool:
    if key == "training.val_sampling_steps" and config.get("model.base", "flux1") != "flux1":
        return False  # FLUX.2 training shifts its noise levels by the sampling step count (training.losses)
    return any(key == h or (h.endswith(".") and key.startswith(h)) for h in HARMLESS)


def compare(previous: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(harmless changes, refused changes) between two configs as JSON-able dicts, each ``key: old -> new``."""
    old, new = flatten(previous), flatten(current)
    harmless, refused = [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<absent>") == new.get(key, "<absent>"):
            continue
        line = f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}"
        (harmless if _harmless(key, new) else refused).append(line)
    return harmless, refused


NEW_RUN = ("Resuming would silently train something else. Put the old values back to continue, or start a new run "
           "in another output_dir (or --no-resume to start over here).")


def check_resume(checkpoint: Path | str, previous: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """Before any work: raise :class:`ConfigError` when the resumed run's config differs from the checkpoint's in
    anything but :data:`HARMLESS` keys; returns the harmless changes (to be logged). ``previous`` None: a
    checkpoint written before configs were recorded, nothing to compare."""
    if previous is None:
        return []
    harmless, refused = compare(previous, current)
    if refused:
        raise ConfigError(f"cannot resume {checkpoint}: the run was trained with another setting of "
                          f"{'; '.join(refused)}. {NEW_RUN}")
    return harmless


def _count(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 'es' if word.endswith('ch') else 's'}"


def check_batch_split(checkpoint: Path | str, record: dict[str, Any], ranks: int, accumulation: int) -> None:
    """Before any work: this launch's ``ranks`` x ``accumulation`` micro-batches per optimiser step must be the
    checkpoint's (``record``: its ``ranks`` and ``micro_batches_per_step``; absent in older checkpoints): the same
    global batch spread otherwise (8 GPUs -> 4 with twice the accumulation) trains the same run, another batch
    would not (and would move the epochs' step counts under the restored schedule)."""
    before, trained_ranks = record.get("micro_batches_per_step"), record.get("ranks")
    now = ranks * accumulation
    if not isinstance(before, int) or not isinstance(trained_ranks, int) or before == now:
        return
    fix = (f"set training.gradient_accumulation_steps to {before // ranks} on {_count(ranks, 'rank')}"
           if before % ranks == 0 else
           f"launch on {' or '.join(str(n) for n in range(1, before + 1) if before % n == 0)} ranks")
    raise ConfigError(
        f"cannot resume {checkpoint}: it was trained with {_count(before, 'micro-batch')} per optimiser step "
        f"({_count(trained_ranks, 'rank')} x training.gradient_accumulation_steps {before // trained_ranks}), this "
        f"launch gives {now} ({_count(ranks, 'rank')} x {accumulation}): {fix}. {NEW_RUN}")


def check_data(checkpoint: Path | str, before: str | None, now: str) -> None:
    """Once the dataset is read: the training data must be the checkpoint's (same images under the same names)."""
    if before is not None and before != now:
        raise ConfigError(f"cannot resume {checkpoint}: its training data had fingerprint {before}, this data_dir "
                          f"gives {now} (other images, or other pictures under the same names). {NEW_RUN}")


def write_run_config(cfg: Config, path: Path) -> None:
    """Write ``cfg`` to the run's ``config.yaml`` unless the file there already holds it (the same values once
    loaded): resuming with the run's own ``config.yaml`` keeps the user's comments and layout. A file that differs
    (a harmless change applied on resume) or does not load is rewritten whole."""
    if path.is_file():
        try:
            if load_config(path).model_dump(mode="json") == cfg.model_dump(mode="json"):
                return
        except (ConfigError, OSError) as err:  # edited by hand into something else, or made unreadable
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            logger.info("%s is rewritten: it does not load as a config (%s)", path, reason)
    try:
        cfg.save(path)
    except WRITE_ERRORS as err:
        raise DtbackError(f"could not write {path} ({write_failure(err)}): nothing was trained; free space or make "
                          f"{path.parent} writable, then run again") from err




def _best_model_problem(best: Path) -> str | None:
    if not best.exists():
        return None
    try:
        read_adapter(best)
    except (DtbackError, OSError, ValueError) as err:
        return str(err).removeprefix(f"{best}: ")
    return None


def _other_base(best: Path, base: Path | None) -> str | None:
    """Why the readable ``best`` model does not go with the whole ``base`` folder beside it (None: it does, or it
    records no base): a run stopped between writing ``base/`` and ``best_model.pt`` leaves the new base beside the
    older best model, whose own base is gone; a ``base`` that is missing is no base for it either."""
    if base is None or not best.is_file():
        return None
    bound = getattr(read_adapter(best)[0].extra, "base_content_id", None)
    if bound and not (base / "transformer" / "config.json").is_file():
        return "the base/ it was trained on is missing"
    found = base_content_id(base) if bound else None
    if not bound or bound == found:
        return None
    return (f"it was trained on a base of content fingerprint {bound[:16]}, base/ has {found[:16]}: a run stopped "
            "between writing base/ and best_model.pt")


def set_aside_damaged_best(best: Path, base: Path | None, progress: Progress) -> None:
    """On resume, before training: a ``best`` model file that does not read, or a ``base`` folder (the simple
    model's base the best model goes with) with a safetensors file that does not read whole, is named as damaged in
    one warning and renamed aside (:func:`dtback.io.move_aside`); so is a best model bound to another base than this
    whole ``base`` (:func:`_other_base`). Then ``progress`` forgets its best score, so the next
    validation writes a new best model (and ``base/``) instead of a damaged one being kept; nothing is deleted. A run
    resumed at its last step validates its final weights at its end for it (:func:`best_model_missing`)."""
    damaged = []  # (the path renamed aside, what is wrong with which file, why)
    problem = _best_model_problem(best)
    if problem is not None:
        damaged.append((best, f"{best} is damaged", problem))
    found = damaged_weights(base) if base is not None and base.is_dir() else None
    if found is not None:
        damaged.append((base, f"{found[0]} is damaged", found[1]))
    elif problem is None and (other := _other_base(best, base)) is not None:
        damaged.append((best, f"{best} does not go with {base}", other))
    for path, what, why in damaged:
        aside = move_aside(path)
        logger.warning("%s (%s): %s renamed to %s, the next validation writes a new best model%s", what, why,
                       path.name, aside.name, " and base/" if path == base else "")
    if damaged:
        progress.best_metric = progress.best_step = None


def best_model_missing(accelerator, best: Path, validates: bool) -> bool:
    """Whether a run that ``validates`` has no ``best`` model file (the main process looks; every rank gets its
    answer). The trainer then validates the final weights at the run's end, which makes them the best model: a run
    resumed at its last step whose best model was damaged and set aside has no step left to validate at, and would
    otherwise end with none."""
    if not validates:
        return False
    missing = accelerator.is_main_process and not best.exists()
    if accelerator.num_processes < 2:
        return missing
    from accelerate.utils import broadcast_object_list  # noqa: PLC0415

    return bool(broadcast_object_list([missing])[0])


LOCK_FILE = ".dtback.lock"
# The files a run writes in its folder: a folder or device in the place of one stopped the run at its first write
# (after the caches were built, or steps trained); and what it writes into in place (appended logs, the lock, the
# checkpoints' folder), which a folder copied from another user may not let it write.
RUN_FILES = ("config.yaml", METRICS_FILE, VALIDATION_FILE, "summary.json", BEST_MODEL, LOCK_FILE)
WRITTEN_IN_PLACE = (METRICS_FILE, VALIDATION_FILE, LOCK_FILE, CHECKPOINTS)


def prepare_run_folder(run_dir: Path) -> None:
    """Before any work: ``run_dir`` can be a run folder (not a file, not inside one, writable, and so are the files
    and folders in it that the run writes: :data:`RUN_FILES`, :data:`WRITTEN_IN_PLACE`); clear message else."""
    problem = output_problem(run_dir, "folder")
    if problem is not None:
        raise ConfigError(f"output.output_dir: {problem}")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"output.output_dir {run_dir} cannot be created: {err.strerror or err}") from err
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise ConfigError(f"output.output_dir {run_dir} is not writable by this user: choose another folder")
    for name in RUN_FILES:
        problem = output_problem(run_dir / name, "file")
        if problem is not None:
            raise ConfigError(f"output.output_dir: {problem.split(': name a file')[0]}: the run writes its {name} "
                              "there; move it away, or train into another output_dir")
    for name in WRITTEN_IN_PLACE:
        path = run_dir / name
        if path.exists() and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            raise ConfigError(f"output.output_dir: {path} is not writable by this user (the run writes into it): "
                              "make it writable, or train into another output_dir")


@contextlib.contextmanager
def run_folder_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``run_dir`` while a run writes into it (``fcntl.flock`` on ``.dtback.lock``, let go
    by the system when the process ends, even by SIGKILL): a second run into the same folder stops at once, naming
    the process that holds it. Holding it, every io temporary left in the folder by a killed run is stale and
    removed (``.tmp-checkpoint-*``, a half-copied ``base``)."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # not POSIX: no lock, nothing else changes
        yield
        return
    path = Path(run_dir) / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ConfigError(f"output.output_dir {run_dir} is in use by a running training ({holder}); wait for it "
                              "to end, or train into another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        removed = sum(remove_stale_temporaries(folder, older_than=0.0)
                      for folder in (run_dir, run_dir / CHECKPOINTS))
        if removed:
            logger.info("removed %d temporary files or folders left in %s by an interrupted run", removed, run_dir)
        yield
    finally:
        handle.close()
