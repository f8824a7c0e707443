"""Drawing for the identity world: a cartoon person (head, hair, face, torso, arms, legs) in a simple scene.

A person is first laid out as a list of drawing operations in *head units* (1.0 = the face height, origin at the
point between the feet, y pointing down), so that its extent is known before anything is drawn; the caller then
picks the pixel scale and position. Everything is drawn at ``SUPERSAMPLE`` times the output size with PIL's
``ImageDraw`` and box-filtered down, which gives smooth edges at about 3 ms per 128 px image on one core.

Colours and proportions come from :mod:`dtback.world.people` (the attribute tables); this module only draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

SUPERSAMPLE = 2
Color = tuple[int, int, int]
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Op:
    """One drawing operation in head units: ``kind`` is ellipse | polygon | line | rect | chord | rrect."""

    kind: str
    points: tuple[float, ...]
    fill: Color
    width: float = 0.0  # line width (head units) for ``line``; corner radius for ``rrect``
    extra: tuple[float, ...] = ()  # chord start/end angles

    def bounds(self) -> Box:
        xs, ys = self.points[0::2], self.points[1::2]
        pad = self.width / 2 if self.kind == "line" else 0.0
        return min(xs) - pad, min(ys) - pad, max(xs) + pad, max(ys) + pad


@dataclass(frozen=True)
class Figure:
    """A laid-out person: drawing ops (back to front), its face box and its whole extent, all in head units."""

    ops: tuple[Op, ...]
    face: Box
    extent: Box


def mix(color: Color, other: Color, t: float) -> Color:
    """Linear blend ``(1 - t) · color + t · other``."""
    return tuple(int(round(a + (b - a) * t)) for a, b in zip(color, other))  # type: ignore[return-value]


def shade(color: Color, factor: float) -> Color:
    """``color · factor`` clipped to 0..255 (darker below 1, lighter above)."""
    return tuple(int(min(255, max(0, round(c * factor)))) for c in color)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ the person


def layout_person(look: dict[str, Any], pose: dict[str, str]) -> Figure:
    """Lay out one person. ``look`` holds resolved drawing values (colours, shapes, build factor); ``pose`` holds
    ``arms`` (down | up | out | wave), ``facing`` (front | left | right) and ``stance`` (standing | walking)."""
    ops: list[Op] = []
    build = look["build"]
    face_w = look["face_width"]
    # Vertical positions (y grows downward, feet at 0): shoes, legs, torso, neck, face.
    leg_len, torso_h, neck_h = 1.3, 1.15, 0.1
    hip_y = -0.12 - leg_len
    shoulder_y = hip_y - torso_h
    face_bottom = shoulder_y - neck_h + 0.03
    face_top = face_bottom - 1.0
    face = (-face_w / 2, face_top, face_w / 2, face_bottom)
    torso_w = 1.2 * build
    turn = {"front": 0.0, "left": -1.0, "right": 1.0}[pose["facing"]]

    _back_hair(ops, look, face)
    _legs(ops, look, pose, hip_y, torso_w, turn)
    _torso(ops, look, shoulder_y, hip_y, torso_w)
    _arms(ops, look, pose, shoulder_y, torso_w)
    ops.append(Op("rect", (-0.14, shoulder_y - neck_h - 0.05, 0.14, shoulder_y + 0.05), look["skin"]))
    _face(ops, look, face, turn)
    _front_hair(ops, look, face)

    boxes = [op.bounds() for op in ops]
    extent = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
    return Figure(ops=tuple(ops), face=face, extent=extent)


def _legs(ops: list[Op], look: dict, pose: dict, hip_y: float, torso_w: float, turn: float) -> None:
    leg_w = 0.3 * math.sqrt(look["build"])
    spread = 0.2 if pose["stance"] == "walking" else 0.0
    for side in (-1, 1):
        top_x = side * torso_w * 0.22
        foot_x = top_x + side * spread
        ops.append(Op("line", (top_x, hip_y, foot_x, -0.1), look["trousers"], width=leg_w))
        toe = turn * 0.12 if turn else side * 0.05
        ops.append(Op("ellipse", (foot_x - 0.2 + toe, -0.16, foot_x + 0.2 + toe, 0.02), look["shoes"]))
    ops.append(Op("rect", (-torso_w * 0.22 - leg_w / 2, hip_y - 0.05, torso_w * 0.22 + leg_w / 2, hip_y + 0.2),
                  look["trousers"]))


def _torso(ops: list[Op], look: dict, top: float, bottom: float, width: float) -> None:
    half, waist = width / 2, width / 2 * 0.86
    color = look["top"]
    ops.append(Op("polygon", (-half, top + 0.05, half, top + 0.05, waist, bottom, -waist, bottom), color))
    ops.append(Op("ellipse", (-half, top - 0.05, half, top + 0.25), color))
    pattern, accent = look["pattern"], look["accent"]
    height = bottom - top
    if pattern == "stripes":
        for i in range(4):
            y = top + 0.18 + i * height * 0.23
            ops.append(Op("rect", (-waist * 0.98, y, waist * 0.98, y + height * 0.1), accent))
    elif pattern == "dots":
        for row in range(3):
            for col in range(3):
                x = (col - 1) * waist * 0.6
                y = top + 0.28 + row * height * 0.28
                ops.append(Op("ellipse", (x - 0.07, y - 0.07, x + 0.07, y + 0.07), accent))
    elif pattern == "split":
        ops.append(Op("polygon", (0, top + 0.05, half, top + 0.05, waist, bottom, 0, bottom), accent))
    elif pattern == "sash":
        ops.append(Op("polygon", (-half * 0.95, top + 0.1, -half * 0.55, top + 0.05, waist * 0.95, bottom - 0.3,
                                  waist * 0.95, bottom - 0.02), accent))


def _arms(ops: list[Op], look: dict, pose: dict, shoulder_y: float, torso_w: float) -> None:
    arm_w = 0.24 * math.sqrt(look["build"])
    angles = {  # degrees from straight down, positive outward; (left arm, right arm) as seen in the image
        "down": (12, 12), "up": (150, 150), "out": (88, 88), "wave": (12, 145),
    }[pose["arms"]]
    length = 1.2
    for side, angle in zip((-1, 1), angles):
        sx, sy = side * (torso_w / 2 - arm_w * 0.3), shoulder_y + arm_w * 0.55
        rad = math.radians(angle)
        ex, ey = sx + side * length * math.sin(rad), sy + length * math.cos(rad)
        ops.append(Op("line", (sx, sy, ex, ey), look["top"], width=arm_w))
        hand = arm_w * 0.62
        ops.append(Op("ellipse", (ex - hand, ey - hand, ex + hand, ey + hand), look["skin"]))


def _face(ops: list[Op], look: dict, face: Box, turn: float) -> None:
    x1, y1, x2, y2 = face
    width = x2 - x1
    skin = look["skin"]
    if look["face_shape"] == "square":
        ops.append(Op("rrect", face, skin, width=0.1))  # corner radius: a square jaw
    else:
        ops.append(Op("ellipse", face, skin))
    cx = (x1 + x2) / 2 + turn * 0.12 * width
    if look["beard"]:
        ops.append(Op("chord", (x1, y1 + 0.2, x2, y2), look["hair"], extra=(15, 165)))
        ops.append(Op("rect", (cx - 0.2 * width, y1 + 0.66, cx + 0.2 * width, y1 + 0.74), look["hair"]))
    eye_y, eye_dx, eye_w, eye_h = y1 + 0.47, 0.22 * width, 0.2 * width, 0.17
    iris = 0.075
    for side in (-1, 1):
        ex = cx + side * eye_dx
        ops.append(Op("rect", (ex - eye_w * 0.55, eye_y - 0.19, ex + eye_w * 0.55, eye_y - 0.14), look["hair"]))
        white = (ex - eye_w / 2, eye_y - eye_h / 2, ex + eye_w / 2, eye_y + eye_h / 2)
        ops.append(Op("ellipse", white, (250, 250, 250)))
        ix = ex + turn * 0.03
        ops.append(Op("ellipse", (ix - iris, eye_y - iris, ix + iris, eye_y + iris), look["eyes"]))
    if look["glasses"]:
        frame = (25, 25, 30)
        for side in (-1, 1):
            ex = cx + side * eye_dx
            ops.append(Op("line", (ex - eye_w * 0.7, eye_y - 0.12, ex + eye_w * 0.7, eye_y - 0.12), frame, width=0.045))
            ops.append(Op("line", (ex - eye_w * 0.7, eye_y + 0.12, ex + eye_w * 0.7, eye_y + 0.12), frame, width=0.045))
            for dx in (-0.7, 0.7):
                x = ex + dx * eye_w
                ops.append(Op("line", (x, eye_y - 0.12, x, eye_y + 0.12), frame, width=0.045))
        ops.append(Op("line", (cx - eye_dx + eye_w * 0.7, eye_y - 0.05, cx + eye_dx - eye_w * 0.7, eye_y - 0.05), frame,
                      width=0.04))
    ops.append(Op("line", (cx + turn * 0.04, y1 + 0.55, cx + turn * 0.08, y1 + 0.64), shade(skin, 0.75), width=0.05))
    ops.append(Op("line", (cx - 0.12 * width, y1 + 0.79, cx + 0.12 * width, y1 + 0.79), (150, 40, 50), width=0.05))


def _back_hair(ops: list[Op], look: dict, face: Box) -> None:
    x1, y1, x2, _ = face
    if look["hair_style"] == "long":
        pad = 0.13
        ops.append(Op("rrect", (x1 - pad, y1 - 0.08, x2 + pad, y1 + 1.45), look["hair"], width=0.25))


def _front_hair(ops: list[Op], look: dict, face: Box) -> None:
    x1, y1, x2, _ = face
    style, hair = look["hair_style"], look["hair"]
    cx, width = (x1 + x2) / 2, x2 - x1
    if style == "mohawk":
        ops.append(Op("rrect", (cx - 0.13 * width, y1 - 0.28, cx + 0.13 * width, y1 + 0.25), hair, width=0.08))
        return
    ops.append(Op("chord", (x1 - 0.05, y1 - 0.1, x2 + 0.05, y1 + 0.62), hair, extra=(180, 360)))
    if style == "spiky":
        for i in range(5):
            bx = x1 + (i + 0.5) * width / 5
            ops.append(Op("polygon", (bx - 0.12, y1 + 0.02, bx + 0.12, y1 + 0.02, bx, y1 - 0.32), hair))
    elif style == "bun":
        ops.append(Op("ellipse", (cx - 0.22, y1 - 0.42, cx + 0.22, y1 - 0.0), hair))
    elif style == "long":
        for side in (-1, 1):
            edge = x1 - 0.12 if side < 0 else x2 - 0.05
            ops.append(Op("rect", (edge, y1 + 0.15, edge + 0.17, y1 + 1.05), hair))


def draw_figure(draw: ImageDraw.ImageDraw, figure: Figure, scale: float, origin: tuple[float, float]) -> None:
    """Draw ``figure`` with ``scale`` canvas pixels per head unit, its origin (feet) at canvas point ``origin``."""
    ox, oy = origin

    def pts(values: Sequence[float]) -> list[float]:
        return [ox + v * scale if i % 2 == 0 else oy + v * scale for i, v in enumerate(values)]

    for op in figure.ops:
        p = pts(op.points)
        if op.kind == "ellipse":
            draw.ellipse(p, fill=op.fill)
        elif op.kind == "rect":
            draw.rectangle(p, fill=op.fill)
        elif op.kind == "polygon":
            draw.polygon(p, fill=op.fill)
        elif op.kind == "line":
            width = max(1, int(round(op.width * scale)))
            draw.line(p, fill=op.fill, width=width)
            if width > 3:  # round caps so limbs do not end in square stubs
                r = width / 2
                for x, y in (p[0:2], p[-2:]):
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=op.fill)
        elif op.kind == "rrect":
            draw.rounded_rectangle(p, radius=max(1, op.width * scale), fill=op.fill)
        elif op.kind == "chord":
            draw.chord(p, op.extra[0], op.extra[1], fill=op.fill)
        else:
            raise ValueError(f"unknown drawing op {op.kind!r}")


# ------------------------------------------------------------------------------------------------------- the scene


@lru_cache(maxsize=64)
def _gradient(top: Color, bottom: Color, size: int) -> Image.Image:
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rows = (np.array(top, np.float32) * (1 - t) + np.array(bottom, np.float32) * t).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows, (size, size, 3))))


def draw_scene(scene: dict[str, Any], rng: np.random.Generator, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A ``size`` x ``size`` canvas with the scene's sky gradient, ground and a few props (trees, buildings, ...)."""
    image = _gradient(scene["sky"][0], scene["sky"][1], size).copy()
    draw = ImageDraw.Draw(image)
    horizon = size * float(rng.uniform(*scene["horizon"]))
    draw.rectangle((0, horizon, size, size), fill=scene["ground"])
    for prop in scene["props"]:
        _PROPS[prop](draw, rng, size, horizon)
    return image, draw


