"""Clustering rules on hand-made embeddings: complete linkage bounds every pair, existing groups only grow,
near-duplicates need both the same face and nearly the same picture, purity / completeness."""

from __future__ import annotations

import numpy as np
import pytest

from dtback.curate.cluster import (
    assign_to_existing,
    cluster,
    distances,
    near_duplicates,
    purity_completeness,
)


def unit(*rows) -> np.ndarray:
    array = np.array(rows, dtype=np.float64)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def chain(count: int, step_degrees: float) -> np.ndarray:
    """Unit vectors on a circle, ``step_degrees`` apart: neighbours close, the ends far."""
    angles = np.radians(np.arange(count) * step_degrees)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def test_distances_match_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 7)), rng.normal(size=(3, 7))
    expected = np.linalg.norm(a[:, None] - b[None], axis=-1)
    np.testing.assert_allclose(distances(a, b), expected, atol=1e-9)


def test_complete_linkage_bounds_every_pair_where_single_would_chain():
    points = chain(10, 10.0)  # neighbours 0.174 apart, ends 1.53 apart
    labels = cluster(points, threshold=0.5, linkage="complete")
    for label in np.unique(labels):
        members = points[labels == label]
        assert distances(members, members).max() < 0.5
    assert len(np.unique(labels)) >= 3
    assert len(np.unique(cluster(points, threshold=0.5, linkage="average"))) >= 2


def test_cluster_labels_are_deterministic_and_ordered_by_size():
    points = np.concatenate([unit([1, 0, 0])] * 2 + [unit([0, 1, 0])] * 3 + [unit([0, 0, 1])])
    labels = cluster(points, threshold=0.5)
    assert labels.tolist() == [1, 1, 0, 0, 0, 2]  # biggest group first, then by first member
    assert cluster(points[:1], 0.5).tolist() == [0] and cluster(points[:0], 0.5).tolist() == []


def test_new_faces_join_existing_groups_one_at_a_time():
    groups = [unit([1, 0], [0.98, 0.2]), unit([0, 1])]
    faces = unit([0.99, -0.1], [0.1, 1], [-1, 0], [0.93, -0.37])
    result = assign_to_existing(faces, groups, threshold=0.5)
    # The last face is within 0.5 of the group's first two members but not of the first face that joined it.
    assert result.tolist() == [0, 1, -1, -1]
    assert distances(faces[3:], faces[:1])[0, 0] < 0.5 < distances(faces[3:], groups[0][1:])[0, 0]
    assert assign_to_existing(faces, [], 0.5).tolist() == [-1] * 4
    assert assign_to_existing(faces, [np.zeros((0, 2))], 0.5).tolist() == [-1] * 4


def test_near_duplicates_need_the_same_face_and_nearly_the_same_picture():
    face = unit([1, 0, 0], [1, 0.05, 0], [1, 0.05, 0], [0, 1, 0])
    hashes = np.zeros((4, 64), dtype=bool)
    hashes[2, :20] = True  # item 2: same face as 1, different picture
    hashes[3] = False  # item 3: same picture, another face
    result = near_duplicates(face, hashes, face_distance=0.16, hash_bits=12)
    assert result.tolist() == [-1, 0, -1, -1]
    # Items already in the dataset are never dropped, even when they duplicate each other.
    assert near_duplicates(face, hashes, 0.16, 12, fixed=2).tolist() == [-1, -1, -1, -1]


@pytest.mark.parametrize(
    ("truth", "predicted", "expected"),
    [
        (["a", "a", "b", "b"], [0, 0, 1, 1], (1.0, 1.0)),
        (["a", "a", "b", "b"], [0, 0, 0, 0], (0.5, 1.0)),  # one group: impure, complete
        (["a", "a", "b", "b"], [0, 1, 2, 3], (1.0, 0.5)),  # singletons: pure, incomplete
        (["a", "a", "a", "b"], [0, 0, 1, 1], (0.75, 0.75)),
    ],
)
def test_purity_and_completeness(truth, predicted, expected):
    assert purity_completeness(np.array(truth), np.array(predicted)) == pytest.approx(expected)
