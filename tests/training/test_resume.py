"""What a resume may change: the global batch (ranks x gradient_accumulation_steps micro-batches per step) stays
the checkpoint's, however the launch spreads it."""

from __future__ import annotations

import shutil

import pytest

from dtback.errors import ConfigError
from dtback.training.checkpoint import list_checkpoints
from dtback.training.resume import check_batch_split
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
