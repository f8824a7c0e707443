"""Training on a FLUX.2 [klein] base (``model.base: flux2_klein``, the simple model): the same trainer, with FLUX.2's
latents, text and positions, validation sampling through ``Flux2KleinPipeline`` with true CFG, and an adapter that
records its family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dtback.config import load_config
from dtback.errors import ConfigError, DtbackError
from dtback.model.identity_flux import read_adapter
from dtback.training.trainer import train
from helpers import REPO, make_dataset, save_tiny_dinov2


def config(root, run_dir, **extra):
    values = {
        "data_dir": root / "data", "output_dir": run_dir, "input_size": 32, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": root / "dino",
        "identity.cache_dir": root / "cache", "identity.face_backend": "dlib", "model.base": "flux2_klein",
        "model.simple_vae": "null", "model.simple_base": "null", "model.train_simple_base": "false", "face_weight": 0, "body_weight": 0.1,
        "training.max_steps": 4, "training.checkpoint_every": 2, "training.validate_every": 4,
        "training.val_sampling_steps": 2, "training.val_true_cfg": 2.0, "training.num_val_characters": 1,
        "training.warmup_steps": 1, "training.log_every": 1,
        # FLUX.2 shifts 2-step sampling of 4 tokens to sigma ~0.9: identity losses are allowed up to there
        "training.identity_loss_max_sigma": 0.99, "data.val_fraction": 0.34, "training.log_with": "[]", **extra,
    }
    return load_config(REPO / "train" / "config.yaml", [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    make_dataset(root / "data", {"b": {f"c{i}": 3 for i in range(6)}}, size=(32, 32))
    save_tiny_dinov2(root / "dino")
    return root


PIPELINES = {"flux2_klein": "Flux2KleinPipeline", "flux2": "Flux2Pipeline"}


@pytest.mark.slow
@pytest.mark.parametrize("base", ["flux2_klein", "flux2"])
def test_a_flux2_run_trains_validates_generates_and_evaluates(root, base, monkeypatch):
    """[klein]: true CFG in validation and generation; [dev]: distilled guidance, no true CFG."""
    from dtback.training import step

    shifts = []  # FLUX.2 pipelines shift noise by the sampling step count: training draws as validation samples

    def recording(*args, **kwargs):
        shifts.append(args[5] if len(args) > 5 else kwargs.get("empirical_mu_steps"))
        return sample_sigmas(*args, **kwargs)

    sample_sigmas = step.sample_sigmas
    monkeypatch.setattr(step, "sample_sigmas", recording)
    run_dir = root / f"run_{base}"
    result = train(config(root, run_dir, **{"model.base": base}), resume=None, progress_bar=False)
    assert result.steps == 4
    assert shifts == [2] * 4  # training.val_sampling_steps, once per micro-batch
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(0 < m["loss/flow"] < 10 for m in metrics)
    assert any(0 < m.get("loss/body", 0) < 2 for m in metrics)  # the body loss through FLUX.2's VAE decoder
    validation = json.loads((run_dir / "validation.jsonl").read_text().splitlines()[-1])
    assert {"val/body_sim", "val/body_sim_no_id", "val/body_sim_shuffled"} <= set(validation)
    assert (run_dir / "samples" / "step-000004.png").is_file()
    # The base written next to the adapter is a FLUX.2 [klein] pipeline; the adapter says so, and only its
    # adapters and resampler trained (the base is frozen, as real FLUX.2 is).
    index = json.loads((run_dir / "base" / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINES[base] and index["transformer"][1] == "Flux2Transformer2DModel"
    spec, _ = read_adapter(run_dir / "best_model.pt")
    assert spec.base["family"] == "flux2"
    first = load_file(run_dir / "checkpoints" / "checkpoint-000002" / "trainable.safetensors")
    last = load_file(run_dir / "checkpoints" / "checkpoint-000004" / "trainable.safetensors")
    assert not any(name.startswith("transformer.") for name in last)
    assert any(not torch.equal(first[name], last[name]) for name in last)

    # Save -> load -> generate: the adapter and its base/ through IdentityFluxPipeline (a Flux2KleinPipeline inside),
    # with true CFG; identity changes the picture, scale 0 gives the base's own.
    from PIL import Image

    from dtback.inference.pipeline import IdentityFluxPipeline

    pipe = IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt")
    assert type(pipe.pipeline).__name__ == PIPELINES[base]
    references, _ = pipe.encode_references([Image.open(p) for p in sorted((root / "data" / "b" / "c0").glob("*.png"))])
    settings = dict(num_inference_steps=2, height=32, width=32, true_cfg_scale=2.0 if base == "flux2_klein" else 1.0)
    with torch.no_grad():
        for adapter in pipe.model.adapters.values():  # 4 steps barely move them: make the effect visible
            adapter.to_out.weight.normal_(std=0.5)
    plain = np.asarray(pipe("a photo of a person", None, **settings)[0], dtype=np.float32)
    off = np.asarray(pipe("a photo of a person", references, body_scale=0.0, **settings)[0], dtype=np.float32)
    on = np.asarray(pipe("a photo of a person", references, **settings)[0], dtype=np.float32)
    assert np.array_equal(off, plain) and np.abs(on - plain).max() > 0
    # dtback evaluate on the run's held-out characters, through the same pipeline.
    from dtback.evaluation.benchmark import EvaluateSettings, evaluate

    if base == "flux2":
        with pytest.raises(DtbackError, match="Flux2Pipeline is guidance-distilled"):
            pipe("a photo of a person", references, **{**settings, "true_cfg_scale": 2.0})
    results = evaluate(EvaluateSettings(model=run_dir / "best_model.pt", out=root / f"eval_{base}", steps=2,
                                        images_per_prompt=1, num_characters=2, device="cpu", progress=False))
    assert {"with_identity", "no_identity", "shuffled"} <= set(results["conditions"])
    assert (root / f"eval_{base}" / "results.json").is_file()


def test_flux2_settings_that_cannot_work_are_refused_naming_the_key(root, tmp_path):
    with pytest.raises(ConfigError, match="simple_vae=world is a FLUX.1 model"):
        config(root, tmp_path / "run", **{"model.simple_vae": "world"})
