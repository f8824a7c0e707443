"""Training the world's face detector and face/body embedders on renders of training characters.

The embedders learn by metric learning on character ids (CosFace: normalised softmax with an additive margin), never
from the attribute labels, so what they output is an identity embedding, not a list of attributes. Crops are
jittered, flipped, blurred and re-lit so the encoders also hold on VAE-decoded and generated images.

:func:`roc_auc_same_vs_different` is the separation figure used in tests and benchmarks (renders in memory:
:class:`dtback.world.people.WorldSet`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dtback.identity.crops import crop_square
from dtback.world.nets import DetectorConfig, Embedder, EmbedderConfig, FaceDetectorNet, body_crop_boxes, face_crop_boxes
from dtback.world.people import WorldSet

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------- recipes


def check_recipe(recipe: Any, least: dict[str, int], positive: tuple[str, ...] = (), fractions: tuple[str, ...] = (),
                 below_one: tuple[str, ...] = (), multiples: dict[str, int] | None = None) -> None:
    """Refuse a recipe (a dataclass) that cannot train or measure, with a ValueError naming the recipe, the field
    and the value: fields annotated ``int`` must be whole numbers and ``float`` finite ones, each of ``least`` at
    least its bound, ``positive`` above 0, ``fractions`` within [0, 1], ``below_one`` below 1 and ``multiples`` a
    multiple of their number. A recipe's ``__post_init__`` calls it, so a bad one stops before minutes of renders
    (steps 0 trained nothing and recorded NaN losses)."""
    for spec in dataclasses.fields(recipe):
        name, value = spec.name, getattr(recipe, spec.name)
        where = f"{type(recipe).__name__}.{name}={value!r}"
        if spec.type == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{where}: must be a whole number")
        if spec.type == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                     or not math.isfinite(value)):
            raise ValueError(f"{where}: must be a finite number")
        if name in least and value < least[name]:
            raise ValueError(f"{where}: must be at least {least[name]}")
        if name in positive and value <= 0:
            raise ValueError(f"{where}: must be above 0")
        if name in fractions and not 0 <= value <= 1:
            raise ValueError(f"{where}: must be between 0 and 1")
        if name in below_one and value >= 1:
            raise ValueError(f"{where}: must be below 1")
        if multiples and name in multiples and value % multiples[name]:
            raise ValueError(f"{where}: must be a multiple of {multiples[name]}")


# ---------------------------------------------------------------------------------------------------- augmentation


def jitter_boxes(boxes: torch.Tensor, gen: torch.Generator, shift: float = 0.08, scale: float = 0.1) -> torch.Tensor:
    """Move and resize ``(B, 4)`` boxes by up to ``shift`` of their size and ``scale`` (as detector error does)."""
    size = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2 + (torch.rand(len(boxes), 2, generator=gen) * 2 - 1) * shift * size
    size = size * (1 + (torch.rand(len(boxes), 1, generator=gen) * 2 - 1) * scale)
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


def photometric(pixels: torch.Tensor, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random flip (when ``flip``), blur (down- and up-sampling, as a VAE round trip softens) and gain on
    ``(B, 3, H, W)``."""
    batch, _, height, width = pixels.shape
    if flip:
        flips = torch.rand(batch, generator=gen) < 0.5
        pixels = torch.where(flips[:, None, None, None], pixels.flip(-1), pixels)
    factor = float(torch.empty(1).uniform_(0.4, 1.0, generator=gen))
    if factor < 0.9:
        small = F.interpolate(pixels, scale_factor=factor, mode="bilinear", antialias=True, align_corners=False)
        blurred = F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
        pick = torch.rand(batch, generator=gen) < 0.5
        pixels = torch.where(pick[:, None, None, None], blurred, pixels)
    gain = 1 + (torch.rand(batch, 3, 1, 1, generator=gen) * 2 - 1) * 0.06
    return (pixels * gain).clamp(0, 1)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: float = 0.05) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate: linear warm-up over ``warmup`` of the steps, then cosine decay to zero."""
    warm = max(1, int(steps * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer,
                   sched: torch.optim.lr_scheduler.LRScheduler) -> float:
    """One step: backward, optimizer and scheduler; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def training_history(losses: list[float], start: float, cpu_start: float, **settings: Any) -> dict[str, Any]:
    """What a training run recorded: wall and CPU seconds (CPU time is what one core costs, whatever else runs on
    the machine), the settings, and the mean loss of the first and last 10 steps."""
    return {"seconds": round(time.perf_counter() - start, 1), "cpu_seconds": round(time.process_time() - cpu_start, 1),
            **settings, "loss_first": round(float(np.mean(losses[:10])), 4),
            "loss_last": round(float(np.mean(losses[-10:])), 4)}


# ------------------------------------------------------------------------------------------------------ embedders


CropFn = Callable[[torch.Tensor], torch.Tensor]
CROP_BOXES: dict[str, CropFn] = {"face": face_crop_boxes, "body": body_crop_boxes}


def cosface_logits(embeddings: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, scale: float = 16.0,
                   margin: float = 0.25) -> torch.Tensor:
    """CosFace logits ``scale · (cos(e, w_c) − margin · [c = label])``: ``embeddings (B, D)`` of unit norm,
    ``weight (C, D)`` one row per character, ``labels (B,)`` -> ``(B, C)``."""
    cos = embeddings @ F.normalize(weight, dim=-1).T
    return scale * (cos - margin * F.one_hot(labels, weight.shape[0]))


