"""The small networks of the identity world: face detector, face embedder, body embedder, and their crop boxes.

All take pixels as ``(B, 3, H, W)`` float tensors in [0, 1] (RGB), so the trainer can put its identity loss through
them. Sizes live in small dataclasses saved next to the weights (safetensors + JSON), as in
``save_pretrained``/``from_pretrained``.

Crop geometry (all in pixels of the image the boxes refer to; the face box is the skin area, forehead to chin):

Crops are cut by :func:`dtback.identity.crops.crop_square` (differentiable).

- face crop: a square of side ``1.5 h`` centred at ``(cx, y1 + 0.3 h)``, which holds hair, bun and beard;
- body crop: a square around the person region ``cx ± 2.8 w``, ``y1 − 0.5 h`` to ``y1 + 3.8 h`` (world people are
  about 3.7 face heights tall and reach 2.8 face widths sideways with their arms out).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dtback.errors import MissingModelError
from dtback.io import atomic_path, safetensors_problem

Net = TypeVar("Net", bound=nn.Module)
FACE_CROP_SIDE, FACE_CROP_CENTRE = 1.5, 0.3
BODY_HALF_WIDTH, BODY_TOP, BODY_BOTTOM = 2.8, 0.5, 3.8


# ---------------------------------------------------------------------------------------------------------- crops


def face_crop_boxes(face_boxes: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` face boxes -> ``(B, 4)`` square face-crop boxes (see the module docstring)."""
    x1, y1, x2, y2 = face_boxes.unbind(-1)
    h = (y2 - y1).clamp(min=1.0)
    cx, cy, half = (x1 + x2) / 2, y1 + FACE_CROP_CENTRE * h, FACE_CROP_SIDE * h / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=-1)


def body_crop_boxes(face_boxes: torch.Tensor) -> torch.Tensor:
    """``(B, 4)`` face boxes -> ``(B, 4)`` person boxes (squared later by :func:`crop_square`)."""
    x1, y1, x2, y2 = face_boxes.unbind(-1)
    w, h = (x2 - x1).clamp(min=1.0), (y2 - y1).clamp(min=1.0)
    cx = (x1 + x2) / 2
    left, right = cx - BODY_HALF_WIDTH * w, cx + BODY_HALF_WIDTH * w
    return torch.stack([left, y1 - BODY_TOP * h, right, y1 + BODY_BOTTOM * h], dim=-1)


# ------------------------------------------------------------------------------------------------------- networks


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class ConvTrunk(nn.Module):
    """Stride-2 conv stages: ``(B, 3, H, W)`` in [0, 1] -> ``(B, widths[-1], H / 2^n, W / 2^n)``."""

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        chans = (3, *widths)
        self.stages = nn.Sequential(*[_stage(a, b, 2) for a, b in zip(chans[:-1], chans[1:])])

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.stages(pixels * 2 - 1)


@dataclass(frozen=True)
class EmbedderConfig:
    """An embedder: input ``size`` (square), trunk ``widths``, embedding ``dim``."""

    size: int
    widths: tuple[int, ...]
    dim: int


