"""The FLUX base: the simple model built, saved in diffusers format, reloaded and sampled; real-FLUX loading errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtback.config import IdentityConfig, ModelConfig
from dtback.errors import MissingModelError
from dtback.identity.resampler import IdentityInputs
from dtback.model.flux import (
    SIMPLE_TRANSFORMER,
    build_simple_tokenizers,
    load_base,
    max_sequence_length,
    resolve_dtype,
)
from dtback.model.identity_flux import IdentityPreservingFlux


def generate(pipeline, seed: int = 0) -> np.ndarray:
    return pipeline(
        "a person standing in a park", height=64, width=64, num_inference_steps=2, guidance_scale=1.0,
        max_sequence_length=16, generator=torch.Generator().manual_seed(seed), output_type="np",
    ).images


@pytest.fixture(scope="module")
def simple_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("out") / "simple_base"


def test_simple_model_saves_reloads_and_generates(simple_dir):
    cfg = ModelConfig(simple_model_dir=simple_dir, simple_vae=None, simple_base=None)
    first = load_base(cfg, output_dir=simple_dir.parent, seed=3)
    assert (simple_dir / "model_index.json").is_file() and (simple_dir / "transformer" / "config.json").is_file()
    assert not [p for p in simple_dir.parent.iterdir() if p.name.startswith(".simple_base")]
    again = load_base(cfg, output_dir=simple_dir.parent, seed=99)  # folder exists: loaded, not rebuilt
    for a, b in zip(first.transformer.state_dict().values(), again.transformer.state_dict().values()):
        assert torch.equal(a, b)
    assert first.transformer.config.num_layers == SIMPLE_TRANSFORMER["num_layers"]
    assert not any(p.requires_grad for p in again.transformer.parameters())
    images = generate(again)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    np.testing.assert_array_equal(images, generate(again))  # deterministic by seed
    assert not np.array_equal(images, generate(again, seed=1))


def test_identity_adapters_run_inside_the_diffusers_pipeline(simple_dir):
    pipeline = load_base(ModelConfig(simple_model_dir=simple_dir, simple_vae=None, simple_base=None), output_dir=simple_dir.parent)
    base_image = generate(pipeline)
    torch.manual_seed(0)
    model = IdentityPreservingFlux.from_config(ModelConfig(), IdentityConfig(), pipeline.transformer.config,
                                               face_dim=8, body_dim=0).attach(pipeline.transformer)
    tokens = model.encode_identity(IdentityInputs(face_embeds=torch.randn(1, 2, 8)))
    model.set_identity(tokens)
    np.testing.assert_array_equal(generate(pipeline), base_image)  # zero-initialised: exactly the base
    with torch.no_grad():
        for adapter in model.adapters.values():
            adapter.to_out.weight.normal_(std=0.5)
    assert np.abs(generate(pipeline) - base_image).max() > 1e-3
    model.set_identity(tokens, face_scale=0.0)
    np.testing.assert_array_equal(generate(pipeline), base_image)


def test_simple_tokenizers_cover_any_caption():
    clip, t5 = build_simple_tokenizers()
    known = t5("a person walking in the park").input_ids
    assert len(known) == 7 and t5.unk_token_id not in known  # six whole words + </s>
    spelled = t5("zebra").input_ids
    assert t5.unk_token_id not in spelled and len(spelled) > 2  # unknown word: spelled out, not <unk>
    ids = clip("a person, zebra").input_ids
    # CLIP's unknown token is its end token, so no unknown piece means no end token before the last position.
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id and clip.unk_token_id not in ids[1:-1]
    assert clip.model_max_length == 77


def test_real_flux_missing_gives_download_hint(tmp_path):
    cfg = ModelConfig(use_simple_model=False, pretrained_model=str(tmp_path / "FLUX.1-dev"))
    with pytest.raises(MissingModelError, match="does not exist. Download it first: `dtback download --only flux`"):
        load_base(cfg, output_dir=tmp_path)
    not_cached = ModelConfig(use_simple_model=False, pretrained_model="nobody-dtback-test/no-such-flux")
    with pytest.raises(MissingModelError, match="nor in the local Hugging Face cache"):
        load_base(not_cached, output_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingModelError, match="has no model_index.json"):
        load_base(ModelConfig(use_simple_model=False, pretrained_model=str(tmp_path / "empty")), output_dir=tmp_path)


def test_dtype_and_sequence_length_defaults():
    assert resolve_dtype(ModelConfig(use_simple_model=False), "cuda") is torch.bfloat16
    assert resolve_dtype(ModelConfig(use_simple_model=False), "cpu") is torch.float32
    assert resolve_dtype(ModelConfig(), "cuda") is torch.float32
    assert resolve_dtype(ModelConfig(dtype="float16"), "cpu") is torch.float16
    assert max_sequence_length(ModelConfig()) == 32
    assert max_sequence_length(ModelConfig(use_simple_model=False)) == 512
    assert max_sequence_length(ModelConfig(max_sequence_length=77)) == 77


def test_every_world_caption_is_whole_words_within_the_prompt_length():
    # A world caption must reach the simple model whole: no word spelled letter by letter, nothing cut at
    # SIMPLE_MAX_SEQUENCE_LENGTH (the lighting words come last).
    import itertools
    import re

    from dtback.world.people import ARMS, FACING, LIGHTING, SCENES, SIDE_LIGHT, STANCE, caption_for
    from dtback.model.flux import CAPTION_WORDS, SIMPLE_MAX_SEQUENCE_LENGTH

    _, t5 = build_simple_tokenizers()
    longest = 0
    for scene, stance, arms, facing, light, side in itertools.product(SCENES, STANCE, ARMS, FACING, LIGHTING,
                                                                      SIDE_LIGHT):
        caption = caption_for({"scene": scene, "lighting": light, "side_light": side,
                               "pose": {"arms": arms, "facing": facing, "stance": stance}})
        missing = [w for w in re.findall(r"[a-z]+", caption) if w not in CAPTION_WORDS]
        assert not missing, (caption, missing)
        longest = max(longest, len(t5(caption).input_ids))
    assert longest <= SIMPLE_MAX_SEQUENCE_LENGTH, longest


def test_private_diffusers_helpers_keep_their_contract():
    """dtback calls these private FluxPipeline helpers (the tested range is in pyproject.toml): packing 2 x 2
    latent patches into tokens and back, the tokens' position ids, and the resolution shift of the noise levels."""
    import torch
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    latents = torch.randn(2, 4, 8, 6)
    packed = FluxPipeline._pack_latents(latents, 2, 4, 8, 6)
    assert packed.shape == (2, 4 * 3, 16)  # (B, patches, channels x 2 x 2)
    assert torch.equal(packed[0, 0], latents[0, :, :2, :2].reshape(4, 4).reshape(-1))
    assert torch.equal(FluxPipeline._unpack_latents(packed, 64, 48, 8), latents)
    ids = FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32)
    assert ids.shape == (12, 3) and ids[:, 0].eq(0).all() and ids[-1].tolist() == [0.0, 3.0, 2.0]
    assert calculate_shift(256) == 0.5 and calculate_shift(4096) == 1.15
