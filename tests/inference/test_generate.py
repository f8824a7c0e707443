"""IdentityFluxPipeline and `dtback generate` on a tiny simple model saved in diffusers format."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.model.flux import build_simple_pipeline, save_pipeline_atomic


def sample(pipe, references, seed=0, **kwargs):
    images = pipe("a person standing in a park", references, num_inference_steps=2, height=64, width=64, seed=seed,
                  **kwargs)
    return np.asarray(images[0], dtype=np.int16)


def test_scales_zero_equal_the_base_and_identity_changes_the_image(pipe, run_dir):
    refs, report = pipe.encode_references([Image.open(run_dir / "face.png")], ["face.png"])
    assert report.faces[0] >= 1  # dlib also reports a weak second detection here
    base = sample(pipe, None)
    assert np.array_equal(sample(pipe, refs, face_scale=0.0, body_scale=0.0), base)
    assert np.abs(sample(pipe, refs) - base).max() > 0
    assert np.array_equal(sample(pipe, refs, identity_start=1.0, identity_end=1.0), base)  # never active
    plain = pipe.pipeline("a person standing in a park", num_inference_steps=2, height=64, width=64,
                          generator=torch.Generator().manual_seed(0), max_sequence_length=16).images[0]
    assert np.array_equal(np.asarray(plain, dtype=np.int16), base)


def test_several_references_and_one_without_a_face(pipe, run_dir):
    images = [Image.open(run_dir / name) for name in ("face.png", "other.png", "noface.png")]
    refs, report = pipe.encode_references(images, ["face.png", "other.png", "noface.png"])
    assert report.faces[2] == 0 and "noface.png: no face detected" in report.warnings[-1]
    assert refs.face_embeds.shape[:2] == (1, 3) and refs.face_mask[0, 2].item() is False
    one, _ = pipe.encode_references(images[:1])
    assert not np.array_equal(sample(pipe, refs), sample(pipe, one))


def test_generate_cli_writes_images_and_settings_that_reproduce_them(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"),
                 "--prompt", "a person in a city", "--prompt", "a person on a beach", "--steps", "2",
                 "--seed", "5", "--output", str(out), "--no-progress"]) == 0
    assert "2/2 [" not in capsys.readouterr().err  # --no-progress silences diffusers' sampling bar too
    settings = json.loads((out / "settings.json").read_text())
    assert settings["images"] == ["000_00.png", "001_00.png"] and settings["reference_faces"][0] >= 1
    assert (settings["height"], settings["seed"], settings["steps"]) == (64, 5, 2)
    again = tmp_path / "again"
    assert main(["generate", "--settings", str(out / "settings.json"), "--output", str(again), "--no-progress"]) == 0
    for name in settings["images"]:
        assert np.array_equal(np.asarray(Image.open(out / name)), np.asarray(Image.open(again / name)))


def test_bad_inputs_get_their_messages(run_dir, tmp_path, capsys):
    model = str(run_dir / "best_model.pt")
    common = ["--steps", "1", "--output", str(tmp_path / "o"), "--no-progress"]
    assert main(["generate", "--model", model, "--reference", str(run_dir / "noface.png"), "--prompt", "x",
                 "--require-face", *common]) == EXIT_BAD_INPUT
    assert "noface.png: no face detected (--require-face)" in capsys.readouterr().err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main(["generate", "--model", model, "--reference", str(broken), "--prompt", "x", *common]) == EXIT_BAD_INPUT
    assert f"--reference {broken}" in capsys.readouterr().err
    empty = tmp_path / "prompts.txt"
    empty.write_text("\n  \n")
    assert main(["generate", "--model", model, "--reference", str(run_dir / "face.png"), "--prompts-file", str(empty),
                 *common]) == EXIT_BAD_INPUT
    assert "no prompt" in capsys.readouterr().err
    other = build_simple_pipeline(seed=1)
    other.transformer = type(other.transformer)(**{**dict(other.transformer.config), "num_single_layers": 2})
    save_pipeline_atomic(other, tmp_path / "other_base")
    assert main(["generate", "--model", model, "--base", str(tmp_path / "other_base"), "--reference",
                 str(run_dir / "face.png"), "--prompt", "x", *common]) == EXIT_BAD_INPUT
    assert "num_single_layers: 4 vs 2" in capsys.readouterr().err


def test_true_cfg_scale_one_equals_the_plain_call(pipe, run_dir):
    refs, _ = pipe.encode_references([Image.open(run_dir / "face.png")])
    assert np.array_equal(sample(pipe, refs, true_cfg_scale=1.0, negative_prompt="blurry"), sample(pipe, refs))


def test_true_cfg_with_a_no_identity_negative_differs_and_is_deterministic(pipe, run_dir):
    refs, _ = pipe.encode_references([Image.open(run_dir / "face.png")])
    plain = sample(pipe, refs)
    guided = sample(pipe, refs, true_cfg_scale=3.0)
    assert np.array_equal(sample(pipe, refs, true_cfg_scale=3.0), guided)
    assert np.abs(guided - plain).max() > 0
    assert not np.array_equal(sample(pipe, refs, true_cfg_scale=3.0, seed=1), guided)
    # Without references both branches are the same call, so the guidance cancels exactly: only identity differs.
    assert np.array_equal(sample(pipe, None, true_cfg_scale=3.0), sample(pipe, None))
    with pytest.raises(ValueError, match="true_cfg_scale must be >= 1"):
        sample(pipe, refs, true_cfg_scale=0.5)


def test_true_cfg_with_scales_zero_equals_the_base_pipeline(pipe, run_dir):
    refs, _ = pipe.encode_references([Image.open(run_dir / "face.png")])
    ours = sample(pipe, refs, face_scale=0.0, body_scale=0.0, true_cfg_scale=2.5, negative_prompt="a blurry photo")
    base = pipe.pipeline("a person standing in a park", negative_prompt="a blurry photo", true_cfg_scale=2.5,
                         num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0),
                         max_sequence_length=16).images[0]
    assert np.array_equal(np.asarray(base, dtype=np.int16), ours)
    assert not np.array_equal(ours, sample(pipe, refs, face_scale=0.0, body_scale=0.0))


def test_generate_cli_true_cfg_settings_reproduce_the_image(run_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["generate", "--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"),
                 "--prompt", "a person in a city", "--steps", "2", "--true-cfg", "2.0", "--negative-prompt", "blurry",
                 "--output", str(out), "--no-progress"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["true_cfg"], settings["negative_prompt"]) == (2.0, "blurry")
    again = tmp_path / "again"
    assert main(["generate", "--settings", str(out / "settings.json"), "--output", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "000_00.png")), np.asarray(Image.open(again / "000_00.png")))
    assert main(["generate", "--settings", str(out / "settings.json"), "--true-cfg", "0.5",
                 "--output", str(tmp_path / "bad"), "--no-progress"]) == EXIT_BAD_INPUT


def test_generate_cli_lora_settings_reproduce_the_image(run_dir, lora_file, tmp_path):
    common = ["--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"), "--prompt",
              "a person in a city", "--steps", "2", "--no-progress"]
    plain_out, out = tmp_path / "plain", tmp_path / "out"
    assert main(["generate", *common, "--output", str(plain_out)]) == 0
    assert main(["generate", *common, "--lora", str(lora_file), "--lora-scale", "0.7", "--offload", "none",
                 "--output", str(out)]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert (settings["lora"], settings["lora_scale"], settings["offload"]) == ([str(lora_file)], [0.7], "none")
    image = np.asarray(Image.open(out / "000_00.png"), dtype=np.int16)
    assert np.abs(image - np.asarray(Image.open(plain_out / "000_00.png"), dtype=np.int16)).max() > 0
    again = tmp_path / "again"
    assert main(["generate", "--settings", str(out / "settings.json"), "--output", str(again), "--no-progress"]) == 0
    assert np.array_equal(image, np.asarray(Image.open(again / "000_00.png"), dtype=np.int16))
    assert json.loads((again / "settings.json").read_text())["lora_scale"] == [0.7]


def test_generate_cli_bad_lora_and_offload_get_their_messages(run_dir, lora_file, tmp_path, capsys):
    common = ["generate", "--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"),
              "--prompt", "x", "--steps", "1", "--output", str(tmp_path / "o"), "--no-progress"]
    missing = tmp_path / "style.safetensors"
    assert main([*common, "--lora", str(missing)]) == EXIT_BAD_INPUT
    assert f"--lora {missing} does not exist" in capsys.readouterr().err
    not_lora = tmp_path / "notes.safetensors"
    not_lora.write_text("hello")
    assert main([*common, "--lora", str(not_lora)]) == EXIT_BAD_INPUT
    assert f"LoRA {not_lora}: truncated or not a safetensors file: a header of" in capsys.readouterr().err
    assert main([*common, "--lora", str(lora_file), "--lora", str(lora_file), "--lora-scale", "1", "--lora-scale",
                 "2", "--lora-scale", "3"]) == EXIT_BAD_INPUT
    assert "--lora-scale given 3 times for 2 --lora" in capsys.readouterr().err
    assert main([*common, "--offload", "sequential", "--device", "cpu"]) == EXIT_BAD_INPUT
    assert "offload 'sequential' needs a GPU" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([*common, "--offload", "model"]) == EXIT_BAD_INPUT
        assert "offload 'model' needs a GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ typed settings (settings.json)

# The keys ``settings.json`` has held since the first version (a run with references adds reference_faces).
SETTINGS_KEYS = {"base", "reference", "prompt", "prompts_file", "seed", "face_scale", "body_scale", "identity_start",
                 "identity_end", "steps", "guidance", "height", "width", "num_images", "require_face", "no_identity",
                 "device", "true_cfg", "negative_prompt", "offload", "lora", "lora_scale", "model", "reference_faces",
                 "images"}


def test_default_steps_is_20_for_the_simple_base_and_28_for_flux():
    from dtback.inference.pipeline import default_steps
    from dtback.model.adapter_file import RunRecord

    assert default_steps(RunRecord(base_model="base")) == 20
    assert default_steps(RunRecord(base_model="black-forest-labs/FLUX.1-dev")) == 28 and default_steps(RunRecord()) == 28


def test_settings_json_of_the_earlier_format_loads_and_reproduces(run_dir, tmp_path):
    from dtback.inference.generate import GenerateSettings, load_settings

    out = tmp_path / "out"
    assert main(["generate", "--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"),
                 "--prompt", "a person in a city", "--steps", "2", "--seed", "4", "--output", str(out),
                 "--no-progress"]) == 0
    written = json.loads((out / "settings.json").read_text())
    assert set(written) == SETTINGS_KEYS and set(GenerateSettings.model_fields) == SETTINGS_KEYS
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temporary file
    # Exactly what the dict-based version wrote (its key order, prompts_file always null, model last).
    earlier = {"base": None, "reference": [str(run_dir / "face.png")], "prompt": ["a person in a city"],
               "prompts_file": None, "seed": 4, "face_scale": None, "body_scale": None, "identity_start": 0.0,
               "identity_end": 1.0, "steps": 2, "guidance": 3.5, "height": 64, "width": 64, "num_images": 1,
               "require_face": False, "no_identity": False, "device": "auto", "true_cfg": 1.0,
               "negative_prompt": None, "offload": "none", "lora": [], "lora_scale": [],
               "model": str(run_dir / "best_model.pt"), "reference_faces": written["reference_faces"],
               "images": ["000_00.png"]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier, indent=2) + "\n")
    loaded = load_settings(tmp_path / "earlier.json")
    assert loaded.to_json() == earlier and written == earlier
    again = tmp_path / "again"
    assert main(["generate", "--settings", str(tmp_path / "earlier.json"), "--output", str(again),
                 "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(out / "000_00.png")), np.asarray(Image.open(again / "000_00.png")))
    assert json.loads((again / "settings.json").read_text()) == earlier


def test_settings_json_unknown_keys_and_bad_values_are_named(run_dir, tmp_path, capsys):
    from dtback.errors import ConfigError
    from dtback.inference.generate import GenerateSettings, load_settings

    good = {"model": str(run_dir / "best_model.pt"), "reference": [str(run_dir / "face.png")], "prompt": ["x"],
            "steps": 1}
    cases = [
        ({"stepz": 3}, "unknown key 'stepz'"),
        ({"true_cfg": 0.5}, "key 'true_cfg' (flag --true-cfg) = 0.5 must be >= 1 (1 = off)"),
        ({"steps": "20"}, "key 'steps' (flag --steps) = '20': Input should be a valid integer"),
        ({"height": 100}, "key 'height' (flag --height) = 100 must be a positive multiple of 16"),
        ({"offload": "disk"}, "key 'offload' (flag --offload) = 'disk'"),
        ({"no_identity": "yes"}, "key 'no_identity' (flag --no-identity) = 'yes'"),
        ({"lora_scale": [1.0, "strong"]}, "key 'lora_scale[1]' (flag --lora-scale) = 'strong'"),
        ({"identity_start": 0.9, "identity_end": 0.5}, "--identity-start 0.9 must be <= --identity-end 0.5"),
    ]
    for i, (change, expected) in enumerate(cases):
        path = tmp_path / f"settings{i}.json"
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError) as info:
            load_settings(path)
        assert expected in str(info.value), (change, str(info.value))
        assert main(["generate", "--settings", str(path), "--output", str(tmp_path / "o"),
                     "--no-progress"]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert expected in err, (change, err)
        if "identity_end" not in change:  # a check across keys names the flags only
            assert f"--settings {path}: " in err
    (tmp_path / "list.json").write_text("[1, 2]")
    assert main(["generate", "--settings", str(tmp_path / "list.json"), "--no-progress"]) == EXIT_BAD_INPUT
    assert "expected a JSON object of settings, got list" in capsys.readouterr().err
    # A flag overrides the file's value and is named as a flag.
    (tmp_path / "good.json").write_text(json.dumps(good))
    assert main(["generate", "--settings", str(tmp_path / "good.json"), "--steps", "0", "--num-images", "0",
                 "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--steps 0: Input should be greater than or equal to 1" in err and "--num-images 0" in err
    assert GenerateSettings(lora=["a.safetensors", "b.safetensors"], lora_scale=[0.5]).lora_scale == [0.5, 0.5]
