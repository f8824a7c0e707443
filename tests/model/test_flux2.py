"""The simple FLUX.2 [klein] model (diffusers' Flux2KleinPipeline with small configs, random weights and a tokenizer
built in memory): saved and loaded through from_pretrained, its latents as the pipeline encodes and decodes them,
its captions, and identity adapters sampling through the pipeline with true CFG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinPipeline

from dtback.config import IdentityConfig, ModelConfig
from dtback.identity.resampler import IdentityInputs
from dtback.model.flux import CAPTION_WORDS
from dtback.model.flux2 import (
    SIMPLE_FLUX2_TRANSFORMER, build_simple_flux2_pipeline, decode_flux2_latents, encode_flux2_captions,
    encode_flux2_latents, image_ids, text_ids,
)
from dtback.model.identity_flux import IdentityPreservingFlux


@pytest.fixture(scope="module")
def simple_flux2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("simple_flux2")
    pipeline = build_simple_flux2_pipeline(seed=3)
    with torch.no_grad():  # statistics as a trained VAE has them, so normalisation is not the identity
        pipeline.vae.bn.running_mean.copy_(torch.linspace(-0.5, 0.5, pipeline.vae.bn.num_features))
        pipeline.vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, pipeline.vae.bn.num_features))
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def pipeline(simple_flux2_dir):
    return Flux2KleinPipeline.from_pretrained(simple_flux2_dir)


def generate(pipeline, **kwargs) -> np.ndarray:
    return pipeline(prompt="a photo of a person in a park", height=64, width=64, num_inference_steps=2,
                    guidance_scale=2.0, max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                    output_type="np", **kwargs).images[0]


def test_the_simple_model_saves_reloads_and_samples_the_same(simple_flux2_dir, pipeline):
    built = build_simple_flux2_pipeline(seed=3)
    built.vae = pipeline.vae  # the fixture changed its statistics before saving
    image = generate(pipeline)
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    np.testing.assert_allclose(generate(built), image, atol=1e-5)
    assert pipeline.transformer.config.joint_attention_dim == SIMPLE_FLUX2_TRANSFORMER["joint_attention_dim"]


def test_the_tokenizer_keeps_caption_words_whole_and_knows_every_byte(pipeline):
    tokenizer = pipeline.tokenizer
    for word in CAPTION_WORDS:
        assert tokenizer.tokenize(f" {word}") == [f"Ġ{word}"], word
    ids = tokenizer(" zebra-crossing: ünïcode 漢字")["input_ids"]
    assert ids and tokenizer.decode(ids) == " zebra-crossing: ünïcode 漢字"


def test_captions_encode_to_three_stacked_layers_with_text_positions(pipeline):
    embeds, ids = encode_flux2_captions(pipeline, ["a photo of a person", "a man on a beach"], 16)
    assert embeds.shape == (2, 16, pipeline.transformer.config.joint_attention_dim)
    assert torch.equal(ids[0].float(), text_ids(16))  # what the training step gives the transformer
    assert not torch.allclose(embeds[0], embeds[1])


def test_latents_are_what_the_pipeline_encodes_and_decode_back(pipeline):
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        latents = encode_flux2_latents(pipeline.vae, pixels * 2 - 1)
        own = pipeline._encode_vae_image(pixels * 2 - 1, generator=None)  # patchified and normalised
    assert latents.shape == (2, 4, 8, 8)
    # Tokens and their positions as dtback packs FLUX.1 latents are FLUX.2's (positions with the 4th axis added).
    from diffusers import FluxPipeline

    flux1_ids = FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32)
    assert torch.equal(image_ids(flux1_ids), Flux2KleinPipeline._prepare_latent_ids(own)[0].float())
    assert torch.equal(FluxPipeline._pack_latents(latents, 2, 4, 8, 8), Flux2KleinPipeline._pack_latents(own))
    assert torch.allclose(Flux2KleinPipeline._patchify_latents(latents), own, atol=1e-6)
    # Decoding undoes the normalisation exactly as the pipeline's sampling does before its VAE decode.
    raw = own * torch.sqrt(pipeline.vae.bn.running_var.view(1, -1, 1, 1) + pipeline.vae.config.batch_norm_eps) \
        + pipeline.vae.bn.running_mean.view(1, -1, 1, 1)
    with torch.no_grad():
        expected = pipeline.vae.decode(Flux2KleinPipeline._unpatchify_latents(raw)).sample
        assert torch.allclose(decode_flux2_latents(pipeline.vae, latents), expected, atol=1e-5)
    # Differentiable, for the identity losses.
    latents.requires_grad_(True)
    decode_flux2_latents(pipeline.vae, latents).mean().backward()
    assert torch.isfinite(latents.grad).all() and latents.grad.abs().sum() > 0


def test_identity_adapters_sample_through_the_flux2_pipeline_with_true_cfg(pipeline):
    base_image = generate(pipeline)
    torch.manual_seed(0)
    model = IdentityPreservingFlux.from_config(ModelConfig(), IdentityConfig(), pipeline.transformer.config,
                                               face_dim=8, body_dim=0).attach(pipeline.transformer)
    tokens = model.encode_identity(IdentityInputs(face_embeds=torch.randn(1, 2, 8)))
    with model.identity_per_call(tokens, steps=2, branches=2):
        np.testing.assert_array_equal(generate(pipeline), base_image)  # zero-initialised: exactly the base
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.to_out.weight.normal_(std=0.5)
    with model.identity_per_call(tokens, steps=2, branches=2):
        assert np.abs(generate(pipeline) - base_image).max() > 1e-3
    with model.identity_per_call(tokens, steps=2, branches=2, face_scale=0.0):
        np.testing.assert_array_equal(generate(pipeline), base_image)


def test_the_simple_flux2_dev_model_saves_reloads_and_reads_its_prompts(tmp_path):
    """FLUX.2 [dev]'s pipeline (Mistral 3 text encoder, distilled guidance) with the simple model's sizes."""
    from diffusers import Flux2Pipeline

    built = build_simple_flux2_pipeline(seed=1, dev=True)
    built.save_pretrained(tmp_path / "dev", safe_serialization=True)
    loaded = Flux2Pipeline.from_pretrained(tmp_path / "dev")
    assert loaded.transformer.config.guidance_embeds
    embeds, _ = encode_flux2_captions(loaded, ["a photo of a person", "a man on a beach"], 16)
    assert embeds.shape == (2, 16, loaded.transformer.config.joint_attention_dim)
    assert not torch.allclose(embeds[0], embeds[1])  # the prompt is read, not cut off behind a system message
    settings = dict(prompt="a photo of a person", height=64, width=64, num_inference_steps=2, guidance_scale=3.5,
                    max_sequence_length=16, output_type="np")
    image = loaded(**settings, generator=torch.Generator().manual_seed(0)).images[0]
    np.testing.assert_allclose(built(**settings, generator=torch.Generator().manual_seed(0)).images[0], image,
                               atol=1e-5)
