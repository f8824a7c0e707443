"""`dtback evaluate` on a run trained for two steps on a tiny identity world: table, JSON, grid, real numbers."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.config import load_config
from dtback.world.people import BODY_ATTRIBUTES, FACE_ATTRIBUTES
from dtback.evaluation.benchmark import CONDITIONS, grid_cell
from dtback.evaluation.heldout import WORLD_PROMPTS
from dtback.world.reader import load_reader
from dtback.viz.grid import grid_layout
from helpers import make_dataset

RANGES = {"reader_face": (0, 1), "reader_body": (0, 1), "reader_mean": (0, 1), "face_detected": (0, 1)}


@pytest.fixture(scope="module")
def evaluated(world_run, tiny_clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("evaluation")
    code = main(["evaluate", "--model", str(world_run / "best_model.pt"), "--steps", "2", "--seed", "3",
                 "--clip-model", str(tiny_clip), "--out", str(out), "--no-progress"])
    assert code == 0
    return out, json.loads((out / "results.json").read_text())


def test_three_rows_with_every_metric_finite_and_in_range(evaluated, world_run):
    out, results = evaluated
    held_out = json.loads((world_run / "split.json").read_text())["val"]
    assert [c["key"] for c in results["characters"]] == held_out and len(held_out) == 2
    assert results["held_out_source"].endswith("split.json") and results["prompts"] == list(WORLD_PROMPTS)
    assert list(results["conditions"]) == list(CONDITIONS) and results["unavailable"] == {}
    metrics = [c["metric"] for c in results["columns"]]
    assert metrics == ["face_sim", "reader_face", "body_sim", "reader_body", "reader_mean", "prompt_adherence",
                       "copy_paste"]
    for condition, row in results["conditions"].items():
        for metric in [*metrics, "face_detected"]:
            value = row[metric]
            low, high = RANGES.get(metric, (-1, 1))
            assert value is not None and math.isfinite(value) and low - 1e-6 <= value <= high + 1e-6, \
                (condition, metric, value)
        assert row["reader_mean"] == pytest.approx((row["reader_face"] + row["reader_body"]) / 2)
    delta = results["deltas"]["with_identity_minus_no_identity"]["body_sim"]
    rows = results["conditions"]
    assert delta == pytest.approx(rows["with_identity"]["body_sim"] - rows["no_identity"]["body_sim"])
    images = results["images"]
    assert len(images) == 3 * 2 * len(WORLD_PROMPTS)
    assert all((out / image["path"]).is_file() for image in images)
    shuffled = [image for image in images if image["condition"] == "shuffled"]
    assert all(image["reference_of"] != image["character"] for image in shuffled)


def test_markdown_table_lists_the_three_rows(evaluated):
    out, results = evaluated
    table = (out / "results.md").read_text()
    header = table.splitlines()[0]
    for column in ("face sim (world face encoder)", "face reader acc", "body sim", "body reader acc",
                   "mean reader acc", "prompt adherence (CLIP)", "copy-paste"):
        assert column in header
    for label, condition in (("with identity", "with_identity"), ("no identity", "no_identity"),
                             ("shuffled reference", "shuffled")):
        line = next(line for line in table.splitlines() if line.startswith(f"| {label} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == f"{results['conditions'][condition]['face_sim']:.3f}"
        assert len(cells) == 8


def test_grid_has_a_row_per_character_and_four_columns(evaluated):
    out, results = evaluated
    keys = [c["key"] for c in results["characters"]]
    layout = grid_layout(keys, ["reference", *CONDITIONS.values()], 4, grid_cell(results["settings"]["size"]),
                         f"prompt: {results['prompts'][0]}")
    grid = Image.open(out / "grid.png")
    assert grid.size == layout.size and layout.rows == 2


def test_no_identity_reader_accuracy_is_what_the_reader_reads(evaluated, world_run):
    """Recompute the no-identity row from the saved images, the reader and the world's metadata sidecars."""
    out, results = evaluated
    reader = load_reader()  # the shipped reader; a missing one raises instead of training
    data_dir = results["data_dir"]
    face, body = [], []
    for image in (i for i in results["images"] if i["condition"] == "no_identity"):
        truth = json.loads(open(f"{data_dir}/{image['character']}/000.json").read())["attributes"]
        read = reader.read([np.asarray(Image.open(out / image["path"]).convert("RGB"))])[0]
        assert image["reader"]["read"] == read  # each image's reading is in results.json, with its hits
        assert image["reader"]["hits"] == {name: float(read[name] == truth[part][name])
                                           for part, names in (("face", FACE_ATTRIBUTES), ("body", BODY_ATTRIBUTES))
                                           for name in names}
        face.append(np.mean([read[name] == truth["face"][name] for name in FACE_ATTRIBUTES]))
        body.append(np.mean([read[name] == truth["body"][name] for name in BODY_ATTRIBUTES]))
    row = results["conditions"]["no_identity"]
    assert row["reader_face"] == pytest.approx(np.mean(face), abs=1e-9)
    assert row["reader_body"] == pytest.approx(np.mean(body), abs=1e-9)
    assert row["reader_mean"] == pytest.approx((np.mean(face) + np.mean(body)) / 2, abs=1e-9)


