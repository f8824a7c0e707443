"""Batched world encoders (used by the identity precompute) give what the one-image path gives."""

from __future__ import annotations

import numpy as np
import torch

from dtback.world.people import render_image, sample_characters
from dtback.world.encoders import load_world_body_encoder, load_world_face_encoder


def test_batched_face_and_body_encoding_match_one_by_one():
    characters = sample_characters(3, seed=11)
    images = [render_image(c, i, 128, seed=11).image for c in characters for i in range(2)]
    face = load_world_face_encoder()
    body = load_world_body_encoder()
    batched = face.encode_batch([np.asarray(image) for image in images])
    single = [face.encode(np.asarray(image)) for image in images]
    assert sum(r is not None for r in single) >= 4
    for a, b in zip(batched, single):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a.face.box, b.face.box, atol=1e-4)
            np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-4)
            assert a.num_faces == b.num_faces
    boxes = [r.face.box if r is not None else None for r in single]
    features = body.encode_batch(images, boxes)
    for i, (image, box) in enumerate(zip(images, boxes)):
        one = body.encode(image, box)
        torch.testing.assert_close(features.pooled[i], one.pooled[0], atol=1e-4, rtol=1e-4)
