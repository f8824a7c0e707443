"""(references, target) pairs: same character, never the target itself, 1..K references, deterministic."""

from __future__ import annotations

import random

import pytest
import torch

from dtback.config import DataConfig
from dtback.data.layout import scan_dataset
from dtback.data.pairs import caption_for, draw_references, to_tensor
from dtback.errors import DatasetError
from helpers import make_dataset


@pytest.fixture
def dataset_root(tmp_path):
    root = make_dataset(tmp_path / "d", {"film": {"alice": 4, "bob": 2}}, size=(48, 48))
    make_dataset(root, {"film": {"tall": 3}}, size=(32, 64))  # portrait images: another bucket
    (root / "film" / "alice" / "001.txt").write_text("alice on a beach")
    return root


def test_draw_references_excludes_target_and_respects_k():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 8)
        target = rng.randrange(n)
        refs = draw_references(n, target, 1, 3, rng)
        assert target not in refs and len(set(refs)) == len(refs)
        assert 1 <= len(refs) <= min(3, n - 1)
        assert all(0 <= r < n for r in refs)
    assert sorted(draw_references(4, 0, 5, 9, rng)) == [1, 2, 3]  # K capped by the other images
    with pytest.raises(DatasetError):
        draw_references(1, 0, 1, 3, rng)


def test_captions_from_sidecar_else_template(dataset_root):
    data = DataConfig(data_dir=dataset_root, min_images_per_char=2)
    index = scan_dataset(data, seed=0, progress=False)
    template = "a photo of {character} from {bundle}"
    captions = {f"{c.key}/{e.path.name}": caption_for(e, c, template) for c in index.characters for e in c.images}
    assert captions["film/alice/001.png"] == "alice on a beach"
    assert captions["film/alice/000.png"] == "a photo of alice from film"
    assert captions["film/bob/000.png"] == "a photo of bob from film"


def test_to_tensor_is_the_vae_range():
    from PIL import Image

    pixels = to_tensor(Image.new("RGB", (3, 2), (255, 0, 128)))
    assert pixels.shape == (3, 2, 3)
    assert torch.allclose(pixels[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 127.5 - 1]), atol=1e-6)
