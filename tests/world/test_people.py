"""The identity world: deterministic by seed, the standard layout, captions without identity, distinct characters."""

from __future__ import annotations

import itertools
import json
import re

import numpy as np
import pytest

from dtback.cli import main
from dtback.config import DataConfig, WorldConfig
from dtback.data.layout import scan_dataset
from dtback.data.split import split_characters
from dtback.world.people import (
    ARMS, ATTRIBUTES, BODY_ATTRIBUTES, FACE_ATTRIBUTES, FACING, LIGHTING, SCENES, SIDE_LIGHT, STANCE, caption_for,
    identity_words, render_image, sample_characters,
)
from dtback.world.files import MANIFEST, ensure_world, read_manifest, write_world
from dtback.errors import DatasetError

SMALL = WorldConfig(characters=6, images_per_character=4, size=64, seed=3)


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "w"
    write_world(root, SMALL, progress=False)
    return root


def test_same_seed_same_bytes_other_seed_other_images(small_world, tmp_path):
    again = tmp_path / "again"
    write_world(again, SMALL, progress=False)
    assert files_of(again) == files_of(small_world)
    other = tmp_path / "other"
    write_world(other, SMALL.model_copy(update={"seed": 4}), progress=False)
    assert (other / "world/c0000/000.png").read_bytes() != (small_world / "world/c0000/000.png").read_bytes()


def test_images_do_not_depend_on_drawing_order():
    characters = sample_characters(3, seed=9)
    forward = [render_image(c, j, 64, 9).image.tobytes() for c in characters for j in range(2)]
    backward = [render_image(c, j, 64, 9).image.tobytes() for c in reversed(characters) for j in reversed(range(2))]
    assert forward == list(reversed(backward))


def test_layout_passes_dataset_inspect(small_world, tmp_path):
    index = scan_dataset(DataConfig(data_dir=small_world), seed=0, progress=False)
    assert [c.key for c in index.characters] == [f"world/c{i:04d}" for i in range(6)]
    assert all(len(c.images) == 4 for c in index.characters)
    assert index.skips == [] and index.drops == [] and index.ignored == [MANIFEST]
    assert all(entry.caption and entry.caption.startswith("a person ") for c in index.characters for entry in c.images)
    report = tmp_path / "report.json"
    assert main(["dataset", "inspect", str(small_world), "--json", str(report), "--no-progress"]) == 0
    totals = json.loads(report.read_text())["totals"]
    assert totals["images_kept"] == 24 and totals["files_skipped"] == 0


def test_captions_never_name_an_identity_attribute(small_world):
    banned = identity_words()
    assert {"blonde", "mohawk", "glasses", "beard", "stripes", "khaki", "broad", "oval"} <= banned
    every = [
        caption_for({"scene": s, "lighting": li, "side_light": side,
                     "pose": {"arms": a, "facing": f, "stance": st}})
        for s, li, side, a, f, st in itertools.product(SCENES, LIGHTING, SIDE_LIGHT, ARMS, FACING, STANCE)
    ]
    written = [p.read_text() for p in small_world.rglob("*.txt")]
    assert len(every) == 2880 and len(written) == 24
    for caption in every + written:
        words = set(re.findall(r"[a-z]+", caption.lower()))
        assert not words & banned, (caption, words & banned)


def test_metadata_boxes_and_attributes(small_world):
    roster = read_manifest(small_world)["roster"]
    for meta_path in small_world.rglob("*.json"):
        if meta_path.name == MANIFEST:
            continue
        meta = json.loads(meta_path.read_text())
        fx1, fy1, fx2, fy2 = meta["face_box"]
        bx1, by1, bx2, by2 = meta["body_box"]
        assert 0 <= bx1 <= fx1 < fx2 <= bx2 <= 64 and 0 <= by1 <= fy1 < fy2 <= by2 <= 64
        assert (fy2 - fy1) > 0.12 * 64  # faces are large enough to read
        assert meta["attributes"] == roster[meta["character"]]
        assert meta["caption"] == meta_path.with_suffix(".txt").read_text().strip()


