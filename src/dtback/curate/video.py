"""Video frames for the dataset builder: decode a video with PyAV and sample frames at a fixed rate.

Sampling rule: with ``fps`` samples per second, sample ``k`` is the first decoded frame whose presentation time is
at or after ``k / fps`` seconds (times counted from the stream's first frame). A frame is used for one sample at
most, so a video slower than ``fps`` gives each of its frames once. Frames come out as ``(H, W, 3)`` uint8 RGB,
as a player shows them: a phone stores a portrait video as landscape frames with a rotation in the stream's display
matrix, which players apply, or every frame of such a video would reach the face detector sideways; a front camera's
video may also be mirrored there (the matrix's determinant is negative). :func:`display_turn` reads the rotation and
the mirror from the frame's display matrix and :func:`upright` applies them. PyAV's own ``VideoFrame.rotation`` is not
used: it reads a mirrored matrix as a rotation (a mirror left-right as 180 degrees, so the frame came out upside
down); checked on the eight orientations PyAV writes (``set_display_rotation`` with ``hflip`` / ``vflip``) against the
matrix applied to every pixel's coordinates. The matrix is read from the frame's side data, which PyAV 14.0 (the
oldest allowed) gives as well (it has no ``VideoFrame.rotation``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import av
import numpy as np
from av.sidedata.sidedata import Type as SideDataType

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
                pixels = upright(frame.to_ndarray(format="rgb24"), *display_turn(frame))
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


def display_turn(frame: av.VideoFrame) -> tuple[float, bool]:
    """``(rotation, mirrored)`` of ``frame``'s display matrix (:func:`matrix_turn`); ``(0, False)`` without one."""
    side = frame.side_data.get(SideDataType.DISPLAYMATRIX)
    if side is None:
        return 0.0, False
    return matrix_turn(np.frombuffer(bytes(side), dtype=np.int32))


def matrix_turn(matrix: Sequence[int]) -> tuple[float, bool]:
    """A display matrix (FFmpeg's 9 int32, ``(x', y') = (x, y, 1) M`` in 16.16 fixed point) as ``(rotation,
    mirrored)``: the frame is shown turned ``rotation`` degrees counter-clockwise, then mirrored left-right when
    ``mirrored``. A mirror turns the matrix's determinant negative; undoing it (negating the x' column, as
    ``av_display_matrix_flip`` does) leaves a pure rotation, read as ``av_display_rotation_get`` reads one. A matrix
    that is not 9 values or maps onto a line shows the frame as stored: ``(0, False)``."""
    if len(matrix) != 9:
        return 0.0, False
    a, b, c, d = (float(matrix[i]) for i in (0, 1, 3, 4))
    mirrored = a * d - b * c < 0
    if mirrored:
        a, c = -a, -c
    if math.hypot(a, c) == 0 or math.hypot(b, d) == 0:
        return 0.0, False
    return -math.degrees(math.atan2(b / math.hypot(b, d), a / math.hypot(a, c))), mirrored


def upright(pixels: np.ndarray, rotation: float, mirrored: bool = False) -> np.ndarray:
    """``pixels`` (H, W, 3) as a player shows them: turned ``rotation`` degrees counter-clockwise, rounded to a
    quarter turn (a rotation that is no multiple of 90 degrees does not occur in phone videos, and a frame is not
    resampled for one), then mirrored left-right when ``mirrored``."""
    turns = round(rotation / 90) % 4
    shown = np.rot90(pixels, turns) if turns else pixels
    if mirrored:
        shown = shown[:, ::-1]
    return np.ascontiguousarray(shown) if turns or mirrored else pixels

