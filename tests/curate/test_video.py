"""Video frame sampling: the time grid, frame limits, slow videos, broken files."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from dtback.curate.video import VideoError, is_video, matrix_turn, sample_frames, upright


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


def write_marked_video(path: Path, rotation: int | None, size=(64, 48), hflip: bool = False,
                       vflip: bool = False) -> Path:
    """Two frames, white in their top-left 16 x 8 px corner and black elsewhere, stored with ``rotation`` (degrees
    counter-clockwise) in the stream's display matrix, as a phone stores a portrait video's landscape frames, and
    mirrored after it when ``hflip`` (left-right) or ``vflip`` (top-bottom)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=2)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        if rotation is not None:
            stream.set_display_rotation(rotation, hflip=hflip, vflip=vflip)
        pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
        pixels[:8, :16] = 255
        for _ in range(2):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def _bright_corner(pixels: np.ndarray) -> str:
    corners = {"top-left": pixels[:4, :4], "top-right": pixels[:4, -4:], "bottom-left": pixels[-4:, :4],
               "bottom-right": pixels[-4:, -4:]}
    return max(corners, key=lambda name: corners[name].mean())


@pytest.mark.parametrize(("rotation", "shape", "corner"), [
    (None, (48, 64, 3), "top-left"),
    (90, (64, 48, 3), "bottom-left"),  # turned a quarter counter-clockwise, as a player shows it
    (-90, (64, 48, 3), "top-right"),  # an iPhone portrait video's "rotation of -90 degrees": a quarter clockwise
    (180, (48, 64, 3), "bottom-right"),
])
def test_a_video_rotated_in_its_metadata_comes_out_upright(tmp_path, rotation, shape, corner):
    frames = list(sample_frames(write_marked_video(tmp_path / "phone.mp4", rotation), fps=2.0))
    assert len(frames) == 2 and all(frame.pixels.shape == shape for frame in frames)
    assert all(_bright_corner(frame.pixels) == corner for frame in frames)
    assert frames[0].pixels.flags["C_CONTIGUOUS"]


def test_upright_rounds_a_rotation_to_a_quarter_turn():
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    assert upright(pixels, 0) is pixels and upright(pixels, 44.0) is pixels
    np.testing.assert_array_equal(upright(pixels, 90), np.rot90(pixels, 1))
    np.testing.assert_array_equal(upright(pixels, -90), np.rot90(pixels, 3))
    np.testing.assert_array_equal(upright(pixels, 270), np.rot90(pixels, 3))
    np.testing.assert_array_equal(upright(pixels, -180), np.rot90(pixels, 2))
    np.testing.assert_array_equal(upright(pixels, 91.0), np.rot90(pixels, 1))


@pytest.mark.parametrize(("rotation", "hflip", "vflip", "shape", "corner"), [
    (0, True, False, (48, 64, 3), "top-right"),  # a front camera's mirror: PyAV's rotation says -180 (upside down)
    (0, False, True, (48, 64, 3), "bottom-left"),
    (90, True, False, (64, 48, 3), "bottom-right"),  # turned a quarter counter-clockwise (bottom-left), mirrored
    (-90, True, False, (64, 48, 3), "top-left"),  # a quarter clockwise (top-right), mirrored
    (90, False, True, (64, 48, 3), "top-left"),  # a quarter counter-clockwise (bottom-left), mirrored top-bottom
    (180, True, False, (48, 64, 3), "bottom-left"),
])
def test_a_video_mirrored_in_its_metadata_comes_out_as_a_player_shows_it(tmp_path, rotation, hflip, vflip, shape,
                                                                         corner):
    """Display matrices with a mirror (written by PyAV's set_display_rotation with hflip / vflip): the frames come out
    turned, then mirrored, as the matrix applied to each pixel's coordinates shows them (checked for all 16
    combinations of 0/90/180/-90 degrees and the two flips when this was written)."""
    video = write_marked_video(tmp_path / "selfie.mp4", rotation, hflip=hflip, vflip=vflip)
    frames = list(sample_frames(video, fps=2.0))
    assert len(frames) == 2 and all(frame.pixels.shape == shape for frame in frames)
    assert all(_bright_corner(frame.pixels) == corner for frame in frames)
    assert frames[0].pixels.flags["C_CONTIGUOUS"]


def test_matrix_turn_reads_rotation_and_mirror_and_refuses_what_is_not_a_display_matrix():
    one = 1 << 16
    assert matrix_turn([one, 0, 0, 0, one, 0, 0, 0, 1 << 30]) == (0.0, False)
    assert matrix_turn([-one, 0, 0, 0, one, 0, 0, 0, 1 << 30]) == (0.0, True)  # left-right mirror
    rotation, mirrored = matrix_turn([0, -one, 0, -one, 0, 0, 0, 0, 1 << 30])  # PyAV's 90 degrees + hflip
    assert (round(rotation), mirrored) == (90, True)
    assert matrix_turn([0] * 9) == (0.0, False) and matrix_turn([one, 0, 0]) == (0.0, False)
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    np.testing.assert_array_equal(upright(pixels, 90, mirrored=True), np.rot90(pixels, 1)[:, ::-1])
