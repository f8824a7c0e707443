"""The run folder is a record (issue 19): a refused resume rewrites nothing, a resume states what changed against
its checkpoint and refuses what would silently train something else, one run per folder, stale temporaries
cleaned, a damaged newest checkpoint skipped, a full disk reported, bad output folders refused before any work."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from dtback.config import load_config
from dtback.errors import CheckpointError, ConfigError, DtbackError
from dtback.model.identity_flux import read_adapter
from dtback.training import checkpoint as ckpt
from dtback.training import checkpoint_load as vet
from dtback.training import setup as run_setup
from dtback.training.resume import LOCK_FILE, compare, run_folder_lock
from dtback.training.trainer import train
from helpers import REPO, make_dataset, save_tiny_dinov2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("record")
    data = make_dataset(root / "data", {"b": {f"c{i}": 3 for i in range(6)}}, size=(32, 32))
    return {"data": data, "body": save_tiny_dinov2(root / "dino"), "cache": root / "cache", "root": root}


def config(tiny, run_dir: Path, **extra):
    values = {
        "data_dir": tiny["data"], "output_dir": run_dir, "input_size": 32, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": tiny["body"],
        "identity.cache_dir": tiny["cache"], "identity.face_backend": "dlib", "model.simple_vae": "null",
        "model.simple_base": "null", "face_weight": 0, "body_weight": 0.1, "training.max_steps": 4,
        "training.checkpoint_every": 2, "training.validate_every": 1000, "training.num_val_characters": 1,
        "training.warmup_steps": 1, "training.log_every": 1, "training.log_with": "[]", **extra,
    }
    return load_config(REPO / "train" / "config.yaml", [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def trained(tiny):
    """A finished 4-step run (checkpoints 2 and 4) to copy and resume."""
    run_dir = tiny["root"] / "run"
    train(config(tiny, run_dir), resume=None, progress_bar=False)
    return run_dir


# Validated at steps 2 and 4, the simple base co-trained (the default), without EMA: base/ is the live base.
VALIDATED = {"training.validate_every": 2, "training.val_sampling_steps": 1, "training.ema_decay": "null"}


def worse_later(metrics: dict) -> float:
    """A selection metric by which every validation scores below the one before: the first stays the best."""
    return -float(metrics["step"])


@pytest.fixture(scope="module")
def validated(tiny):
    """A finished 4-step run validated at steps 2 and 4 whose best model is step 2's (checkpoints 2 and 4)."""
    run_dir = tiny["root"] / "validated"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_setup, "selection_metric", worse_later)
        train(config(tiny, run_dir, **VALIDATED), resume=None, progress_bar=False)
    return run_dir


def copy_run(trained: Path, target: Path, keep_step: int = 4) -> Path:
    shutil.copytree(trained, target)
    for folder in (target / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) > keep_step:
            shutil.rmtree(folder)
    return target


def every_byte(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
            and p.name != LOCK_FILE}


def test_compare_sorts_changes_into_applied_and_refused():
    harmless, refused = compare({"training": {"log_every": 10, "learning_rate": 1e-4}, "seed": 1},
                                {"training": {"log_every": 5, "learning_rate": 1e-3}, "seed": 1})
    assert harmless == ["training.log_every: 10 -> 5"]
    assert refused == ["training.learning_rate: 0.0001 -> 0.001"]
    # The validation step count is harmless for FLUX.1; a FLUX.2 run shifts its training noise levels by it.
    for base, harmful in (("flux1", False), ("flux2_klein", True)):
        harmless, refused = compare({"model": {"base": base}, "training": {"val_sampling_steps": 20}},
                                    {"model": {"base": base}, "training": {"val_sampling_steps": 28}})
        assert (refused if harmful else harmless) == ["training.val_sampling_steps: 20 -> 28"]


