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

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dtback.data.world import ATTRIBUTES, BODY_ATTRIBUTES, FACE_ATTRIBUTES, WORLD_VERSION, sample_characters
from dtback.data.world_files import world_models_dir
from dtback.evaluation.metrics import attribute_accuracy
from dtback.identity.world import image_pixels, load_component
from dtback.identity.world_nets import (
    ConvTrunk, DetectorConfig, FaceDetectorNet, body_crop_boxes, crop_square, face_crop_boxes, save_net,
)
from dtback.identity.world_train import (
    WorldSet, jitter_boxes, optimizer_step, photometric, render_world_set, train_detector, training_history,
    warmup_cosine,
)

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

    def __init__(self, net: ReaderNet, name: str):
        self.net = net
        self.name = name

    @classmethod
    def from_folder(cls, folder: Path) -> "IdentityReader":
        net, component_id = load_component(folder, READER, ReaderNet)
        return cls(net, f"world-{component_id}")

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


# -------------------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class ReaderRecipe:
    """Reader training and evaluation: its own characters and seeds, never those of the encoders or datasets."""

    characters: int = 2400
    images_per_character: int = 1
    size: int = 128
    seed: int = 3001
    detector_steps: int = 400
    steps: int = 1500
    # Share of training images taken from their VAE round trips. 0: the reader learns the world as drawn; mixing
    # in round trips (0.3) raised accuracy on decoded images by ~0.1 but cost clean accuracy (top pattern 0.93).
    decoded_share: float = 0.0
    batch: int = 48
    lr: float = 3e-3
    eval_characters: int = 100
    eval_images: int = 4
    eval_seed: int = 4001


def train_reader(world: WorldSet, config: ReaderConfig, recipe: ReaderRecipe,
                 progress: bool = True) -> tuple[ReaderNet, dict[str, Any]]:
    """Train the face locator (as the world's face detector), then both trunks and every head with cross-entropy
    on crops around jittered true face boxes. Returns the net (eval, frozen) and a history."""
    detector, detector_history = train_detector(world, DetectorConfig(config.detector_size, config.detector_widths),
                                                recipe.detector_steps, seed=recipe.seed, progress=progress)
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    net = ReaderNet(config)
    net.detector.load_state_dict(detector.state_dict())
    net.detector.requires_grad_(False)
    labels = attribute_labels(world, tuple(net.heads))
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=recipe.lr, weight_decay=5e-4)
    sched = warmup_cosine(opt, recipe.steps)
    losses, start, cpu_start = [], time.perf_counter(), time.process_time()
    net.train()
    for _ in tqdm(range(recipe.steps), desc="world identity reader", unit="step", disable=not progress):
        index = torch.randint(len(world), (recipe.batch,), generator=gen)
        pixels = photometric(world.pixels(index, gen, recipe.decoded_share), gen, flip=False)  # boxes stay put
        logits = net.read_crops(pixels, jitter_boxes(world.face_boxes[index], gen))
        loss = sum(F.cross_entropy(logits[name], labels[index, a]) for a, name in enumerate(net.heads))
        losses.append(optimizer_step(loss, opt, sched))
    history = training_history(losses, start, cpu_start, steps=recipe.steps, batch=recipe.batch)
    history["detector"] = detector_history
    return net.eval().requires_grad_(False), history


@torch.no_grad()
def evaluate_reader(reader: IdentityReader, world: WorldSet, batch: int = 64) -> dict[str, float]:
    """Per-attribute accuracy of ``reader`` on ``world`` (fractions in [0, 1])."""
    names = tuple(reader.net.heads)
    labels = attribute_labels(world, names)
    correct = torch.zeros(len(names))
    for start in range(0, len(world), batch):
        index = torch.arange(start, min(start + batch, len(world)))
        read = reader.read_pixels(world.pixels(index))
        correct += torch.stack([(read[name] == labels[index, a]).sum() for a, name in enumerate(names)]).float()
    return {name: round(float(correct[a]) / len(world), 4) for a, name in enumerate(names)}


def reader_held_out_set(recipe: ReaderRecipe) -> WorldSet:
    """Renders of characters whose faces the reader never saw (bodies repeat: there are only 576 body outfits)."""
    train = sample_characters(recipe.characters, recipe.seed)
    held = sample_characters(recipe.eval_characters, recipe.eval_seed, exclude=train, exclude_bodies=False)
    return render_world_set(held, recipe.eval_images, recipe.size, recipe.eval_seed)


def build_reader(folder: Path, recipe: ReaderRecipe = ReaderRecipe(), progress: bool = True,
                 round_trip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Any]:
    """Train the reader on its own renders (``recipe.decoded_share`` of them through ``round_trip``, the VAE), measure
    it on held-out characters, as rendered and (with ``round_trip``) decoded, and save it into ``folder``."""
    world = render_world_set(sample_characters(recipe.characters, recipe.seed), recipe.images_per_character,
                             recipe.size, recipe.seed)
    held = {"render": reader_held_out_set(recipe)}
    if round_trip is not None:
        if recipe.decoded_share > 0:
            world.decoded = round_trip(world.images)
        held["decoded"] = dataclasses.replace(held["render"], images=round_trip(held["render"].images))
    net, history = train_reader(world, ReaderConfig(), recipe, progress=progress)
    accuracy = {name: evaluate_reader(IdentityReader(net, "unsaved"), images) for name, images in held.items()}
    save_net(net, folder, READER, {"world_version": WORLD_VERSION, "recipe": asdict(recipe), "history": history,
                                   "held_out_accuracy": accuracy, "rebuild": "dtback world-components --out <folder>"})
    log.info("world identity reader -> %s: held-out accuracy %s; trained in %.0f s", folder, accuracy,
             history["seconds"])
    return {"reader": history, "held_out_accuracy": accuracy}


def load_reader(folder: Path | None = None, train_if_missing: bool = True, progress: bool = True) -> IdentityReader:
    """The identity reader from ``folder`` (None: :func:`world_models_dir`); trained there first when missing."""
    folder = world_models_dir(folder)
    if train_if_missing and not (folder / f"{READER}.safetensors").is_file():
        log.info("identity reader not found in %s: training it (a few minutes on one core) ...", folder)
        build_reader(folder, progress=progress)
    return IdentityReader.from_folder(folder)


def validation_scorer(cfg: Any, store: Any, val_set: Any):
    """A training-validation scorer (``(images, character indices) -> metrics``) when ``cfg.data.data_dir`` is an
    identity world, else None: ``reader_face`` / ``reader_body`` are the fractions of face / body attributes the
    reader reads in each generated image that equal its character's true attributes (from ``world.json``).

    ``store.characters[i]`` is the ``bundle/character`` key of character ``i``; ``val_set`` is not needed.
    """
    from dtback.data.world_files import read_manifest

    manifest = read_manifest(cfg.data.data_dir)
    if manifest is None or not manifest.get("complete"):
        return None
    reader = load_reader(cfg.identity.world_models_dir)
    roster, bundle = manifest["roster"], manifest["bundle"]

    def score(images: list, characters: list[int]) -> dict[str, float]:
        read = reader.read([np.asarray(image.convert("RGB")) for image in images])
        face, body = [], []
        for values, character in zip(read, characters):
            key_bundle, _, name = store.characters[character].partition("/")
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
