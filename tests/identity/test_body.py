"""Body encoder: person crop rule, torch preprocessing, tiny random DINOv2/SigLIP backbones saved and reloaded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model, SiglipConfig, SiglipModel

from dtback.identity import body
from dtback.identity.body import (
    BodyCropRule,
    BodyEncoder,
    BodyPreprocess,
    MissingModelError,
    letterbox,
    person_box,
    pil_to_pixels,
    preprocess_from_dict,
)

from helpers import HIDDEN, MEAN, PATCH, SIZE, STD, save_tiny_dinov2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture(scope="module")
def encoder(tiny_dir) -> BodyEncoder:
    return BodyEncoder.from_pretrained(tiny_dir)


def person_image(width: int = 96, height: int = 192, seed: int = 0) -> Image.Image:
    """Noise background with a 'person': skin-coloured head, red shirt, blue trousers."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    array[10:30, 40:56] = (230, 180, 150)
    array[30:90, 30:66] = (200, 20, 20)
    array[90:180, 34:62] = (20, 20, 160)
    return Image.fromarray(array)


# ----------------------------------------------------------------------------------------------------- person_box


def test_person_box_follows_the_documented_rule():
    # w = 100, h = 120, cx = 450: x 450 ± 200, y from 300 - 60 to 300 + 900.
    assert person_box((1000, 2000), np.array([400.0, 300.0, 500.0, 420.0]), BodyCropRule()) == (250, 240, 650, 1200)


def test_person_box_custom_factors():
    rule = BodyCropRule(width_factor=1.0, height_factor=3.0, top_factor=0.0)
    assert person_box((1000, 2000), np.array([400.0, 300.0, 500.0, 420.0]), rule) == (350, 300, 550, 660)


def test_person_box_grows_to_whole_pixels_and_clips_at_borders():
    # w = h = 20, cx = 20.5: x -19.5 .. 60.5 -> 0 .. 61; y 10.25 .. 170.25 -> 10 .. 100 (image height).
    assert person_box((100, 100), np.array([10.5, 20.25, 30.5, 40.25]), BodyCropRule()) == (0, 10, 61, 100)
    assert person_box((300, 600), np.array([10.0, 5.0, 110.0, 125.0]), BodyCropRule()) == (0, 0, 260, 600)


def test_person_box_whole_image_without_face_or_when_empty():
    assert person_box((64, 48), None, BodyCropRule()) == (0, 0, 64, 48)
    # Face entirely right of the image: the clipped box has no width.
    assert person_box((100, 100), np.array([500.0, 10.0, 520.0, 30.0]), BodyCropRule()) == (0, 0, 100, 100)
    # Zero-size face box.
    assert person_box((100, 100), np.array([50.0, 50.0, 50.0, 50.0]), BodyCropRule()) == (0, 0, 100, 100)


def test_person_box_rejects_bad_input_naming_the_value():
    with pytest.raises(ValueError, match=r"x2 >= x1"):
        person_box((100, 100), np.array([50.0, 10.0, 40.0, 30.0]), BodyCropRule())
    with pytest.raises(ValueError, match="4 finite numbers"):
        person_box((100, 100), np.array([1.0, 2.0, 3.0]), BodyCropRule())
    with pytest.raises(ValueError, match="image_size"):
        person_box((0, 100), None, BodyCropRule())
    with pytest.raises(ValueError, match="width_factor"):
        BodyCropRule(width_factor=0.0)


# -------------------------------------------------------------------------------------------------- preprocessing


