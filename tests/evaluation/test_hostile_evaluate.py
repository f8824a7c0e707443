"""Hostile input to `dtback evaluate` (issue 19, case 7): trained characters are never scored as held-out, and no
character name writes outside --out."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.errors import DatasetError, DtbackError
from dtback.evaluation.heldout import inside, load_held_out, run_config


def split_of(run):
    return json.loads((run / "split.json").read_text())


def evaluate_args(run, out, *extra):
    return ["evaluate", "--model", str(run / "best_model.pt"), "--steps", "1", "--out", str(out), "--no-progress",
            *extra]


def test_trained_characters_are_refused_naming_them(world_run, tmp_path, capsys):
    trained = split_of(world_run)["train"][:2]
    out = tmp_path / "o"
    args = evaluate_args(world_run, out)
    for key in trained:
        args += ["--characters", key]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"--characters names 2 character(s) the run trained on ({trained[0]}, {trained[1]}; from " \
           f"{world_run / 'split.json'})" in err and "--allow-trained" in err and "Traceback" not in err
    assert not out.exists()


def test_allowed_trained_characters_are_labelled(world_run):
    cfg = run_config(world_run, None)
    split = split_of(world_run)
    keys = [split["train"][0], split["val"][0]]
    with pytest.raises(DtbackError, match=f"trained on \\({split['train'][0]};"):
        load_held_out(world_run, cfg, None, keys, None)
    held = load_held_out(world_run, cfg, None, keys, None, allow_trained=True)
    assert held.trained == [split["train"][0]] and "1 trained on, --allow-trained" in held.source
    held = load_held_out(world_run, cfg, None, split["val"], None)  # held-out ones: nothing to label
    assert held.trained == [] and held.source == "--characters"


@pytest.mark.parametrize("name", ["../../..", "../x", "/etc/passwd", "world/..", "a/b/c", "world\\..\\x", ".x/y"])
def test_character_names_that_leave_the_dataset_are_refused_before_anything_is_written(world_run, tmp_path,
                                                                                       capsys, name):
    out = tmp_path / "o"
    assert main(evaluate_args(world_run, out, "--characters", name, "--characters", "world/c0000")) == \
        EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"--characters {[name, 'world/c0000']}" in err and repr(name) in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "images").exists()


def test_an_edited_split_file_cannot_lead_outside_either(world_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(world_run / "best_model.pt", run / "best_model.pt")
    shutil.copy(world_run / "config.yaml", run / "config.yaml")
    (run / "split.json").write_text(json.dumps({"method": "explicit", "train": [], "val": ["../../etc", "world/a"]}))
    with pytest.raises(DatasetError, match=r"held-out character '\.\./\.\./etc' \(from .*split.json\)"):
        load_held_out(run, run_config(run, None), None, [], None)


def test_output_paths_stay_inside_out(tmp_path):
    out = tmp_path / "out"
    (out / "images").mkdir(parents=True)
    assert inside(out, "images/with_identity/world/c0000", "image folder") == out / "images/with_identity/world/c0000"
    with pytest.raises(DtbackError, match="would be outside"):
        inside(out, "images/../../escape", "image folder")
    os.symlink(tmp_path, out / "images" / "link")
    with pytest.raises(DtbackError, match="would be outside"):
        inside(out, "images/link/x", "image folder")


def test_out_that_is_a_file_and_an_absent_device_are_refused(world_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(evaluate_args(world_run, blocker)) == EXIT_BAD_INPUT
    assert f"--out {blocker} is a file, not a folder" in capsys.readouterr().err
    if torch.cuda.device_count() > 7:
        return
    assert main(evaluate_args(world_run, tmp_path / "o", "--device", "cuda:7")) == EXIT_BAD_INPUT
    assert "--device cuda:7: this machine has" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_character_named_twice_is_refused(world_run):
    cfg = run_config(world_run, None)
    key = split_of(world_run)["val"][0]
    with pytest.raises(DtbackError, match=f"--characters names {key} more than once"):
        load_held_out(world_run, cfg, None, [key, key], None)


@pytest.mark.parametrize("bundle", ["world", "people"])
def test_a_world_of_the_runs_seed_holds_the_runs_characters(world_run, tmp_path, bundle):
    """Other pictures (more per character, another bundle name) of the same seed are the same people: the ones the
    run trained on are refused or labelled, and the held-out ones are its split's."""
    from dtback.config import WorldConfig  # noqa: PLC0415
    from dtback.world.files import write_world  # noqa: PLC0415

    cfg, split = run_config(world_run, None), split_of(world_run)
    same_seed = tmp_path / "same_seed"
    write_world(same_seed, WorldConfig(characters=8, images_per_character=4, size=64, seed=0, bundle=bundle),
                progress=False)
    theirs = [f"{bundle}/{key.split('/')[1]}" for key in split["train"]]
    with pytest.raises(DtbackError, match="the run trained on"):
        load_held_out(world_run, cfg, same_seed, theirs[:2], None)
    held = load_held_out(world_run, cfg, same_seed, [], None)
    assert [c.key for c in held.characters] == [f"{bundle}/{key.split('/')[1]}" for key in split["val"]]
    other_seed = tmp_path / "other_seed"
    write_world(other_seed, WorldConfig(characters=4, images_per_character=3, size=64, seed=5), progress=False)
    held = load_held_out(world_run, cfg, other_seed, [], None)  # another seed: other people, all of them held out
    assert len(held.characters) == 4 and "another dataset" in held.source


