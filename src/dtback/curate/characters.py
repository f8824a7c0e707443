"""The builder's characters on disk: ``<data_dir>/<bundle>/<character>/`` with images, ``character.json`` and a
contact sheet.

``character.json`` lists every image the builder placed there, in order, with where it came from and what was
measured::

    {"format": "dtback-character", "version": 1, "bundle": "built_000", "character": "person_0001",
     "encoder": {"id": "dlib-resnet-v1:...", "cache_namespace": "..."},
     "images": [
      {"file": "IMG_0412_3fa2b1c0.jpg", "embedding_id": "<sha256 of the file>", "source": "/photos/IMG_0412.jpg",
       "frame_time": null, "face_box": [x1, y1, x2, y2], "body_box": [left, top, right, bottom],
       "face_score": 1.2, "num_faces": 1, "sharpness": 212.4}, ...]}

Boxes are pixels of the stored image, clipped to it (right/bottom exclusive, as ``PIL.Image.crop``); the body box
is :func:`dtback.identity.body.person_box` of the face box. ``embedding_id`` is the key of the face record in the
builder's embedding cache. The file is the builder's memory: characters without it are not the builder's and are
left alone. ``contact_sheet.png`` shows each image's person crop with its face box, captioned with its number in
the JSON and its file name (as ``dtback dataset fix`` takes it), for a person to check the character at a glance;
the dataset scan skips both files.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from dtback.curate.faces import turn_upright
from dtback.data.images import ImageSkip, load_rgb
from dtback.data.layout import CONTACT_SHEET
from dtback.errors import DatasetError
from dtback.io import atomic_path, write_bytes

CHARACTER_FILE = "character.json"
FORMAT_NAME = "dtback-character"
FORMAT_VERSION = 1
TILE = (128, 192)  # contact sheet tile (width, height): person crops are taller than wide
COLUMNS = 8
FACE_COLOUR = (40, 220, 60)
CAPTION = 13  # px: the strip under each tile with its number and file name
CAPTION_CHARS = 21  # characters of PIL's default font that fit a tile's width
_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif"}


@dataclass(frozen=True)
class PlacedImage:
    """One image of a character, as listed in ``character.json``."""

    file: str
    embedding_id: str
    source: str
    frame_time: float | None
    face_box: list[float]
    body_box: list[int]
    face_score: float
    num_faces: int
    sharpness: float
    rotation: int = 0  # degrees counter-clockwise the source was turned to stand upright; ``file`` is the turned one


@dataclass
class Character:
    """A character folder written by the builder; ``images`` in the order they were added."""

    bundle: str
    name: str
    encoder: dict[str, str]
    images: list[PlacedImage] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.bundle}/{self.name}"

    def folder(self, root: Path) -> Path:
        return root / self.bundle / self.name


def read_characters(root: Path) -> list[Character]:
    """Every builder character under ``root`` (``<bundle>/<character>/character.json``), sorted by bundle and name.

    Raises :class:`DatasetError` naming the file when a ``character.json`` cannot be read.
    """
    characters = []
    for path in sorted(root.glob(f"*/*/{CHARACTER_FILE}")):
        characters.append(_parse(path))
    return characters


def _parse(path: Path) -> Character:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable {CHARACTER_FILE} ({err}); fix it or remove the folder") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{path}: not a {FORMAT_NAME} file (format {found!r})")
    expected = (path.parent.parent.name, path.parent.name)
    if (data.get("bundle"), data.get("character")) != expected:
        raise DatasetError(
            f"{path}: names {data.get('bundle')}/{data.get('character')} but lies in {expected[0]}/{expected[1]}; "
            "rename the folder back or fix the file"
        )
    try:
        images = [PlacedImage(**entry) for entry in data["images"]]
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{path}: malformed image list ({err})") from None
    for number, image in enumerate(images):
        if not _is_own_file(image.file):
            raise DatasetError(
                f"{path}: images[{number}].file: {image.file!r} is not the name of an image in this folder (no "
                "'/', '\\', '..' or absolute path); fix the entry or remove it"
            )
    return Character(bundle=expected[0], name=expected[1], encoder=dict(data.get("encoder", {})), images=images)


def _is_own_file(name: Any) -> bool:
    """Whether ``name`` is a plain file name of an image in the character's folder: corrections delete and move
    these files, so a name reaching elsewhere (``../``, an absolute path) or the folder's own files is refused."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..", CHARACTER_FILE, CONTACT_SHEET)
        and not any(mark in name for mark in ("/", "\\", "\0"))
    )


