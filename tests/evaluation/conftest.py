"""Session fixtures for evaluation tests: a run trained for two steps on a tiny identity world, a tiny CLIP model."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import REPO


@pytest.fixture(scope="session")
def world_run(tmp_path_factory) -> Path:
    """A run folder as training leaves it (best_model.pt, base/, config.yaml, split.json) after 2 steps on a
    6-character world of 128 px images; 2 characters are held out. About 10 s on one core."""
    from dtback.config import ModelConfig, WorldConfig, load_config
    from dtback.world.files import write_world
    from dtback.training.trainer import train

    root = tmp_path_factory.mktemp("world_run")
    write_world(root / "world", WorldConfig(characters=6, images_per_character=3, size=128, seed=0), progress=False)
    settings = {
        "data_dir": root / "world", "output_dir": root / "run", "batch_size": 2, "data.val_fraction": 0.25,
        "data.world.generate_if_missing": "false", "face_weight": 0, "body_weight": 0, "training.max_steps": 2,
        "training.checkpoint_every": 1000, "training.validate_every": 1000, "training.val_sampling_steps": 1,
        "training.num_val_characters": 1, "training.warmup_steps": 1, "training.log_every": 1,
    }
    if "simple_base" in ModelConfig.model_fields:  # start from random weights, not the pretrained world base
        settings["model.simple_base"] = "null"
    cfg = load_config(REPO / "train" / "config.yaml", [f"{key}={value}" for key, value in settings.items()])
    result = train(cfg, resume=None, progress_bar=False)
    assert result.best_model is not None
    return root / "run"


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    """A random CLIPModel (32 px images) with the simple model's tokenizer, saved as a transformers folder."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from dtback.model.flux import build_simple_tokenizers

    folder = tmp_path_factory.mktemp("clip")
    tokenizer = build_simple_tokenizers()[0]
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder
