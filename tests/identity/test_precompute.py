"""dtback precompute: fills the face and body caches once; the second run makes no encoder call."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dtback import backends
from dtback.cli import main
from dtback.config import DataConfig, IdentityConfig
from dtback.data.layout import scan_dataset
from dtback.identity.precompute import IdentityPrecomputer
from helpers import REPO, make_dataset, save_tiny_dinov2


@pytest.fixture(scope="module")
def body_dir(tmp_path_factory):
    return save_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


@pytest.fixture
def mixed_root(people_dir, tmp_path):
    """3 LFW people (faces), one Market-1501 pedestrian (no detectable face) and one duplicate photo."""
    root = tmp_path / "data"
    for name in ("Tony_Blair", "Colin_Powell", "Hugo_Chavez"):
        shutil.copytree(people_dir / "krasserm_lfw" / name, root / "lfw" / name)
    shutil.copytree(people_dir / "reid_market" / "market_0007", root / "market" / "market_0007")
    first = sorted((root / "lfw" / "Tony_Blair").iterdir())[0]
    shutil.copy(first, root / "lfw" / "Colin_Powell" / "copy_of_blair.jpg")  # same content, other path
    return root


def test_precompute_fills_caches_then_is_a_no_op(mixed_root, body_dir, tmp_path):
    data = DataConfig(data_dir=mixed_root, min_images_per_char=3)
    index = scan_dataset(data, seed=0, progress=False)
    n_images = sum(len(c.images) for c in index.characters)
    assert n_images == 35
    identity = IdentityConfig(face_backend="dlib", body_model=str(body_dir), device="cpu")
    cache = tmp_path / "cache"

    encoders = backends.face_encoder(identity), backends.body_encoder(identity)
    first = IdentityPrecomputer(*encoders, cache, data.max_image_pixels).run(index, progress=False)
    assert first.images == 35
    assert first.face_encoder_calls == 34  # the copied photo hits the cache by content
    assert first.face_cache_hits == 1
    assert first.faces_found == 31
    assert sorted(first.no_face) == sorted(
        p.relative_to(mixed_root).as_posix() for p in (mixed_root / "market").glob("*/*")
    )
    assert first.body_encoder_calls == 34  # the body path runs for the faceless pedestrians too

    second = IdentityPrecomputer(*encoders, cache, data.max_image_pixels).run(index, progress=False)
    assert (second.face_encoder_calls, second.body_encoder_calls) == (0, 0)
    assert (second.face_cache_hits, second.body_cache_hits) == (35, 35)
    assert second.faces_found == 31 and sorted(second.no_face) == sorted(first.no_face)


def test_cached_entries_hold_embeddings_boxes_and_tokens(mixed_root, body_dir, tmp_path):
    from dtback.identity.cache import content_hash

    data = DataConfig(data_dir=mixed_root, min_images_per_char=3)
    index = scan_dataset(data, seed=0, progress=False)
    identity = IdentityConfig(face_backend="dlib", body_model=str(body_dir), device="cpu")
    runner = IdentityPrecomputer(backends.face_encoder(identity), backends.body_encoder(identity), tmp_path / "c", 10**8)
    runner.run(index, progress=False)
    face_cache, body_cache = runner.face_cache, runner.body_cache
    blair = sorted((mixed_root / "lfw" / "Tony_Blair").iterdir())[0]
    face = face_cache.get(content_hash(blair))
    assert int(face["num_faces"]) == 1 and face["embedding"].shape == (128,)
    assert abs(float(face["embedding"].norm()) - 1) < 1e-4 and face["box"].shape == (4,)
    pedestrian = next((mixed_root / "market" / "market_0007").iterdir())
    assert int(face_cache.get(content_hash(pedestrian))["num_faces"]) == 0
    body = body_cache.get(content_hash(blair))
    assert body["pooled"].shape == (32,) and body["tokens"].shape == (16, 32) and body["tokens"].dtype == torch.float16


def test_precompute_command(mixed_root, body_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["precompute", "--config", str(REPO / "train" / "config.yaml"), "--no-progress", "--set", f"data_dir={mixed_root}",
            "--set", f"output_dir={run_dir}", "--set", f"identity.body_model={body_dir}", "--set", "identity.device=cpu",
            "--set", "identity.face_backend=dlib"]
    assert main(args) == 0
    report = json.loads((run_dir / "precompute_report.json").read_text())
    assert report["images"] == 35 and report["faces_found"] == 31 and len(report["no_face"]) == 4
    assert (run_dir / "cache" / "face").is_dir() and (run_dir / "cache" / "body").is_dir()
    assert main(args) == 0
    again = json.loads((run_dir / "precompute_report.json").read_text())
    assert again["face_encoder_calls"] == 0 and again["body_encoder_calls"] == 0
    said = capsys.readouterr().err
    assert "encoder calls face 0 body 0" in said and "faces found 31 (turned 0, over-exposed 0), no face 4" in said


def test_missing_body_model_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "d", {"b": {"a": 3}}, size=(32, 32))
    args = ["precompute", "--no-progress", "--set", f"data_dir={root}", "--set", f"output_dir={tmp_path / 'run'}",
            "--set", f"identity.body_model={tmp_path / 'no_dinov2'}", "--set", "identity.face_backend=dlib"]
    assert main(args) == 2


def test_the_progress_bar_moves_per_image_with_a_one_at_a_time_encoder(tmp_path, monkeypatch):
    """dlib encodes one image at a time: the bar moves once per image, not once per batch of 64."""
    from dtback.identity import precompute

    updates = []

    class Bar:
        def __init__(self, total=None, **kwargs):
            self.total = total

        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(precompute, "tqdm", Bar)
    root = make_dataset(tmp_path / "data", {"b": {"c": 5}}, size=(32, 32))
    index = scan_dataset(DataConfig(data_dir=root, min_images_per_char=3), seed=0, progress=False)
    face = backends.face_encoder(IdentityConfig(face_backend="dlib", device="cpu"))
    IdentityPrecomputer(face, None, tmp_path / "cache", 10**8).run(index, progress=True)
    assert [n for n in updates if n] == [1] * 5


def test_an_image_removed_during_the_run_is_a_counted_skip(tmp_path, body_dir):
    """An image the scan kept but that is gone (or unreadable) when it is hashed is named and counted as
    unreadable, like one that no longer decodes; the other images are embedded and cached."""
    root = make_dataset(tmp_path / "data", {"b": {"c": 4}}, size=(32, 32))
    index = scan_dataset(DataConfig(data_dir=root, min_images_per_char=3), seed=0, progress=False)
    (root / "b" / "c" / "001.png").unlink()
    identity = IdentityConfig(face_backend="dlib", body_model=str(body_dir), device="cpu")
    runner = IdentityPrecomputer(backends.face_encoder(identity), backends.body_encoder(identity), tmp_path / "c", 10**8)
    report = runner.run(index, progress=False)
    assert report.images == 4
    assert report.unreadable == ["b/c/001.png"]
    assert (report.face_encoder_calls, report.body_encoder_calls) == (3, 3)
    assert len(runner.face_cache) == 3 and len(runner.body_cache) == 3


@pytest.fixture(scope="module")
def dlib_face():
    return backends.face_encoder(IdentityConfig(face_backend="dlib", device="cpu"))


def _hand_made_turned(root):
    """A hand-made folder of skimage's astronaut upright and stored turned 90, 180 and 270 degrees counter-clockwise
    without an orientation tag (``np.rot90`` 1, 2, 3 times): upright, dlib finds no face scoring 0.3 in the turned
    ones (tests/curate/test_faces.py)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = root / "hand" / "astronaut"
    folder.mkdir(parents=True)
    pixels = skimage.data.astronaut()
    for name, turns in (("up", 0), ("side", 1), ("down", 2), ("late", 3)):
        Image.fromarray(np.ascontiguousarray(np.rot90(pixels, turns))).save(folder / f"{name}.png")
    return pixels


