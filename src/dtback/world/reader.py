"""The identity reader: reads every face and body attribute of the world's person from a whole image.

Evaluation only, never a training signal: it is trained on its own renders (its own seed, its own weights, nothing
shared with the training encoders) with the attribute labels, and its accuracy is measured on renders of held-out
characters (faces never seen in its training). A generated image of a held-out character can then be scored
attribute by attribute: did the face keep its hair colour, the body its top pattern?

``ReaderNet`` reads in two stages, as a person would look: its own face locator (the world's detector architecture)
finds the face in the whole image ``(B, 3, H, W)`` in [0, 1]; a face crop (48 px) and a person crop (64 px) go
through two conv trunks; one linear head per attribute reads the face attributes from the face crop and the body
attributes from the person crop (``(B, n_values)`` logits each).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtback.identity.crops import crop_square
from dtback.world.encoders import image_pixels, load_component
from dtback.world.files import MANIFEST, read_manifest, world_models_dir
from dtback.world.nets import ConvTrunk, DetectorConfig, FaceDetectorNet, body_crop_boxes, face_crop_boxes
from dtback.world.people import ATTRIBUTES, BODY_ATTRIBUTES, FACE_ATTRIBUTES, WorldSet

log = logging.getLogger(__name__)

READER = "reader"


@dataclass(frozen=True)
class ReaderConfig:
    """Sizes of the face locator, the face and person crops and their trunks."""

    detector_size: int = 128
    detector_widths: tuple[int, ...] = (16, 32, 64)
    face_size: int = 48
    face_widths: tuple[int, ...] = (32, 64, 96)
    body_size: int = 64
    body_widths: tuple[int, ...] = (24, 48, 96, 128)


class ReaderNet(nn.Module):
    """Whole images ``(B, 3, H, W)`` in [0, 1] -> {attribute: ``(B, n_values)`` logits} for every attribute."""

    config_class = ReaderConfig

    def __init__(self, config: ReaderConfig):
        super().__init__()
        self.config = config
        self.detector = FaceDetectorNet(DetectorConfig(config.detector_size, config.detector_widths))
        self.face_trunk = ConvTrunk(config.face_widths)
        self.body_trunk = ConvTrunk(config.body_widths)
        self.heads = nn.ModuleDict({name: nn.Linear(config.face_widths[-1], len(ATTRIBUTES[name]))
                                    for name in FACE_ATTRIBUTES})
        self.heads.update({name: nn.Linear(config.body_widths[-1], len(ATTRIBUTES[name])) for name in BODY_ATTRIBUTES})

    @torch.no_grad()
    def locate(self, pixels: torch.Tensor) -> torch.Tensor:
        """Face box ``(B, 4)`` (pixels of ``pixels``) at the most confident cell of the face locator."""
        size = self.config.detector_size
        height, width = pixels.shape[-2:]
        resized = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        scores, boxes = self.detector.decode(self.detector(resized))
        best = boxes[torch.arange(len(boxes)), scores.argmax(dim=1)]
        return best * torch.tensor([width / size, height / size] * 2, device=best.device)

    def read_crops(self, pixels: torch.Tensor, face_boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits from the face and person crops around ``face_boxes (B, 4)``."""
        face = self.face_trunk(crop_square(pixels, face_crop_boxes(face_boxes), self.config.face_size))
        body = self.body_trunk(crop_square(pixels, body_crop_boxes(face_boxes), self.config.body_size))
        face, body = face.mean(dim=(2, 3)), body.mean(dim=(2, 3))
        return {name: head(face if name in FACE_ATTRIBUTES else body) for name, head in self.heads.items()}

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.read_crops(pixels, self.locate(pixels))


