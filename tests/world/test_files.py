"""A world killed mid-generation (``dtback.world.files``): what is on disk is whole images and a manifest that says
unfinished; the next run (``dtback world`` or training's ``ensure_world``) completes it to the bytes of an
uninterrupted world, never trains on half of one, and clears what the killed writer left."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from PIL import Image

from dtback.config import DataConfig, WorldConfig
from dtback.data.layout import scan_dataset
from dtback.errors import DatasetError
from dtback.io import TMP_MARK
from dtback.world.files import MANIFEST, ensure_world, write_world
from helpers import kill_when_half_done

WORLD = WorldConfig(characters=3, images_per_character=3, size=48, seed=5)
ARGS = ["world", "--characters", "3", "--images-per-character", "3", "--size", "48", "--seed", "5", "--no-progress"]

# `dtback world` in a child process whose 5th PNG stops half written (its bytes flushed to the temporary file, as a
# kill inside PIL's writer leaves them); the child says so and waits to be killed.
KILLED_WRITER = """
import sys
from PIL import Image
from dtback.cli import main
saves, real = [], Image.Image.save
def save(self, fp, *args, **kwargs):
    saves.append(fp)
    if len(saves) < 5:
        return real(self, fp, *args, **kwargs)
    with open(fp, "wb") as handle:
        handle.write(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\0" * 40)
    print("half", flush=True)
    sys.stdin.read()
Image.Image.save = save
main(sys.argv[1:])
"""


def files_of(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def kill_mid_world(out):
    assert kill_when_half_done(KILLED_WRITER, *ARGS, "--out", str(out)) == -signal.SIGKILL


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("whole") / "w", WORLD, progress=False).root


def test_a_killed_world_holds_whole_images_and_says_it_is_unfinished(tmp_path):
    out = tmp_path / "w"
    kill_mid_world(out)
    assert json.loads((out / MANIFEST).read_text())["complete"] is False
    pngs = sorted(out.rglob("*.png"))
    assert [p.relative_to(out).as_posix() for p in pngs] == [f"world/c000{i // 3}/00{i % 3}.png" for i in range(4)]
    for png in pngs:
        with Image.open(png) as image:
            image.verify()
    (temporary,) = [p for p in out.rglob("*") if TMP_MARK in p.name]
    assert temporary.name.startswith(".001.png" + TMP_MARK) and temporary.stat().st_size == 48
    # A scan (training's, `dataset inspect`) never takes the half-written file for an image.
    index = scan_dataset(DataConfig(data_dir=out), 0, progress=False)
    assert [(c.key, len(c.images)) for c in index.characters] == [("world/c0000", 3)]
    assert [(s.path, s.reason) for s in index.skips] == [(temporary.relative_to(out).as_posix(), "hidden")]


def test_training_completes_a_killed_world_with_its_own_settings(whole, tmp_path, caplog):
    """The run's data.world says another world (the defaults: 256 characters, seed 0); the folder's manifest says
    which world it is, and that one is finished (it was refused as 'another world ... delete this one')."""
    out = tmp_path / "w"
    kill_mid_world(out)
    for temporary in out.rglob(f"*{TMP_MARK}*"):
        os.utime(temporary, (time.time() - 7200,) * 2)  # what an interrupted run left hours ago
    caplog.set_level("INFO")
    assert ensure_world(DataConfig(data_dir=out, world=WorldConfig(generate_if_missing=False)), progress=False) == out
    assert files_of(out) == files_of(whole)  # nothing half written kept, no temporary left
    assert "its own settings (3 characters x 3 images, 48 px, seed 5)" in caplog.text


def test_dtback_world_completes_a_killed_world(whole, tmp_path, capsys):
    from dtback.cli import main

    out = tmp_path / "w"
    kill_mid_world(out)
    assert main([*ARGS, "--out", str(out)]) == 0
    assert "5 written" in capsys.readouterr().err
    assert {k: v for k, v in files_of(out).items() if TMP_MARK not in k} == files_of(whole)


def test_an_unfinished_world_whose_settings_do_not_read_is_refused_naming_the_key(tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"world_version": 2, "seed": -3, "characters": 3, "images_per_character": 3,
                                            "size": 48, "bundle": "world", "complete": False}))
    with pytest.raises(DatasetError, match=rf"{out / MANIFEST}: an unfinished world whose settings do not read "
                                           r"\(seed: Input should be greater than or equal to 0\)"):
        ensure_world(DataConfig(data_dir=out), progress=False)