def _sun(draw, rng, size, horizon) -> None:
    x, y, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.25) * size, size * 0.06
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(255, 235, 150))


def _moon(draw, rng, size, horizon) -> None:
    x, y, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.05, 0.2) * size, size * 0.05
    draw.ellipse((x - r, y - r, x + r, y + r), fill=(235, 235, 210))
    for _ in range(14):
        sx, sy = rng.uniform(0, size), rng.uniform(0, horizon)
        draw.rectangle((sx, sy, sx + size / 128, sy + size / 128), fill=(250, 250, 230))


def _sea(draw, rng, size, horizon) -> None:
    draw.rectangle((0, horizon - size * 0.12, size, horizon), fill=(50, 120, 180))


def _trees(draw, rng, size, horizon) -> None:
    for _ in range(int(rng.integers(3, 7))):
        x, h = rng.uniform(0, size), rng.uniform(0.15, 0.35) * size
        base = horizon + rng.uniform(0, 0.05) * size
        draw.rectangle((x - size * 0.015, base - h * 0.3, x + size * 0.015, base), fill=(90, 60, 35))
        green = (int(rng.integers(30, 70)), int(rng.integers(100, 150)), int(rng.integers(30, 70)))
        draw.polygon((x - h * 0.3, base - h * 0.25, x + h * 0.3, base - h * 0.25, x, base - h), fill=green)


