"""A damaged or edited --model file ends `dtback generate` in one line naming it, before its base is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import save_file

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.inference.adapter_file import read_checked_adapter


@pytest.fixture(scope="module")
def payload(run_dir):
    return torch.load(run_dir / "best_model.pt", weights_only=True)


@pytest.fixture
def no_base_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded for an adapter that should have been refused first")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)


def refused(run_dir, tmp_path, capsys, model) -> str:
    args = ["generate", "--model", str(model), "--base", str(run_dir / "base"), "--reference",
            str(run_dir / "face.png"), "--prompt", "a person", "--steps", "1", "--output", str(tmp_path / "out"),
            "--no-progress"]
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    return err


def edited(payload, folder, name, config=None, state=None):
    path = folder / name
    torch.save({"config": json.dumps(config) if config is not None else payload["config"],
                "state_dict": state if state is not None else payload["state_dict"]}, path)
    return path


def test_a_safetensors_adapter_cut_short_or_of_junk_is_named(run_dir, tmp_path, capsys, payload, no_base_loading):
    whole = tmp_path / "adapter.safetensors"
    save_file({k: v.contiguous() for k, v in payload["state_dict"].items()}, whole,
              metadata={"dtback_adapter_config": payload["config"]})
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    err = refused(run_dir, tmp_path, capsys, cut)
    assert f"error: {cut}: truncated: {len(data) // 2} of its {len(data)} bytes; not a whole adapter" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello world")
    assert f"{junk}: truncated or not a safetensors file: a header of" in refused(run_dir, tmp_path, capsys, junk)
    assert read_checked_adapter(whole)[0].double_blocks == (0,)  # the whole file reads


def test_an_adapter_folder_whose_config_is_not_utf8_is_named(run_dir, tmp_path, capsys, payload, no_base_loading):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    save_file({"a": torch.ones(1)}, folder / "adapter.safetensors")
    err = refused(run_dir, tmp_path, capsys, folder)
    assert f"error: {folder}: the adapter config is not UTF-8 text (invalid start byte at byte 0)" in err


def test_a_pt_state_dict_of_lists_or_nan_is_refused_naming_the_key(run_dir, tmp_path, capsys, payload,
                                                                    no_base_loading):
    first = next(iter(payload["state_dict"]))
    lists = edited(payload, tmp_path, "lists.pt", state={key: [1, 2] for key in payload["state_dict"]})
    assert f"{lists}: state_dict key {first!r} holds a list, not a tensor" in refused(run_dir, tmp_path, capsys, lists)
    state = dict(payload["state_dict"])
    state[first] = torch.full_like(state[first], float("nan"))
    nan = edited(payload, tmp_path, "nan.pt", state=state)
    err = refused(run_dir, tmp_path, capsys, nan)
    assert f"{nan}: key {first} holds NaN or infinite values: a damaged adapter makes every image NaN" in err


def test_blocks_or_shapes_the_config_does_not_make_are_refused_before_the_base_loads(run_dir, tmp_path, capsys,
                                                                                     payload, no_base_loading):
    config = json.loads(payload["config"])
    blocks = edited(payload, tmp_path, "blocks.pt", config={**config, "double_blocks": [0, 5]})
    err = refused(run_dir, tmp_path, capsys, blocks)
    assert f"{blocks}: adapter config double_blocks [0, 5] names blocks [5] that its base (num_layers 2)" in err
    wider = {**config, "resampler": {**config["resampler"], "dim": 256}}  # an adapter of another size
    other = edited(payload, tmp_path, "wider.pt", config=wider)
    err = refused(run_dir, tmp_path, capsys, other)
    assert f"{other}: weights of another shape than the adapter config: resampler.face.latents (8, 128) (the config " \
           "makes (8, 256))" in err
    fewer = dict(payload["state_dict"])
    dropped = sorted(fewer)[0]
    del fewer[dropped]
    missing = edited(payload, tmp_path, "fewer.pt", state=fewer)
    assert f"weights do not match the adapter config (missing [{dropped!r}], unexpected [])" in \
        refused(run_dir, tmp_path, capsys, missing)
