"""The identity world: generated characters with a fixed face and body identity, drawn in varied scenes.

Every character has fixed **face** attributes (skin tone, hair colour, hair style, eye colour, face shape, beard,
glasses) and **body** attributes (top colour, top pattern, trouser colour, build). Every image of a character varies
what identity must survive: position, scale, pose (arms, facing, stance), background scene and lighting. Captions
describe the scene and the pose, never the identity.

Everything is a pure function of the seed: the characters come from ``seed``; image ``j`` of character ``i`` from
``(seed, i, j)`` alone, so images can be drawn in any order, and the same seed always gives the same bytes.

Drawing lives in :mod:`dtback.world.render`; writing folders and ``ensure_world`` in
:mod:`dtback.world.files`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from dtback.world.render import SUPERSAMPLE, apply_lighting, draw_figure, draw_scene, layout_person, mix, shade

# Bump when drawing or attribute tables change: stored world components record the version they were trained on.
WORLD_VERSION = 2

Color = tuple[int, int, int]

SKIN_TONES: dict[str, Color] = {
    "pale": (247, 224, 205), "peach": (236, 186, 148), "tan": (196, 142, 96), "umber": (138, 90, 58),
    "ebony": (80, 52, 36),
}
HAIR_COLOURS: dict[str, Color] = {
    "black": (28, 24, 24), "brown": (110, 66, 28), "blonde": (238, 204, 110), "red": (196, 62, 24),
    "grey": (168, 168, 168), "blue": (48, 92, 214), "pink": (238, 110, 172),
}
HAIR_STYLES = ("short", "long", "spiky", "bun", "mohawk")
EYE_COLOURS: dict[str, Color] = {
    "brown": (92, 52, 18), "blue": (36, 108, 245), "green": (28, 172, 48), "amber": (238, 168, 0),
}
FACE_WIDTHS: dict[str, float] = {"round": 0.96, "oval": 0.72, "square": 0.88}  # face width / face height
TOP_COLOURS: dict[str, Color] = {
    "red": (208, 40, 40), "orange": (242, 140, 30), "yellow": (242, 216, 50), "green": (48, 160, 70),
    "blue": (44, 84, 204), "purple": (132, 58, 172), "white": (242, 242, 242), "black": (34, 34, 40),
    "pink": (240, 128, 180), "teal": (20, 150, 150),
}
TOP_PATTERNS = ("plain", "stripes", "dots", "sash", "split")
TROUSER_COLOURS: dict[str, Color] = {
    "black": (30, 30, 35), "grey": (128, 128, 132), "khaki": (192, 172, 116), "denim": (56, 86, 148),
    "brown": (104, 64, 34), "maroon": (118, 24, 46), "olive": (96, 106, 44),
}
BUILDS: dict[str, float] = {"slim": 0.78, "average": 1.0, "broad": 1.3}  # torso width factor
SHOES: Color = (46, 36, 30)

FACE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "skin_tone": tuple(SKIN_TONES),
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_style": HAIR_STYLES,
    "eye_colour": tuple(EYE_COLOURS),
    "face_shape": tuple(FACE_WIDTHS),
    "beard": ("none", "beard"),
    "glasses": ("none", "glasses"),
}
BODY_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "top_colour": tuple(TOP_COLOURS),
    "top_pattern": TOP_PATTERNS,
    "trouser_colour": tuple(TROUSER_COLOURS),
    "build": tuple(BUILDS),
}
ATTRIBUTES: dict[str, tuple[str, ...]] = {**FACE_ATTRIBUTES, **BODY_ATTRIBUTES}

# Scenes: sky gradient (top, bottom), ground colour, horizon range (fraction of height), props, caption phrase.
SCENES: dict[str, dict[str, Any]] = {
    "beach": {"sky": ((120, 180, 240), (205, 228, 250)), "ground": (232, 212, 160), "horizon": (0.45, 0.6),
              "props": ("sun", "sea"), "phrase": "on a beach"},
    "forest": {"sky": ((150, 200, 232), (212, 232, 222)), "ground": (72, 122, 52), "horizon": (0.5, 0.65),
               "props": ("trees",), "phrase": "in a forest"},
    "city": {"sky": ((160, 190, 222), (222, 222, 228)), "ground": (104, 104, 110), "horizon": (0.55, 0.7),
             "props": ("buildings",), "phrase": "on a city street"},
    "room": {"sky": ((226, 214, 188), (200, 186, 160)), "ground": (150, 110, 72), "horizon": (0.55, 0.72),
             "props": ("room",), "phrase": "in a living room"},
    "snow": {"sky": ((188, 204, 226), (236, 240, 246)), "ground": (246, 248, 252), "horizon": (0.45, 0.6),
             "props": ("pines",), "phrase": "in the snow"},
    "desert": {"sky": ((240, 200, 140), (250, 232, 192)), "ground": (226, 190, 132), "horizon": (0.5, 0.65),
               "props": ("dunes", "sun"), "phrase": "in a desert"},
    "night": {"sky": ((10, 16, 46), (42, 42, 82)), "ground": (36, 46, 40), "horizon": (0.5, 0.65),
              "props": ("moon",), "phrase": "outside at night"},
    "park": {"sky": ((130, 190, 240), (202, 230, 250)), "ground": (100, 170, 72), "horizon": (0.5, 0.65),
             "props": ("bushes", "sun"), "phrase": "in a park"},
}
LIGHTING: dict[str, tuple[tuple[float, float, float], str]] = {
    "daylight": ((1.0, 1.0, 1.0), "in daylight"),
    "warm": ((1.08, 1.0, 0.86), "in warm evening light"),
    "cool": ((0.9, 0.97, 1.08), "in cool overcast light"),
    "dim": ((0.84, 0.84, 0.88), "in dim light"),
    "bright": ((1.1, 1.1, 1.08), "in bright sunshine"),
}
NIGHT_LIGHTING = ("warm", "cool", "dim")
SIDE_LIGHT: dict[float, str] = {0.0: "", -0.12: ", lit from the right", 0.12: ", lit from the left"}
ARMS: dict[str, str] = {"down": "arms at the sides", "up": "arms raised", "out": "arms stretched out",
                        "wave": "waving one hand"}
FACING: dict[str, str] = {"front": "facing the camera", "left": "turned to the left", "right": "turned to the right"}
STANCE: dict[str, str] = {"standing": "standing", "walking": "walking"}
HEIGHT_RANGE = (0.62, 0.92)  # person height as a fraction of the image side


@dataclass(frozen=True)
class Character:
    """One identity: ``index`` in its world, ``name`` (its folder), and attribute name -> value for face and body."""

    index: int
    name: str
    face: dict[str, str]
    body: dict[str, str]

    @property
    def attributes(self) -> dict[str, str]:
        return {**self.face, **self.body}

    @property
    def face_key(self) -> tuple[str, ...]:
        return tuple(self.face[k] for k in FACE_ATTRIBUTES)

    @property
    def body_key(self) -> tuple[str, ...]:
        return tuple(self.body[k] for k in BODY_ATTRIBUTES)

    def look(self) -> dict[str, Any]:
        """Drawing values (colours, shapes, factors) for :func:`~dtback.world.render.layout_person`."""
        top = TOP_COLOURS[self.body["top_colour"]]
        light_top = sum(top) / 3 > 120
        return {
            "skin": SKIN_TONES[self.face["skin_tone"]],
            "hair": HAIR_COLOURS[self.face["hair_colour"]],
            "hair_style": self.face["hair_style"],
            "eyes": EYE_COLOURS[self.face["eye_colour"]],
            "face_shape": self.face["face_shape"],
            "face_width": FACE_WIDTHS[self.face["face_shape"]],
            "beard": self.face["beard"] == "beard",
            "glasses": self.face["glasses"] == "glasses",
            "top": top,
            "accent": shade(top, 0.5) if light_top else mix(top, (255, 255, 255), 0.55),
            "pattern": self.body["top_pattern"],
            "trousers": TROUSER_COLOURS[self.body["trouser_colour"]],
            "build": BUILDS[self.body["build"]],
            "shoes": SHOES,
        }


def character_name(index: int) -> str:
    return f"c{index:04d}"


def sample_characters(
    count: int, seed: int, exclude: Iterable[Character] = (), exclude_bodies: bool = True
) -> list[Character]:
    """``count`` distinct characters drawn from ``seed``.

    No two share their face attributes, and while the world is small enough (at most half of the body
    combinations) no two share their body attributes either, so each is recognisable from the face alone and from
    the body alone. Characters whose face attributes (and, with ``exclude_bodies``, body attributes) equal those of
    a character in ``exclude`` are never drawn: held-out characters for an evaluation are made that way.
    """
    rng = np.random.default_rng([seed, 0])
    exclude = list(exclude)
    banned_faces = {c.face_key for c in exclude}
    banned_bodies = {c.body_key for c in exclude} if exclude_bodies else set()
    n_bodies = int(np.prod([len(v) for v in BODY_ATTRIBUTES.values()]))
    unique_bodies = count + len(banned_bodies) <= n_bodies // 2
    faces, bodies, out = set(banned_faces), set(banned_bodies), []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct characters (seed {seed}, {len(exclude)} excluded)")
        face = {k: v[int(rng.integers(len(v)))] for k, v in FACE_ATTRIBUTES.items()}
        body = {k: v[int(rng.integers(len(v)))] for k, v in BODY_ATTRIBUTES.items()}
        character = Character(index=len(out), name=character_name(len(out)), face=face, body=body)
        if character.face_key in faces or character.body_key in banned_bodies:
            continue
        if unique_bodies and character.body_key in bodies:
            continue
        faces.add(character.face_key)
        bodies.add(character.body_key)
        out.append(character)
    return out


@dataclass(frozen=True)
class WorldImage:
    """A rendered image (``size`` x ``size`` RGB), its caption and its metadata (boxes in output pixels)."""

    image: Image.Image
    caption: str
    meta: dict[str, Any]


def sample_shot(rng: np.random.Generator) -> dict[str, Any]:
    """What one image varies: scene, lighting, side light, pose, person height (fraction of the side), placement."""
    scene = str(rng.choice(list(SCENES)))
    lighting = str(rng.choice(NIGHT_LIGHTING if scene == "night" else list(LIGHTING)))
    return {
        "scene": scene,
        "lighting": lighting,
        "side_light": float(rng.choice(list(SIDE_LIGHT))),
        "pose": {"arms": str(rng.choice(list(ARMS))), "facing": str(rng.choice(list(FACING))),
                 "stance": str(rng.choice(list(STANCE)))},
        "height": float(rng.uniform(*HEIGHT_RANGE)),
        "place": (float(rng.uniform()), float(rng.uniform())),
    }


def caption_for(shot: dict[str, Any]) -> str:
    """Scene and pose in words; never an identity attribute."""
    pose = shot["pose"]
    return (
        f"a person {STANCE[pose['stance']]} {SCENES[shot['scene']]['phrase']}, {ARMS[pose['arms']]}, "
        f"{FACING[pose['facing']]}, {LIGHTING[shot['lighting']][1]}{SIDE_LIGHT[shot['side_light']]}"
    )


def render_image(character: Character, image_index: int, size: int, seed: int) -> WorldImage:
    """Image ``image_index`` of ``character`` at ``size`` px: a function of (seed, character, image_index) only."""
    rng = np.random.default_rng([seed, 1, character.index, image_index])
    shot = sample_shot(rng)
    figure = layout_person(character.look(), shot["pose"])
    x0, y0, x1, y1 = figure.extent
    scale = min(shot["height"] * size / (y1 - y0), 0.96 * size / (x1 - x0))  # output px per head unit
    lo_x, hi_x = 1 - x0 * scale, size - 1 - x1 * scale
    lo_y, hi_y = 1 - y0 * scale, size - 1 - y1 * scale
    ox = lo_x + shot["place"][0] * max(0.0, hi_x - lo_x)
    oy = lo_y + (0.4 + 0.6 * shot["place"][1]) * max(0.0, hi_y - lo_y)  # feet rather low: people stand on ground

    canvas, draw = draw_scene(SCENES[shot["scene"]], rng, size * SUPERSAMPLE)
    draw_figure(draw, figure, scale * SUPERSAMPLE, (ox * SUPERSAMPLE, oy * SUPERSAMPLE))
    image = apply_lighting(canvas.reduce(SUPERSAMPLE), LIGHTING[shot["lighting"]][0], shot["side_light"])

    def to_px(box: Sequence[float]) -> list[float]:
        return [round(ox + box[0] * scale, 2), round(oy + box[1] * scale, 2),
                round(ox + box[2] * scale, 2), round(oy + box[3] * scale, 2)]

    caption = caption_for(shot)
    meta = {
        "character": character.name,
        "image_index": image_index,
        "size": size,
        "face_box": to_px(figure.face),
        "body_box": to_px(figure.extent),
        "attributes": {"face": dict(character.face), "body": dict(character.body)},
        "scene": shot["scene"],
        "lighting": shot["lighting"],
        "side_light": shot["side_light"],
        "pose": shot["pose"],
        "caption": caption,
        "world_version": WORLD_VERSION,
    }
    return WorldImage(image=image, caption=caption, meta=meta)


def render_arrays(
    characters: Sequence[Character], per_character: int, size: int, seed: int, first_image: int = 0
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """In-memory renders for training world components: ``(N, size, size, 3)`` uint8 with N = characters x
    per_character (character-major), and the metadata of each image."""
    images = np.empty((len(characters) * per_character, size, size, 3), dtype=np.uint8)
    metas = []
    for i, character in enumerate(characters):
        for j in range(per_character):
            rendered = render_image(character, first_image + j, size, seed)
            images[i * per_character + j] = np.asarray(rendered.image)
            metas.append(rendered.meta)
    return images, metas


def identity_words() -> set[str]:
    """Every word of every attribute value: a caption must contain none of them."""
    return {word for values in ATTRIBUTES.values() for value in values for word in value.lower().split("-")}


# ------------------------------------------------------------------------------------------ renders in memory


@dataclass
class WorldSet:
    """Renders in memory: ``images (N, 3, S, S)`` uint8, ``face_boxes``/``body_boxes (N, 4)`` float pixels,
    ``labels (N,)`` character index within ``characters``, and the per-image metadata.

    ``decoded`` optionally holds the same images after a VAE round trip (uint8, same shape): training draws from
    them too, so that encoders and reader also work on decoded latents, which is what the identity loss and the
    evaluation of generated images see."""

    images: torch.Tensor
    face_boxes: torch.Tensor
    body_boxes: torch.Tensor
    labels: torch.Tensor
    characters: list[Character]
    metas: list[dict[str, Any]]
    decoded: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def pixels(self, index: torch.Tensor, gen: torch.Generator | None = None,
               decoded_share: float = 0.5) -> torch.Tensor:
        """``(B, 3, S, S)`` float in [0, 1] for the given image indices. With ``gen`` and :attr:`decoded`, each
        image is its VAE round trip with probability ``decoded_share``."""
        images = self.images[index]
        if gen is not None and self.decoded is not None:
            pick = torch.rand(len(index), generator=gen) < decoded_share
            images = torch.where(pick[:, None, None, None], self.decoded[index], images)
        return images.float() / 255.0


def render_world_set(characters: Sequence[Character], per_character: int, size: int, seed: int) -> WorldSet:
    """Render ``per_character`` images of each character (character-major order)."""
    images, metas = render_arrays(characters, per_character, size, seed)
    return WorldSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        face_boxes=torch.tensor([m["face_box"] for m in metas], dtype=torch.float32),
        body_boxes=torch.tensor([m["body_box"] for m in metas], dtype=torch.float32),
        labels=torch.arange(len(characters)).repeat_interleave(per_character),
        characters=list(characters),
        metas=metas,
    )
