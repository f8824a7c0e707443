"""Damaged checkpoints (src/dtback/training/checkpoint_load.py, trainer.py): NaN or infinite tensors, a state.json of
another form, tensors of another shape and a missing EMA are refused naming the file and key (auto-resume skips
them like a truncated file); a run folder whose checkpoints are all damaged is refused before any work, rewriting
nothing; best_model.pt and checkpoints are never written from non-finite weights, and a NaN validation metric is
never an improvement. Tiny live objects (a linear layer, AdamW, an EMA): no training run, fast."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

from dtback.config import load_config
from dtback.errors import CheckpointError, TrainingDiverged
from dtback.training import checkpoint as ckpt
from dtback.training import checkpoint_load as vet
from dtback.training.trainer import _check_finite_weights, train
from dtback.training.validation import selection_metric
from helpers import REPO


class Adapter:
    """Stands in for the identity model: save_checkpoint only asks it for its adapter state and folder."""

    def adapter_state_dict(self):
        return {}

    def save_pretrained(self, path, state=None):
        path.mkdir(parents=True)


def live(seed: int = 0, width: int = 3):
    """(trainable by name, optimizer, scheduler, ema) of a tiny model, trained one step so every state is set."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(width, 2)
    trainable = dict(layer.named_parameters())
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ema = EMAModel(list(trainable.values()), decay=0.9)
    layer(torch.ones(1, width)).sum().backward()
    optimizer.step()
    scheduler.step()
    ema.step(list(trainable.values()))
    return trainable, optimizer, scheduler, ema


def save(run_dir: Path, step: int, seed: int = 0) -> Path:
    trainable, optimizer, scheduler, ema = live(seed)
    snapshot = ckpt.take_snapshot(Adapter(), trainable, optimizer, ema)
    return ckpt.save_checkpoint(run_dir, ckpt.Progress(step=step, best_metric=0.5, best_step=step), Adapter(),
                                snapshot, scheduler, keep=10)


def poison(path: Path, key: str, value: float = math.nan) -> None:
    tensors = load_file(path)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = value
    save_file(tensors, path)


def every_byte(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name, key", [("ema.safetensors", "1"), ("trainable.safetensors", "weight"),
                                       ("optimizer.safetensors", "0.exp_avg_sq")])
def test_a_non_finite_tensor_is_refused_naming_file_and_key_before_anything_changes(tmp_path, name, key):
    folder = save(tmp_path, 2)
    poison(folder / name, key, math.nan if name != "optimizer.safetensors" else math.inf)
    assert vet.checkpoint_problem(folder) == f"{name}: tensor {key!r} holds NaN or infinite values"
    trainable, optimizer, scheduler, ema = live(seed=1)
    before = {k: v.detach().clone() for k, v in trainable.items()}
    with pytest.raises(CheckpointError, match=rf"checkpoint-000002 cannot be resumed from: {name}: tensor '{key}'"):
        vet.load_checkpoint(folder, trainable, optimizer, scheduler, ema)
    assert all(torch.equal(before[k], trainable[k]) for k in trainable)  # nothing loaded
    assert all(torch.isfinite(t).all() for t in ema.shadow_params)


def test_auto_resume_skips_a_checkpoint_with_a_nan_ema_for_the_one_before(tmp_path, caplog):
    save(tmp_path, 2)
    newest = save(tmp_path, 4)
    poison(newest / "ema.safetensors", "0")
    with caplog.at_level(logging.WARNING):
        assert vet.resumable_checkpoint(tmp_path).folder == ckpt.checkpoint_dir(tmp_path, 2)
    assert "checkpoint-000004 cannot be resumed from: ema.safetensors: tensor '0' holds NaN" in caplog.text


def test_resuming_reads_each_tensor_file_once_and_loads_what_it_vetted(tmp_path, monkeypatch):
    save(tmp_path, 2, seed=0)
    reads = []
    real = vet.load_file
    monkeypatch.setattr(vet, "load_file", lambda path: reads.append(Path(path).name) or real(path))
    checkpoint = vet.resume_point(tmp_path, "auto")
    poison(checkpoint.folder / "trainable.safetensors", "weight")  # changed after vetting: not read again
    trainable, optimizer, scheduler, ema = live(seed=1)
    assert vet.load_checkpoint(checkpoint, trainable, optimizer, scheduler, ema).step == 2
    assert sorted(reads) == ["ema.safetensors", "optimizer.safetensors", "trainable.safetensors"]
    expected, _, _, _ = live(seed=0)
    assert all(torch.equal(expected[k], trainable[k]) for k in trainable)  # the vetted, finite weights


def test_a_good_checkpoint_still_restores_every_state(tmp_path):
    folder = save(tmp_path, 2, seed=0)
    expected, _, _, expected_ema = live(seed=0)
    trainable, optimizer, scheduler, ema = live(seed=1)
    progress = vet.load_checkpoint(folder, trainable, optimizer, scheduler, ema)
    assert (progress.step, progress.best_metric) == (2, 0.5)
    assert all(torch.equal(expected[k], trainable[k]) for k in trainable)
    assert all(torch.equal(a, b) for a, b in zip(expected_ema.shadow_params, ema.shadow_params))


