"""dlib's face recognition ResNet in torch against dlib itself: the parsed file, descriptors on a bundled image and
on real photos, dlib's chip geometry as a differentiable warp, gradients and a real optimisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtback.config import ConfigError
from dtback.data.images import load_rgb
from dtback.identity.dlib_torch import (
    MODEL_FILE,
    DlibModelError,
    _padded_add,
    _Reader,
    cut_face_chips,
    load_dlib_resnet,
    read_dlib_resnet,
)
from dtback.identity.face import DlibFaceEncoder, dlib_models_dir

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def encoder() -> DlibFaceEncoder:
    return DlibFaceEncoder()


@pytest.fixture(scope="module")
def net():
    return load_dlib_resnet()


@pytest.fixture(scope="module")
def astronaut(encoder):
    """skimage's astronaut (512 x 512, one frontal face), its face and dlib's chip of it."""
    image = np.ascontiguousarray(skimage_data.astronaut())
    face = max(encoder.detect(image), key=lambda f: f.area)
    return image, face, encoder.align(image, face)


def torch_descriptor(net, chip: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(chip.copy()).permute(2, 0, 1)[None].float())[0].numpy()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b))


def dlib_full_image_descriptor(encoder: DlibFaceEncoder, image: np.ndarray, face) -> np.ndarray:
    """dlib's own path: compute_face_descriptor(image, shape) cuts the chip itself."""
    dlib = encoder._dlib
    x1, y1, x2, y2 = (int(round(v)) for v in face.box)
    shape = dlib.full_object_detection(dlib.rectangle(x1, y1, x2 - 1, y2 - 1),
                                       [dlib.point(int(x), int(y)) for x, y in face.landmarks])
    return np.array(encoder._recognizer.compute_face_descriptor(image, shape))


# ------------------------------------------------------------------------------------------------ the file


def test_the_file_parses_into_dlibs_network():
    weights = read_dlib_resnet(dlib_models_dir() / MODEL_FILE)
    kinds = [layer.kind for layer in weights.layers]
    assert (kinds.count("con"), kinds.count("affine"), kinds.count("relu")) == (29, 29, 29)
    assert (kinds.count("add_prev"), kinds.count("avg_pool"), kinds.count("max_pool"), kinds[-1]) == (14, 5, 1, "fc")
    assert weights.input_size == (150, 150)
    np.testing.assert_allclose(weights.channel_means, (122.782, 117.001, 104.298), atol=1e-4)
    assert weights.layers[0].weight.shape == (32, 3, 7, 7) and weights.layers[0].sizes == (2, 2, 0, 0)
    assert weights.layers[-1].weight.shape == (256, 128)


def test_a_damaged_file_is_refused_naming_it(tmp_path):
    data = (dlib_models_dir() / MODEL_FILE).read_bytes()
    cut = tmp_path / "cut.dat"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibModelError, match=r"cut\.dat.*ends early"):
        read_dlib_resnet(cut)
    other = tmp_path / "shape.dat"
    other.write_bytes((dlib_models_dir() / "shape_predictor_5_face_landmarks.dat").read_bytes()[:4096])
    with pytest.raises(DlibModelError, match=r"shape\.dat"):
        read_dlib_resnet(other)
    renamed = tmp_path / "renamed.dat"
    renamed.write_bytes(data.replace(b"\x05con_4", b"\x05con_9", 1))
    with pytest.raises(DlibModelError, match=r"renamed\.dat: layer 'con_9' where con_4 belongs"):
        read_dlib_resnet(renamed)


def test_reader_decodes_dlibs_integers_and_floats(tmp_path):
    path = tmp_path / "numbers.dat"
    # 300 (2 bytes), -5 (sign bit), 0, then 0.04 as mantissa 0xa3d70a and exponent -28, then '1'
    path.write_bytes(bytes([0x02, 0x2C, 0x01, 0x81, 0x05, 0x01, 0x00, 0x03, 0x0A, 0xD7, 0xA3, 0x81, 0x1C]) + b"1")
    reader = _Reader(path)
    assert (reader.int(), reader.int(), reader.int()) == (300, -5, 0)
    assert reader.float() == pytest.approx(0.04, abs=1e-9)
    assert reader.bool() is True


