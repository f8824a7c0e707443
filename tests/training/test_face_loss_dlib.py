"""The licence-clean face loss: a few CPU training steps of the simple model on real photos with
``identity.face_backend=dlib`` and ``face_weight > 0`` log ``loss/face``; targets without a face are counted."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from dtback.config import load_config
from dtback.training.trainer import train
from helpers import REPO


@pytest.mark.slow
def test_dlib_face_loss_trains_on_real_photos(people_dir, tmp_path):
    data = tmp_path / "data"  # a copy outside the repository: 6 people x 2 photos + 1 picture with no face each
    for person in sorted(p for p in (people_dir / "krasserm_lfw").iterdir() if p.is_dir())[:6]:
        for photo in sorted(person.iterdir())[:2]:
            (data / "lfw" / person.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, data / "lfw" / person.name / photo.name)
        Image.fromarray(np.full((250, 250, 3), 128, np.uint8)).save(data / "lfw" / person.name / "zz_blank.png")
    settings = {
        "data_dir": data, "output_dir": tmp_path / "run", "input_size": 64, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": "null",
        "identity.cache_dir": tmp_path / "cache", "identity.face_backend": "dlib", "model.simple_vae": "null",
        "model.simple_base": "null", "face_weight": 0.5, "body_weight": 0,
        "training.identity_loss_max_sigma": 1.0, "training.max_steps": 4, "training.checkpoint_every": 4,
        "training.validate_every": 1000, "training.val_sampling_steps": 2, "training.num_val_characters": 1,
        "training.warmup_steps": 1, "training.log_every": 1,
    }
    cfg = load_config(REPO / "train" / "config.yaml", [f"{key}={value}" for key, value in settings.items()])
    train(cfg, resume=None, progress_bar=False)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    faces = [m["loss/face"] for m in metrics if "loss/face" in m]
    assert faces and all(math.isfinite(v) and 0 <= v <= 2 for v in faces), metrics
    assert all("identity/face_skipped" in m for m in metrics)
    assert sum(m["identity/face_skipped"] for m in metrics) > 0  # the blank pictures: counted, no crash


def test_face_geometry_that_cannot_be_cut_is_told_apart():
    import torch

    from dtback.training.identity_loss import usable_face_geometry

    good = torch.tensor([[30.0, 20], [24, 21], [10, 20], [16, 21], [20, 30]])
    rows = torch.stack([good, torch.zeros(5, 2), good.clone().fill_(float("nan")), good * 0 + 7, good / 20])
    assert usable_face_geometry(rows).tolist() == [True, False, False, False, False]