def _pines(draw, rng, size, horizon) -> None:
    for _ in range(int(rng.integers(2, 5))):
        x, h = rng.uniform(0, size), rng.uniform(0.15, 0.3) * size
        draw.polygon((x - h * 0.25, horizon, x + h * 0.25, horizon, x, horizon - h), fill=(40, 80, 70))
    for _ in range(20):
        sx, sy = rng.uniform(0, size), rng.uniform(0, size)
        draw.ellipse((sx, sy, sx + size / 90, sy + size / 90), fill=(245, 245, 250))


def _buildings(draw, rng, size, horizon) -> None:
    x = -rng.uniform(0, 0.1) * size
    while x < size:
        w, h = rng.uniform(0.12, 0.25) * size, rng.uniform(0.2, 0.55) * size
        tone = int(rng.integers(90, 170))
        draw.rectangle((x, horizon - h, x + w, horizon), fill=(tone, tone - 10, tone - 20))
        for wy in np.arange(horizon - h + size * 0.04, horizon - size * 0.05, size * 0.08):
            for wx in np.arange(x + size * 0.03, x + w - size * 0.04, size * 0.06):
                draw.rectangle((wx, wy, wx + size * 0.025, wy + size * 0.035), fill=(230, 220, 140))
        x += w + rng.uniform(0.0, 0.05) * size
    draw.rectangle((0, horizon, size, horizon + size * 0.03), fill=(150, 150, 150))


