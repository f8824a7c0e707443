"""What a resume may change: the global batch (ranks x gradient_accumulation_steps micro-batches per step) stays
the checkpoint's, however the launch spreads it."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from dtback.errors import ConfigError
from dtback.training.checkpoint import Progress, list_checkpoints
from dtback.training.resume import check_batch_split, set_aside_damaged_best
from dtback.training.trainer import train


def test_the_same_global_batch_on_other_ranks_is_accepted_and_another_is_refused():
    record = {"ranks": 2, "micro_batches_per_step": 2}
    assert check_batch_split("ckpt", record, ranks=1, accumulation=2) is None  # 2 GPUs -> 1 GPU x 2 accumulated
    assert check_batch_split("ckpt", {}, ranks=1, accumulation=5) is None  # an older checkpoint records none
    with pytest.raises(ConfigError) as err:
        check_batch_split("ckpt", record, ranks=1, accumulation=1)
    assert str(err.value).startswith(
        "cannot resume ckpt: it was trained with 2 micro-batches per optimiser step (2 ranks x "
        "training.gradient_accumulation_steps 1), this launch gives 1 (1 rank x 1): set "
        "training.gradient_accumulation_steps to 2 on 1 rank. Resuming would silently train something else.")
    with pytest.raises(ConfigError, match=r"launch on 1 or 2 ranks"):
        check_batch_split("ckpt", record, ranks=4, accumulation=1)  # 4 ranks cannot make 2 micro-batches


def test_a_resume_that_changes_the_accumulated_batch_is_refused_before_any_work(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir), resume=None, progress_bar=False)
    shutil.rmtree(list_checkpoints(run_dir)[-1])  # killed after step 3: resumes from step 2
    config = (run_dir / "config.yaml").read_bytes()
    with pytest.raises(ConfigError, match=r"1 micro-batch per optimiser step .* this launch gives 2 \(1 rank x 2\)"):
        train(tiny_config(run_dir, **{"training.gradient_accumulation_steps": 2}), resume="auto", progress_bar=False)
    assert (run_dir / "config.yaml").read_bytes() == config  # was: steps 3 and 4 trained on twice the batch
    assert train(tiny_config(run_dir), resume="auto", progress_bar=False).steps == 4


def test_a_best_model_left_bound_to_an_older_base_is_set_aside_on_resume(tiny_config, tmp_path, monkeypatch, caplog):
    """A kill between writing base/ and best_model.pt (at a validation that improved) leaves the new base/ beside the
    older best model, which goes with a base no longer there; generate refuses the pair."""
    from dtback.model.flux import base_content_id
    from dtback.model.identity_flux import read_adapter
    from dtback.training import setup as run_setup

    validated = {"training.validate_every": 2, "training.ema_decay": "null"}
    written = []  # each best_model.pt the run writes, with the base/ beside it then
    real_write = run_setup.RunParts._write_best

    def keep_each(parts, *args, **kwargs):
        real_write(parts, *args, **kwargs)
        written.append(shutil.copy(parts.run_dir / "best_model.pt", tmp_path / f"best-{len(written)}.pt"))

    monkeypatch.setattr(run_setup.RunParts, "_write_best", keep_each)
    monkeypatch.setattr(run_setup, "selection_metric", lambda metrics: float(metrics["step"]))  # step 4 is better
    run_dir = tmp_path / "run"
    train(tiny_config(run_dir, **validated), resume=None, progress_bar=False)
    monkeypatch.undo()
    shutil.rmtree(list_checkpoints(run_dir)[-1])  # killed at step 4's validation: base/ written, then nothing
    shutil.copy(written[0], run_dir / "best_model.pt")  # step 2's, bound to step 2's base
    old_base = read_adapter(written[0])[0].extra.base_content_id
    assert old_base != base_content_id(run_dir / "base")

    monkeypatch.setattr(run_setup, "selection_metric", lambda metrics: -float(metrics["step"]))  # 4 does not beat 2
    with caplog.at_level(logging.WARNING, logger="dtback.training.resume"):
        train(tiny_config(run_dir, **validated), resume="auto", progress_bar=False)
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith(f"{run_dir / 'best_model.pt'} does not go with {run_dir / 'base'} (it was trained on a base "
                           f"of content fingerprint {old_base[:16]}, base/ has ")
    assert line.endswith("): best_model.pt renamed to best_model.pt.damaged, the next validation writes a new best "
                         "model")
    # Was kept: the run ended with a best model bound to a base that is no longer there.
    spec, _ = read_adapter(run_dir / "best_model.pt")
    assert spec.extra.base_content_id == base_content_id(run_dir / "base")
    assert (run_dir / "best_model.pt.damaged").read_bytes() == written[0].read_bytes()
    # A base/ gone altogether (removed by hand, a kill inside its swap) leaves the best model no base either.
    shutil.rmtree(run_dir / "base")
    progress = Progress(step=4, best_metric=-4.0, best_step=4)
    set_aside_damaged_best(run_dir / "best_model.pt", run_dir / "base", progress)
    assert "(the base/ it was trained on is missing)" in caplog.records[-1].getMessage()
    assert (run_dir / "best_model.pt.damaged-2").is_file() and progress.best_step is None


@pytest.mark.parametrize("name", ["config.yaml", ".dtback.lock", "metrics.jsonl", "validation.jsonl", "summary.json",
                                  "best_model.pt"])
def test_a_folder_where_the_run_writes_a_file_is_refused_before_any_work(tiny_config, tmp_path, name):
    run_dir = tmp_path / "run"
    (run_dir / name).mkdir(parents=True)  # was a traceback after the caches, an error after a step, or at the end
    with pytest.raises(ConfigError) as err:
        train(tiny_config(run_dir), resume=None, progress_bar=False)
    assert str(err.value) == (f"output.output_dir: {run_dir / name} is a folder, not a file: the run writes its "
                              f"{name} there; move it away, or train into another output_dir")
    assert sorted(p.name for p in run_dir.iterdir()) == [name]  # nothing written


@pytest.mark.parametrize("name", ["checkpoints", "metrics.jsonl", ".dtback.lock"])
def test_a_part_of_the_run_folder_the_user_cannot_write_is_refused_before_any_work(tiny_config, tmp_path, monkeypatch,
                                                                                    name):
    # A folder copied from another user: the run dir is writable, what is in it is not. Was refused only at the
    # first checkpoint or log line, after those steps were trained (or a traceback, for the lock file). As root
    # too: the access check the refusal rests on says no.
    from dtback.training import resume

    run_dir = tmp_path / "run"
    path = run_dir / name
    path.parent.mkdir(parents=True)
    path.mkdir() if name == "checkpoints" else path.write_text("")
    real_access = os.access
    monkeypatch.setattr(resume.os, "access", lambda p, mode: False if Path(p) == path else real_access(p, mode))
    with pytest.raises(ConfigError, match=f"^output.output_dir: {re.escape(str(path))} is not writable by this user"):
        train(tiny_config(run_dir), resume=None, progress_bar=False)
    assert sorted(p.name for p in run_dir.iterdir()) == [name]


def test_a_run_config_that_cannot_be_read_is_rewritten_not_a_traceback(tiny_config, tmp_path, monkeypatch, caplog):
    from dtback.training import resume

    path = tmp_path / "config.yaml"
    path.write_text("seed: 1\n")

    def unreadable(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(resume, "load_config", unreadable)
    with caplog.at_level(logging.INFO, logger="dtback.training.resume"):
        resume.write_run_config(tiny_config(tmp_path / "run"), path)
    assert f"{path} is rewritten: it does not load as a config (Permission denied)" in caplog.text
    assert "seed: 42" in path.read_text()


def test_a_full_disk_writing_the_run_config_is_one_line_naming_it(tiny_config, tmp_path, monkeypatch):
    from dtback.config import Config
    from dtback.errors import DtbackError
    from dtback.training import resume

    def no_space(self, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Config, "save", no_space)
    path = tmp_path / "config.yaml"
    with pytest.raises(DtbackError) as err:  # was an OSError traceback once the caches were built
        resume.write_run_config(tiny_config(tmp_path / "run"), path)
    assert str(err.value) == (f"could not write {path} (No space left on device): nothing was trained; free space "
                              f"or make {tmp_path} writable, then run again")
