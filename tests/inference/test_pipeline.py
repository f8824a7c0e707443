"""IdentityFluxPipeline with diffusers' CPU offload and with LoRAs loaded through diffusers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from dtback.errors import DtbackError
from dtback.inference.pipeline import IdentityFluxPipeline, offload_device

PROMPT = "a person standing in a park"


def sample(pipe, references, seed=0, **kwargs):
    images = pipe(PROMPT, references, num_inference_steps=2, height=64, width=64, seed=seed, **kwargs)
    return np.asarray(images[0], dtype=np.int16)


def plain(pipeline, seed=0):
    """The FluxPipeline's own image for :data:`PROMPT` with the settings of :func:`sample`."""
    image = pipeline(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(seed),
                     max_sequence_length=16).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def refs(pipe, run_dir):
    return pipe.encode_references([Image.open(run_dir / "face.png")])[0]


def test_offload_on_the_cpu_says_it_needs_a_gpu(run_dir, fresh):
    with pytest.raises(DtbackError, match="offload 'model' needs a GPU: .* (the device is cpu|this machine has none)"):
        fresh.enable_offload("model", "cpu")
    with pytest.raises(DtbackError, match="offload 'sequential' needs a GPU"):
        IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt", device="cpu", offload="sequential")
    with pytest.raises(DtbackError, match="offload mode 'layers' is not one of model, sequential"):
        fresh.enable_offload("layers")
    assert fresh.offload == "none"
    if torch.cuda.is_available():
        return  # the rest is the CPU-only machine's message
    with pytest.raises(DtbackError, match="offload 'sequential' needs a GPU: .* this machine has none"):
        IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt", offload="sequential")
    with pytest.raises(DtbackError, match="onto cuda:0: no such device here"):
        offload_device("model", "cuda:0")


def test_model_offload_wiring_gives_the_same_images(pipe, refs, fresh, lora_file, run_dir):
    """The CPU stands in for the GPU (enable_offload refuses it for users): accelerate's hooks wrap every component,
    and the identity hooks and the per-call identity schedule must work through them, LoRA loading included.
    (Sequential offload cannot stand in like this: accelerate fails on the CPU inside the CLIP text encoder.)"""
    expected = sample(pipe, refs)
    fresh._offload_to("model", torch.device("cpu"))
    assert fresh.offload == "model" and hasattr(fresh.pipeline.transformer, "_hf_hook")
    assert next(fresh.model.parameters()).device.type == "cpu"
    assert np.array_equal(sample(fresh, refs), expected)
    fresh.load_lora_weights(lora_file)  # diffusers takes the hooks off, loads, and puts them back
    assert hasattr(fresh.pipeline.transformer, "_hf_hook")
    with_lora = sample(fresh, refs)
    assert np.abs(with_lora - expected).max() > 0
    in_place = IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt")
    in_place.load_lora_weights(lora_file)
    assert np.array_equal(sample(in_place, refs), with_lora)


def test_a_diffusers_lora_keeps_the_identity_hooks(pipe, refs, fresh, lora_file, run_dir):
    without = {"base": sample(pipe, refs, face_scale=0.0, body_scale=0.0), "identity": sample(pipe, refs)}
    assert fresh.load_lora_weights(lora_file) == "pytorch_lora_weights"
    assert fresh.loras == {"pytorch_lora_weights": 1.0}
    # peft wrapped the attention Linears; the identity hooks sit on the blocks around them and are still there.
    assert "lora_A" in dict(fresh.pipeline.transformer.transformer_blocks[0].attn.to_q.named_modules())
    assert fresh.pipeline.transformer.transformer_blocks[0]._forward_hooks
    base = sample(fresh, refs, face_scale=0.0, body_scale=0.0)
    assert np.abs(base - without["base"]).max() > 0  # (a) the LoRA changes the image
    reference = FluxPipeline.from_pretrained(run_dir / "base")
    reference.load_lora_weights(str(lora_file))
    assert np.array_equal(base, plain(reference))  # (b) scales 0 = the plain FluxPipeline with the same LoRA
    identity = sample(fresh, refs)
    assert np.abs(identity - base).max() > 0  # (c) identity still acts through the LoRA'd transformer
    assert np.abs(identity - without["identity"]).max() > 0
    fresh.set_lora_scales(pytorch_lora_weights=0.0)
    assert np.array_equal(sample(fresh, refs), without["identity"])  # scale 0 = no LoRA, exactly
    fresh.set_lora_scales(pytorch_lora_weights=0.5)
    half = sample(fresh, refs)
    assert not np.array_equal(half, identity) and not np.array_equal(half, without["identity"])
    with pytest.raises(DtbackError, match="no LoRA named other is loaded"):
        fresh.set_lora_scales(other=1.0)


def test_lora_scale_on_loading(fresh, refs, lora_file, run_dir):
    fresh.load_lora_weights(lora_file, adapter_name="style", scale=0.5)
    other = IdentityFluxPipeline.from_pretrained(run_dir / "best_model.pt")
    other.load_lora_weights(lora_file)
    other.set_lora_scales(pytorch_lora_weights=0.5)
    assert np.array_equal(sample(fresh, refs), sample(other, refs))
    with pytest.raises(DtbackError, match="adapter name 'style' is already in use"):
        fresh.load_lora_weights(lora_file, adapter_name="style")
    assert fresh.load_lora_weights(lora_file) == "pytorch_lora_weights"  # the same file twice: a second name
    assert fresh.load_lora_weights(lora_file) == "pytorch_lora_weights_2"


def test_files_that_are_not_loras_are_named(fresh, run_dir, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(DtbackError, match=f"LoRA {missing} does not exist"):
        fresh.load_lora_weights(missing)
    text = tmp_path / "notes.safetensors"
    text.write_text("not a LoRA")
    with pytest.raises(DtbackError, match=f"LoRA {text}: truncated or not a safetensors file"):
        fresh.load_lora_weights(text)
    with pytest.raises(DtbackError, match="LoRA .*face.png: not a tensors-only LoRA file"):
        fresh.load_lora_weights(run_dir / "face.png")
    assert fresh.loras == {}
