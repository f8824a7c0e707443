"""World face and body encoders: they separate held-out characters, follow the identity interfaces, are
differentiable, plug into the precompute factory, and their training code runs and round-trips through files."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dtback import backends
from dtback.config import DataConfig, IdentityConfig, ModelConfig, WorldConfig
from dtback.data.layout import scan_dataset
from dtback.errors import MissingModelError
from dtback.identity.body import BodyFeatures
from dtback.identity.crops import PRE_SHRINK_ZOOM, crop_square
from dtback.identity.face import FaceResult
from dtback.identity.precompute import IdentityPrecomputer
from dtback.world.encoders import WorldBodyEncoder, WorldFaceEncoder, load_world_body_encoder, load_world_face_encoder
from dtback.world.files import ensure_world
from dtback.world.people import render_world_set, sample_characters
from dtback.world_build.encoders import (
    EncoderRecipe, evaluate_body_encoder, evaluate_face_encoder,
    training_characters,
)
from dtback.world_build.train import box_iou, roc_auc_same_vs_different

HELD_OUT_SEED = 777  # neither the encoders' training seed nor their recorded evaluation seed


@pytest.fixture(scope="module")
def face_encoder() -> WorldFaceEncoder:
    return load_world_face_encoder()


@pytest.fixture(scope="module")
def body_encoder() -> WorldBodyEncoder:
    return load_world_body_encoder()


@pytest.fixture(scope="module")
def held_out():
    """30 characters x 4 images sharing neither face nor body attributes with any encoder training character."""
    characters = sample_characters(30, HELD_OUT_SEED, exclude=training_characters(EncoderRecipe()))
    return render_world_set(characters, 4, 128, HELD_OUT_SEED)


def test_face_encoder_separates_held_out_characters(face_encoder, held_out):
    figures = evaluate_face_encoder(face_encoder, held_out)
    assert figures["auc"] >= 0.95, figures
    assert figures["detection_rate"] >= 0.98 and figures["mean_iou"] >= 0.7, figures


def test_body_encoder_separates_held_out_characters(body_encoder, held_out):
    figures = evaluate_body_encoder(body_encoder, held_out)
    assert figures["auc"] >= 0.95, figures


@pytest.mark.slow
def test_encoders_hold_on_vae_round_trips(face_encoder, body_encoder, held_out):
    """The identity loss sees decoded latents: both encoders still separate characters after the world VAE."""
    from dtback.world.vae import load_world_vae, round_trip, world_vae_folder

    decoded = dataclasses.replace(held_out, images=round_trip(load_world_vae(world_vae_folder()), held_out.images))
    face, body = evaluate_face_encoder(face_encoder, decoded), evaluate_body_encoder(body_encoder, decoded)
    assert face["auc"] >= 0.95 and face["detection_rate"] >= 0.95 and body["auc"] >= 0.95, (face, body)


def test_face_encoder_interface(face_encoder, held_out):
    image = held_out.images[0].permute(1, 2, 0).numpy()
    result = face_encoder.encode(image)
    assert isinstance(result, FaceResult) and result.num_faces == 1
    assert result.aligned.shape == (48, 48, 3) and result.aligned.dtype == np.uint8
    assert result.embedding.shape == (128,) and abs(np.linalg.norm(result.embedding) - 1) < 1e-5
    assert float(box_iou(torch.from_numpy(result.face.box)[None], held_out.face_boxes[:1])) > 0.6
    assert result.face.landmarks.shape == (5, 2)
    assert face_encoder.encode(np.full((128, 128, 3), 200, np.uint8)) is None  # a blank wall has no face
    assert face_encoder.encoder_id.startswith("world-face:") and face_encoder.settings()["choice"] == "largest"


def test_body_encoder_interface(body_encoder, held_out):
    from PIL import Image

    image = Image.fromarray(held_out.images[0].permute(1, 2, 0).numpy())
    features = body_encoder.encode(image, held_out.face_boxes[0].numpy())
    assert isinstance(features, BodyFeatures)
    assert features.pooled.shape == (1, body_encoder.dim) and features.tokens.shape == (1, body_encoder.num_tokens, 128)
    whole = body_encoder.encode(image, None)
    assert whole.pooled.shape == (1, 128)
    assert body_encoder.encoder_id.startswith("world-body:")


def test_differentiable_paths_reach_the_pixels(face_encoder, body_encoder, held_out):
    pixels = held_out.pixels(torch.arange(4)).requires_grad_(True)
    boxes = held_out.face_boxes[:4]
    face = face_encoder.embed_pixels(pixels, boxes)
    body = body_encoder.embed_pixels(pixels, boxes).pooled
    assert face.shape == (4, 128) and body.shape == (4, 128)
    (face.sum() + body.sum()).backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    # Same box: the differentiable path and the numpy path (uint8 aligned crop) give the same embedding.
    image = held_out.images[0].permute(1, 2, 0).numpy()
    detected = face_encoder.detect(image)[0]
    by_numpy = face_encoder.embed([face_encoder.align(image, detected)])[0]
    by_torch = face_encoder.embed_pixels(pixels[:1].detach(), torch.from_numpy(detected.box)[None])[0]
    assert float(np.dot(by_numpy, by_torch.numpy())) > 0.99


def test_crop_square_fills_outside_and_keeps_inside():
    pixels = torch.zeros(1, 3, 8, 8)
    pixels[..., 2:6, 2:6] = 1.0
    inside = crop_square(pixels, torch.tensor([[2.0, 2.0, 6.0, 6.0]]), 4)
    assert torch.allclose(inside, torch.ones_like(inside))
    outside = crop_square(pixels, torch.tensor([[20.0, 20.0, 24.0, 24.0]]), 4)
    assert torch.allclose(outside, torch.full_like(outside, 0.5))


def whole_image_crop(pixels, box, size):
    """The definition crop_square computes: blur the whole image by the zoom factor, sample bilinearly."""
    height, width = pixels.shape[-2:]
    centre, half = (box[:2] + box[2:]) / 2, float((box[2:] - box[:2]).max()) / 2
    steps = (torch.arange(size) + 0.5) / size * 2 - 1
    gx, gy = (centre[0] + half * steps) / width * 2 - 1, (centre[1] + half * steps) / height * 2 - 1
    zoom = half * 2 / size
    kernel = int(zoom) | 1 if zoom > 1.5 else 1
    source = torch.nn.functional.avg_pool2d(pixels - 0.5, kernel, stride=1, padding=kernel // 2,
                                            count_include_pad=False)
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    return torch.nn.functional.grid_sample(source, grid, align_corners=False) + 0.5


@pytest.mark.parametrize("box", [[10.0, 20, 90, 130], [-50, -40, 60, 50], [150, 250, 260, 330], [0, 0, 200, 300]])
def test_crop_square_reads_only_its_region_and_matches_the_whole_image_blur(box):
    """Below PRE_SHRINK_ZOOM the crop is the definition exactly (the world encoders were trained on it)."""
    pixels = torch.rand(1, 3, 300, 200, generator=torch.Generator().manual_seed(0))
    box = torch.tensor(box)
    for size in (48, 64, 112):
        assert float((box[2:] - box[:2]).max()) / size < PRE_SHRINK_ZOOM
        assert torch.allclose(crop_square(pixels, box[None], size), whole_image_crop(pixels, box, size), atol=1e-4)


def test_crop_square_costs_the_same_for_any_photo_size(monkeypatch):
    """Issue 19: the blur ran over the whole image with a kernel growing with it (cost ~ side^4: a 7000^2 reference
    took 459 s). Now the stride-1 blur sees at most (PRE_SHRINK_ZOOM + 1)^2 ``size^2`` pixels whatever the photo."""
    blurred = []
    pool = torch.nn.functional.avg_pool2d

    def counting(source, kernel, stride=None, *args, **kwargs):
        if stride == 1:
            blurred.append((source.shape[-2] * source.shape[-1], kernel))
        return pool(source, kernel, stride, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "avg_pool2d", counting)
    smooth = torch.rand(1, 3, 30, 40, generator=torch.Generator().manual_seed(1))
    for side in (600, 4000):
        pixels = torch.nn.functional.interpolate(smooth, size=(side * 3 // 4, side), mode="bilinear")
        box = torch.tensor([0.0, 0.0, side, side * 3 / 4])
        blurred.clear()
        crop = crop_square(pixels, box[None], 64)
        (area, kernel), = blurred
        assert area <= ((PRE_SHRINK_ZOOM + 1) * 64) ** 2 and kernel <= 7, (side, area, kernel)
        if side == 600:  # the reference blur is itself side^4: compared where it is cheap
            monkeypatch.setattr(torch.nn.functional, "avg_pool2d", pool)
            assert (crop - whole_image_crop(pixels, box, 64)).abs().mean() < 0.01
            monkeypatch.setattr(torch.nn.functional, "avg_pool2d", counting)


def test_backends_build_world_encoders_for_the_precompute(tmp_path):
    cfg = IdentityConfig(device="cpu")
    assert cfg.face_backend == "world" and cfg.body_model == "world"
    face, body = backends.face_encoder(cfg), backends.body_encoder(cfg)
    assert isinstance(face, WorldFaceEncoder) and isinstance(body, WorldBodyEncoder)
    data = DataConfig(data_dir=tmp_path / "w", world=WorldConfig(characters=3, images_per_character=3, size=128))
    ensure_world(data, progress=False)
    index = scan_dataset(data, seed=0, progress=False)
    report = IdentityPrecomputer(face, body, tmp_path / "cache", 10**8).run(index, progress=False)
    assert report.images == 9 and report.faces_found == 9 and report.body_encoder_calls == 9


def test_a_missing_world_component_names_the_command_that_builds_it(tmp_path):
    # Loaders load, never train: an empty components folder is a clear error, for every world part.
    empty = tmp_path / "components"
    empty.mkdir()
    model = ModelConfig(simple_model_dir=tmp_path / "simple")
    for load in (lambda: backends.face_encoder(IdentityConfig(device="cpu"), empty),
                 lambda: backends.body_encoder(IdentityConfig(device="cpu"), empty),
                 lambda: backends.reader(empty),
                 lambda: backends.simple_vae(model, empty),
                 lambda: backends.load_base(model, tmp_path, world=empty)):
        with pytest.raises(MissingModelError, match=f"dtback world-components --out {empty}"):
            load()
    assert not any(empty.iterdir()) and not (tmp_path / "simple").exists()  # nothing was trained or written


def test_auc_helper():
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert roc_auc_same_vs_different(perfect, labels) == 1.0