def test_add_prev_sums_into_the_larger_shape_with_zeros():
    big = torch.ones(1, 2, 3, 3)
    small = torch.full((1, 1, 2, 2), 5.0)
    out = _padded_add(big, small)
    assert out.shape == (1, 2, 3, 3)
    assert out[0, 0, :2, :2].eq(6).all() and out[0, 0, 2].eq(1).all() and out[0, 1].eq(1).all()


# --------------------------------------------------------------------------------------- descriptors vs dlib


def test_bundled_image_descriptor_equals_dlibs(encoder, net, astronaut):
    """Runs everywhere (no shared photos needed): the same chip through both networks, and dlib's full-image path."""
    image, face, chip = astronaut
    ours = torch_descriptor(net, chip)
    from_chip = np.array(encoder._recognizer.compute_face_descriptor(chip))
    assert cosine(ours, from_chip) >= 0.9999
    np.testing.assert_allclose(ours, from_chip, atol=1e-4)  # the raw values too, not only the direction
    assert cosine(ours, dlib_full_image_descriptor(encoder, image, face)) >= 0.9999


def test_real_photos_descriptors_equal_dlibs(people_dir, encoder, net):
    """Every 6th photo of the shared set (the benchmark runs all of them): cosine >= 0.9999 on both dlib paths."""
    files = sorted(p for p in people_dir.glob("*/*/*") if p.is_file())[::6]
    worst, compared = 1.0, 0
    for path in files:
        image = np.asarray(load_rgb(path, 10**8))
        faces = encoder.detect(image)
        if not faces:
            continue
        face = max(faces, key=lambda f: f.area)
        chip = encoder.align(image, face)
        ours = torch_descriptor(net, chip)
        worst = min(worst, cosine(ours, np.array(encoder._recognizer.compute_face_descriptor(chip))),
                    cosine(ours, dlib_full_image_descriptor(encoder, image, face)))
        compared += 1
    assert compared >= 15
    assert worst >= 0.9999, f"worst cosine {worst:.6f} over {compared} photos"


def test_the_encoder_runs_either_recognizer_with_the_same_embeddings(encoder, astronaut, monkeypatch):
    """identity.face_recognizer: the torch network (default, batched: one call for a batch of images) and dlib's own
    C++ give the same unit embeddings through ``encode_batch``, which precompute, the builder and evaluate use; the
    choice is part of the cache key."""
    image = astronaut[0]
    images = [image, image[:, ::-1].copy(), np.zeros((64, 64, 3), np.uint8)]  # a mirror, and no face at all
    with_dlib = DlibFaceEncoder(recognizer="dlib")
    calls = []
    original = encoder._torch_net

    def spy(device):
        calls.append(device)
        return original(device)

    monkeypatch.setattr(encoder, "_torch_net", spy)
    moved = []
    ours = encoder.encode_batch(images, on_image=moved.append)
    theirs = with_dlib.encode_batch(images)
    assert len(calls) == 1 and moved == [1, 1, 1]  # one batched forward; the progress moves per image
    assert ours[2] is None and theirs[2] is None
    for a, b in zip(ours[:2], theirs[:2]):
        assert cosine(a.embedding, b.embedding) >= 0.9999
        assert abs(np.linalg.norm(a.embedding) - 1) < 1e-5
    assert encoder.settings()["recognizer"] == "torch" and with_dlib.settings()["recognizer"] == "dlib"
    with pytest.raises(ConfigError, match="recognizer"):
        DlibFaceEncoder(recognizer="onnx")


def test_a_batch_gives_each_chip_its_own_descriptor(net, astronaut):
    chip = astronaut[2]
    chips = torch.from_numpy(np.stack([chip, chip[:, ::-1].copy()])).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        batch = net(chips)
    np.testing.assert_allclose(batch[0].numpy(), torch_descriptor(net, chip), atol=1e-4)
    with pytest.raises(ValueError, match="150"):
        net(chips[:, :, :112, :112])


# ------------------------------------------------------------------------------------- differentiable chip