def sample_batch(labels: torch.Tensor, classes: int, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """``classes`` characters x ``per_class`` of their images (P x K sampling), as image indices ``(P·K,)``."""
    n_chars = int(labels.max()) + 1
    chosen = torch.randperm(n_chars, generator=gen)[:classes]
    out = []
    for c in chosen.tolist():
        idx = torch.nonzero(labels == c).flatten()
        out.append(idx[torch.randint(len(idx), (per_class,), generator=gen)])
    return torch.cat(out)


def train_embedder(kind: str, world: WorldSet, config: EmbedderConfig, steps: int, batch: int = 96,
                   lr: float = 3e-3, seed: int = 0, progress: bool = True) -> tuple[Embedder, dict[str, Any]]:
    """Train a ``kind`` ("face" or "body") embedder on ``world`` by CosFace over its characters.

    Returns the network (eval mode, frozen) and a history: seconds, first/last loss.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = Embedder(config)
    n_classes = int(world.labels.max()) + 1
    weight = torch.nn.Parameter(torch.randn(n_classes, config.dim) * 0.01)
    opt = torch.optim.AdamW([*net.parameters(), weight], lr=lr, weight_decay=5e-4)
    sched = warmup_cosine(opt, steps)
    per_class = 4
    losses, start, cpu_start = [], time.perf_counter(), time.process_time()
    net.train()
    for _ in tqdm(range(steps), desc=f"world {kind} encoder", unit="step", disable=not progress):
        index = sample_batch(world.labels, max(2, batch // per_class), per_class, gen)
        boxes = CROP_BOXES[kind](jitter_boxes(world.face_boxes[index], gen))
        crops = photometric(crop_square(world.pixels(index, gen), boxes, config.size), gen)
        loss = F.cross_entropy(cosface_logits(net(crops), weight, world.labels[index]), world.labels[index])
        losses.append(optimizer_step(loss, opt, sched))
    history = training_history(losses, start, cpu_start, steps=steps, batch=batch)
    return net.eval().requires_grad_(False), history


def roc_auc_same_vs_different(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """ROC AUC of cosine similarity for "same character" vs "different character" over all image pairs."""
    from sklearn.metrics import roc_auc_score

    emb = F.normalize(embeddings.float(), dim=-1)
    sim = emb @ emb.T
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    same = (labels[:, None] == labels[None, :])[upper]
    return float(roc_auc_score(same.numpy(), sim[upper].numpy()))


# ------------------------------------------------------------------------------------------------------- detector


def detector_targets(boxes: torch.Tensor, config: DetectorConfig, input_scale: float) -> tuple[torch.Tensor, ...]:
    """Heatmap ``(B, G, G)`` (Gaussian around the centre cell, sigma of half a cell, plus the face size), regression
    targets ``(B, 4, G, G)`` (log distances in cells) and the regression mask ``(B, G, G)`` (3 x 3 cells around the
    centre)."""
    stride, grid = config.stride, config.size // config.stride
    boxes = boxes * input_scale
    centres = (torch.arange(grid, dtype=torch.float32) + 0.5) * stride
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    bx, by = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    dx, dy = (cx[None] - bx[:, None, None]) / stride, (cy[None] - by[:, None, None]) / stride
    heat = torch.exp(-(dx**2 + dy**2) / (2 * 0.5**2))
    dist = torch.stack([cx[None] - boxes[:, 0, None, None], cy[None] - boxes[:, 1, None, None],
                        boxes[:, 2, None, None] - cx[None], boxes[:, 3, None, None] - cy[None]], dim=1)
    mask = (dx.abs() <= 1.0) & (dy.abs() <= 1.0) & (dist.amin(dim=1) > 0)
    return heat, torch.log(dist.clamp(min=0.5) / stride), mask


def train_detector(world: WorldSet, config: DetectorConfig, steps: int, batch: int = 32, lr: float = 3e-3,
                   seed: int = 0, progress: bool = True) -> tuple[FaceDetectorNet, dict[str, Any]]:
    """Train the face detector on whole renders and their face boxes. Returns the net (eval, frozen) and history."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = FaceDetectorNet(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = warmup_cosine(opt, steps)
    scale = config.size / world.images.shape[-1]
    losses, start, cpu_start = [], time.perf_counter(), time.process_time()
    net.train()
    for _ in tqdm(range(steps), desc="world face detector", unit="step", disable=not progress):
        index = torch.randint(len(world), (batch,), generator=gen)
        pixels = world.pixels(index, gen)
        boxes = world.face_boxes[index].clone()
        flip = torch.rand(batch, generator=gen) < 0.5
        width = pixels.shape[-1]
        boxes[flip] = torch.stack([width - boxes[flip, 2], boxes[flip, 1], width - boxes[flip, 0], boxes[flip, 3]], 1)
        pixels = torch.where(flip[:, None, None, None], pixels.flip(-1), pixels)
        pixels = photometric(pixels, gen, flip=False)
        if scale != 1:
            pixels = F.interpolate(pixels, size=(config.size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        heat, reg, mask = detector_targets(boxes, config, scale)
        out = net(pixels)
        cls = F.binary_cross_entropy_with_logits(out[:, 0], heat, pos_weight=torch.tensor(20.0))
        reg_loss = (F.smooth_l1_loss(out[:, 1:], reg, reduction="none").sum(1) * mask).sum() / mask.sum().clamp(min=1)
        loss = cls + reg_loss
        losses.append(optimizer_step(loss, opt, sched))
    history = training_history(losses, start, cpu_start, steps=steps, batch=batch)
    return net.eval().requires_grad_(False), history


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of matching rows of ``a`` and ``b`` ``(N, 4)`` -> ``(N,)``."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area = (a[:, 2:] - a[:, :2]).prod(dim=1) + (b[:, 2:] - b[:, :2]).prod(dim=1)
    return inter / (area - inter).clamp(min=1e-6)
