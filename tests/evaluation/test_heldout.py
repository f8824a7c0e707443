"""Held-out characters of `dtback evaluate` on unusual but legal worlds (``dtback.evaluation.heldout``): what a world
lacks or has lost is a counted skip with its reason, never a silent drop, a crash or a misleading message."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from dtback.config import WorldConfig
from dtback.errors import DatasetError, DtbackError
from dtback.evaluation.heldout import load_held_out, run_config
from dtback.world.files import MANIFEST, write_world


def world(path, seed=5, characters=4, images=3, size=64):
    return write_world(path, WorldConfig(characters=characters, images_per_character=images, size=size, seed=seed),
                       progress=False).root


def test_held_out_characters_missing_from_a_world_of_the_runs_seed_are_counted_skips(world_run, tmp_path):
    """A world of the run's seed with fewer characters holds only some of its held-out people: those it lacks are
    skipped with their reason, the others evaluated (it was 'no folder ... does --data-dir match the run?')."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("best_model.pt", "config.yaml"):
        shutil.copy(world_run / name, run / name)
    (run / "split.json").write_text(json.dumps({"method": "explicit", "train": ["world/c0000"],
                                                "val": ["world/c0001", "world/c0002", "world/c0004"]}))
    smaller = world(tmp_path / "same_seed", seed=0, characters=3)
    held = load_held_out(run, run_config(run, None), smaller, [], None)
    assert [c.key for c in held.characters] == ["world/c0001", "world/c0002"]
    assert held.skipped == [{"path": str(smaller / "world/c0004"), "reason": "not_in_dataset",
                             "detail": f"held out by the run ({run / 'split.json'}) but {smaller} has no such "
                                       "folder"}]
    tiny = world(tmp_path / "tiny", seed=0, characters=2)  # one held-out character left: too few, both named
    with pytest.raises(DtbackError, match=rf"found 1; skipped: 2 \(not_in_dataset: 2; e.g. {tiny}/world/c0002: held "):
        load_held_out(run, run_config(run, None), tiny, [], None)


def test_characters_the_scan_leaves_out_are_listed_as_skipped(world_run, tmp_path):
    """Every character of another world is held out; those the scan drops (too few images, a name that is not
    UTF-8) are in ``skipped`` with the scan's reason instead of vanishing."""
    other = world(tmp_path / "other")
    for name in ("001.png", "002.png"):
        (other / "world" / "c0000" / name).unlink()
    os.rename(other / "world" / "c0003", os.fsencode(other / "world") + b"/bad\xff")
    held = load_held_out(world_run, run_config(world_run, None), other, [], None)
    assert [c.key for c in held.characters] == ["world/c0001", "world/c0002"]
    reasons = {entry["path"]: entry["reason"] for entry in held.skipped}
    assert reasons == {f"{other}/world/c0000": "too_few_images", f"{other}/world/bad\\xff": "name_not_utf8"}


def test_a_world_that_lost_a_sidecar_is_still_a_world(world_run, tmp_path):
    """One image's .json gone: the character's truth comes from its other images (it made the whole folder read as
    photos); a character with none left is skipped as no_world_metadata."""
    other = world(tmp_path / "other")
    (other / "world" / "c0000" / "000.json").unlink()
    (other / "world" / "c0001" / "000.json").write_text('{"attributes": ')  # cut short
    edited = json.loads((other / "world" / "c0003" / "000.json").read_text())
    del edited["attributes"]["face"]["glasses"]  # scored as a KeyError after every image was generated
    (other / "world" / "c0003" / "000.json").write_text(json.dumps(edited))
    for name in ("000.json", "001.json", "002.json"):
        (other / "world" / "c0002" / name).unlink()
    held = load_held_out(world_run, run_config(world_run, None), other, [], None)
    roster = json.loads((other / MANIFEST).read_text())["roster"]
    assert held.is_world and [c.key for c in held.characters] == ["world/c0000", "world/c0001", "world/c0003"]
    assert [c.truth for c in held.characters] == [roster[name] for name in ("c0000", "c0001", "c0003")]
    assert held.skipped == [{"path": str(other / "world/c0002"), "reason": "no_world_metadata",
                             "detail": "none of its 3 images has a readable .json sidecar with its attributes"}]


def test_an_unfinished_world_is_refused_with_the_command_that_finishes_it(world_run, tmp_path):
    other = world(tmp_path / "other")
    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "complete": False, "roster": {}}))  # as a kill leaves it
    with pytest.raises(DatasetError, match=rf"{other / MANIFEST}: an unfinished identity world .* finish it with "
                                           rf"`dtback world --out {other} --characters 4 --images-per-character 3 "
                                           r"--size 64 --seed 5 --bundle world`"):
        load_held_out(world_run, run_config(world_run, None), other, [], None)


def test_a_data_dir_that_is_a_file_is_named_as_one(world_run, tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("x")
    with pytest.raises(DatasetError, match=f"dataset folder {file} is a file, not a folder"):
        load_held_out(world_run, run_config(world_run, None), file, [], None)
    with pytest.raises(DatasetError, match=f"dataset folder {tmp_path / 'nope'} does not exist"):
        load_held_out(world_run, run_config(world_run, None), tmp_path / "nope", [], None)


def test_too_few_usable_characters_name_the_reasons_in_one_short_line(world_run, tmp_path):
    """Every character of a 12-character world short of images for --references 3: the error counts the skips by
    reason with one example each, where it printed every skip record (7 KB for 40 characters)."""
    other = world(tmp_path / "other", characters=12)
    (other / "world" / "c0005" / "000.png").write_bytes(b"")
    with pytest.raises(DtbackError) as caught:
        load_held_out(world_run, run_config(world_run, None), other, [], None, references=3)
    message = str(caught.value)
    assert message.endswith(f"found 0; skipped: 13 (too_few_images: 12; e.g. {other}/world/c0000: 3 readable "
                            "image(s); 3 reference(s) and a gallery image are needed; zero_byte: 1; e.g. "
                            f"{other}/world/c0005/000.png: file is empty)")
    assert len(message) < 700