@pytest.mark.parametrize("text, problem", [
    ("{}", "state.json: key 'progress' must be an object (got missing)"),
    ("[]", "state.json is not a JSON object (got list)"),
    ('{"progress": {"step": 2}, "optimizer": {}, "scheduler": {}, "rng": {}, "ema": null}',
     "state.json: key 'optimizer' must hold 'param_groups'"),
])
def test_a_state_json_of_another_form_is_named_not_a_traceback(tmp_path, text, problem):
    save(tmp_path, 2)
    folder = save(tmp_path, 4)
    (folder / "state.json").write_text(text, encoding="utf-8")
    assert vet.checkpoint_problem(folder).startswith(problem)
    assert vet.resumable_checkpoint(tmp_path).folder == ckpt.checkpoint_dir(tmp_path, 2)
    with pytest.raises(CheckpointError, match="state.json"):
        vet.checkpoint_record(folder)  # was AttributeError on a list
    with pytest.raises(CheckpointError, match=f"cannot be resumed from: {problem[:30]}"):
        vet.load_checkpoint(folder, *live(seed=1))  # was KeyError 'optimizer'


def test_a_missing_ema_file_is_damage_when_state_json_records_an_ema(tmp_path):
    save(tmp_path, 2)
    folder = save(tmp_path, 4)
    (folder / "ema.safetensors").unlink()
    assert vet.checkpoint_problem(folder) == "ema.safetensors is missing (state.json records an EMA)"
    assert vet.resumable_checkpoint(tmp_path).folder == ckpt.checkpoint_dir(tmp_path, 2)
    with pytest.raises(CheckpointError, match="ema.safetensors is missing"):  # was FileNotFoundError
        vet.load_checkpoint(folder, *live(seed=1))


def test_a_tensor_of_another_shape_is_named(tmp_path):
    folder = save(tmp_path, 2)
    weights = load_file(folder / "trainable.safetensors")
    weights["weight"] = torch.zeros(5, 7)
    save_file(weights, folder / "trainable.safetensors")
    # Against its own EMA: found by the check that runs before any work.
    assert vet.checkpoint_problem(folder) == ("trainable.safetensors and ema.safetensors disagree on tensor shapes "
                                               "(e.g. ['weight'])")
    # EMA changed alike: only the live model knows, and load_checkpoint names it (was RuntimeError in copy_).
    shadow = load_file(folder / "ema.safetensors")
    shadow["0"] = torch.zeros(5, 7)  # the EMA keeps trainable's order: weight, bias
    save_file(shadow, folder / "ema.safetensors")
    assert vet.checkpoint_problem(folder) is None
    trainable, optimizer, scheduler, ema = live(seed=1)
    before = {k: v.detach().clone() for k, v in trainable.items()}
    with pytest.raises(CheckpointError, match=r"trainable.safetensors: tensor 'weight' has shape \(5, 7\), the "
                                              r"model's is \(2, 3\)"):
        vet.load_checkpoint(folder, trainable, optimizer, scheduler, ema)
    assert all(torch.equal(before[k], trainable[k]) for k in trainable)


def config(tmp_path: Path, run_dir: Path):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    values = {"data_dir": data, "output_dir": run_dir, "data.world.generate_if_missing": "false",
              "identity.body_model": "null", "identity.face_backend": "dlib", "body_weight": 0,
              "model.simple_vae": "null", "model.simple_base": "null", "training.log_with": "[]"}
    return load_config(REPO / "train" / "config.yaml", [f"{k}={v}" for k, v in values.items()])


def test_a_run_folder_whose_checkpoints_are_all_damaged_is_refused_before_any_work(tmp_path, caplog):
    run_dir = tmp_path / "run"
    for step in (2, 4):
        folder = save(run_dir, step)
        (folder / "trainable.safetensors").write_bytes((folder / "trainable.safetensors").read_bytes()[:60])
    (run_dir / "best_model.pt").write_bytes(b"the user's best model")
    before = every_byte(run_dir)
    with caplog.at_level(logging.WARNING), pytest.raises(CheckpointError) as err:
        train(config(tmp_path, run_dir), resume="auto", progress_bar=False)
    message = str(err.value)
    assert "none of the checkpoints" in message and "checkpoint-000002, checkpoint-000004" in message
    assert "--no-resume" in message and "another output_dir" in message
    assert caplog.text.count("falling back to the one before it") == 2
    after = every_byte(run_dir)
    after.pop(".dtback.lock", None)
    assert after == before  # nothing trained, nothing rewritten


def test_non_finite_weights_stop_before_validation_or_a_checkpoint(tmp_path):
    trainable, _, _, ema = live()
    accelerator = Accelerator(cpu=True)
    progress = ckpt.Progress(step=6, best_step=3)
    _check_finite_weights(accelerator, trainable, ema, progress, tmp_path)  # finite: nothing happens
    ema.shadow_params[0].view(-1)[2] = math.nan  # the EMA keeps trainable's order: weight, bias
    with pytest.raises(TrainingDiverged, match=r"EMA weights hold NaN .* step 6 \(first: weight\).* best_model.pt "
                                               r"kept \(step 3\)"):
        _check_finite_weights(accelerator, trainable, ema, progress, tmp_path)
    with torch.no_grad():
        trainable["bias"][0] = math.inf
    with pytest.raises(TrainingDiverged, match=r"trainable weights .* \(first: bias\)"):
        _check_finite_weights(accelerator, trainable, None, progress, tmp_path)


def test_a_nan_validation_metric_is_never_an_improvement():
    assert selection_metric({"val/face_sim": 0.2, "val/body_sim": 0.4}) == pytest.approx(0.3)
    for bad in (math.nan, math.inf):
        metric = selection_metric({"val/face_sim": bad, "val/body_sim": 0.4})
        assert metric == -math.inf and not metric > -1.0  # setup's test: metric > best_metric
