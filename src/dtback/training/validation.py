"""Validation on held-out characters: generate with identity, without identity and with a shuffled reference, and
measure identity similarity of each against the character's references.

The identity encoders that fed training (face and body) score the generated images: a face that is not detected
scores 0 (and lowers ``face_detected``). Extra scorers (the world's identity reader) add their own metrics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dtback.evaluation.metrics import body_similarity, face_similarity
from dtback.model.identity_flux import IdentityPreservingFlux
from dtback.training.batches import normalized_masked_mean, reference_inputs
from dtback.training.features import FeatureStore

logger = logging.getLogger(__name__)

CONDITIONS = ("id", "no_id", "shuffled")
# A scorer gets the generated images of one condition and the character index of each, returns metric -> value.
Scorer = Callable[[list[Image.Image], list[int]], dict[str, float]]


@dataclass
class ValidationSet:
    """Fixed held-out examples: per character, reference images (store indices) and one target (its caption)."""

    characters: list[int]
    references: list[list[int]]
    targets: list[int]


def make_validation_set(store: FeatureStore, val_characters: Sequence[int], count: int, max_refs: int) -> ValidationSet:
    """The first ``count`` held-out characters with 2+ images: the last image is the target, the others refs."""
    chosen, refs, targets = [], [], []
    for character in val_characters:
        images = store.images_of(character)
        if len(images) < 2:
            continue
        chosen.append(character)
        refs.append(images[: min(max_refs, len(images) - 1)])
        targets.append(images[-1])
        if len(chosen) == count:
            break
    return ValidationSet(chosen, refs, targets)


@torch.no_grad()
def generate(pipeline, model: IdentityPreservingFlux, store: FeatureStore, val: ValidationSet, condition: str,
             size: int, steps: int, guidance: float, seed: int, true_cfg: float = 1.0) -> list[Image.Image]:
    """Images of ``val``'s targets' captions under one condition (see :data:`CONDITIONS`). ``true_cfg > 1``: the
    conditions with identity use true CFG against the same caption without identity."""
    references = val.references
    if condition == "shuffled":  # each character gets the next character's references
        references = references[1:] + references[:1]
    identity = None if condition == "no_id" else model.encode_identity(reference_inputs(store, references)[0])
    device, dtype = pipeline.transformer.device, pipeline.transformer.dtype
    caption = store.caption[torch.tensor(val.targets)]
    prompt = {"prompt_embeds": store.prompt_embeds[caption].to(device, dtype)}
    if store.pooled_embeds is not None:
        prompt["pooled_prompt_embeds"] = store.pooled_embeds[caption].to(device, dtype)
    kwargs = {}
    if pipeline.transformer.config.guidance_embeds:
        kwargs["guidance_scale"] = guidance
    branches = 1
    cfg = true_cfg > 1.0 and identity is not None
    if store.family == "flux2":
        # FLUX.2 [klein]'s guidance_scale is true CFG (against the negative prompt), off without identity; FLUX.2
        # [dev] is guidance-distilled and has no true CFG.
        if not pipeline.transformer.config.guidance_embeds:
            kwargs["guidance_scale"] = true_cfg if cfg else 1.0
            if cfg:
                branches = 2
                kwargs["negative_prompt_embeds"] = prompt["prompt_embeds"]
    elif cfg:
        branches = 2
        kwargs.update(true_cfg_scale=true_cfg, negative_prompt_embeds=prompt["prompt_embeds"],
                      negative_pooled_prompt_embeds=prompt["pooled_prompt_embeds"])
    with model.identity_per_call(identity, steps, branches):
        output = pipeline(**prompt, height=size, width=size, num_inference_steps=steps,
                          generator=torch.Generator().manual_seed(seed), output_type="pil", **kwargs)
    return output.images


def similarity_scorer(store: FeatureStore, val: ValidationSet, face_encoder, body_encoder) -> Scorer:
    """Cosine similarity of each image's face / body embedding with its character's mean reference embedding."""
    face_ref = body_ref = None
    index = {c: i for i, c in enumerate(val.characters)}
    if store.face_embeds is not None:
        rows = [torch.tensor(r) for r in val.references]
        face_ref = torch.stack([normalized_masked_mean(store.face_embeds[r][None], store.face_valid[r][None])[0]
                                for r in rows])
    if store.body_pooled is not None:
        body_ref = torch.stack([F.normalize(store.body_pooled[torch.tensor(r)].mean(0), dim=-1) for r in val.references])

    def score(images: list[Image.Image], characters: list[int]) -> dict[str, float]:
        metrics: dict[str, float] = {}
        rows = [index[character] for character in characters]
        boxes: list = [None] * len(images)
        if face_encoder is not None:
            faces = face_similarity(face_encoder, images, [None if face_ref is None else face_ref[r] for r in rows])
            boxes = faces.boxes
            if face_ref is not None:
                metrics["face_sim"] = float(np.mean(faces.sims))
                metrics["face_detected"] = float(np.mean(faces.detected))
        if body_ref is not None and body_encoder is not None:
            sims = body_similarity(body_encoder, images, boxes, [body_ref[r] for r in rows])
            metrics["body_sim"] = float(np.mean(sims))
        return metrics

    return score


def run_validation(
    pipeline, model, store, val: ValidationSet, scorers: Sequence[Scorer], size: int, steps: int, guidance: float,
    seed: int, true_cfg: float = 1.0,
) -> tuple[dict[str, float], dict[str, list[Image.Image]]]:
    """Metrics ``val/<metric>`` (with identity), ``val/<metric>_no_id``, ``val/<metric>_shuffled`` and the images."""
    metrics: dict[str, float] = {}
    images: dict[str, list[Image.Image]] = {}
    for condition in CONDITIONS:
        images[condition] = generate(pipeline, model, store, val, condition, size, steps, guidance, seed, true_cfg)
        suffix = "" if condition == "id" else f"_{condition}"
        for scorer in scorers:
            for name, value in scorer(images[condition], val.characters).items():
                metrics[f"val/{name}{suffix}"] = value
    return metrics, images


def selection_metric(metrics: dict[str, float]) -> float:
    """What ``best_model`` maximises: mean of the with-identity face and body similarities that exist; ``-inf``
    (never an improvement on a scored model) when there are none or one is NaN or infinite."""
    values = [metrics[k] for k in ("val/face_sim", "val/body_sim") if k in metrics]
    if not values or not all(np.isfinite(values)):
        return float("-inf")
    return float(np.mean(values))
