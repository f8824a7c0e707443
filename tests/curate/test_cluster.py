"""Clustering rules on hand-made embeddings: complete linkage bounds every pair, existing groups only grow,
near-duplicates need both the same face and nearly the same picture, purity / completeness."""

from __future__ import annotations

import numpy as np
import pytest

from dtback.curate.cluster import (
    cluster,
    distances,
    group_faces,
    near_duplicates,
    patch_correlation,
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


def at_angle(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at ``degrees``: two at angle a are 2 sin(a/2) apart (10 deg: 0.174, 30: 0.518)."""
    return chain(1, 0)[0:0] if not degrees else np.stack(
        [np.cos(np.radians(degrees)), np.sin(np.radians(degrees))], axis=1
    )


def test_new_faces_join_existing_groups_against_the_same_members():
    groups = [at_angle(0, 5), at_angle(90)]
    # 3 deg: joins group 0; 95 deg: joins group 1; 180 deg: far from both; 27 deg is 0.467 from the first face of
    # group 0 and 0.381 from the second: complete linkage 0.467, inside the margin above 0.44: ambiguous.
    faces = at_angle(3, 95, 180, 27)
    result = group_faces(groups, faces, threshold=0.44, margin=0.04, min_size=3)
    assert result.target.tolist() == [0, 1, -1, -1] and result.new_groups == 0
    assert result.reason == ["", "", "unclustered", "ambiguous"] and "character 1 at 0.467" in result.detail[3]
    # Decided against the groups as they were: the order of the new faces changes nothing.
    reverse = group_faces(groups, faces[::-1], 0.44, 0.04, 3)
    assert reverse.target.tolist() == result.target.tolist()[::-1] and reverse.reason == result.reason[::-1]


def test_a_face_close_to_two_characters_is_ambiguous():
    groups = [at_angle(0), at_angle(20)]  # 0.347 apart
    faces = at_angle(10, 1)  # 0.174 from both; 0.017 and 0.330 from them: clearly the first
    result = group_faces(groups, faces, threshold=0.44, margin=0.04, min_size=3)
    assert result.target.tolist() == [-1, 0] and result.reason[0] == "ambiguous"
    assert "close to two characters" in result.detail[0]


def test_new_groups_form_by_the_rule_and_a_near_merge_is_ambiguous():
    # Two tight groups whose farthest members are 27 deg (0.467) apart: they would merge at a threshold of 0.47,
    # inside the margin (and no face of the smaller is within 0.44 of all the larger's); and one far away.
    faces = at_angle(0, 0.5, 1, 25, 26, 26.5, 27, 120, 122, 124)
    result = group_faces([], faces, threshold=0.44, margin=0.04, min_size=3)
    assert result.new_groups == 2
    assert result.target.tolist() == [-1, -1, -1, 0, 0, 0, 0, 1, 1, 1]
    left = [reason for reason in result.reason if reason]
    assert left == ["ambiguous"] * 3  # the smaller of the two close groups
    # Without a margin both groups are kept as they are.
    plain = group_faces([], faces, threshold=0.44, margin=0.0, min_size=3)
    assert plain.new_groups == 3 and (plain.target >= 0).all()


def test_grouping_is_a_fixed_point_and_ignores_the_order():
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(6, 16))
    faces = np.concatenate([c + rng.normal(scale=0.09, size=(5, 16)) for c in centres])
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    first = group_faces([], faces, threshold=0.44, margin=0.04, min_size=3)
    assert first.new_groups >= 3
    # Rerun: the placed faces are now the groups, the left-out ones are tried again: nothing moves.
    groups = [faces[first.target == k] for k in range(first.new_groups)]
    left = np.flatnonzero(first.target < 0)
    again = group_faces(groups, faces[left], 0.44, 0.04, 3)
    assert (again.target < 0).all() and again.reason == [first.reason[i] for i in left]
    # Shuffled input: the same partition.
    order = rng.permutation(len(faces))
    shuffled = group_faces([], faces[order], 0.44, 0.04, 3)
    partition = lambda target, idx: sorted(sorted(idx[target == k].tolist()) for k in range(target.max() + 1))
    assert partition(shuffled.target, order) == partition(first.target, np.arange(len(faces)))


def test_near_duplicates_need_the_same_face_and_the_same_picture():
    face = unit([1, 0, 0], [1, 0.05, 0], [1, 0.05, 0], [0, 1, 0])
    rng = np.random.default_rng(0)
    patch = rng.integers(0, 255, size=(14, 16))
    patches = np.stack([patch, patch + 3, rng.integers(0, 255, size=(14, 16)), patch])  # 1: brighter copy of 0
    # item 1: same face and picture as 0 -> duplicate; 2: same face, another picture; 3: same picture, another face.
    result = near_duplicates(face, patches, face_distance=0.2, min_correlation=0.95)
    assert result.tolist() == [-1, 0, -1, -1]
    # Items already in the dataset are never dropped, even when they duplicate each other.
    assert near_duplicates(face, patches, 0.2, 0.95, fixed=2).tolist() == [-1, -1, -1, -1]
    assert patch_correlation(patches[:1], patches[1:2])[0, 0] == pytest.approx(1.0)


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
