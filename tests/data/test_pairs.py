"""(references, target) pairs: same character, never the target itself, 1..K references, deterministic."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils.data import DataLoader

from dtback.config import DataConfig
from dtback.data.buckets import BucketBatchSampler
from dtback.data.layout import scan_dataset
from dtback.data.pairs import IdentityPairDataset, collate_pairs, draw_references
from dtback.errors import DatasetError
from helpers import make_dataset


@pytest.fixture
def dataset_root(tmp_path):
    root = make_dataset(tmp_path / "d", {"film": {"alice": 4, "bob": 2}}, size=(48, 48))
    make_dataset(root, {"film": {"tall": 3}}, size=(32, 64))  # portrait images: another bucket
    (root / "film" / "alice" / "001.txt").write_text("alice on a beach")
    return root


def make(root, **kw) -> IdentityPairDataset:
    data = DataConfig(data_dir=root, input_size=64, reference_size=32, min_images_per_char=2, **kw)
    index = scan_dataset(data, seed=0, progress=False)
    return IdentityPairDataset(index.characters, data, seed=0)


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


def test_pairs_come_from_one_character_and_never_include_the_target(dataset_root):
    ds = make(dataset_root, min_references=1, max_references=3)
    assert len(ds) == 4 + 2 + 3
    counts = set()
    for epoch in range(5):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            spec = ds.pair(i)
            char = spec.character.split("/")[1]
            assert spec.target not in spec.references
            assert all(ref.path.parent.name == char for ref in spec.references)
            assert spec.target.path.parent.name == char
            counts.add(len(spec.references))
    assert counts == {1, 2, 3}


def test_pairs_are_deterministic_per_seed_and_epoch(dataset_root):
    a, b = make(dataset_root), make(dataset_root)
    assert [a.pair(i) for i in range(len(a))] == [b.pair(i) for i in range(len(b))]
    b.set_epoch(1)
    assert [a.pair(i) for i in range(len(a))] != [b.pair(i) for i in range(len(b))]


def test_captions_from_sidecar_else_template(dataset_root):
    ds = make(dataset_root, caption_template="a photo of {character} from {bundle}")
    captions = {ds.pair(i).target.path.name + ds.pair(i).character: ds.pair(i).caption for i in range(len(ds))}
    assert captions["001.pngfilm/alice"] == "alice on a beach"
    assert captions["000.pngfilm/alice"] == "a photo of alice from film"
    assert captions["000.pngfilm/bob"] == "a photo of bob from film"


def test_items_are_tensors_at_bucket_size(dataset_root):
    ds = make(dataset_root)
    item = ds[0]
    assert item["target"].shape == (3, 64, 64)
    assert item["target"].min() >= -1 and item["target"].max() <= 1
    assert item["references"].shape[1:] == (3, 32, 32)
    assert item["references"].shape[0] == len(item["reference_paths"])
    tall = [i for i in range(len(ds)) if ds.pair(i).character == "film/tall"][0]
    h, w = ds[tall]["target"].shape[1:]
    assert h > w and h % 16 == 0 and w % 16 == 0


def test_loader_with_bucket_sampler_and_collate(dataset_root):
    ds = make(dataset_root, max_references=3)
    sampler = BucketBatchSampler(ds.bucket_of, batch_size=2, seed=0)
    batches = list(DataLoader(ds, batch_sampler=sampler, collate_fn=collate_pairs))
    assert sum(len(b["caption"]) for b in batches) == len(ds)
    for batch in batches:
        b, k = batch["reference_mask"].shape
        assert batch["target"].shape[0] == b and batch["references"].shape[:2] == (b, k)
        counts = batch["reference_mask"].sum(dim=1).tolist()
        assert counts == [len(p) for p in batch["reference_paths"]]
        # padding slots are zeros, real slots are images
        for row, n in enumerate(counts):
            assert torch.all(batch["references"][row, n:] == 0)


def test_collate_refuses_mixed_sizes(dataset_root):
    ds = make(dataset_root)
    square = ds[0]
    tall = ds[[i for i in range(len(ds)) if ds.pair(i).character == "film/tall"][0]]
    with pytest.raises(ValueError, match="BucketBatchSampler"):
        collate_pairs([square, tall])


def test_image_broken_after_scan_is_a_counted_skip(dataset_root):
    ds = make(dataset_root, min_references=1, max_references=1)
    spec = ds.pair(0)
    spec.target.path.write_bytes(b"")  # the file was emptied after the scan
    item = ds[0]
    assert item["target_path"] != str(spec.target.path)
    assert item["target"].shape == (3, 64, 64)
    assert ds.runtime_skips["zero_byte"] >= 1


def test_character_with_one_image_is_refused(tmp_path):
    root = make_dataset(tmp_path / "d", {"b": {"a": 2}})
    data = DataConfig(data_dir=root, min_images_per_char=2)
    chars = scan_dataset(data, seed=0, progress=False).characters
    chars[0].images.pop()
    with pytest.raises(DatasetError, match="b/a has 1 image"):
        IdentityPairDataset(chars, data, seed=0)
