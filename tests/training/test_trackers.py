"""What reaches accelerate's trackers, and a tracker that cannot write (a full disk, a read-only folder) mid-run:
a counted skip, warned about once naming the folder, never a stopped run."""

from __future__ import annotations

import errno
import json
import logging

import pytest
from PIL import Image

from dtback.training import trainer as trainer_module
from dtback.training.trackers import TrackerWrites
from dtback.training.trainer import train


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# TensorBoard's writer thread ends with the error it then raises in the run's thread: the thread's own report.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_tensorboard_that_cannot_write_mid_run_is_a_counted_skip_and_training_goes_on(tiny_config, tmp_path,
                                                                                      monkeypatch, caplog):
    from tensorboard.summary.writer.record_writer import RecordWriter

    real_start = trainer_module.start_trackers

    def start_then_fill_the_disk(accelerator, cfg):  # the events file is opened, then the disk is full
        real_start(accelerator, cfg)
        monkeypatch.setattr(RecordWriter, "write", no_space)
        monkeypatch.setattr(RecordWriter, "flush", no_space)

    monkeypatch.setattr(trainer_module, "start_trackers", start_then_fill_the_disk)
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, **{"training.log_with": "[tensorboard]", "training.validate_every": 2})
    with caplog.at_level(logging.WARNING, logger="dtback.training.trackers"):
        result = train(cfg, resume=None, progress_bar=False)  # was an OSError traceback at step 1
    assert result.steps == 4 and result.best_model == run_dir / "best_model.pt"
    (line,) = [record.getMessage() for record in caplog.records]  # once, however many writes failed
    assert line == (f"tensorboard could not write to {run_dir / 'tensorboard' / 'dtback'} (No space left on device): "
                    "its writes are skipped from step 1 on and training goes on; metrics.jsonl, validation.jsonl "
                    "and samples/ hold every number and grid (summary.json: skipped_tracker_writes)")
    summary = json.loads((run_dir / "summary.json").read_text())
    # 4 losses, 2 validations (metrics + grid each), and the events file's last flush at the end
    assert summary["skipped_tracker_writes"] == 4 + 2 * 2 + 1
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


class Tracker:
    """A tracker that takes images through ``log_images``, writing into ``logging_dir``."""

    name = "wandb"

    def __init__(self, fail: bool):
        self.fail, self.logged, self.logging_dir = fail, [], "/runs/wandb"

    def log(self, values, step):
        if self.fail:
            no_space()
        self.logged.append((step, values))

    def log_images(self, values, step):
        self.logged.append((step, sorted(values)))

    def finish(self):
        pass


class Accelerator:
    def __init__(self, trackers):
        self.trackers = trackers


def test_one_tracker_that_cannot_write_leaves_the_others_their_numbers(caplog):
    failing, working = Tracker(fail=True), Tracker(fail=False)
    writes = TrackerWrites(Accelerator([failing, working]))
    with caplog.at_level(logging.WARNING):
        writes.scalars(3, {"loss": 0.5, "name": "text is not a number"})
        writes.scalars(4, {"loss": 0.25})
        writes.image("grid", Image.new("RGB", (2, 2)), 4)
    assert working.logged == [(3, {"loss": 0.5}), (4, {"loss": 0.25}), (4, ["grid"])]
    assert writes.skipped == 2 and len(caplog.records) == 1 and "/runs/wandb" in caplog.text
    writes.finish()
    assert writes.accelerator.trackers == []  # finished once: accelerate's end_training finds none left


@pytest.mark.parametrize("names", [[], ["tensorboard"]])
def test_no_tracker_is_no_write_and_no_skip(names):
    writes = TrackerWrites(Accelerator([]))
    writes.scalars(1, {"loss": 1.0})
    writes.finish()
    assert writes.skipped == 0
