"""The memory modes through the real trainer: a tiny run with checkpointing every 2nd block, 8-bit AdamW and the
encoders offloaded after the caches trains, checkpoints the 8-bit optimiser state and reaches the same loss range."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file

from dtback.config import ModelConfig, load_config
from dtback.training import setup as training_setup
from dtback.training import trainer as trainer_module
from dtback.training.trainer import train
from helpers import make_dataset, save_tiny_dinov2


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="training.optimizer=adamw8bit needs bitsandbytes: pip install 'dtback[memory]'")
def test_a_run_with_the_memory_modes_trains_and_checkpoints(tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", {"b": {f"c{i}": 3 for i in range(6)}}, size=(32, 32))
    settings = {
        "data_dir": data, "output_dir": tmp_path / "run", "input_size": 32, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": save_tiny_dinov2(tmp_path / "dino"),
        "identity.face_backend": "dlib", "model.simple_vae": "null", "face_weight": 0, "body_weight": 0.1,
        "training.max_steps": 2, "training.checkpoint_every": 2, "training.validate_every": 1000,
        "training.num_val_characters": 1, "training.warmup_steps": 1, "training.log_every": 1,
        "training.ema_decay": "null",
        # the memory modes under test
        "training.gradient_checkpointing": "true", "training.gradient_checkpointing_every": 2,
        "training.optimizer": "adamw8bit", "model.offload_after_cache": "true",
    }
    if "simple_base" in ModelConfig.model_fields:  # random simple base, as the VAE is random too
        settings["model.simple_base"] = "null"
    cfg = load_config(None, [f"{key}={value}" for key, value in settings.items()])

    seen = {}

    def spy(name, real):
        def wrapper(*args, **kwargs):
            seen[name] = real(*args, **kwargs)
            return seen[name]
        return wrapper

    monkeypatch.setattr(training_setup, "finish_caching", spy("offloaded", training_setup.finish_caching))
    monkeypatch.setattr(trainer_module, "apply_checkpointing", spy("checkpointed", trainer_module.apply_checkpointing))
    result = train(cfg, resume=None, progress_bar=False)

    assert result.steps == 2 and result.last_checkpoint is not None
    assert seen["offloaded"] == ["text_encoder", "text_encoder_2", "vae.encoder"]
    # The simple model has 2 double + 4 single blocks: every 2nd is checkpointed.
    assert seen["checkpointed"] == ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.2"]
    moments = load_file(result.last_checkpoint / "optimizer.safetensors")
    assert any(key.endswith("/state1") and value.dtype == torch.uint8 for key, value in moments.items())  # 8-bit
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)