class Embedder(nn.Module):
    """Crops ``(B, 3, S, S)`` in [0, 1] (resized to ``config.size`` when S differs) -> ``pooled (B, D)`` with unit
    norm and ``tokens (B, N, D)`` (the last feature map, N = (size / 2^stages)^2)."""

    config_class = EmbedderConfig

    def __init__(self, config: EmbedderConfig):
        super().__init__()
        self.config = config
        self.trunk = ConvTrunk(config.widths)
        self.to_tokens = nn.Conv2d(config.widths[-1], config.dim, 1)
        self.head = nn.Sequential(nn.Linear(config.widths[-1], config.dim), nn.BatchNorm1d(config.dim))

    def features(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if pixels.shape[-1] != self.config.size or pixels.shape[-2] != self.config.size:
            pixels = F.interpolate(pixels, size=(self.config.size,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        fmap = self.trunk(pixels)
        pooled = F.normalize(self.head(fmap.mean(dim=(2, 3))), dim=-1)
        tokens = self.to_tokens(fmap).flatten(2).transpose(1, 2)
        return pooled, tokens

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, D)`` unit-norm embeddings."""
        return self.features(pixels)[0]


@dataclass(frozen=True)
class DetectorConfig:
    """Face detector: images are resized to ``size`` (square) and scored on a grid of ``2^len(widths)`` px cells."""

    size: int
    widths: tuple[int, ...]

    @property
    def stride(self) -> int:
        return 2 ** len(self.widths)


class FaceDetectorNet(nn.Module):
    """``(B, 3, size, size)`` in [0, 1] -> ``(B, 5, G, G)``: a face-centre logit and the log distances (in cells)
    from the cell centre to the box's left, top, right and bottom edges (FCOS-style, one cell per face centre)."""

    config_class = DetectorConfig

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.trunk = ConvTrunk(config.widths)
        width = config.widths[-1]
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(inplace=True),
                                  nn.Conv2d(width, 5, 1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(pixels))

    def decode(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 5, G, G)`` -> scores ``(B, G*G)`` in [0, 1] and boxes ``(B, G*G, 4)`` in detector-input pixels."""
        batch, _, grid, _ = output.shape
        stride = self.config.stride
        centres = (torch.arange(grid, device=output.device, dtype=output.dtype) + 0.5) * stride
        cy, cx = torch.meshgrid(centres, centres, indexing="ij")
        dist = output[:, 1:].exp() * stride  # (B, 4, G, G)
        boxes = torch.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], dim=-1)
        return torch.sigmoid(output[:, 0]).flatten(1), boxes.flatten(1, 2)


# ------------------------------------------------------------------------------------------------- saving/loading


def save_net(net: nn.Module, folder: Path, name: str, info: dict[str, Any]) -> None:
    """``<folder>/<name>.safetensors`` (weights, buffers included) and ``<name>.json`` (class, config, ``info``).
    ``net.config`` must be a dataclass.

    Both files are written whole under temporary names first and renamed only then, so a kill while writing leaves
    the old pair; both carry the same build id (the weights in their safetensors metadata), so the pair a kill
    between the two renames leaves is refused by :func:`load_net` instead of loading with another build's figures."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    build = uuid.uuid4().hex
    description = {"class": type(net).__name__, "config": asdict(net.config), **info, "build": build}
    with atomic_path(Path(folder) / f"{name}.safetensors") as weights, \
            atomic_path(Path(folder) / f"{name}.json") as meta:
        save_file(state, str(weights), metadata={"build": build})
        meta.write_text(json.dumps(description, indent=1) + "\n", encoding="utf-8")


def load_net(folder: Path, name: str, cls: type[Net]) -> tuple[Net, dict[str, Any]]:
    """Inverse of :func:`save_net` for a network class with a ``config_class``: the network in eval mode, frozen,
    and the JSON it was saved with."""
    meta_path, weights = Path(folder) / f"{name}.json", Path(folder) / f"{name}.safetensors"
    if not meta_path.is_file() or not weights.is_file():
        raise MissingModelError(f"world component {name!r} not found in {folder} (need {meta_path.name} and "
                                f"{weights.name}); build it with `dtback world-components --out {folder}`")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta["class"] != cls.__name__:
            raise ValueError(f"holds a {meta['class']}, expected a {cls.__name__}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()}
        config = cls.config_class(**fields)
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"{type(err).__name__}: {err}"
        raise MissingModelError(f"{meta_path}: not a world component description ({problem})") from None
    rebuild = f"rebuild it with `dtback world-components --out {folder}`"
    problem = safetensors_problem(weights)
    if problem is None and "build" in meta:  # components saved before build ids have none: nothing to compare
        with safe_open(str(weights), "pt") as handle:
            theirs = (handle.metadata() or {}).get("build")
        if theirs != meta["build"]:
            problem = f"and {meta_path.name} are of different builds (a build stopped between saving them)"
    net = cls(config)
    if problem is None:
        try:
            net.load_state_dict(load_file(str(weights)))
        except (RuntimeError, SafetensorError) as err:
            # torch lists every missing, extra or misshapen tensor over many lines: the first says enough
            details = " ".join(str(err).split()).split(f"for {cls.__name__}: ", 1)[-1].split(". ")
            problem = f"its tensors do not fit the {cls.__name__} of {meta_path.name} ({details[0]}" + \
                (f"; and {len(details) - 1} more)" if len(details) > 1 else ")")
    if problem is not None:
        raise MissingModelError(f"{weights} {problem}; {rebuild}" if problem.startswith("and ") else
                                f"{weights}: {problem}; {rebuild}")
    return net.eval().requires_grad_(False), meta
