"""Group face embeddings into identities, drop near-duplicates, and score a grouping against the truth.

**Clustering rule.** Agglomerative clustering (scikit-learn) with *complete* linkage and a distance threshold on
the unit-norm face embeddings: two groups merge only while every pair of faces across them is closer than the
threshold, so no character ever holds two faces farther apart than that.

Measured on 140 real photos of 18 people (LFW + TV stills, dlib descriptors; purity / completeness): complete
linkage is 1.0 / 1.0 at thresholds 0.48-0.50 and >= 0.91 over 0.40-0.54; average linkage is >= 0.93 only over
0.40-0.48; single linkage chains everyone together; DBSCAN (min_samples 2) is 1.0 / 0.99 at eps 0.35 but
0.86 / 1.0 at 0.40 and merges everyone at 0.45; HDBSCAN is 1.0 / 1.0 at min_cluster_size 3 but leaves faces as
noise at other sizes and its clusters have no distance bound. Complete linkage has the widest safe range and a
rule a person can check, so it is the default.

**Purity first, with a margin.** A character that mixes two people teaches the adapter an average face; a person
split in two, or a photo left out, costs only data. So faces join (and groups merge) only below
``cluster_threshold``, and a decision close to it is not taken at all: a face is left out as ``ambiguous`` when its
linkage distance to the closest character is within ``[threshold, threshold + margin)``, or when a second character
is within ``threshold + margin`` and less than ``margin`` farther than the first; a new group is ``ambiguous`` when
it lies within ``threshold + margin`` (complete linkage) of an existing character or of a larger new group, i.e.
when a slightly larger threshold would have merged them. The user merges such photos by hand if they are right
(``corrections.yaml``, :mod:`dtback.curate.corrections`).

Defaults (:data:`DEFAULT_THRESHOLDS`) for dlib: threshold 0.44, margin 0.04 (ambiguous zone 0.44-0.48), from:

- dlib's published behaviour: its ResNet descriptor is documented at 0.6 euclidean on the raw descriptors for
  "same person", with 99.38 % on the LFW pair benchmark; pairs near 0.6 are its errors. The builder compares
  unit-norm descriptors, on which that rule sits lower: raw descriptors of 15 LFW faces measure 1.29-1.45 in norm
  (mean 1.39), so 0.6 raw is ~0.43 unit.
- 85 photos of 19 people nobody here had seen (issue 15): every same-person pair under 0.39, 8.8 % of
  different-person pairs under 0.5, and two wrong complete-linkage merges at 0.488 and 0.496 under the old 0.5
  default. 0.44 keeps all their same-person pairs and puts both wrong merges outside the join range.
- the 140 shared photos of 18 people (LFW + TV stills): same-person pairs up to 0.465 (99th percentile 0.44),
  different-person pairs from 0.389 (0.2 % under 0.42, 1.4 % under 0.45, 11.8 % under 0.5). With the defaults:
  purity 1.000, completeness 0.971 (134-136 of 140 placed); over 30 random 70 % subsets shuffled, purity >= 0.990,
  completeness >= 0.936 (mean 0.963). 0.5 without a margin is 1.0 / 1.0 here, but only because these 18 people
  are well apart; it was the setting that merged strangers on unseen photos.
- synthetic cases in ``tests/curate/test_cluster.py`` pin the rule itself.

InsightFace ArcFace: 1.15 (cosine 0.34), margin 0.05; not measured here (no ArcFace weights on this machine).

**Order and reruns.** New faces (sorted by content key by the builder) are first compared with the characters as
they stand, all against the same members, so their order does not matter; then the rest are clustered; new groups
become characters and the loop repeats until nothing more joins or forms. The result is a fixed point: a rerun
with the same faces places nothing new and leaves out the same faces for the same reasons.

**Near-duplicates** are the same face in the same picture, however cropped, letterboxed or resized: face
distance below ``duplicate_face_distance`` (dlib 0.2) and the eyes-to-mouth centre of the aligned face crop
(14 x 16 grey) correlating at least ``duplicate_face_correlation`` (0.95). The whole image is not compared: a crop,
a letterbox and a 720p resize of one photo differed by 23-34 of 64 bits of a whole-image hash (issue 15). Measured
on the astronaut and 14 shared photos, each cropped (12 % / 8 % off the sides), letterboxed (to 1.5 x the width) and
resized (0.6 x): face distance <= 0.127 and patch correlation >= 0.967 for every variant; among the 140 distinct
shared photos no two patches correlate above 0.916 (249 same-person pairs are closer than 0.3 in face distance).
Of near-duplicates the larger face is kept. ``tests/curate/test_build.py`` builds such variants.

**Small faces** (``min_join_face_size`` to ``min_face_size`` px, the faces of full-body photos) never start or shape
a character (they are not members when others are compared) but join one after the others are placed, when closer
than ``threshold - margin`` (0.40) and ``margin`` nearer than to any other character (:func:`join_only`). Measured
on 47 shared photos shrunk to a 26 px face (median) on a full-body canvas and found at 2x: 57 % are within 0.40 of
their own person's other photos (complete linkage), none within 0.40 of another person (closest 0.449); at 37 px,
79 % and none (closest 0.435).

**Existing characters** are never split, merged or renamed by the builder (only by the user's corrections).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering

# Per face backend: (cluster threshold, cluster margin, near-duplicate face distance) on unit-norm embeddings.
DEFAULT_THRESHOLDS = {"dlib": (0.44, 0.04, 0.2), "insightface": (1.15, 0.05, 0.4)}


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``a`` (N, D) and ``b`` (M, D): (N, M) float64."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.maximum(squared, 0.0))


def patch_correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation between each of (N, ...) face patches ``a`` and each of (M, ...) ``b``: (N, M)."""

    def standard(patches: np.ndarray) -> np.ndarray:
        flat = np.asarray(patches, dtype=np.float64).reshape(len(patches), -1)
        flat = flat - flat.mean(1, keepdims=True)
        return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-9)

    return standard(a) @ standard(b).T


