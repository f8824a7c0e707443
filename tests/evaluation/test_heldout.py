"""Held-out characters of `dtback evaluate` on unusual but legal worlds (``dtback.evaluation.heldout``): what a world
lacks or has lost is a counted skip with its reason, never a silent drop, a crash or a misleading message."""

from __future__ import annotations

import json

import pytest

from dtback.config import WorldConfig
from dtback.errors import DatasetError
from dtback.evaluation.heldout import load_held_out, run_config
from dtback.world.files import MANIFEST, write_world


def world(path, seed=5, characters=4, images=3, size=64):
    return write_world(path, WorldConfig(characters=characters, images_per_character=images, size=size, seed=seed),
                       progress=False).root


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
