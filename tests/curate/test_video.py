"""Video frame sampling: the time grid, frame limits, slow videos, broken files."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from dtback.curate.video import VideoError, is_video, sample_frames


def write_counter_video(path: Path, seconds: float, fps: int, size=(64, 48)) -> Path:
    """Frame i has brightness 10 * (i % 20), so a frame can be told from its pixels."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for i in range(int(seconds * fps)):
            pixels = np.full((size[1], size[0], 3), 10 * (i % 20), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def test_samples_follow_the_time_grid(tmp_path):
    video = write_counter_video(tmp_path / "clip.mp4", seconds=3, fps=10)
    frames = list(sample_frames(video, fps=2.0))
    assert [f.time for f in frames] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert all(f.pixels.shape == (48, 64, 3) and f.pixels.dtype == np.uint8 for f in frames)
    brightness = [int(round(f.pixels.mean() / 10)) for f in frames]
    assert brightness == [0, 5, 10, 15, 0, 5]  # frames 0, 5, 10, 15, 20, 25
    assert [f.time for f in sample_frames(video, fps=1.0, max_frames=2)] == [0.0, 1.0]


def test_a_video_slower_than_the_rate_gives_each_frame_once(tmp_path):
    video = write_counter_video(tmp_path / "slow.mkv", seconds=2, fps=2)
    assert [f.time for f in sample_frames(video, fps=5.0)] == [0.0, 0.5, 1.0, 1.5]


def test_broken_and_empty_videos_raise_video_error(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00\x01not a video" * 100)
    with pytest.raises(VideoError, match="garbage.mp4") as info:
        list(sample_frames(garbage, fps=1.0))
    assert info.value.frames == 0
    with pytest.raises(VideoError):
        list(sample_frames(tmp_path / "missing.mp4", fps=1.0))
    with pytest.raises(ValueError, match="fps"):
        list(sample_frames(garbage, fps=0))


def test_a_cut_off_video_keeps_the_frames_before_the_cut(tmp_path):
    video = write_counter_video(tmp_path / "cut.mkv", seconds=4, fps=10, size=(320, 240))  # index-free container
    data = video.read_bytes()
    video.write_bytes(data[: len(data) // 2])
    times = []
    try:
        for frame in sample_frames(video, fps=1.0):
            times.append(frame.time)
    except VideoError as err:
        assert err.frames == len(times)
    assert 1 <= len(times) < 4 and times[0] == 0.0  # some of the 4 samples, and no crash


def test_video_suffixes():
    assert is_video(Path("a/b.MP4")) and is_video(Path("x.mkv")) and is_video(Path("x.webm"))
    assert not is_video(Path("x.jpg")) and not is_video(Path("x"))