def test_chip_warp_matches_get_face_chip(encoder, net, astronaut):
    image, face, chip = astronaut
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float()
    ours = cut_face_chips(pixels, torch.from_numpy(face.landmarks)[None])[0].permute(1, 2, 0).numpy()
    assert ours.shape == chip.shape
    assert np.abs(ours - chip)[5:-5, 5:-5].mean() < 1.5  # grey levels; dlib rounds down
    reference = np.array(encoder._recognizer.compute_face_descriptor(chip))
    assert cosine(torch_descriptor(net, ours.round().clip(0, 255).astype(np.uint8)), reference) >= 0.999
    # a face twice the size: the same chip, up to the blur that stands in for dlib's pyramid
    large = np.ascontiguousarray(np.repeat(np.repeat(image, 3, axis=0), 3, axis=1))
    big_face = max(encoder.detect(large), key=lambda f: f.area)
    big = torch.from_numpy(large).permute(2, 0, 1)[None].float()
    big_chip = cut_face_chips(big, torch.from_numpy(big_face.landmarks)[None])[0].permute(1, 2, 0).numpy()
    assert cosine(torch_descriptor(net, big_chip.round().astype(np.uint8)), reference) >= 0.995


def test_identity_loss_gradients_reach_the_pixels(encoder, net, astronaut):
    image, face, chip = astronaut
    reference = torch.from_numpy(np.array(encoder._recognizer.compute_face_descriptor(chip))).float()
    other = np.ascontiguousarray(skimage_data.chelsea())  # a cat: far from the astronaut
    pixels = torch.from_numpy(other.copy()).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    landmarks = torch.from_numpy(face.landmarks)[None] * 0.5  # the astronaut's geometry, halved, on the cat
    loss = 1 - F.cosine_similarity(net(cut_face_chips(pixels, landmarks) * 255), reference[None]).squeeze()
    loss.backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert pixels.grad[0, :, :10, -10:].abs().sum() == 0  # outside the chip: no gradient


@pytest.mark.slow
def test_gradient_descent_on_a_noised_face_raises_similarity(encoder, net, astronaut):
    """Noise the astronaut's face heavily, then descend the loss w.r.t. the pixels for 200 small steps: the
    similarity climbs through the run (not in the first few steps), and dlib itself (not only the torch copy) sees
    the optimised uint8 image closer to the clean reference than the noised one."""
    image = np.ascontiguousarray(astronaut[0][:220, 120:340])
    face = max(encoder.detect(image), key=lambda f: f.area)
    reference = torch.from_numpy(encoder.embed([encoder.align(image, face)])[0])
    landmarks = torch.from_numpy(face.landmarks)[None]
    clean = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255
    noisy = (clean + 0.6 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    pixels = noisy.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([pixels], lr=0.001)
    similarities = []
    for _ in range(200):
        similarity = F.cosine_similarity(net(cut_face_chips(pixels.clamp(0, 1), landmarks) * 255), reference[None])
        optimiser.zero_grad()
        (1 - similarity.squeeze()).backward()
        optimiser.step()
        similarities.append(float(similarity.detach()))
    print("similarity every 20 steps", [round(s, 4) for s in similarities[::20]], round(similarities[-1], 4))
    assert similarities[0] < 0.9 and similarities[-1] > 0.99, similarities[::20]
    assert similarities[20] < similarities[100] < similarities[-1], similarities[::20]  # a climb, not one jump

    def dlib_similarity(tensor: torch.Tensor) -> float:
        pic = np.ascontiguousarray((tensor.detach()[0].clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy())
        return float(encoder.embed([encoder.align(pic, face)])[0] @ reference.numpy())

    assert dlib_similarity(pixels) > dlib_similarity(noisy) + 0.03


def test_dlib_encoder_embed_pixels_is_its_embed_with_gradients(encoder, astronaut):
    """The one encoder interface: the differentiable path gives the embedding ``encode`` gives."""
    image, face, _ = astronaut
    assert encoder.differentiable
    pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().div(255).requires_grad_(True)
    embedding = encoder.embed_pixels(pixels, torch.from_numpy(face.box)[None], torch.from_numpy(face.landmarks)[None])
    assert embedding.shape == (1, 128)
    assert cosine(embedding[0].detach().numpy(), encoder.encode(image).embedding) >= 0.999
    embedding.sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