def test_bad_inputs_get_clear_messages(world_run, tmp_path, capsys):
    model = str(world_run / "best_model.pt")
    common = ["--steps", "1", "--out", str(tmp_path / "o"), "--no-progress"]

    assert main(["evaluate", "--model", str(tmp_path / "missing.pt"), *common]) == EXIT_BAD_INPUT
    assert f"--model {tmp_path / 'missing.pt'} does not exist" in capsys.readouterr().err

    run = tmp_path / "run"  # a run folder whose split holds nothing out
    run.mkdir()
    shutil.copy(world_run / "best_model.pt", run / "best_model.pt")
    shutil.copy(world_run / "config.yaml", run / "config.yaml")
    (run / "split.json").write_text(json.dumps({"method": "explicit", "train": ["world/c0000"], "val": []}))
    assert main(["evaluate", "--model", str(run / "best_model.pt"), *common]) == EXIT_BAD_INPUT
    assert "no held-out characters" in capsys.readouterr().err

    assert main(["evaluate", "--model", model, "--true-cfg", "0.5", *common]) == EXIT_BAD_INPUT
    assert "--true-cfg 0.5 must be >= 1" in capsys.readouterr().err

    empty = tmp_path / "prompts.txt"
    empty.write_text("\n   \n")
    assert main(["evaluate", "--model", model, "--prompts-file", str(empty), *common]) == EXIT_BAD_INPUT
    assert f"--prompts-file {empty} holds no prompt" in capsys.readouterr().err

    held_out = json.loads((world_run / "split.json").read_text())["val"]
    assert main(["evaluate", "--model", model, "--characters", held_out[0], *common]) == EXIT_BAD_INPUT
    assert "need at least 2 held-out characters" in capsys.readouterr().err

    assert main(["evaluate", "--model", model, "--characters", "world/nobody", *common]) == EXIT_BAD_INPUT
    assert "held-out character world/nobody: no folder" in capsys.readouterr().err

    assert main(["evaluate", "--model", model, "--clip-model", str(tmp_path), *common]) == EXIT_BAD_INPUT
    assert "not a transformers CLIP folder" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ photos: InsightFace + dlib


@pytest.fixture(scope="module")
def photo_run(tmp_path_factory):
    """A run trained (in spirit) on photos: InsightFace (a tiny pack: magenta squares are faces) as the training
    face encoder, a tiny DINOv2 body model, random adapters on a saved simple base; two characters of photos."""
    import torch
    from skimage import data as skdata

    from dtback.config import IdentityConfig, ModelConfig
    from dtback.model.flux import build_simple_pipeline, save_pipeline_atomic
    from dtback.model.identity_flux import IdentityPreservingFlux
    from flux_helpers import randomise_outputs
    from helpers import MAGENTA, export_tiny_insightface_pack, save_tiny_dinov2

    root = tmp_path_factory.mktemp("photo_run")
    pipeline = build_simple_pipeline(seed=0)
    save_pipeline_atomic(pipeline, root / "run" / "base")
    identity = IdentityConfig(face_backend="insightface", face_model_dir=export_tiny_insightface_pack(root / "pack"),
                              face_det_size=320, body_model=str(save_tiny_dinov2(root / "dino")))
    torch.manual_seed(0)
    model = IdentityPreservingFlux.from_config(ModelConfig(), identity, pipeline.transformer.config, face_dim=64,
                                               body_dim=32, body_token_dim=32)
    randomise_outputs(model, seed=3)
    model.spec.extra.update(base_model="base", identity=identity.model_dump(mode="json"), input_size=64,
                            max_sequence_length=16)
    model.save_pretrained(root / "run" / "best_model.pt")
    astronaut = Image.fromarray(skdata.astronaut()).resize((320, 320))
    for name, picture in (("alice", astronaut), ("bob", astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT))):
        for i, corner in enumerate(((16, 16), (288, 16))):
            image = picture.copy()
            image.paste(MAGENTA, (*corner, corner[0] + 16, corner[1] + 16))
            (root / "photos" / "set" / name).mkdir(parents=True, exist_ok=True)
            image.save(root / "photos" / "set" / name / f"{i}.png")
    return root


