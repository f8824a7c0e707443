"""A tiny trained run folder and a tiny diffusers LoRA for the inference tests."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image
from skimage import data as skdata

from dtback.config import IdentityConfig, ModelConfig
from dtback.inference.pipeline import IdentityFluxPipeline
from dtback.model.flux import build_simple_pipeline, save_pipeline_atomic
from dtback.model.identity_flux import IdentityPreservingFlux
from flux_helpers import randomise_outputs
from helpers import save_tiny_dinov2, write_image


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A run folder as training leaves it: base/ (diffusers) + best_model.pt recording base and encoders."""
    root = tmp_path_factory.mktemp("run")
    pipeline = build_simple_pipeline(seed=0)
    save_pipeline_atomic(pipeline, root / "base")
    body = save_tiny_dinov2(root / "dino")
    identity = IdentityConfig(face_backend="dlib", body_model=str(body))
    torch.manual_seed(0)
    model = IdentityPreservingFlux.from_config(ModelConfig(), identity, pipeline.transformer.config, face_dim=128,
                                               body_dim=32, body_token_dim=32)
    randomise_outputs(model, seed=3)
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.to_out.weight.mul_(20)
    model.spec.extra.update(base_model="base", identity=identity.model_dump(mode="json"), input_size=64,
                            max_sequence_length=16)
    model.save_pretrained(root / "best_model.pt")
    Image.fromarray(skdata.astronaut()).save(root / "face.png")
    Image.fromarray(skdata.astronaut()[::-1, ::-1].copy()).resize((256, 256)).save(root / "other.png")
    write_image(root / "noface.png", size=(96, 96), color=(30, 120, 200))
    return root


@pytest.fixture(scope="module")
def pipe(run_dir):
    return IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt")


@pytest.fixture
def fresh(run_dir):
    """A pipeline of its own, for tests that load LoRAs or offload."""
    return IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt")


@pytest.fixture(scope="session")
def lora_file(run_dir):
    """A diffusers FLUX LoRA for the run's base: rank 4 on the attention projections, random non-zero ``lora_B``."""
    from peft import LoraConfig, get_peft_model_state_dict  # noqa: PLC0415

    transformer = build_simple_pipeline(seed=0).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                       init_lora_weights=True))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    folder = run_dir / "style_lora"
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer))
    return folder / "pytorch_lora_weights.safetensors"