def near_duplicates(
    embeddings: np.ndarray, patches: np.ndarray, face_distance: float, min_correlation: float, fixed: int = 0
) -> np.ndarray:
    """For each item, the index of an earlier kept item it nearly duplicates, or -1 when it is kept.

    ``embeddings`` (N, D) unit norm, ``patches`` (N, h, w) grey face centres (:func:`dtback.curate.faces.face_patch`).
    Item ``i`` duplicates a kept item ``j < i`` when their faces are closer than ``face_distance`` AND their face
    patches correlate at least ``min_correlation``: the same face in the same picture, however it was cropped,
    letterboxed or resized. The closest such face is named. The first ``fixed`` items (already in the dataset) are
    always kept. Returns (N,) int64.
    """
    count = len(embeddings)
    result = np.full(count, -1, dtype=np.int64)
    kept: list[int] = list(range(min(fixed, count)))
    for i in range(len(kept), count):
        if kept:
            index = np.asarray(kept)
            face = distances(embeddings[i : i + 1], embeddings[index])[0]
            close = face < face_distance
            same_picture = patch_correlation(patches[i : i + 1], patches[index])[0] >= min_correlation
            match = np.flatnonzero(close & same_picture)
            if match.size:  # the closest face, so the answer does not depend on the order of the kept items
                result[i] = index[match[np.argmin(face[match])]]
                continue
        kept.append(i)
    return result


def cluster(embeddings: np.ndarray, threshold: float, linkage: str = "complete") -> np.ndarray:
    """Agglomerative clustering of (N, D) embeddings; (N, ) int64 labels numbered by falling cluster size, ties by
    first member, so the same input always gives the same labels. Needs the N x N distance matrix: 8 N² bytes
    (10,000 new faces in one run: 0.8 GB)."""
    count = len(embeddings)
    if count < 2:
        return np.zeros(count, dtype=np.int64)
    raw = AgglomerativeClustering(
        n_clusters=None, distance_threshold=threshold, linkage=linkage, metric="euclidean"
    ).fit_predict(np.asarray(embeddings, dtype=np.float64))
    groups = sorted(np.unique(raw), key=lambda g: (-int((raw == g).sum()), int(np.flatnonzero(raw == g)[0])))
    relabel = {int(g): new for new, g in enumerate(groups)}
    return np.array([relabel[int(g)] for g in raw], dtype=np.int64)