@pytest.mark.slow
@pytest.mark.parametrize("change, named", [
    ({"identity.num_face_latents": 4}, "identity.num_face_latents: 8 -> 4"),  # a shape: was a size-mismatch crash
    ({"training.learning_rate": 1e-3}, "training.learning_rate"),  # was recorded, and ignored by the scheduler
    ({"seed": 7}, "seed: 42 -> 7"),
])
def test_a_refused_resume_names_the_change_and_rewrites_nothing(tiny, trained, tmp_path, change, named):
    run_dir = copy_run(trained, tmp_path / "run", keep_step=2)
    before = every_byte(run_dir)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")) as err:
        train(config(tiny, run_dir, **change), resume="auto", progress_bar=False)
    assert "another output_dir" in str(err.value)
    assert every_byte(run_dir) == before  # config.yaml included


@pytest.mark.slow
def test_another_dataset_under_the_same_names_is_refused(tiny, trained, tmp_path):
    other = make_dataset(tmp_path / "other", {"b": {f"c{i}": 3 for i in range(6)}}, size=(32, 32))
    (other / "b" / "c0" / "000.png").unlink()
    shutil.copy(other / "b" / "c1" / "000.png", other / "b" / "c0" / "000.png")  # same names, another picture
    run_dir = copy_run(trained, tmp_path / "run", keep_step=2)
    before = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match="training data had fingerprint"):
        train(config(tiny, run_dir, data_dir=other), resume="auto", progress_bar=False)
    assert (run_dir / "config.yaml").read_bytes() == before


