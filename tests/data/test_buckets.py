"""Aspect-ratio buckets: sides multiple of 16, ~input_size^2 pixels, one bucket per batch, resumable order."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from dtback.data.buckets import BucketBatchSampler, assign_bucket, letterbox, make_buckets, resize_to_bucket


@pytest.mark.parametrize("size", [128, 256, 512, 1024])
def test_buckets_are_multiples_of_16_with_about_the_same_area(size):
    buckets = make_buckets(size, max_aspect_ratio=2.0)
    assert (size, size) in buckets
    # Nine photo shapes within 2:1; at small sizes rounding to 16 px merges neighbours (9:16 and 1:2 at 128 px).
    assert len(buckets) == 9 if size >= 256 else 5 <= len(buckets) < 9
    assert len(set(buckets)) == len(buckets)
    for width, height in buckets:
        assert width % 16 == 0 and height % 16 == 0
        assert abs(width * height / size**2 - 1) < 0.15
        assert 0.45 < width / height < 2.2
    ratios = [w / h for w, h in buckets]
    assert ratios == sorted(ratios)


def test_max_aspect_ratio_and_disabled_buckets():
    assert all(1 / 1.5 - 1e-6 <= w / h <= 1.5 + 1e-6 for w, h in make_buckets(512, 1.5))
    assert make_buckets(512, 2.0, enabled=False) == [(512, 512)]


def test_assign_bucket_picks_the_closest_aspect():
    buckets = make_buckets(512, 2.0)
    assert buckets[assign_bucket(250, 250, buckets)] == (512, 512)
    portrait = buckets[assign_bucket(64, 128, buckets)]
    assert portrait[0] < portrait[1] and math.isclose(portrait[0] / portrait[1], 0.5, rel_tol=0.05)
    landscape = buckets[assign_bucket(1920, 1080, buckets)]
    assert math.isclose(landscape[0] / landscape[1], 16 / 9, rel_tol=0.05)


def test_resize_to_bucket_covers_and_centre_crops():
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (100, 0, 200, 100))  # red centre third
    out = resize_to_bucket(image, (64, 64))
    assert out.size == (64, 64)
    assert out.getpixel((32, 32))[0] > 200  # the centre is kept


def test_letterbox_keeps_everything():
    out = letterbox(Image.new("RGB", (100, 50), (255, 255, 255)), 64)
    assert out.size == (64, 64)
    assert out.getpixel((32, 32)) == (255, 255, 255)
    assert out.getpixel((32, 2)) == (0, 0, 0)  # padding above the wide image


def test_batches_stay_in_one_bucket_and_cover_every_index():
    bucket_of = [i % 3 for i in range(50)]
    sampler = BucketBatchSampler(bucket_of, batch_size=4, seed=0)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(50))
    for batch in batches:
        assert len({bucket_of[i] for i in batch}) == 1 and 1 <= len(batch) <= 4
    assert len(sampler) == len(batches)
    dropped = list(BucketBatchSampler(bucket_of, batch_size=4, seed=0, drop_last=True))
    assert all(len(b) == 4 for b in dropped)


def test_order_depends_on_seed_and_epoch_and_resumes_exactly():
    bucket_of = [i % 2 for i in range(40)]
    sampler = BucketBatchSampler(bucket_of, batch_size=3, seed=5)
    epoch0 = list(sampler)
    assert list(BucketBatchSampler(bucket_of, batch_size=3, seed=5)) == epoch0
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0
    resumed = BucketBatchSampler(bucket_of, batch_size=3, seed=5)
    resumed.set_position(epoch=1, batch=4)
    assert list(resumed) == epoch1[4:]
    assert len(resumed) == len(epoch1) - 4