def linkage_distances(embeddings: np.ndarray, groups: list[np.ndarray], linkage: str = "complete") -> np.ndarray:
    """Distance from each of (N, D) ``embeddings`` to each group (each (M_k, D)): the largest (complete) or the mean
    (average) distance to the group's members. Returns (N, K) float64; inf for an empty group."""
    result = np.full((len(embeddings), len(groups)), np.inf)
    for k, group in enumerate(groups):
        if len(group) and len(embeddings):
            row = distances(embeddings, group)
            result[:, k] = row.max(1) if linkage == "complete" else row.mean(1)
    return result


@dataclass
class Grouping:
    """What :func:`group_faces` decided for N new faces: ``target`` (N,) int64, the group each joins (existing
    groups first, then the new ones in creation order) or -1; ``reason`` and ``detail`` for each face left out
    (``ambiguous`` or ``unclustered``, "" for placed faces); ``new_groups`` how many groups were created."""

    target: np.ndarray
    reason: list[str]
    detail: list[str]
    new_groups: int


def group_faces(
    fixed: list[np.ndarray],
    embeddings: np.ndarray,
    threshold: float,
    margin: float,
    min_size: int,
    linkage: str = "complete",
    names: list[str] | None = None,
) -> Grouping:
    """Place (N, D) new ``embeddings`` into the ``fixed`` groups (existing characters, each (M_k, D), never split)
    or into new groups, purity first; rules in the module docstring. ``names`` label the groups in details: the
    existing ones, then (optionally) the names the new ones will get, in creation order (else ``new group <n>``).

    The result depends on the set of faces, not on their order when the caller sorts them by a content key; and it
    is a fixed point: calling again with the placed faces moved into their groups and only the faces left out as
    ``embeddings`` places nothing and gives the same reasons (so a rerun changes nothing).
    """
    embeddings = np.asarray(embeddings, dtype=np.float64)
    groups = [np.asarray(g, dtype=np.float64).reshape(-1, embeddings.shape[1] if embeddings.ndim == 2 else 0)
              for g in fixed]
    names = list(names or [f"character {k + 1}" for k in range(len(groups))])
    count = len(embeddings)
    target = np.full(count, -1, dtype=np.int64)
    created = 0
    while True:
        left = np.flatnonzero(target < 0)
        reason, detail = [""] * count, [""] * count
        if not left.size:
            break
        links = linkage_distances(embeddings[left], groups, linkage)
        joins: dict[int, list[int]] = {}
        rest = []
        for row, index in enumerate(left):
            order = np.argsort(links[row], kind="stable")
            d1 = links[row, order[0]] if groups else np.inf
            d2 = links[row, order[1]] if len(groups) > 1 else np.inf
            if d1 < threshold and not (d2 < threshold + margin and d2 - d1 < margin):
                joins.setdefault(int(order[0]), []).append(int(index))
            elif d1 < threshold + margin:
                reason[index] = "ambiguous"
                if d2 < threshold + margin and d2 - d1 < margin:
                    detail[index] = (f"close to two characters: {names[order[0]]} at {d1:.3f} and {names[order[1]]} "
                                     f"at {d2:.3f} (cluster_margin={margin})")
                else:
                    detail[index] = (f"close to {names[order[0]]} at {d1:.3f}, within cluster_margin={margin} of "
                                     f"cluster_threshold={threshold}")
            else:
                rest.append(int(index))
        if joins:  # all decided against the same groups, so the order of the faces does not matter
            for k, members in sorted(joins.items()):
                groups[k] = np.vstack([groups[k], embeddings[members]])
                target[members] = k
            continue
        made = _new_groups(embeddings, rest, groups, names, threshold, margin, min_size, linkage, reason, detail)
        if not made:
            break
        for members in made:
            created += 1
            target[members] = len(groups)
            groups.append(embeddings[members])
            if len(names) < len(groups):
                names.append(f"new group {created}")
    return Grouping(target=target, reason=reason, detail=detail, new_groups=created)


