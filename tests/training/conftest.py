"""Tiny training runs shared by the tests of this folder: a 6-character dataset of 32 px images, a tiny DINOv2 body
model and an embedding cache, built once per session; :func:`tiny_config` makes a 4-step run's config from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtback.config import load_config
from helpers import REPO, make_dataset, save_tiny_dinov2


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-run")
    data = make_dataset(root / "data", {"b": {f"c{i}": 3 for i in range(6)}}, size=(32, 32))
    return {"data": data, "body": save_tiny_dinov2(root / "dino"), "cache": root / "cache", "root": root}


@pytest.fixture
def tiny_config(tiny_run):
    """``tiny_config(run_dir, **overrides)``: the config of a 4-step run on :func:`tiny_run` (checkpoints at steps 2
    and 4, no validation, no tracker) with ``overrides`` (``--set`` keys) applied."""
    def make(run_dir: Path, **extra):
        values = {
            "data_dir": tiny_run["data"], "output_dir": run_dir, "input_size": 32, "batch_size": 2,
            "data.world.generate_if_missing": "false", "identity.body_model": tiny_run["body"],
            "identity.cache_dir": tiny_run["cache"], "identity.face_backend": "dlib", "model.simple_vae": "null",
            "model.simple_base": "null", "face_weight": 0, "body_weight": 0.1, "training.max_steps": 4,
            "training.checkpoint_every": 2, "training.validate_every": 1000, "training.num_val_characters": 1,
            "training.val_sampling_steps": 1, "training.warmup_steps": 1, "training.log_every": 1,
            "training.log_with": "[]", **extra,
        }
        return load_config(REPO / "train" / "config.yaml", [f"{k}={v}" for k, v in values.items()])

    return make