def write_character(root: Path, character: Character) -> Path:
    """Write ``character.json`` atomically; returns its path."""
    payload: dict[str, Any] = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "bundle": character.bundle,
        "character": character.name,
        "encoder": character.encoder,
    }
    # One line per image keeps the file readable and diffable.
    images = ",\n  ".join(json.dumps(asdict(image)) for image in character.images)
    text = json.dumps(payload, indent=1).removesuffix("\n}") + f',\n "images": [\n  {images}\n ]\n}}\n'
    path = character.folder(root) / CHARACTER_FILE
    write_atomic(path, text.encode("utf-8"))
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole or not at all (:func:`dtback.io.write_bytes`)."""
    write_bytes(path, data)


def copy_atomic(source: Path, dest: Path, link: bool = False) -> None:
    """Copy ``source`` to ``dest`` whole or not at all (:func:`dtback.io.atomic_path`); with ``link``, hard-link
    instead where the file system can."""
    with atomic_path(dest) as tmp:
        if link:
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or no hard links: a copy does the same
                shutil.copyfile(source, tmp)
        else:
            shutil.copyfile(source, tmp)


def new_slots(
    root: Path,
    characters: list[Character],
    count: int,
    bundle_prefix: str,
    character_prefix: str,
    limit: int | None,
    reserved: set[str] = frozenset(),
) -> list[tuple[str, str]]:
    """(bundle, name) for ``count`` new characters: ``<character_prefix>_NNNN`` numbers continue after the highest
    existing one; bundle ``<bundle_prefix>_NNN`` takes up to ``limit`` character folders (None: no limit) before
    the next one is opened. A folder the builder did not make keeps its name (the number is skipped), and so does
    a ``reserved`` key (named by a correction)."""
    pattern = re.compile(rf"{re.escape(character_prefix)}_(\d+)")
    number = max((int(m.group(1)) for c in characters if (m := pattern.fullmatch(c.name))), default=0)
    bundle_pattern = re.compile(rf"{re.escape(bundle_prefix)}_(\d+)")
    index = max((int(m.group(1)) for c in characters if (m := bundle_pattern.fullmatch(c.bundle))), default=0)
    slots: list[tuple[str, str]] = []

    def full(bundle: str) -> bool:
        return limit is not None and _character_folders(root / bundle) + sum(b == bundle for b, _ in slots) >= limit

    for _ in range(count):
        while full(f"{bundle_prefix}_{index:03d}"):
            index += 1
        bundle = f"{bundle_prefix}_{index:03d}"
        number += 1
        while (root / bundle / f"{character_prefix}_{number:04d}").exists() or (
            f"{bundle}/{character_prefix}_{number:04d}" in reserved
        ):
            number += 1
        slots.append((bundle, f"{character_prefix}_{number:04d}"))
    return slots


def _character_folders(bundle: Path) -> int:
    if not bundle.is_dir():
        return 0
    return sum(1 for p in bundle.iterdir() if p.is_dir() and not p.name.startswith("."))


def file_name(source: str, frame_time: float | None, key: str, pixels: Path, rotation: int = 0) -> str:
    """``<source stem>_<first 8 of the key><ext>``; frames add ``_t<milliseconds>``; the extension follows the
    content of ``pixels`` (a JPEG named .png is stored as .jpg); a picture turned upright is written as PNG."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(source).stem)[:40].strip("_") or "image"
    if rotation:
        suffix = "" if frame_time is None else f"_t{round(frame_time * 1000):08d}"
        return f"{stem}{suffix}_{key[:8]}.png"
    if frame_time is not None:
        return f"{stem}_t{round(frame_time * 1000):08d}_{key[:8]}.jpg"
    try:
        with Image.open(pixels) as image:  # header only
            fmt = image.format or ""
    except (OSError, ValueError, SyntaxError):  # it was decoded when read; keep its own suffix if it changed since
        fmt = ""
    return f"{stem}_{key[:8]}{_EXTENSIONS.get(fmt, pixels.suffix.lower() or '.img')}"


