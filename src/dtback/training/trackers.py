"""accelerate's trackers for a run (``training.log_with``): which to start, with the config as flat
hyper-parameters. Losses, validation metrics and grids reach them from :class:`dtback.training.setup.RunParts`;
``metrics.jsonl`` is written whatever the trackers."""

from __future__ import annotations

import json

from accelerate import Accelerator

from dtback.config import Config
from dtback.errors import ConfigError

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