def _room(draw, rng, size, horizon) -> None:
    x, w = rng.uniform(0.05, 0.6) * size, rng.uniform(0.2, 0.3) * size
    top = horizon * rng.uniform(0.15, 0.35)
    draw.rectangle((x, top, x + w, top + w * 0.8), fill=(110, 80, 50))
    draw.rectangle((x + size * 0.015, top + size * 0.015, x + w - size * 0.015, top + w * 0.8 - size * 0.015),
                   fill=(150, 200, 235))
    draw.rectangle((0, horizon - size * 0.02, size, horizon), fill=(120, 100, 80))


def _dunes(draw, rng, size, horizon) -> None:
    for _ in range(3):
        x, w = rng.uniform(-0.2, 1.0) * size, rng.uniform(0.4, 0.8) * size
        draw.chord((x, horizon - size * 0.12, x + w, horizon + size * 0.12), 180, 360, fill=(215, 180, 120))
    x = rng.uniform(0.05, 0.95) * size
    draw.rectangle((x - size * 0.02, horizon - size * 0.2, x + size * 0.02, horizon), fill=(60, 130, 60))


def _bushes(draw, rng, size, horizon) -> None:
    for _ in range(int(rng.integers(2, 5))):
        x, r = rng.uniform(0, size), rng.uniform(0.04, 0.08) * size
        draw.ellipse((x - r * 1.5, horizon - r, x + r * 1.5, horizon + r), fill=(50, 110, 45))
    x = rng.uniform(0.1, 0.8) * size
    draw.rectangle((x, horizon + size * 0.04, x + size * 0.2, horizon + size * 0.06), fill=(120, 80, 40))


_PROPS = {
    "sun": _sun, "moon": _moon, "sea": _sea, "trees": _trees, "pines": _pines, "buildings": _buildings,
    "room": _room, "dunes": _dunes, "bushes": _bushes,
}


def apply_lighting(image: Image.Image, gain: Sequence[float], side: float) -> Image.Image:
    """Multiply the RGB channels by ``gain`` (3,) and by a horizontal ramp ``1 ± side`` (light from one side)."""
    pixels = np.asarray(image, dtype=np.float32)
    width = pixels.shape[1]
    ramp = 1.0 + side * np.linspace(-1.0, 1.0, width, dtype=np.float32)
    factor = ramp[None, :, None] * np.asarray(gain, dtype=np.float32)[None, None, :]
    return Image.fromarray(np.clip(pixels * factor + 0.5, 0, 255).astype(np.uint8))