def clip_box(box: np.ndarray, size: tuple[int, int]) -> list[float]:
    """(4,) x1, y1, x2, y2 clipped to an image of ``size`` (width, height); detectors may reach past the edge."""
    limits = np.array([size[0], size[1], size[0], size[1]], dtype=np.float64)
    return [round(float(v), 2) for v in np.clip(np.asarray(box, dtype=np.float64), 0, limits)]


def write_contact_sheet(root: Path, character: Character, max_tiles: int) -> Path:
    """Draw up to ``max_tiles`` of the character's images (evenly spread when there are more) as person crops with
    their face box in green, captioned with their number in ``character.json`` and file name; a grid of at most 8
    columns. Returns the PNG path."""
    path = character.folder(root) / CONTACT_SHEET
    write_atomic(path, draw_sheet(character.folder(root), character.images, max_tiles))
    return path


def draw_sheet(folder: Path, images: list[PlacedImage], max_tiles: int) -> bytes:
    """PNG bytes of up to ``max_tiles`` of ``images`` (files relative to ``folder``, or absolute) as captioned tiles."""
    count = len(images)
    chosen = np.unique(np.linspace(0, count - 1, min(count, max_tiles)).round().astype(int)) if count else []
    columns = max(1, min(COLUMNS, len(chosen)))
    rows = max(1, -(-len(chosen) // columns))
    sheet = Image.new("RGB", (columns * TILE[0], rows * TILE[1]), (255, 255, 255))
    for slot, index in enumerate(chosen):
        tile = _tile(folder, images[index], int(index) + 1)
        sheet.paste(tile, ((slot % columns) * TILE[0], (slot // columns) * TILE[1]))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def _tile(folder: Path, image: PlacedImage, number: int) -> Image.Image:
    """The person crop of one image letterboxed into a TILE, face box drawn, its number and file name below."""
    tile = Image.new("RGB", TILE, (235, 235, 235))
    draw = ImageDraw.Draw(tile)
    try:
        picture = load_rgb(folder / image.file, max_pixels=1 << 31)
        if Path(image.file).is_absolute():  # a source (the ambiguous sheet): turned as the builder turns it
            picture = turn_upright(picture, image.rotation)
    except ImageSkip as skip:
        draw.text((4, TILE[1] // 2), f"{number}: {skip.reason.value}", fill=(200, 0, 0))
        return tile
    left, top, right, bottom = image.body_box
    crop = picture.crop((left, top, right, bottom))
    scale = min(TILE[0] / crop.width, TILE[1] / crop.height)
    size = (max(1, round(crop.width * scale)), max(1, round(crop.height * scale)))
    offset = ((TILE[0] - size[0]) // 2, (TILE[1] - size[1]) // 2)
    tile.paste(crop.resize(size, Image.Resampling.LANCZOS), offset)
    x1, y1, x2, y2 = image.face_box
    face = [offset[0] + (x1 - left) * scale, offset[1] + (y1 - top) * scale]
    face += [offset[0] + (x2 - left) * scale, offset[1] + (y2 - top) * scale]
    draw.rectangle(face, outline=FACE_COLOUR, width=2)
    draw.rectangle((0, TILE[1] - CAPTION, TILE[0], TILE[1]), fill=(0, 0, 0))
    draw.text((2, TILE[1] - CAPTION + 1), tile_caption(number, image.file), fill=(255, 255, 255))
    return tile


def tile_caption(number: int, file: str, width: int = CAPTION_CHARS) -> str:
    """``<number> <file name>``, the start of the name cut (``~``) to fit ``width`` characters: the end, with the
    content key (``_3fa2b1c0.jpg``), is what tells files apart and what ``dtback dataset fix`` matches."""
    text = f"{number} {file}"
    if len(text) <= width:
        return text
    return f"{number} ~{file[-(width - len(str(number)) - 2):]}"