def test_out_inside_the_dataset_is_refused_before_anything_is_written(world_run, tmp_path, capsys):
    cfg = run_config(world_run, None)
    key = split_of(world_run)["val"][0]
    out = cfg.data.data_dir / key / "evaluation"
    assert main(evaluate_args(world_run, out)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"--out {out} is inside the dataset" in err and "Traceback" not in err
    assert not out.exists()


def test_a_world_adapter_is_not_scored_on_photos(world_run, tmp_path, capsys):
    from helpers import make_dataset  # noqa: PLC0415

    photos = make_dataset(tmp_path / "photos", {"b": {"x": 3, "y": 3}}, size=(32, 32))
    out = tmp_path / "o"
    assert main(evaluate_args(world_run, out, "--data-dir", str(photos))) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{photos} holds photos, not an identity world" in err and "identity.face_backend" in err
    assert not out.exists()


def test_a_nan_or_cut_short_adapter_is_refused_in_one_line_before_its_base_loads(world_run, tmp_path, capsys,
                                                                                monkeypatch):
    """evaluate reads --model through the one vetted reader: a cut-short .pt used to end in torch's miniz message
    cut off at 200 characters, mid-sentence."""
    from diffusers import FluxPipeline  # noqa: PLC0415

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded for an adapter that should have been refused first")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)
    payload = torch.load(world_run / "best_model.pt", weights_only=True)
    key = sorted(payload["state_dict"])[0]
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
    whole = (world_run / "best_model.pt").read_bytes()
    runs = {"nan": lambda path: torch.save(payload, path),
            "cut": lambda path: path.write_bytes(whole[: len(whole) // 10])}
    messages = {}
    for name, write in runs.items():
        run = tmp_path / name
        run.mkdir()
        for kept in ("config.yaml", "split.json"):
            shutil.copy(world_run / kept, run / kept)
        write(run / "best_model.pt")
        out = tmp_path / f"out_{name}"
        assert main(evaluate_args(run, out)) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
        messages[name] = err.strip()
    assert messages["nan"] == f"error: {tmp_path / 'nan' / 'best_model.pt'}: key {key} holds NaN or infinite values: " \
                              "a damaged adapter makes every image NaN; use an earlier checkpoint or an undamaged copy"
    assert messages["cut"] == f"error: {tmp_path / 'cut' / 'best_model.pt'}: not a tensors-only dtback checkpoint " \
                              f"(cut short: a zip archive of {len(whole) // 10} bytes whose directory at its end is " \
                              "missing; copy it again)"
