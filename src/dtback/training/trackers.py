"""accelerate's trackers for a run (``training.log_with``): which to start, with the config as flat
hyper-parameters, and :class:`TrackerWrites`, through which losses, validation metrics and grids reach them from
:class:`dtback.training.setup.RunParts`; ``metrics.jsonl`` is written whatever the trackers."""

from __future__ import annotations

import json
import logging
from typing import Any

from accelerate import Accelerator
from PIL import Image

from dtback.config import Config
from dtback.errors import ConfigError
from dtback.io import WRITE_ERRORS, write_failure
from dtback.viz.runlog import as_number

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # accelerate's logging_dir in the run folder: tensorboard --logdir <run>/tensorboard
TRACKER_PROJECT = "dtback"  # project name for the trackers; TensorBoard writes <run>/tensorboard/<project>/


def tracker_names(cfg: Config) -> list[str] | None:
    """``training.log_with`` for ``Accelerator(log_with=...)``; None when it is empty. A named tracker whose package
    is not installed ends the run here, before any work (accelerate would leave it out with a debug line)."""
    names = list(cfg.training.log_with)
    if not names:
        return None
    from accelerate.tracking import get_available_trackers  # noqa: PLC0415

    installed = sorted(str(tracker) for tracker in get_available_trackers())
    missing = [name for name in names if name != "all" and name not in installed]
    if missing:
        raise ConfigError(
            f"training.log_with: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
            f"(pip install {' '.join(missing)}); installed trackers: {', '.join(installed) or 'none'}. Install it, "
            "or leave it out of training.log_with ([] logs to no tracker; metrics.jsonl is written anyway)"
        )
    return names


def flat_hparams(cfg: Config) -> dict[str, bool | int | float | str]:
    """The config as flat ``section.key`` scalars, the hyper-parameters the trackers store (TensorBoard's hparams
    take only bool/int/float/str): lists, null and empty mappings are written as JSON text."""
    flat: dict[str, bool | int | float | str] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (bool, int, float, str)):
                flat[prefix + key] = value
            else:
                flat[prefix + key] = json.dumps(value)

    walk(cfg.model_dump(mode="json"), "")
    return flat


def start_trackers(accelerator: Accelerator, cfg: Config) -> None:
    """Start the trackers of ``training.log_with`` on the main process (one run per tracker, as diffusers' scripts
    do), with the flat config as hyper-parameters; a tracker that cannot start ends the run before training."""
    if not accelerator.is_main_process or not accelerator.log_with:
        return
    try:
        accelerator.init_trackers(TRACKER_PROJECT, config=flat_hparams(cfg))
    except Exception as err:  # e.g. wandb without a login: a message, not a traceback mid-setup
        names = ", ".join(str(tracker) for tracker in accelerator.log_with)
        raise ConfigError(f"training.log_with: the trackers ({names}) could not start: {err}") from err


class TrackerWrites:
    """Numbers and images to the started trackers of ``accelerator`` (accelerate starts them on the main process
    only: elsewhere there are none, and nothing is written).

    A tracker is a copy of what the run folder keeps (``metrics.jsonl``, ``validation.jsonl``, ``samples/``), so a
    write it cannot make (one of :data:`dtback.io.WRITE_ERRORS`: a full disk, a folder made read-only; TensorBoard's
    writer thread raises it at the next write or flush) is a skip, counted in :attr:`skipped` (``summary.json``'s
    ``skipped_tracker_writes``) and warned about once per tracker naming its folder; training goes on and the
    other trackers still get every value. The next writes are tried again: a disk that has room again is written."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.skipped = 0
        self._warned: set[str] = set()
        self._step = 0

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        """The numbers among ``values`` at ``step`` (text and the like are left out). NaN is logged as is: a NaN
        loss is worth seeing."""
        numbers = {key: number for key, value in values.items() if (number := as_number(value)) is not None}
        if not numbers:
            return
        for tracker in self._trackers():
            self._write(tracker, step, lambda: tracker.log(numbers, step=step))

    def image(self, tag: str, image: Image.Image, step: int) -> None:
        """``image`` (a sample grid) to each tracker that takes images: TensorBoard through its writer, the others
        through their ``log_images`` (accelerate's mlflow, comet_ml, dvclive and trackio trackers take none)."""
        for tracker in self._trackers():
            if tracker.name == "tensorboard":
                self._write(tracker, step, lambda: _tensorboard_image(tracker.writer, tag, image, step))
            elif tracker.name in ("aim", "clearml"):  # one image per tag
                self._write(tracker, step, lambda: tracker.log_images({tag: image}, step=step))
            elif hasattr(tracker, "log_images"):  # wandb, swanlab: a list of images per tag
                self._write(tracker, step, lambda: tracker.log_images({tag: [image]}, step=step))

    def finish(self) -> None:
        """Finish every tracker now, also when the run failed (TensorBoard's events file flushed and closed, a wandb
        run ended); accelerate's ``end_training`` then finds none left to finish."""
        trackers, self.accelerator.trackers = self._trackers(), []
        for tracker in trackers:
            self._write(tracker, self._step, tracker.finish)

    def _trackers(self) -> list:
        return list(getattr(self.accelerator, "trackers", None) or ())

    def _write(self, tracker: Any, step: int, write) -> None:
        self._step = max(self._step, step)
        try:
            write()
        except WRITE_ERRORS as err:
            self.skipped += 1
            if tracker.name in self._warned:
                return
            self._warned.add(tracker.name)
            folder = getattr(tracker, "logging_dir", None) or "its folder"
            logger.warning("%s could not write to %s (%s): its writes are skipped from step %d on and training goes "
                           "on; metrics.jsonl, validation.jsonl and samples/ hold every number and grid "
                           "(summary.json: skipped_tracker_writes)", tracker.name, folder, write_failure(err), step)


def _tensorboard_image(writer: Any, tag: str, image: Image.Image, step: int) -> None:
    import numpy as np  # noqa: PLC0415

    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    writer.add_image(tag, pixels, global_step=step, dataformats="HWC")
    writer.flush()