def test_a_sideways_photo_of_a_hand_made_folder_is_found_turned_cached_in_its_own_pixels_and_named(
        tmp_path, dlib_face, monkeypatch, caplog):
    """``dtback precompute`` on a hand-made folder: a face found only turned is cached (not a silent no_face), its
    embedding that of the upright face, its box and landmarks in the file's own pixels (the aligned crop cut from the
    file as it is embeds like the upright face), and the photo is named with what to do, on the first run and on
    the second (cache hits). An upright face costs one detection: 4 images, 4 upright + 3 x 3 turned detections."""
    import numpy as np

    from dtback.identity.cache import content_hash
    from dtback.identity.face import Face

    pixels = _hand_made_turned(tmp_path / "data")
    index = scan_dataset(DataConfig(data_dir=tmp_path / "data", min_images_per_char=3), seed=0, progress=False)
    calls = []
    detect = dlib_face.detect
    monkeypatch.setattr(dlib_face, "detect", lambda image: calls.append(image.shape) or detect(image))
    runner = IdentityPrecomputer(dlib_face, None, tmp_path / "cache", 10**8)
    report = runner.run(index, progress=False)
    assert report.faces_found == 4 and report.no_face == []
    assert report.turned == {"hand/astronaut/side.png": 270, "hand/astronaut/down.png": 180,
                             "hand/astronaut/late.png": 90}
    assert len(calls) == 4 + 3 * 3
    assert ("sideways: hand/astronaut/side.png: face found turned 270 degrees; rotate the file or build with dtback "
            "dataset build") in report.notes()
    assert "sideways: hand/astronaut/late.png" in caplog.text
    assert report.to_json()["turned"]["hand/astronaut/down.png"] == 180

    folder = tmp_path / "data" / "hand" / "astronaut"
    upright = runner.face_cache.get(content_hash(folder / "up.png"))
    side = runner.face_cache.get(content_hash(folder / "side.png"))
    assert int(upright["rotation"]) == 0 and int(side["rotation"]) == 270 and not bool(side["relit"])
    assert float(side["embedding"] @ upright["embedding"]) > 0.98
    x1, y1, x2, y2 = upright["box"].tolist()  # np.rot90 once: (x, y) -> (y, 512 - x)
    np.testing.assert_allclose(side["box"].numpy(), [y1, 512 - x2, y2, 512 - x1], atol=6)
    turned_file = np.ascontiguousarray(np.rot90(pixels, 1))
    chip = dlib_face.align(turned_file, Face(box=side["box"].numpy(), landmarks=side["landmarks"].numpy(), score=1.0))
    assert float(dlib_face.embed([chip])[0] @ upright["embedding"].numpy()) > 0.98

    again = IdentityPrecomputer(dlib_face, None, tmp_path / "cache", 10**8).run(index, progress=False)
    assert again.face_encoder_calls == 0 and again.turned == report.turned


