"""Scores shared by validation and `dtback evaluate`: face/body similarity, attribute accuracy, copy-paste."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dtback.evaluation.metrics import copy_paste_score, face_similarity, unit_mean


class ColourFaces:
    """A fake face encoder: a face wherever the top-left pixel is not black; embedding = that pixel's unit colour."""

    def encode(self, image: np.ndarray):
        colour = image[0, 0].astype(np.float32)
        if not colour.any():
            return None
        face = SimpleNamespace(box=np.array([0.0, 0.0, 4.0, 4.0]))
        return SimpleNamespace(embedding=colour / np.linalg.norm(colour), face=face)


def test_face_similarity_scores_zero_without_a_face_and_none_without_a_reference():
    red, black = Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 0))
    reference = torch.tensor([1.0, 0.0, 0.0])
    scores = face_similarity(ColourFaces(), [red, black, red], [reference, reference, None])
    assert scores.sims == [pytest.approx(1.0), 0.0, None]
    assert scores.detected == [True, False, True]
    assert scores.boxes[1] is None and scores.boxes[0].tolist() == [0, 0, 4, 4]


def test_unit_mean_is_normalised():
    mean = unit_mean(torch.tensor([[3.0, 0.0], [0.0, 3.0]]))
    assert torch.allclose(mean, torch.tensor([0.5 ** 0.5, 0.5 ** 0.5]))


def test_copy_paste_score_is_one_for_a_copy_and_low_for_another_picture():
    rng = np.random.default_rng(0)
    reference = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    assert copy_paste_score(reference, reference) == pytest.approx(1.0)
    assert copy_paste_score(reference.resize((96, 128)), reference) > 0.9  # size does not matter
    negative = Image.fromarray(255 - np.asarray(reference))
    assert copy_paste_score(negative, reference) == pytest.approx(-1.0, abs=1e-3)  # up to uint8 rounding
    other = Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8))
    assert abs(copy_paste_score(other, reference)) < 0.2
    assert copy_paste_score(Image.new("RGB", (8, 8), (9, 9, 9)), reference) == 0.0  # flat: no correlation
