"""Build (train, evaluate, save) the world's face detector, face encoder and body encoder.

Training characters come from their own seed; the held-out characters used for the recorded figures share neither
their face nor their body attributes with any training character. Each saved component's JSON records the world
version, the recipe, the training history and the held-out figures.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from dtback.world.encoders import BODY, DETECTOR, FACE, WorldBodyEncoder, WorldFaceEncoder
from dtback.world.nets import DetectorConfig, EmbedderConfig, save_net
from dtback.world.people import WORLD_VERSION, Character, WorldSet, render_world_set, sample_characters
from dtback.world_build.train import (
    box_iou, check_recipe, roc_auc_same_vs_different, train_detector, train_embedder,
)

log = logging.getLogger(__name__)

DETECTOR_CONFIG = DetectorConfig(size=128, widths=(16, 32, 64))
FACE_CONFIG = EmbedderConfig(size=48, widths=(32, 64, 128), dim=128)
BODY_CONFIG = EmbedderConfig(size=64, widths=(24, 48, 96, 128), dim=128)


@dataclass(frozen=True)
class EncoderRecipe:
    """How the world encoders are trained and evaluated (characters, images, steps, seeds)."""

    characters: int = 320
    images_per_character: int = 8
    size: int = 128
    seed: int = 1001
    detector_steps: int = 500
    face_steps: int = 900
    body_steps: int = 900
    batch: int = 96
    eval_characters: int = 40
    eval_images: int = 6
    eval_seed: int = 2001

    def __post_init__(self) -> None:
        # CosFace needs two characters; the held-out AUC needs pairs of the same and of different characters.
        check_recipe(self, {"characters": 2, "images_per_character": 1, "size": 16, "seed": 0, "detector_steps": 1,
                            "face_steps": 1, "body_steps": 1, "batch": 1, "eval_characters": 2, "eval_images": 2,
                            "eval_seed": 0})


def training_characters(recipe: EncoderRecipe) -> list[Character]:
    return sample_characters(recipe.characters, recipe.seed)


def held_out_set(recipe: EncoderRecipe, train: list[Character] | None = None) -> WorldSet:
    """Renders of characters that share neither face nor body attributes with any training character."""
    train = train if train is not None else training_characters(recipe)
    held = sample_characters(recipe.eval_characters, recipe.eval_seed, exclude=train)
    return render_world_set(held, recipe.eval_images, recipe.size, recipe.eval_seed)


@torch.no_grad()
def evaluate_face_encoder(encoder: WorldFaceEncoder, world: WorldSet, batch: int = 64) -> dict[str, float]:
    """Full pipeline on ``world``: detect -> crop -> embed. Returns detection rate, mean IoU of the detected box
    with the true face box, and the same-vs-different ROC AUC (images without a detection use the true box)."""
    embeddings, ious, found = [], [], 0
    for start in range(0, len(world), batch):
        index = torch.arange(start, min(start + batch, len(world)))
        pixels = world.pixels(index)
        faces = encoder.detect_pixels(pixels)
        boxes = world.face_boxes[index].clone()
        for k, detected in enumerate(faces):
            if detected:
                found += 1
                boxes[k] = torch.from_numpy(detected[0].box)
        ious.append(box_iou(boxes, world.face_boxes[index]))
        embeddings.append(encoder.embed_pixels(pixels, boxes))
    auc = roc_auc_same_vs_different(torch.cat(embeddings), world.labels)
    return {"auc": round(auc, 4), "detection_rate": round(found / len(world), 4),
            "mean_iou": round(float(torch.cat(ious).mean()), 4)}


@torch.no_grad()
def evaluate_body_encoder(encoder: WorldBodyEncoder, world: WorldSet, batch: int = 64) -> dict[str, float]:
    """Same-vs-different ROC AUC of the pooled body embedding on person crops found from the true face boxes."""
    embeddings = []
    for start in range(0, len(world), batch):
        index = torch.arange(start, min(start + batch, len(world)))
        embeddings.append(encoder.embed_pixels(world.pixels(index), world.face_boxes[index]).pooled)
    return {"auc": round(roc_auc_same_vs_different(torch.cat(embeddings), world.labels), 4)}


RoundTrip = Callable[[torch.Tensor], torch.Tensor]


def _info(recipe: EncoderRecipe, history: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    return {"world_version": WORLD_VERSION, "recipe": asdict(recipe), "history": history, "held_out": metrics,
            "rebuild": "dtback world-components --out <folder>"}


@functools.lru_cache(maxsize=1)
def training_sets(recipe: EncoderRecipe, round_trip: RoundTrip | None) -> tuple[WorldSet, dict[str, WorldSet]]:
    """The training renders (with their VAE round trips when ``round_trip`` maps uint8 ``(N, 3, S, S)`` images to
    decoded ones) and the held-out sets to measure on: ``render``, and ``decoded`` with a round trip. Cached for
    the last (recipe, round trip): the face and body builds of one run share them (read-only)."""
    characters = training_characters(recipe)
    world = render_world_set(characters, recipe.images_per_character, recipe.size, recipe.seed)
    held = {"render": held_out_set(recipe, characters)}
    if round_trip is not None:
        world.decoded = round_trip(world.images)
        held["decoded"] = dataclasses.replace(held["render"], images=round_trip(held["render"].images))
    return world, held


def build_face_components(folder: Path, recipe: EncoderRecipe = EncoderRecipe(), progress: bool = True,
                          round_trip: RoundTrip | None = None) -> dict[str, Any]:
    """Train the face detector and face encoder on renders of the recipe's training characters (half of them
    through ``round_trip``, the VAE, when given), measure them on held-out characters, save both into ``folder``."""
    world, held = training_sets(recipe, round_trip)
    detector, det_history = train_detector(world, DETECTOR_CONFIG, recipe.detector_steps, seed=recipe.seed,
                                           progress=progress)
    embedder, face_history = train_embedder("face", world, FACE_CONFIG, recipe.face_steps, recipe.batch,
                                            seed=recipe.seed, progress=progress)
    encoder = WorldFaceEncoder(detector, embedder, name="unsaved")
    metrics = {name: evaluate_face_encoder(encoder, images) for name, images in held.items()}
    detection = {name: {k: m[k] for k in ("detection_rate", "mean_iou")} for name, m in metrics.items()}
    save_net(detector, folder, DETECTOR, _info(recipe, det_history, detection))
    save_net(embedder, folder, FACE, _info(recipe, face_history, metrics))
    log.info("world face encoder -> %s: held-out %s; trained in %.0f s + %.0f s", folder, metrics,
             det_history["seconds"], face_history["seconds"])
    return {"detector": det_history, "face": face_history, "held_out": metrics}


def build_body_component(folder: Path, recipe: EncoderRecipe = EncoderRecipe(), progress: bool = True,
                         round_trip: RoundTrip | None = None) -> dict[str, Any]:
    """Train the body encoder (as the face encoder), measure it on held-out characters, save it into ``folder``."""
    world, held = training_sets(recipe, round_trip)
    embedder, history = train_embedder("body", world, BODY_CONFIG, recipe.body_steps, recipe.batch, seed=recipe.seed,
                                       progress=progress)
    encoder = WorldBodyEncoder(embedder, name="unsaved")
    metrics = {name: evaluate_body_encoder(encoder, images) for name, images in held.items()}
    save_net(embedder, folder, BODY, _info(recipe, history, metrics))
    log.info("world body encoder -> %s: held-out %s; trained in %.0f s", folder, metrics, history["seconds"])
    return {"body": history, "held_out": metrics}