def test_the_world_path_makes_no_second_look(tmp_path, monkeypatch):
    """World faces are drawn upright and score at least the detector's threshold (0.4): precompute on a small world
    never calls the second look, so the world path costs what it did."""
    from dtback.config import WorldConfig
    from dtback.identity import precompute
    from dtback.world.files import write_world

    write_world(tmp_path / "world", WorldConfig(characters=3, images_per_character=3, size=128, seed=0),
                progress=False)
    looks = []
    monkeypatch.setattr(precompute, "second_look", lambda *args: looks.append(args))
    index = scan_dataset(DataConfig(data_dir=tmp_path / "world", min_images_per_char=3), seed=0, progress=False)
    face = backends.face_encoder(IdentityConfig(face_backend="world", device="cpu"))
    report = IdentityPrecomputer(face, None, tmp_path / "cache", 10**8).run(index, progress=False)
    assert report.images == 9 and report.faces_found == 9 and looks == [] and report.turned == {}


def test_an_over_exposed_photo_is_found_on_a_darkened_copy_and_named(people_dir, tmp_path, dlib_face):
    """Penny (TV still) at 2x brightness, clipped: no face upright, also at 2x; found on the darkened copy, embedded
    from the photo itself (cosine 0.92 to the original's, measured) and named as over-exposed."""
    from PIL import ImageEnhance

    from dtback.data.images import load_rgb
    from dtback.identity.cache import content_hash

    folder = tmp_path / "data" / "hand" / "penny"
    folder.mkdir(parents=True)
    photo = load_rgb(sorted((people_dir / "faceapi_bbt" / "penny").iterdir())[0], 10**8)
    photo.save(folder / "a.png")
    ImageEnhance.Brightness(photo).enhance(2.0).save(folder / "burnt.png")
    index = scan_dataset(DataConfig(data_dir=tmp_path / "data", min_images_per_char=2), seed=0, progress=False)
    runner = IdentityPrecomputer(dlib_face, None, tmp_path / "cache", 10**8)
    report = runner.run(index, progress=False)
    assert report.faces_found == 2 and report.overexposed == ["hand/penny/burnt.png"] and report.turned == {}
    assert ("over-exposed: hand/penny/burnt.png: face found only on a darkened copy; a better-exposed photo trains "
            "better") in report.notes()
    burnt, original = (runner.face_cache.get(content_hash(folder / name)) for name in ("burnt.png", "a.png"))
    assert bool(burnt["relit"]) and int(burnt["rotation"]) == 0
    assert float(burnt["embedding"] @ original["embedding"]) > 0.9
