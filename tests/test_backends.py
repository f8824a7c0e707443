"""backends.photo_backends: the identity world's encoders never run on a photo folder unasked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dtback import backends
from dtback.cli import EXIT_BAD_INPUT, main
from dtback.config import load_config
from dtback.errors import ConfigError
from helpers import make_dataset

CONFIG = Path(__file__).resolve().parents[1] / "train" / "config.yaml"


@pytest.fixture
def no_world_encoders(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a world encoder was loaded for a photo folder")

    monkeypatch.setattr(backends, "load_world_face_encoder", refuse)
    monkeypatch.setattr(backends, "load_world_body_encoder", refuse)


def precompute(photos: Path, out: Path, *overrides: str) -> int:
    settings = [f"data.data_dir={json.dumps(str(photos))}", f"output.output_dir={json.dumps(str(out))}", *overrides]
    return main(["precompute", "--config", str(CONFIG), "--no-progress",
                 *(item for setting in settings for item in ("--set", setting))])


def test_precompute_on_photos_with_the_default_config_never_runs_the_world_encoders(
    tmp_path, capsys, no_world_encoders
):
    photos = make_dataset(tmp_path / "photos", {"holiday": {"anna": 3}})
    assert load_config(CONFIG, []).identity.face_backend == "world"  # the embedded default
    assert precompute(photos, tmp_path / "run") == EXIT_BAD_INPUT
    printed = capsys.readouterr().err
    assert "identity.body_model=world" in printed and "not an identity world" in printed
    # With a body model chosen (here none), the faces go to dlib, never to the world's encoder.
    assert precompute(photos, tmp_path / "run", "identity.body_model=null") == 0
    assert "identity.face_backend world -> dlib" in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "precompute_report.json").read_text())
    assert report["images"] == 3 and report["face_encoder_calls"] == 3


def test_a_world_folder_and_a_missing_folder_keep_the_world_encoders(tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    (world / "world.json").write_text("{}")
    cfg = load_config(CONFIG, [f"data.data_dir={json.dumps(str(world))}"])
    assert backends.photo_backends(cfg) == (cfg, None)
    missing = load_config(CONFIG, [f"data.data_dir={json.dumps(str(tmp_path / 'not_yet'))}"])
    assert backends.photo_backends(missing) == (missing, None)
    photos = make_dataset(tmp_path / "photos", {"b": {"c": 2}})
    with pytest.raises(ConfigError, match="identity.body_model"):
        backends.photo_backends(load_config(CONFIG, [f"data.data_dir={json.dumps(str(photos))}"]))


def test_train_on_photos_gets_the_photo_face_backend(tmp_path, monkeypatch, capsys):
    """`dtback train` resolves the backends before the trainer sees the config (the trainer itself is not run)."""
    from dtback.training import trainer

    seen = []

    def fake_train(cfg, **kwargs):
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(trainer, "train", fake_train)
    photos = make_dataset(tmp_path / "photos", {"b": {"c": 3}})
    settings = [f"data.data_dir={json.dumps(str(photos))}", f"output.output_dir={json.dumps(str(tmp_path / 'run'))}"]
    args = ["train", "--config", str(CONFIG), *(item for s in settings for item in ("--set", s))]
    assert main(args) == EXIT_BAD_INPUT and not seen  # body_model world on photos: stops before training
    assert "identity.body_model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*args, "--set", "identity.body_model=null"])
    assert seen[0].identity.face_backend == "dlib" and seen[0].identity.body_model is None


def test_body_weights_cut_short_are_named_not_a_safetensors_traceback(tmp_path):
    """A body backbone whose model.safetensors is cut short (an interrupted copy, a partial hub snapshot) ends in
    one message naming the model and what to do."""
    from dtback import backends as backends_module
    from dtback.config import IdentityConfig
    from dtback.errors import MissingModelError
    from helpers import save_tiny_dinov2

    folder = save_tiny_dinov2(tmp_path / "dino")
    weights = folder / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-64])  # the header is whole, the last tensor's bytes are not
    identity = IdentityConfig(face_backend="dlib", body_model=str(folder), device="cpu")
    with pytest.raises(MissingModelError) as caught:
        backends_module.body_encoder(identity)
    message = str(caught.value)
    assert f"identity.body_model={folder}" in message and "cannot be read" in message
    assert f"model.safetensors: truncated: {len(whole) - 64} of its {len(whole)} bytes" in message
    assert "dtback download --only body" in message and "\n" not in message
