"""Hostile input to `dtback generate` (issue 19, cases 8-10): every bad argument ends in exit status 2 with a
message naming it, before any model is loaded; an adapter runs only on the base it was trained on."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.inference import generate as generate_module
from dtback.inference.pipeline import IdentityFluxPipeline
from dtback.model.flux import base_content_id, build_simple_pipeline, save_pipeline_atomic


@pytest.fixture
def no_model_loading(monkeypatch):
    """Loading the pipeline fails the test: these inputs must be refused before any model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded for input that should have been refused first")

    monkeypatch.setattr(IdentityFluxPipeline, "from_pretrained", refuse)


def generate_args(run_dir, tmp_path, *extra):
    return ["generate", "--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"),
            "--prompt", "a person", "--steps", "1", "--output", str(tmp_path / "out"), "--no-progress", *extra]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--face-scale", "nan"], "--face-scale nan: Input should be a finite number"),
        (["--body-scale", "inf"], "--body-scale inf: Input should be a finite number"),
        (["--face-scale", "-1"], "--face-scale -1.0: Input should be greater than or equal to 0"),
        (["--steps", "0"], "--steps 0: Input should be greater than or equal to 1"),
        (["--steps", "-3"], "--steps -3: Input should be greater than or equal to 1"),
        (["--steps", "100000"], "--steps 100000: Input should be less than or equal to 1000"),
        (["--num-images", "0"], "--num-images 0: Input should be greater than or equal to 1"),
        (["--seed", "-1"], "--seed -1: Input should be greater than or equal to 0"),
        (["--seed", str(10**23)], "--seed 100000000000000000000000: Input should be less than or equal to"),
        (["--identity-start", "0.8", "--identity-end", "0.2"], "--identity-start 0.8 must be <= --identity-end 0.2"),
        (["--width", "160000"], "--width 160000 must be a positive multiple of 16 (FLUX latents"),
        (["--height", "100"], "--height 100 must be a positive multiple of 16"),
        (["--height", "0"], "--height 0 must be a positive multiple of 16"),
        (["--guidance", "inf"], "--guidance inf: Input should be a finite number"),
        (["--true-cfg", "nan"], "--true-cfg nan: Input should be a finite number"),
        (["--device", "cuda:7"], "--device cuda:7: this machine has no cuda device"),
        (["--device", "gpu0"], "--device 'gpu0' is not a device torch knows"),
        (["--lora-scale", "0.5"], "--lora-scale 0.5 is given without a --lora to scale"),  # was dropped silently
    ],
)
def test_bad_generate_arguments_exit_2_before_loading(run_dir, tmp_path, capsys, no_model_loading, flags, message):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    assert main(generate_args(run_dir, tmp_path, *flags)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_float_seed_is_an_argument_error(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(generate_args(run_dir, tmp_path, "--seed", "1e23"))
    assert info.value.code == EXIT_BAD_INPUT and "--seed: invalid int value: '1e23'" in capsys.readouterr().err


def test_bad_files_exit_2_before_loading(run_dir, tmp_path, capsys, no_model_loading, monkeypatch):
    existing = tmp_path / "a_file.png"
    existing.write_bytes(b"x")
    args = generate_args(run_dir, tmp_path)
    args[args.index("--output") + 1] = str(existing)
    assert main(args) == EXIT_BAD_INPUT
    assert f"--output {existing} is a file, not a folder" in capsys.readouterr().err

    folder_ref = generate_args(run_dir, tmp_path)
    folder_ref[folder_ref.index("--reference") + 1] = str(tmp_path)
    assert main(folder_ref) == EXIT_BAD_INPUT
    assert f"--reference {tmp_path}: not_a_regular_file (a folder where a file was expected)" in \
        capsys.readouterr().err

    monkeypatch.setattr(generate_module, "MAX_REFERENCE_PIXELS", 1000)  # the face.png reference is far larger
    assert main(generate_args(run_dir, tmp_path)) == EXIT_BAD_INPUT
    assert "too_many_pixels" in capsys.readouterr().err

    settings = tmp_path / "settings.json"  # a settings file holds JSON numbers: a float seed is no int
    settings.write_text(json.dumps({"seed": 1e23}))
    assert main([*generate_args(run_dir, tmp_path), "--settings", str(settings)]) == EXIT_BAD_INPUT
    assert "key 'seed'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_adapter_file_whose_config_is_not_json_text_is_refused(tmp_path, run_dir, capsys):
    for config in ({"format": "x"}, ["a"], 7):
        fake = tmp_path / "best_model.pt"
        torch.save({"config": config, "state_dict": {}}, fake)
        args = generate_args(run_dir, tmp_path)
        args[args.index("--model") + 1] = str(fake)
        assert main(args) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"{fake}: 'config' must be the adapter config as JSON text" in err and "Traceback" not in err


def test_a_damaged_adapter_is_refused_before_its_base_loads(run_dir, tmp_path, capsys, monkeypatch):
    """The pipeline reads --model once, vetted (dtback.model.adapter_file.read_adapter), before the base."""
    from diffusers import FluxPipeline  # noqa: PLC0415

    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded for an adapter that should have been refused first")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", refuse)
    lists = tmp_path / "lists.pt"
    torch.save({"config": torch.load(run_dir / "best_model.pt", weights_only=True)["config"],
                "state_dict": {"resampler.x": [1, 2]}}, lists)
    args = generate_args(run_dir, tmp_path)
    args[args.index("--model") + 1] = str(lists)
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.strip() == f"error: {lists}: state_dict key 'resampler.x' holds a list, not a tensor; not a dtback " \
                          "adapter"
    assert not (tmp_path / "out").exists()


def copy_run(run_dir, folder, content_id: str | None = None, base=True):
    """best_model.pt (optionally recording ``content_id``) and face.png, with or without the run's base/."""
    folder.mkdir(parents=True)
    payload = torch.load(run_dir / "best_model.pt", weights_only=True)
    if content_id is not None:
        config = json.loads(payload["config"])
        config["extra"]["base_content_id"] = content_id
        payload["config"] = json.dumps(config)
    torch.save(payload, folder / "best_model.pt")
    if base:
        shutil.copytree(run_dir / "base", folder / "base")
    return folder / "best_model.pt"


def test_the_base_is_found_next_to_the_adapter_never_in_the_current_folder(run_dir, tmp_path, capsys, monkeypatch):
    lone = copy_run(run_dir, tmp_path / "lone", base=False)
    elsewhere = tmp_path / "another_run"  # the current folder holds another run's base/
    shutil.copytree(run_dir / "base", elsewhere / "base")
    monkeypatch.chdir(elsewhere)
    args = generate_args(run_dir, tmp_path)
    args[args.index("--model") + 1] = str(lone)
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"was trained on the base folder 'base', expected at {lone.parent / 'base'}, which does not exist" in err
    assert "Hugging Face" not in err and "Traceback" not in err


def test_a_base_with_another_content_is_refused_naming_both(run_dir, tmp_path, capsys):
    recorded = base_content_id(run_dir / "base")
    other = build_simple_pipeline(seed=1)  # the same shape, other weights: another run's base
    save_pipeline_atomic(other, tmp_path / "other_base")
    assert base_content_id(tmp_path / "other_base") != recorded
    adapter = copy_run(run_dir, tmp_path / "swapped", content_id=recorded, base=False)
    shutil.copytree(tmp_path / "other_base", adapter.parent / "base")
    args = generate_args(run_dir, tmp_path)
    args[args.index("--model") + 1] = str(adapter)
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"{adapter} was trained on a base with content fingerprint {recorded[:16]}" in err
    assert f"{adapter.parent / 'base'} has {base_content_id(tmp_path / 'other_base')[:16]}" in err
    assert not (tmp_path / "out").exists()


def test_a_base_cut_short_is_named_as_damaged_not_as_another_base(run_dir, tmp_path, capsys):
    adapter = copy_run(run_dir, tmp_path / "cut", content_id=base_content_id(run_dir / "base"))
    weights = next((adapter.parent / "base" / "transformer").glob("*.safetensors"))
    whole = weights.stat().st_size
    with open(weights, "r+b") as handle:  # an interrupted copy
        handle.truncate(whole // 2)
    for chosen in ([], ["--base", str(adapter.parent / "base")]):
        args = generate_args(run_dir, tmp_path) + chosen
        args[args.index("--model") + 1] = str(adapter)
        assert main(args) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert err.startswith(f"error: {weights} is damaged (truncated: {whole // 2} of its {whole} bytes): the base "
                              f"{adapter.parent / 'base'} that {adapter} was trained on is not whole; copy it again")
        assert "another base" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_recorded_base_is_accepted_from_any_folder(run_dir, tmp_path, monkeypatch):
    adapter = copy_run(run_dir, tmp_path / "bound", content_id=base_content_id(run_dir / "base"))
    monkeypatch.chdir(tmp_path)
    args = generate_args(run_dir, tmp_path, "--height", "32", "--width", "32")
    args[args.index("--model") + 1] = str(adapter.relative_to(tmp_path))
    assert main(args) == 0
    assert (tmp_path / "out" / "000_00.png").is_file()


def test_a_base_that_is_a_file_or_missing_and_a_lora_of_other_weights_exit_2(run_dir, tmp_path, capsys):
    from safetensors.torch import save_file  # noqa: PLC0415

    file_base = tmp_path / "weights.bin"
    file_base.write_bytes(b"not a folder")
    for base, message in ((file_base, "is a file: pass a FLUX folder"),
                          (tmp_path / "no" / "such", "no such folder")):
        assert main([*generate_args(run_dir, tmp_path), "--base", str(base)]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert f"--base {base}" in err and message in err and "Traceback" not in err
    trainable = tmp_path / "trainable.safetensors"  # a training checkpoint's tensors, not a LoRA
    save_file({"adapters.double_0.to_q.weight": torch.ones(4, 4), "resampler.face.proj.bias": torch.ones(4)}, trainable)
    assert main([*generate_args(run_dir, tmp_path), "--lora", str(trainable)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"LoRA {trainable}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_prompts_or_settings_file_that_is_a_folder_missing_or_not_utf8_is_named(run_dir, tmp_path, capsys,
                                                                                   no_model_loading):
    latin1 = tmp_path / "prompts.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for flag, path, message in (
        ("--prompts-file", tmp_path, f"--prompts-file {tmp_path} is a folder, not a text file"),  # was "Errno 21: 6"
        ("--settings", tmp_path, f"--settings {tmp_path} is a folder, not a text file"),
        ("--prompts-file", tmp_path / "nope.txt", f"--prompts-file {tmp_path / 'nope.txt'} does not exist"),
        ("--prompts-file", latin1, f"--prompts-file {latin1}: not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"),
    ):
        assert main([*generate_args(run_dir, tmp_path), flag, str(path)]) == EXIT_BAD_INPUT
        assert capsys.readouterr().err.strip() == f"error: {message}"
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_does_not_start_the_first_prompt(tmp_path):
    from dtback.cli import build_parser  # noqa: PLC0415

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffa person\r\n\r\n  on a beach \n".encode("utf-8"))  # as Windows' Notepad saves it
    args = build_parser().parse_args(["generate", "--prompts-file", str(prompts)])
    assert generate_module.resolve_settings(args).prompt == ["a person", "on a beach"]


def test_an_output_folder_that_cannot_be_written_is_refused_before_loading(run_dir, tmp_path, capsys, monkeypatch,
                                                                           no_model_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access  # as a read-only folder answers for a user who is not root
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    args = generate_args(run_dir, tmp_path)
    args[args.index("--output") + 1] = str(locked / "out")
    assert main(args) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"error: --output {locked / 'out'} cannot be written: {locked} is not " \
                                              "writable"


def test_a_disk_that_fills_while_writing_images_names_the_file_and_keeps_the_ones_before(run_dir, tmp_path, capsys,
                                                                                        monkeypatch):
    real = generate_module.atomic_path

    def fill_at_second_image(path, *args, **kwargs):
        if path.name == "001_00.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(generate_module, "atomic_path", fill_at_second_image)
    out = tmp_path / "out"
    args = generate_args(run_dir, tmp_path, "--prompt", "a person on a beach", "--height", "32", "--width", "32")
    assert main(args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"error: --output: cannot write {out / '001_00.png'} (No space left on " \
                                           "device); the 1 images written before it are kept"
    assert "Traceback" not in err and sorted(p.name for p in out.iterdir()) == ["000_00.png"]


def test_a_missing_or_oversized_reference_is_named_without_training_keys(run_dir, tmp_path, capsys, monkeypatch,
                                                                         no_model_loading):
    args = generate_args(run_dir, tmp_path)
    args[args.index("--reference") + 1] = str(tmp_path / "nope.png")
    assert main(args) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.strip() == f"error: --reference {tmp_path / 'nope.png'} does not exist"
    monkeypatch.setattr(generate_module, "MAX_REFERENCE_PIXELS", 1000)
    assert main(generate_args(run_dir, tmp_path)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err  # max_image_pixels is training's key: generate has no setting to raise
    assert err.strip().endswith("; a reference may have at most 1,000 pixels: downscale it"), err


def test_a_negative_prompt_without_true_cfg_is_said_to_be_unused(run_dir, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="dtback.inference.generate"):
        assert main(generate_args(run_dir, tmp_path, "--height", "32", "--width", "32", "--negative-prompt",
                                  "blurry")) == 0
    assert "--negative-prompt is not used: it is the prompt of true CFG's negative branch, which --true-cfg 1 (the " \
           "default) switches off" in caplog.text


def test_the_seed_help_says_what_seeds_the_images(run_dir, tmp_path, capsys):
    from dtback.cli import build_parser  # noqa: PLC0415

    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--help"])
    assert "prompt p uses seed + p (default 0)" in " ".join(capsys.readouterr().out.split())
    size = ["--height", "32", "--width", "32"]
    both = generate_args(run_dir, tmp_path, "--prompt", "a person on a beach", "--seed", "5", *size)
    assert main(both) == 0
    alone = generate_args(run_dir, tmp_path / "alone", "--seed", "6", *size)
    alone[alone.index("--prompt") + 1] = "a person on a beach"
    assert main(alone) == 0
    second, same = Image.open(tmp_path / "out" / "001_00.png"), Image.open(tmp_path / "alone" / "out" / "000_00.png")
    assert np.array_equal(np.asarray(second), np.asarray(same))
