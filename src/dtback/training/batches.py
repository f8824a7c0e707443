"""Deterministic training batches over a :class:`~dtback.training.features.FeatureStore`.

An epoch's batches are a pure function of ``(seed, epoch)``: targets grouped by bucket and shuffled by
:class:`~dtback.data.buckets.BucketBatchSampler`, references drawn by
:func:`~dtback.data.pairs.draw_references` from ``(seed, epoch, target)``. The data position of a run is therefore
just ``(epoch, batch)``; a resumed run continues with exactly the batches the interrupted run would have used.
With several processes, rank ``r`` of ``n`` takes every ``n``-th batch of the same global list.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from diffusers import FluxPipeline

from dtback.data.buckets import BucketBatchSampler
from dtback.data.pairs import draw_references
from dtback.identity.resampler import IdentityInputs
from dtback.training.features import FeatureStore


@dataclass
class Batch:
    """One micro-batch: packed latents ``(B, L, 4C)`` of the targets at ``(height, width)`` latent size, text
    embeddings, identity inputs of the references, the references' mean face/body embeddings ``(B, D)`` for the
    identity losses, and the targets' boxes ``(B, 4)`` in training pixels."""

    targets: list[int]
    latents: torch.Tensor
    latent_size: tuple[int, int]
    image_ids: torch.Tensor
    caption: torch.Tensor
    identity: IdentityInputs
    face_reference: torch.Tensor | None
    face_reference_valid: torch.Tensor
    body_reference: torch.Tensor | None
    face_boxes: torch.Tensor
    face_landmarks: torch.Tensor
    target_has_face: torch.Tensor
    body_boxes: torch.Tensor


def epoch_batches(store: FeatureStore, members: list[int], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Global list of target batches (store indices) for ``epoch``; one bucket per batch, last partial kept."""
    sampler = BucketBatchSampler([int(store.bucket[i]) for i in members], batch_size, seed, shuffle=True)
    return [[members[j] for j in batch] for batch in sampler.batches(epoch)]


def draw_pair_references(store: FeatureStore, target: int, k_min: int, k_max: int, seed: int, epoch: int) -> list[int]:
    """1..K other images of the target's character, deterministic in ``(seed, epoch, target)``."""
    images = store.images_of(int(store.character[target]))
    rng = random.Random(f"{seed}:{epoch}:{target}")
    return [images[i] for i in draw_references(len(images), images.index(target), k_min, k_max, rng)]


def reference_inputs(store: FeatureStore, references: list[list[int]]):
    """Resampler inputs of each sample's references, padded to the longest list: ``(IdentityInputs, index (B, K),
    present (B, K))``; padding and references without a face / body are masked."""
    k = max(len(refs) for refs in references)
    index = torch.tensor([refs + [refs[0]] * (k - len(refs)) for refs in references])
    present = torch.tensor([[j < len(refs) for j in range(k)] for refs in references])
    identity = IdentityInputs(
        face_embeds=store.face_embeds[index] if store.face_embeds is not None else None,
        face_mask=present & store.face_valid[index] if store.face_embeds is not None else None,
        body_pooled=store.body_pooled[index] if store.body_pooled is not None else None,
        body_tokens=store.body_tokens[index].float() if store.body_tokens is not None else None,
        body_mask=present & store.body_valid[index] if store.body_pooled is not None else None,
    )
    return identity, index, present


def make_batch(store: FeatureStore, targets: list[int], references: list[list[int]]) -> Batch:
    """Stack targets and pad their reference lists to the longest (masked)."""
    latents = torch.stack([store.latents[i] for i in targets]).float()
    batch, channels, height, width = latents.shape
    packed = FluxPipeline._pack_latents(latents, batch, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", torch.float32)
    identity, ref_index, present = reference_inputs(store, references)
    face_mask = present & store.face_valid[ref_index]
    face_reference = body_reference = None
    if store.face_embeds is not None:
        face_reference = normalized_masked_mean(store.face_embeds[ref_index], face_mask)
    if store.body_pooled is not None:
        body_reference = normalized_masked_mean(store.body_pooled[ref_index], present & store.body_valid[ref_index])
    target_index = torch.tensor(targets)
    return Batch(
        targets=targets, latents=packed, latent_size=(height, width), image_ids=image_ids,
        caption=store.caption[target_index], identity=identity,
        face_reference=face_reference, face_reference_valid=face_mask.any(dim=1), body_reference=body_reference,
        face_boxes=store.face_boxes[target_index], face_landmarks=store.face_landmarks[target_index],
        target_has_face=store.face_valid[target_index], body_boxes=store.body_boxes[target_index],
    )


def normalized_masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The unit-length mean of the embeddings ``values`` (B, R, D) over the references ``mask`` (B, R) marks present
    (B, D): one identity reference per sample, for training batches and validation alike."""
    weights = mask.to(values.dtype).unsqueeze(-1)
    mean = (values * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    return torch.nn.functional.normalize(mean, dim=-1)