def test_characters_are_distinct_by_face_and_by_body():
    characters = sample_characters(256, seed=0)
    assert len({c.face_key for c in characters}) == 256
    assert len({c.body_key for c in characters}) == 256
    combos = np.prod([len(v) for v in ATTRIBUTES.values()])
    assert combos > 1000 * 256  # identities are drawn from millions of combinations
    assert set(FACE_ATTRIBUTES) | set(BODY_ATTRIBUTES) == set(ATTRIBUTES)
    held = sample_characters(20, seed=1, exclude=characters)
    assert not {c.face_key for c in held} & {c.face_key for c in characters}
    assert not {c.body_key for c in held} & {c.body_key for c in characters}


def test_default_world_splits_into_identity_disjoint_train_and_val(tmp_path):
    data = DataConfig(data_dir=tmp_path / "w", world=WorldConfig(characters=20, images_per_character=3, size=32))
    ensure_world(data, progress=False)
    index = scan_dataset(data, seed=42, progress=False)
    split = split_characters(index, data, seed=42)
    assert len(split.val) == 2 and not set(split.val) & set(split.train)
    roster = read_manifest(data.data_dir)["roster"]
    faces = {key: json.dumps(roster[key.split("/")[1]]["face"], sort_keys=True) for key in split.train + split.val}
    assert not {faces[k] for k in split.val} & {faces[k] for k in split.train}


def test_interrupted_world_is_completed_with_the_same_bytes(small_world, tmp_path):
    partial = tmp_path / "partial"
    write_world(partial, SMALL, progress=False)
    for path in list((partial / "world").rglob("00[23].png")):
        path.unlink()
    manifest = json.loads((partial / MANIFEST).read_text())
    (partial / MANIFEST).write_text(json.dumps({**manifest, "complete": False}))
    data = DataConfig(data_dir=partial, world=SMALL)
    ensure_world(data, progress=False)
    assert files_of(partial) == files_of(small_world)


def test_ensure_world_leaves_other_folders_alone_and_refuses_when_told(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    assert ensure_world(DataConfig(data_dir=photos), progress=False) == photos
    assert list(photos.iterdir()) == []
    off = DataConfig(data_dir=tmp_path / "missing", world=WorldConfig(generate_if_missing=False))
    with pytest.raises(DatasetError, match="generate_if_missing is false"):
        ensure_world(off, progress=False)


def test_another_world_in_the_same_folder_is_refused(small_world):
    with pytest.raises(DatasetError, match="holds another world"):
        write_world(small_world, SMALL.model_copy(update={"size": 96}), progress=False)


def test_world_command(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["world", "--out", str(out), "--characters", "3", "--images-per-character", "2", "--size", "48",
            "--seed", "5", "--no-progress"]
    assert main(args) == 0
    assert len(list(out.rglob("*.png"))) == 6
    assert main(args) == 0  # a finished world: nothing left to write
    err = capsys.readouterr().err
    assert "0 written" in err and "redrawn" not in err
    assert main(["world", "--out", str(tmp_path / "bad"), "--characters", "1", "--no-progress"]) == 2


def test_a_damaged_image_in_an_existing_world_is_redrawn(small_world, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    write_world(damaged, SMALL, progress=False)
    half = damaged / "world/c0001/002.png"
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    (damaged / "world/c0002/000.png").write_bytes(b"")
    (damaged / "world/c0003/001.txt").unlink()  # a lost caption: the triple is redrawn
    summary = write_world(damaged, SMALL, progress=False)
    assert (summary.written, summary.redrawn, summary.existing) == (3, 3, 21)
    assert files_of(damaged) == files_of(small_world)
    half.write_bytes(half.read_bytes()[:-20])
    args = ["world", "--out", str(damaged), "--characters", "6", "--images-per-character", "4", "--size", "64",
            "--seed", "3", "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "1 written (" in err and "1 of them redrawn over a damaged file), 23 already there" in err
    assert files_of(damaged) == files_of(small_world)