def test_preprocess_from_dict_dinov2_siglip_and_defaults():
    dinov2 = {"crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "size": {"shortest_edge": 256},
              "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
    assert preprocess_from_dict(dinov2, "x").size == (224, 224)
    siglip = {"size": {"height": 384, "width": 384}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    assert preprocess_from_dict(siglip, "x") == BodyPreprocess((384, 384), (0.5,) * 3, (0.5,) * 3)
    assert preprocess_from_dict({}, "x") == BodyPreprocess()
    unnormalised = preprocess_from_dict({"do_normalize": False, "size": 64}, "x")
    assert unnormalised == BodyPreprocess((64, 64), (0.0,) * 3, (1.0,) * 3)
    with pytest.raises(ValueError, match=r"cfg.json: image_mean"):
        preprocess_from_dict({"image_mean": [0.5, 0.5]}, "cfg.json")


def test_letterbox_pads_evenly_with_fill():
    pixels = torch.ones(1, 3, 10, 4)
    fill = torch.tensor([0.1, 0.2, 0.3])
    boxed = letterbox(pixels, 1.0, fill)
    assert boxed.shape == (1, 3, 10, 10)
    assert torch.equal(boxed[..., 3:7], pixels)
    assert torch.allclose(boxed[0, :, :, :3], fill.view(3, 1, 1).expand(3, 10, 3))
    assert letterbox(boxed, 1.0, fill) is boxed


def test_settings_read_from_preprocessor_config(encoder):
    assert encoder.preprocess == BodyPreprocess((SIZE, SIZE), MEAN, STD)
    assert encoder.dim == HIDDEN and encoder.num_tokens == (SIZE // PATCH) ** 2


def test_json_fallback_when_image_processor_unavailable(tiny_dir, monkeypatch):
    def unavailable(*args, **kwargs):
        raise ImportError("needs torchvision")

    monkeypatch.setattr(body.AutoImageProcessor, "from_pretrained", unavailable)
    assert BodyEncoder.from_pretrained(tiny_dir).preprocess == BodyPreprocess((SIZE, SIZE), MEAN, STD)


def test_defaults_without_preprocessor_config(tmp_path):
    encoder = BodyEncoder.from_pretrained(save_tiny_dinov2(tmp_path / "m", processor=False))
    assert encoder.preprocess == BodyPreprocess((224, 224), body.IMAGENET_MEAN, body.IMAGENET_STD)


# ----------------------------------------------------------------------------------------------------- forward


def test_forward_shapes(encoder):
    features = encoder(torch.rand(2, 3, 40, 24))
    assert features.pooled.shape == (2, HIDDEN)
    assert features.tokens.shape == (2, (SIZE // PATCH) ** 2, HIDDEN)


def test_forward_equals_transformers_on_manually_preprocessed_pixels(encoder, tiny_dir):
    torch.manual_seed(1)
    pixels = torch.rand(2, 3, 48, 40)
    manual = F.interpolate(pixels, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    manual = (manual - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    reference = Dinov2Model.from_pretrained(tiny_dir, local_files_only=True).eval()
    with torch.no_grad():
        expected = reference(pixel_values=manual)
        features = encoder(pixels)
    torch.testing.assert_close(features.pooled, expected.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.tokens, expected.last_hidden_state[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.pooled, expected.last_hidden_state[:, 0], atol=1e-5, rtol=1e-5)


def test_gradients_flow_to_pixels_not_to_frozen_backbone(encoder):
    pixels = torch.rand(2, 3, 40, 40, requires_grad=True)
    encoder(pixels).pooled.pow(2).sum().backward()
    assert pixels.grad is not None and torch.isfinite(pixels.grad).all()
    assert pixels.grad.abs().sum(dim=(1, 2, 3)).min() > 0
    assert all(not p.requires_grad for p in encoder.parameters())


def test_forward_rejects_wrong_shape(encoder):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\).*\(3, 32, 32\)"):
        encoder(torch.rand(3, 32, 32))


# ------------------------------------------------------------------------------------------------------ encode


def test_encode_full_body_image(encoder):
    image = person_image()
    face = np.array([40.0, 10.0, 56.0, 30.0])
    features = encoder.encode(image, face)
    assert features.pooled.shape == (1, HIDDEN) and features.tokens.shape == (1, encoder.num_tokens, HIDDEN)
    # Same numbers as cropping and letterboxing by hand and calling forward.
    crop = pil_to_pixels(image.crop(person_box(image.size, face, encoder.crop_rule)))
    with torch.no_grad():
        by_hand = encoder(letterbox(crop, 1.0, torch.tensor(MEAN)))
    torch.testing.assert_close(features.pooled, by_hand.pooled)
    # Different crops read different pixels, so they give different features.
    whole = encoder.encode(image, None)
    shifted = encoder.encode(image, np.array([10.0, 100.0, 26.0, 120.0]))
    assert not torch.allclose(features.pooled, whole.pooled, atol=1e-4)
    assert not torch.allclose(features.pooled, shifted.pooled, atol=1e-4)


def test_encode_rejects_non_rgb(encoder):
    with pytest.raises(ValueError, match="mode 'L'"):
        encoder.encode(person_image().convert("L"), None)


# ------------------------------------------------------------------------------------------- loading and identity


def test_missing_folder_names_it_and_how_to_download(tmp_path):
    missing = tmp_path / "models" / "dinov2-small"
    with pytest.raises(MissingModelError) as info:
        BodyEncoder.from_pretrained(missing)
    assert str(missing) in str(info.value)
    assert "huggingface-cli download facebook/dinov2-small --local-dir" in str(info.value)
    with pytest.raises(MissingModelError, match="does not exist"):
        BodyEncoder.from_pretrained(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingModelError, match="no config.json"):
        BodyEncoder.from_pretrained(tmp_path / "empty")


def test_uncached_hub_id_is_a_clear_error():
    with pytest.raises(MissingModelError, match="nor in the local Hugging Face cache"):
        BodyEncoder.from_pretrained("dtback-tests/no-such-model")


def test_encoder_id_stable_for_same_config_and_differs_for_another(tmp_path):
    folder = save_tiny_dinov2(tmp_path / "m")
    first = BodyEncoder.from_pretrained(folder).encoder_id
    assert BodyEncoder.from_pretrained(folder).encoder_id == first
    assert first.startswith(str(folder.resolve()) + "@")
    save_tiny_dinov2(folder, layers=3)
    assert BodyEncoder.from_pretrained(folder).encoder_id != first
    other_rule = BodyEncoder.from_pretrained(folder, crop_rule=BodyCropRule(height_factor=4.0)).encoder_id
    assert other_rule != BodyEncoder.from_pretrained(folder).encoder_id


def test_torch_dtype_is_applied(tiny_dir):
    encoder = BodyEncoder.from_pretrained(tiny_dir, torch_dtype=torch.bfloat16)
    features = encoder(torch.rand(1, 3, SIZE, SIZE))
    assert features.pooled.dtype == torch.bfloat16


def test_siglip_pair_uses_vision_tower_without_cls(tmp_path):
    torch.manual_seed(0)
    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = SiglipConfig(
        text_config={**tiny, "vocab_size": 99, "max_position_embeddings": 16},
        vision_config={**tiny, "image_size": SIZE, "patch_size": PATCH},
    )
    SiglipModel(config).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "size": {"height": SIZE, "width": SIZE},
         "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    ))
    encoder = BodyEncoder.from_pretrained(tmp_path)
    pixels = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        features = encoder(pixels)
        expected = encoder.backbone(pixel_values=(pixels - 0.5) / 0.5)
    assert features.tokens.shape == (2, (SIZE // PATCH) ** 2, 32)
    torch.testing.assert_close(features.tokens, expected.last_hidden_state)
    torch.testing.assert_close(features.pooled, expected.pooler_output)