@pytest.mark.slow
def test_harmless_changes_are_applied_and_logged(tiny, trained, tmp_path, caplog):
    run_dir = copy_run(trained, tmp_path / "run", keep_step=2)
    moved = shutil.copytree(tiny["data"], tmp_path / "moved")  # the same data in another folder: allowed
    with caplog.at_level(logging.INFO, logger="dtback.training.trainer"):
        train(config(tiny, run_dir, data_dir=moved, **{"training.log_every": 2}), resume="auto", progress_bar=False)
    assert "resume applies a changed setting: training.log_every: 1 -> 2" in caplog.text
    assert load_config(run_dir / "config.yaml").training.log_every == 2
    a, b = load_file(ckpt.latest_checkpoint(trained) / "trainable.safetensors"), \
        load_file(ckpt.latest_checkpoint(run_dir) / "trainable.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run is the uninterrupted one


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tiny, trained, tmp_path, caplog):
    run_dir = copy_run(trained, tmp_path / "run", keep_step=4)
    newest = run_dir / "checkpoints" / "checkpoint-000004"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    assert "trainable.safetensors" in vet.checkpoint_problem(newest)
    assert vet.resumable_checkpoint(run_dir).folder == run_dir / "checkpoints" / "checkpoint-000002"
    with pytest.raises(DtbackError, match="trainable.safetensors"):
        train(config(tiny, run_dir), resume=newest, progress_bar=False)  # named by hand: refused, not replaced
    with caplog.at_level(logging.WARNING):
        result = train(config(tiny, run_dir), resume="auto", progress_bar=False)
    assert "checkpoint-000004 cannot be resumed from" in caplog.text and result.steps == 4
    a = load_file(trained / "checkpoints" / "checkpoint-000004" / "trainable.safetensors")
    b = load_file(newest / "trainable.safetensors")  # rewritten from step 2 on
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_path_is_checked_before_any_work(tiny, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(DtbackError, match="not a checkpoint folder"):
        train(config(tiny, run_dir), resume=tmp_path / "nowhere", progress_bar=False)
    assert not (run_dir / "dataset_report.json").exists() and not (run_dir / "config.yaml").exists()


def test_output_dir_that_is_a_file_is_refused_before_any_work(tiny, tmp_path):
    target = tmp_path / "file"
    target.write_text("not a folder")
    with pytest.raises(ConfigError, match="output_dir: .*is a file"):
        train(config(tiny, target), resume=None, progress_bar=False)
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        train(config(tiny, target / "run"), resume=None, progress_bar=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_output_dir_is_refused(tiny, tmp_path):
    run_dir = tmp_path / "ro"
    run_dir.mkdir()
    run_dir.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            train(config(tiny, run_dir), resume=None, progress_bar=False)
    finally:
        run_dir.chmod(0o755)


def test_an_output_dir_the_user_cannot_write_is_refused_even_as_root(tiny, tmp_path, monkeypatch):
    # Runs as root too (who writes into read-only folders): the access check the refusal rests on says no.
    from dtback.training import resume

    run_dir = tmp_path / "theirs"
    run_dir.mkdir()
    real_access = os.access
    monkeypatch.setattr(resume.os, "access",
                        lambda path, mode: False if Path(path) == run_dir else real_access(path, mode))
    with pytest.raises(ConfigError, match=f"{run_dir} is not writable"):
        train(config(tiny, run_dir), resume=None, progress_bar=False)
    assert list(run_dir.iterdir()) == []  # refused before anything was written


def test_a_second_run_into_the_same_folder_stops_naming_the_first(tiny, tmp_path):
    run_dir = tmp_path / "busy"
    run_dir.mkdir()
    with run_folder_lock(run_dir):
        with pytest.raises(ConfigError, match=f"in use by a running training \\(pid {os.getpid()}"):
            train(config(tiny, run_dir), resume=None, progress_bar=False)


def test_temporaries_of_a_killed_run_are_removed_when_the_next_takes_the_folder(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".checkpoint-000002.tmp-999-deadbeef").mkdir(parents=True)
    (run_dir / ".base.tmp-999-cafebabe").mkdir()
    (run_dir / ".best_model.pt.tmp-999-0badf00d").write_bytes(b"half")
    with run_folder_lock(run_dir):
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE, "checkpoints"]
        assert not list((run_dir / "checkpoints").iterdir())


def test_a_full_disk_in_safetensors_is_a_checkpoint_error(tmp_path, monkeypatch):
    layer = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(layer.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    class Adapter:
        def adapter_state_dict(self):
            return {}

        def save_pretrained(self, path, state=None):
            path.mkdir(parents=True)

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", full)
    snapshot = ckpt.take_snapshot(Adapter(), dict(layer.named_parameters()), optimizer, None)
    with pytest.raises(CheckpointError, match="No space left on device.*last good checkpoint is none"):
        ckpt.save_checkpoint(tmp_path, ckpt.Progress(step=1), Adapter(), snapshot, scheduler, keep=2)
    assert not list((tmp_path / "checkpoints").iterdir())  # no torn checkpoint, no temporary left


def test_best_model_records_the_content_of_the_base_beside_it(trained):
    from dtback.model.flux import base_content_id
    from dtback.model.identity_flux import read_adapter

    spec, _ = read_adapter(trained / "best_model.pt")
    assert spec.extra.base_model == "base"
    assert spec.extra.base_content_id == base_content_id(trained / "base")


def test_adapter_blocks_the_base_does_not_have_are_refused_before_feature_caching(tiny, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ConfigError, match=r"model\.adapter_double_blocks"):
        train(config(tiny, tmp_path / "run", **{"identity.cache_dir": cache, "model.adapter_double_blocks": "[0, 40]"}),
              resume=None, progress_bar=False)
    assert not (cache / "latents").exists() and not (cache / "text").exists()


def test_resuming_with_the_runs_own_config_keeps_the_users_file_byte_for_byte(tiny, trained, tmp_path):
    run_dir = copy_run(trained, tmp_path / "run")
    path = run_dir / "config.yaml"
    config(tiny, run_dir).save(path)  # the run's config, as it wrote it, for this folder
    text = f"# the first run: 4 steps on the tiny set\n{path.read_text()}# seed 42 as always\n"
    path.write_text(text)
    assert train(load_config(path), resume="auto", progress_bar=False).steps == 4
    assert path.read_text() == text  # was rewritten, the comments dropped
    # A setting that differs (a harmless change, applied on resume) is written, as before.
    train(load_config(path, ["training.log_every=2"]), resume="auto", progress_bar=False)
    assert load_config(path).training.log_every == 2 and "# the first run" not in path.read_text()


def last_validation(run_dir: Path) -> dict:
    return json.loads((run_dir / "validation.jsonl").read_text().splitlines()[-1])


def test_a_damaged_best_model_is_named_on_resume_and_replaced_at_the_next_validation(tiny, validated, tmp_path,
                                                                                     monkeypatch, caplog):
    run_dir = copy_run(validated, tmp_path / "run", keep_step=2)  # its best, step 2's, is not beaten at step 4
    assert last_validation(validated)["best_step"] == 2
    best = run_dir / "best_model.pt"
    best.write_bytes(b"not a model: a torn copy")
    monkeypatch.setattr(run_setup, "selection_metric", worse_later)
    with caplog.at_level(logging.WARNING):
        result = train(config(tiny, run_dir, **VALIDATED), resume="auto", progress_bar=False)
    (line,) = [line for line in caplog.text.splitlines() if "best_model.pt" in line]
    assert f"{best} is damaged" in line and "renamed to best_model.pt.damaged" in line
    assert (run_dir / "best_model.pt.damaged").read_bytes() == b"not a model: a torn copy"  # kept aside
    assert result.best_model == best and last_validation(run_dir)["best_step"] == 4
    # Was the torn copy, kept: step 4 did not beat the best of step 2. Now step 4's adapter (no EMA: the live one,
    # as the uninterrupted run's checkpoint 4 holds it).
    _, state = read_adapter(best)
    _, expected = read_adapter(validated / "checkpoints" / "checkpoint-000004" / "adapter")
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_truncated_base_is_named_as_damaged_on_resume_and_written_anew(tiny, validated, tmp_path, monkeypatch,
                                                                         caplog):
    from dtback.model.flux import base_content_id

    run_dir = copy_run(validated, tmp_path / "run", keep_step=2)
    weights = run_dir / "base" / "transformer" / "diffusion_pytorch_model.safetensors"
    whole = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[: whole // 2])  # a full disk, an interrupted copy
    monkeypatch.setattr(run_setup, "selection_metric", worse_later)  # step 4 does not beat step 2
    with caplog.at_level(logging.WARNING):
        train(config(tiny, run_dir, **VALIDATED), resume="auto", progress_bar=False)
    (line,) = [line for line in caplog.text.splitlines() if "is damaged" in line]
    assert f"{weights} is damaged (truncated: {whole // 2} of its {whole} bytes): base renamed to base.damaged" in line
    assert (run_dir / "base.damaged" / weights.relative_to(run_dir / "base")).stat().st_size == whole // 2
    # Was kept, truncated, under a best_model.pt bound to the whole one: generate called it "another base".
    spec, _ = read_adapter(run_dir / "best_model.pt")
    assert spec.extra.base_content_id == base_content_id(run_dir / "base")
    assert last_validation(run_dir)["best_step"] == 4 and weights.stat().st_size == whole


def test_each_checkpoint_adapter_records_the_base_it_was_saved_with(validated, tmp_path, caplog):
    from diffusers import FluxTransformer2DModel

    from dtback.inference.pipeline import check_base_content
    from dtback.model.flux import base_content_id

    def recorded(step: int) -> str:
        return read_adapter(validated / "checkpoints" / f"checkpoint-{step:06d}" / "adapter")[0].extra.base_content_id

    best_base = base_content_id(validated / "base")  # written with the best model, at step 2
    assert recorded(2) == best_base  # no EMA: checkpoint 2 holds the very base base/ does
    # The co-trained base moved on by step 4: checkpoint 4's adapter goes with its own (was base/'s fingerprint).
    own = shutil.copytree(validated / "base", tmp_path / "base4")
    weights = load_file(validated / "checkpoints" / "checkpoint-000004" / "trainable.safetensors")
    transformer = FluxTransformer2DModel.from_pretrained(own / "transformer")
    transformer.load_state_dict({k.removeprefix("transformer."): v for k, v in weights.items()
                                 if k.startswith("transformer.")})
    transformer.save_pretrained(own / "transformer")
    shutil.copy(validated / "base" / "transformer" / "config.json", own / "transformer")  # the run's _name_or_path
    assert recorded(4) == base_content_id(own) != best_base
    # Generating from checkpoint 4's adapter on base/ (given by --base) now warns that it is another base.
    adapter = validated / "checkpoints" / "checkpoint-000004" / "adapter"
    with caplog.at_level(logging.WARNING):
        check_base_content(adapter, read_adapter(adapter)[0].extra, str(validated / "base"), chosen=True)
    assert "another base" in caplog.text


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_sample_grid_that_cannot_be_written_is_a_counted_skip_and_training_goes_on(tiny, tmp_path, monkeypatch,
                                                                                    caplog):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(run_setup, "save_sample_grid", no_space)  # a full disk, a read-only samples/
    with caplog.at_level(logging.WARNING):
        result = train(config(tiny, run_dir, **VALIDATED), resume=None, progress_bar=False)
    assert result.steps == 4 and result.best_model == run_dir / "best_model.pt"  # was a traceback at step 2
    skips = [line for line in caplog.text.splitlines() if "could not write" in line]
    assert len(skips) == 2 and f"could not write {run_dir / 'samples' / 'step-000002.png'} (No space left on " \
                               "device): skipped, training goes on (1 preview writes skipped)" in skips[0]
    assert json.loads((run_dir / "summary.json").read_text())["skipped_previews"] == 2
    assert [vet.checkpoint_problem(folder) for folder in ckpt.list_checkpoints(run_dir)] == [None, None]
    assert (run_dir / "report.html").is_file() and not (run_dir / "samples").exists()


def test_a_log_that_cannot_be_written_stops_in_one_line_naming_it_with_checkpoints_intact(tiny, tmp_path,
                                                                                         monkeypatch):
    run_dir = tmp_path / "run"
    real = run_setup.append_jsonl
    monkeypatch.setattr(run_setup, "append_jsonl",
                        lambda path, record: no_space() if path.name == "validation.jsonl" else real(path, record))
    with pytest.raises(DtbackError) as err:  # was a traceback (OSError)
        train(config(tiny, run_dir, **VALIDATED, **{"training.checkpoint_every": 1}), resume=None,
              progress_bar=False)
    first = run_dir / "checkpoints" / "checkpoint-000001"
    assert str(err.value) == (f"could not write {run_dir / 'validation.jsonl'} (No space left on device); training "
                              f"stopped. The checkpoints are intact, the last good one is {first}: resume from it "
                              f"once {run_dir} has room and can be written")
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["checkpoint-000001"]
    assert vet.checkpoint_problem(first) is None


def test_an_image_gone_after_the_scan_is_a_counted_skip_of_training(tiny, tmp_path, monkeypatch, caplog):
    from dtback.training import features

    gone = sorted((tiny["data"] / "b" / "c0").glob("*.png"))[0]
    real = features.content_hash

    def removed_after_precompute(path):  # gone between the identity precompute and the latents
        if path == gone:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real(path)

    monkeypatch.setattr(features, "content_hash", removed_after_precompute)
    with caplog.at_level(logging.WARNING):
        result = train(config(tiny, tmp_path / "run", **{"training.max_steps": 1}), resume=None, progress_bar=False)
    assert result.steps == 1  # was a FileNotFoundError traceback
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == {f"b/c0/{gone.name}": "unreadable"}
    assert f"b/c0/{gone.name}: unreadable (No such file or directory); left out of training" in caplog.text