class IdentityReader:
    """A trained :class:`ReaderNet` with value names: ``read(images)`` -> one {attribute: value} dict per image."""

    def __init__(self, net: ReaderNet, name: str, held_out: Mapping[str, Mapping[str, float]] | None = None):
        self.net = net
        self.name = name
        # Its recorded per-attribute accuracy on held-out renders ("render") and their VAE round trips ("decoded":
        # the ceiling for generated images, which are decoded latents).
        self.held_out = dict(held_out or {})

    @classmethod
    def from_folder(cls, folder: Path) -> "IdentityReader":
        net, component_id = load_component(folder, READER, ReaderNet)
        info = json.loads((Path(folder) / f"{READER}.json").read_text(encoding="utf-8"))
        return cls(net, f"world-{component_id}", info.get("held_out_accuracy"))

    @torch.no_grad()
    def read_pixels(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(B, 3, H, W)`` in [0, 1] -> {attribute: ``(B,)`` value indices into ``ATTRIBUTES[attribute]``}."""
        return {name: logits.argmax(dim=1) for name, logits in self.net(pixels).items()}

    def read(self, images: Sequence[np.ndarray]) -> list[dict[str, str]]:
        """``(H, W, 3)`` uint8 RGB images -> one {attribute: value name} per image."""
        pixels = torch.cat([image_pixels(image) for image in images])
        indices = self.read_pixels(pixels)
        return [{name: ATTRIBUTES[name][int(idx[i])] for name, idx in indices.items()} for i in range(len(images))]


def attribute_labels(world: WorldSet, names: Sequence[str] = tuple(ATTRIBUTES)) -> torch.Tensor:
    """``(N, A)`` value indices of each image's character, attributes in ``names`` order."""
    rows = []
    for character in world.characters:
        values = character.attributes
        rows.append([ATTRIBUTES[name].index(values[name]) for name in names])
    return torch.tensor(rows, dtype=torch.long)[world.labels]


def attribute_hits(read: Mapping[str, str], truth: Mapping[str, Mapping[str, str]]) -> dict[str, float]:
    """1.0 / 0.0 per attribute: does ``read`` (attribute -> value, from the reader) equal ``truth`` (``{"face":
    {...}, "body": {...}}``, as in ``world.json`` and the images' ``.json`` sidecars)?"""
    hits = {name: float(read[name] == truth["face"][name]) for name in FACE_ATTRIBUTES}
    hits.update({name: float(read[name] == truth["body"][name]) for name in BODY_ATTRIBUTES})
    return hits


def truth_problem(truth: Any) -> str | None:
    """Why ``truth`` is not a character's true attributes ``{"face": {...}, "body": {...}}`` holding every attribute
    of the world as text (None: it is): a sidecar or ``world.json`` edited by hand, cut short, or of another world
    version. Checked before scoring, which would otherwise stop at the first missing attribute."""
    if not isinstance(truth, dict):
        return f"expected an object with 'face' and 'body', got {type(truth).__name__}"
    for part, names in (("face", FACE_ATTRIBUTES), ("body", BODY_ATTRIBUTES)):
        values = truth.get(part)
        if not isinstance(values, dict):
            return f"'{part}' is not an object of attributes"
        missing = sorted(name for name in names if not isinstance(values.get(name), str))
        if missing:
            return f"'{part}' lacks {', '.join(missing)}"
    return None


def attribute_accuracy(read: Mapping[str, str], truth: Mapping[str, Mapping[str, str]]) -> tuple[float, float]:
    """(face, body) fraction of attributes in ``read`` equal to ``truth`` (see :func:`attribute_hits`)."""
    hits = attribute_hits(read, truth)
    return float(np.mean([hits[name] for name in FACE_ATTRIBUTES])), float(np.mean([hits[name] for name in BODY_ATTRIBUTES]))


def load_reader(folder: Path | None = None) -> IdentityReader:
    """The identity reader from the world components ``folder`` (None: the shipped one). A missing reader raises
    :class:`~dtback.errors.MissingModelError` with the command that builds it."""
    return IdentityReader.from_folder(world_models_dir(folder))


def validation_scorer(data_dir: Path, world: Path | None, keys: Sequence[str]):
    """A training-validation scorer (``(images, character indices) -> metrics``) when ``data_dir`` is an identity
    world, else None: ``reader_face`` / ``reader_body`` are the fractions of face / body attributes the reader
    (from the world components folder ``world``) reads in each generated image that equal its character's true
    attributes (from ``world.json``). ``keys[i]`` is the ``bundle/character`` key of character ``i``.
    """
    manifest = read_manifest(data_dir)
    if manifest is None or not manifest.get("complete"):
        return None
    reader = load_reader(world)
    roster, bundle = manifest.get("roster"), manifest.get("bundle")
    roster = roster if isinstance(roster, dict) else {}
    for name, truth in list(roster.items()):
        problem = truth_problem(truth)
        if problem:
            log.warning("%s: roster entry %s: %s; left out of the reader's figures", Path(data_dir) / MANIFEST, name,
                        problem)
            del roster[name]

    def score(images: list, characters: list[int]) -> dict[str, float]:
        read = reader.read([np.asarray(image.convert("RGB")) for image in images])
        face, body = [], []
        for values, character in zip(read, characters):
            key_bundle, _, name = keys[character].partition("/")
            truth = roster.get(name) if key_bundle == bundle else None
            if truth is None:
                continue
            face_accuracy, body_accuracy = attribute_accuracy(values, truth)
            face.append(face_accuracy)
            body.append(body_accuracy)
        if not face:
            return {}
        return {"reader_face": float(np.mean(face)), "reader_body": float(np.mean(body))}

    return score