def test_photos_use_insightface_and_dlib_and_say_what_is_not_available(photo_run, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(photo_run / "run" / "best_model.pt"), "--data-dir",
                 str(photo_run / "photos"), "--characters", "set/alice", "--characters", "set/bob", "--steps", "1",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["recognizers"]["face_sim"].startswith("insightface") and \
        results["recognizers"]["face_sim_2"].startswith("dlib")
    assert [c["header"] for c in results["columns"]][:2] == ["face sim (insightface)", "face sim (dlib)"]
    assert results["unavailable"]["prompt_adherence"] == "n/a (no CLIP model)"
    assert results["unavailable"]["reader_mean"] == "n/a (no world metadata)"
    for row in results["conditions"].values():
        for metric in ("face_sim", "face_sim_2", "body_sim", "copy_paste"):
            assert -1 <= row[metric] <= 1
        assert row["reader_body"] is None and row["prompt_adherence"] is None
    table = (out / "results.md").read_text()
    assert table.count("n/a (no CLIP model)") == 3 and "| shuffled reference |" in table
    assert "face sim (dlib)" in capsys.readouterr().out


def test_without_split_file_the_config_gives_the_same_held_out_characters(world_run, tmp_path):
    """A run folder without split.json: data.val_fraction of its config.yaml, applied again, gives the same split."""
    from dtback.evaluation.heldout import held_out_keys, run_config

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(world_run / "config.yaml", run / "config.yaml")
    cfg = run_config(run, None)
    keys, source = held_out_keys(run, cfg, cfg.data.data_dir, [])
    assert keys == json.loads((world_run / "split.json").read_text())["val"]
    assert source.startswith("config data.val_fraction=0.25")


def test_true_cfg_changes_the_images_with_identity_only(evaluated, world_run, tmp_path):
    _, results = evaluated
    run_cfg = load_config(world_run / "config.yaml")
    assert results["settings"]["true_cfg"] == run_cfg.training.val_true_cfg  # the run's value by default
    runs = {}
    for scale in ("1", "3"):
        runs[scale] = tmp_path / f"cfg{scale}"
        assert main(["evaluate", "--model", str(world_run / "best_model.pt"), "--steps", "2", "--seed", "3",
                     "--true-cfg", scale, "--out", str(runs[scale]), "--no-progress"]) == 0
        assert json.loads((runs[scale] / "results.json").read_text())["settings"]["true_cfg"] == float(scale)
    out, cfg_out = runs["1"], runs["3"]
    for condition, same in (("no_identity", True), ("with_identity", False), ("shuffled", False)):
        for path in sorted((out / "images" / condition).rglob("*.png")):
            plain = np.asarray(Image.open(path))
            guided = np.asarray(Image.open(cfg_out / path.relative_to(out)))
            assert np.array_equal(plain, guided) == same, (condition, path.name)


def test_evaluate_settings_reject_bad_values_naming_the_flag(tmp_path, capsys):
    from dtback.errors import ConfigError
    from dtback.evaluation.benchmark import EvaluateSettings

    model = tmp_path / "missing.pt"  # the values are checked before any file is looked at
    common = ["evaluate", "--model", str(model), "--out", str(tmp_path / "o"), "--no-progress"]
    for flags, expected in ((["--images-per-prompt", "0"], "--images-per-prompt 0 is too small (at least 1)"),
                            (["--num-characters", "1"], "--num-characters 1 is too small (at least 2)"),
                            (["--steps", "0"], "--steps 0 is too small (at least 1)"),
                            (["--true-cfg", "0.5"], "--true-cfg 0.5 must be >= 1 (1 = off)"),
                            (["--guidance", "nan"], "--guidance nan: Input should be a finite number")):
        assert main([*common, *flags]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err
        assert expected in err and "does not exist" not in err, (flags, err)
    with pytest.raises(ConfigError, match="unknown evaluate setting 'stepz'"):
        EvaluateSettings.create(model=model, out=tmp_path, stepz=2)
    with pytest.raises(ConfigError, match="--seed 1.5: Input should be a valid integer"):
        EvaluateSettings.create(model=model, out=tmp_path, seed=1.5)
    settings = EvaluateSettings.create(model=str(model), out=tmp_path)
    assert settings.model == model and settings.characters == [] and settings.images_per_prompt == 1
    assert settings.steps is None and settings.guidance == 3.5 and settings.true_cfg is None and settings.progress


def test_results_files_are_complete_and_settings_recorded(evaluated):
    out, results = evaluated
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temporary file
    assert (out / "results.md").read_text().endswith("\n")
    settings = results["settings"]
    assert (settings["steps"], settings["seed"], settings["images_per_prompt"]) == (2, 3, 1)
    assert settings["model"].endswith("best_model.pt") and settings["out"] == str(out)


def test_per_attribute_reader_table_agrees_with_the_means_and_shows_the_ceiling(evaluated):
    out, results = evaluated
    attributes = results["reader_attributes"]
    from dtback.world.people import BODY_ATTRIBUTES, FACE_ATTRIBUTES

    assert set(attributes) == set(FACE_ATTRIBUTES) | set(BODY_ATTRIBUTES)
    for condition in ("with_identity", "no_identity", "shuffled"):
        face = np.mean([attributes[name][condition] for name in FACE_ATTRIBUTES])
        body = np.mean([attributes[name][condition] for name in BODY_ATTRIBUTES])
        assert face == pytest.approx(results["conditions"][condition]["reader_face"])
        assert body == pytest.approx(results["conditions"][condition]["reader_body"])
    # The reader's recorded accuracy on VAE round trips (the ceiling) sits beside each attribute.
    assert 0 < attributes["eye_colour"]["reader_on_decoded"] < attributes["eye_colour"]["reader_on_render"] <= 1
    table = (out / "results.md").read_text()
    assert "| eye_colour | face |" in table and "decoded (reader)" in table


def test_another_world_is_evaluated_on_every_character_and_the_same_world_on_the_split(world_run, tmp_path):
    """``--data-dir`` may point at any world: one of another seed holds no trained character, so every character is
    held out; the training world, even copied elsewhere, keeps the run's split; a photo folder without the run's
    held-out characters is another dataset too."""
    from dtback.config import WorldConfig
    from dtback.evaluation.heldout import held_out_keys, run_config
    from dtback.world.files import write_world

    cfg = run_config(world_run, None)
    split = json.loads((world_run / "split.json").read_text())["val"]
    other = write_world(tmp_path / "seed5", WorldConfig(characters=5, images_per_character=2, size=128, seed=5),
                        progress=False).root
    keys, source = held_out_keys(world_run, cfg, other, [])
    assert len(keys) == 5 and source.startswith(f"every character of {other}")
    copy = tmp_path / "copy"
    shutil.copytree(cfg.data.data_dir, copy)
    assert held_out_keys(world_run, cfg, copy, []) == (split, str(world_run / "split.json"))
    photos = make_dataset(tmp_path / "photos", {"film": {"ann": 2, "bo": 2, "cy": 2}})
    keys, source = held_out_keys(world_run, cfg, photos, [])
    assert keys == ["film/ann", "film/bo", "film/cy"] and source.startswith("every character of")


def test_several_references_per_character_leave_the_rest_as_gallery(world_run, tmp_path):
    out = tmp_path / "three"
    assert main(["evaluate", "--model", str(world_run / "best_model.pt"), "--steps", "1", "--seed", "3",
                 "--references", "2", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["references"] == 2
    for character in results["characters"]:
        references, gallery = character["references"], character["gallery"]
        assert len(references) == 2 and references[0] == character["reference"]
        assert not set(references) & set(gallery) and len(gallery) == 1  # 3 images per world character
    assert "2 reference(s) per character" in (out / "results.md").read_text()
    assert main(["evaluate", "--model", str(world_run / "best_model.pt"), "--references", "0",
                 "--out", str(out)]) == EXIT_BAD_INPUT
