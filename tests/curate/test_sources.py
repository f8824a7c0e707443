"""Finding the builder's source files, and the builder's settings validation."""

from __future__ import annotations

import pytest

from dtback.config import load_config
from dtback.curate.sources import Item, list_files
from dtback.errors import ConfigError, DatasetError
from helpers import write_image


def test_list_files_walks_sorted_skips_hidden_and_the_output(tmp_path):
    src = tmp_path / "src"
    for rel in ("b/2.jpg", "b/1.jpg", "a.png", "out/built_000/person_0001/x.jpg", ".cache/y.jpg", "c/.DS_Store"):
        write_image(src / rel)
    files, skips = list_files([src / "b", src, src / "a.png"], exclude=src / "out")
    assert [f.relative_to(src).as_posix() for f in files] == ["a.png", "b/1.jpg", "b/2.jpg"]
    assert all(f.is_absolute() for f in files)
    assert sorted((s.path.removeprefix(str(src) + "/"), s.reason) for s in skips) == [
        (".cache", "hidden"), ("c/.DS_Store", "hidden")
    ]
    with pytest.raises(DatasetError, match="--from .*nowhere: no such file or folder"):
        list_files([tmp_path / "nowhere"], exclude=src / "out")


def test_item_labels():
    assert Item("k", "/v/a.mp4", 1.5).label == "/v/a.mp4@1.500s"
    assert Item("k", "/p/a.jpg").label == "/p/a.jpg"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.build.video_fps=0", "data.build.video_fps: Input should be greater than 0"),
        ("data.build.bundle_prefix=a/b", "data.build.bundle_prefix: must be letters, digits"),
        ("data.build.cluster_linkage=single", "data.build.cluster_linkage: Input should be 'complete' or 'average'"),
        ("data.build.fps=2", "data.build.fps: unknown key (valid keys in data.build: video_fps,"),
    ],
)
def test_build_settings_are_validated_with_their_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value) and f"--set {override}" in str(info.value)
