"""TensorBoard logging for the main training process: scalars and sample grids under ``<run>/tensorboard/``."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from PIL import Image

from dtback.viz.runlog import as_number

logger = logging.getLogger(__name__)


def scalar_value(value: Any) -> float | None:
    """A loggable float from a Python/numpy number or a one-element tensor/array, else ``None``."""
    number = as_number(value)
    if number is not None:
        return number
    if hasattr(value, "item") and getattr(value, "size", None) in (1, None) and not isinstance(value, (str, bytes)):
        try:
            item = value.item()
        except (ValueError, RuntimeError):  # more than one element
            return None
        return as_number(item)
    return None


class TensorBoardWriter:
    """A thin wrapper over ``torch.utils.tensorboard.SummaryWriter`` writing to ``<run_dir>/tensorboard``.

    Only the main process should create one. Values that are not numbers (``None``, strings) are left out of
    :meth:`log_scalars`; ``NaN`` is logged as is, because a NaN loss is worth seeing."""

    def __init__(self, run_dir: Path, flush_secs: int = 30) -> None:
        # Imported here so that reading reports never pays for importing torch.
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(run_dir) / "tensorboard"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs)
        self._closed = False

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> int:
        """Log every numeric entry of ``values`` (``step``/``epoch`` keys excepted) at ``step``; returns how many
        were logged."""
        logged = 0
        for tag, raw in values.items():
            if tag in ("step", "epoch"):
                continue
            value = scalar_value(raw)
            if value is None:
                logger.debug("tensorboard: %s=%r at step %d is not a number, left out", tag, raw, step)
                continue
            if not math.isfinite(value):
                logger.warning("tensorboard: %s is %s at step %d", tag, value, step)
            self._writer.add_scalar(tag, value, global_step=int(step))
            logged += 1
        return logged

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        """Log a PIL image (a sample grid) under ``tag`` at ``step``."""
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        self._writer.add_image(tag, pixels, global_step=int(step), dataformats="HWC")

    def flush(self) -> None:
        """Write pending events to disk now."""
        self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file; closing twice is harmless."""
        if not self._closed:
            self._writer.close()
            self._closed = True

    def __enter__(self) -> "TensorBoardWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
