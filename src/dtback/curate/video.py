"""Video frames for the dataset builder: decode a video with PyAV and sample frames at a fixed rate.

Sampling rule: with ``fps`` samples per second, sample ``k`` is the first decoded frame whose presentation time is
at or after ``k / fps`` seconds (times counted from the stream's first frame). A frame is used for one sample at
most, so a video slower than ``fps`` gives each of its frames once. Frames come out as ``(H, W, 3)`` uint8 RGB,
upright: a phone stores a portrait video as landscape frames with a rotation in the stream's display matrix, which
players apply; so does :func:`upright` here (PyAV's ``VideoFrame.rotation``, degrees counter-clockwise), or every
frame of such a video would reach the face detector sideways.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import numpy as np

from dtback.errors import VideoError

# Files with these suffixes are read as videos; everything else is tried as an image (decoded by content).
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts", ".3gp", ".ogv"}
)


@dataclass(frozen=True)
class Frame:
    """One sampled frame: ``time`` in seconds from the start of the stream, ``pixels`` (H, W, 3) uint8 RGB."""

    time: float
    pixels: np.ndarray


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def sample_frames(path: Path, fps: float, max_frames: int | None = None) -> Iterator[Frame]:
    """Yield frames of the first video stream of ``path`` at ``fps`` samples per second (see the module docstring).

    Raises :class:`VideoError` when the file is not a readable video or decoding fails part-way (frames yielded
    before the failure stay valid).
    """
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    yielded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(path, "no video stream")
            stream = container.streams.video[0]
            start: float | None = None
            next_time = 0.0
            for frame in container.decode(stream):
                if frame.time is None:
                    continue  # a frame without a timestamp cannot be placed on the sampling grid
                start = frame.time if start is None else start
                time = frame.time - start
                if time + 1e-6 < next_time:
                    continue
                pixels = upright(frame.to_ndarray(format="rgb24"), frame.rotation)  # the display matrix's
                yield Frame(time=round(time, 3), pixels=pixels)
                yielded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
                # The next sample is the first grid point after this frame, so slow videos skip no frames.
                next_time = (np.floor(time * fps + 1e-6) + 1) / fps
    except (av.error.FFmpegError, OSError) as err:  # PyAV's errors; OSError for missing or unreadable files
        raise VideoError(path, f"{type(err).__name__}: {err}", yielded) from None
    if yielded == 0:
        raise VideoError(path, "no decodable frames")


def upright(pixels: np.ndarray, rotation: float) -> np.ndarray:
    """``pixels`` (H, W, 3) turned ``rotation`` degrees counter-clockwise (a display matrix's rotation, as a player
    shows the frame), rounded to a quarter turn; a rotation that is no multiple of 90 degrees does not occur in phone
    videos, and a frame is not resampled for one."""
    turns = round(rotation / 90) % 4
    return np.ascontiguousarray(np.rot90(pixels, turns)) if turns else pixels