def join_only(
    groups: list[np.ndarray], embeddings: np.ndarray, threshold: float, margin: float, linkage: str, names: list[str]
) -> tuple[np.ndarray, list[str]]:
    """Join each of (N, D) small ``embeddings`` (faces of full-body photos) to one of ``groups`` only when it is
    closer than ``threshold - margin`` to the closest and at least ``margin`` nearer to it than to the next; all
    against the same groups. Returns ((N,) int64 group index or -1, a detail per face left out, "" when joined)."""
    links = linkage_distances(np.asarray(embeddings, dtype=np.float64), groups, linkage)
    target = np.full(len(embeddings), -1, dtype=np.int64)
    detail = [""] * len(embeddings)
    for i in range(len(embeddings)):
        order = np.argsort(links[i], kind="stable")
        d1 = links[i, order[0]] if groups else np.inf
        d2 = links[i, order[1]] if len(groups) > 1 else np.inf
        if d1 < threshold - margin and d2 - d1 >= margin:
            target[i] = order[0]
        elif np.isfinite(d1):
            detail[i] = (f"closest character {names[order[0]]} at {d1:.3f}; small faces join only below "
                         f"cluster_threshold - cluster_margin = {threshold - margin:.2f}, {margin} nearer than to any other")
        else:
            detail[i] = "no character to join (small faces never start one)"
    return target, detail


def _new_groups(
    embeddings: np.ndarray,
    rest: list[int],
    groups: list[np.ndarray],
    names: list[str],
    threshold: float,
    margin: float,
    min_size: int,
    linkage: str,
    reason: list[str],
    detail: list[str],
) -> list[list[int]]:
    """Cluster the faces ``rest`` (indices into ``embeddings``) at ``threshold``; return the clusters that become
    groups and fill ``reason``/``detail`` for the others. A cluster within ``threshold + margin`` of an existing
    group or of a larger cluster is ambiguous: at a slightly larger threshold it would have merged."""
    if not rest:
        return []
    labels = cluster(embeddings[rest], threshold, linkage)
    clusters = [[rest[i] for i in np.flatnonzero(labels == label)] for label in range(int(labels.max()) + 1)]
    made = []
    for number, members in enumerate(clusters):  # largest first
        others = groups + [embeddings[c] for c in clusters[:number]]
        close = linkage_distances(embeddings[members], others, linkage).max(0) if others else np.zeros(0)
        near = np.flatnonzero(close < threshold + margin)
        if near.size:
            k = int(near[np.argmin(close[near])])
            what = names[k] if k < len(groups) else "a larger group of left-out faces"
            for index in members:
                reason[index] = "ambiguous"
                detail[index] = (f"{len(members)} similar faces within cluster_threshold={threshold} + "
                                 f"cluster_margin={margin} of {what} ({close[k]:.3f})")
        elif len(members) >= min_size:
            made.append(members)
        else:
            for index in members:
                reason[index] = "unclustered"
                detail[index] = f"{len(members)} similar faces < min_images_per_char={min_size}"
    return made


def purity_completeness(truth: np.ndarray, predicted: np.ndarray) -> tuple[float, float]:
    """Cluster purity (share of items that belong to their cluster's majority identity) and completeness as inverse
    purity (share of items in their identity's largest cluster). Both 1.0 for a perfect grouping."""
    truth, predicted = np.asarray(truth), np.asarray(predicted)
    if len(truth) == 0:
        return 1.0, 1.0

    def majority_share(outer: np.ndarray, inner: np.ndarray) -> float:
        total = 0
        for value in np.unique(outer):
            _, counts = np.unique(inner[outer == value], return_counts=True)
            total += int(counts.max())
        return total / len(outer)

    return majority_share(predicted, truth), majority_share(truth, predicted)
