"""Write an identity world to disk in the standard dataset layout, and generate it on first use.

Layout: ``<out>/<bundle>/<character>/<NNN>.png`` with ``<NNN>.txt`` (caption) and ``<NNN>.json`` (metadata: face
box, body box, attributes, pose, scene, lighting) beside each image, plus ``<out>/world.json`` (the settings and
every character's attributes). Each PNG is written last, through a temporary name, so an interrupted run leaves no
half image: running the same command again skips finished images and completes the world.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dtback.config import DataConfig, WorldConfig
from dtback.data.world import WORLD_VERSION, render_image, sample_characters
from dtback.errors import DatasetError

log = logging.getLogger(__name__)

MANIFEST = "world.json"
# World components (VAE, face/body encoders, reader): shipped with the package, rebuilt by `dtback world-components`.
WORLD_MODELS_ENV = "DTBACK_WORLD_MODELS"
PACKAGED_WORLD_MODELS = Path(__file__).resolve().parents[1] / "assets" / "world"


@dataclass(frozen=True)
class WorldSummary:
    """What :func:`write_world` did: images written now, images already there, seconds spent."""

    root: Path
    written: int
    existing: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def world_settings(cfg: WorldConfig) -> dict[str, Any]:
    """The settings that determine a world's bytes (stored in ``world.json`` and compared on resume)."""
    return {
        "world_version": WORLD_VERSION,
        "seed": cfg.seed,
        "characters": cfg.characters,
        "images_per_character": cfg.images_per_character,
        "size": cfg.size,
        "bundle": cfg.bundle,
    }


def write_world(out: Path, cfg: WorldConfig, progress: bool = True) -> WorldSummary:
    """Render the world described by ``cfg`` into ``out`` (created; resumed when it holds the same world)."""
    out = Path(out)
    settings = world_settings(cfg)
    _check_resumable(out, settings)
    characters = sample_characters(cfg.characters, cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / MANIFEST, {**settings, "complete": False, "roster": {}})

    written = existing = 0
    start = time.perf_counter()
    total = cfg.characters * cfg.images_per_character
    with tqdm(total=total, desc=f"identity world -> {out}", unit="img", disable=not progress) as bar:
        for character in characters:
            folder = out / cfg.bundle / character.name
            folder.mkdir(parents=True, exist_ok=True)
            for j in range(cfg.images_per_character):
                image_path = folder / f"{j:03d}.png"
                if image_path.is_file():
                    existing += 1
                else:
                    _write_image(render_image(character, j, cfg.size, cfg.seed), image_path)
                    written += 1
                bar.update()
    seconds = time.perf_counter() - start
    roster = {c.name: {"face": c.face, "body": c.body} for c in characters}
    _write_json(out / MANIFEST, {**settings, "complete": True, "roster": roster})
    return WorldSummary(root=out, written=written, existing=existing, seconds=seconds)


def _write_image(rendered, image_path: Path) -> None:
    image_path.with_suffix(".txt").write_text(rendered.caption + "\n", encoding="utf-8")
    _write_json(image_path.with_suffix(".json"), rendered.meta)
    tmp = image_path.with_name(f".{image_path.name}.tmp")
    rendered.image.save(tmp, format="PNG")
    os.replace(tmp, image_path)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(root: Path) -> dict[str, Any] | None:
    """``<root>/world.json`` as a dict, or None when ``root`` holds no world manifest."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a readable world manifest ({err}); delete the folder to regenerate") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: a world manifest must be a JSON object, got {type(data).__name__}")
    return data


def _check_resumable(out: Path, settings: dict[str, Any]) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise DatasetError(f"world output {out} exists and is not a folder")
    manifest = read_manifest(out)
    if manifest is None:
        if any(out.iterdir()):
            raise DatasetError(f"world output {out} is a non-empty folder without {MANIFEST}; choose an empty folder")
        return
    stored = {key: manifest.get(key) for key in settings}
    if stored != settings:
        changed = {k: (stored[k], settings[k]) for k in settings if stored[k] != settings[k]}
        raise DatasetError(
            f"{out / MANIFEST}: this folder holds another world (stored -> asked: {changed}); "
            "choose another folder or delete this one"
        )


def ensure_world(data: DataConfig, progress: bool = True) -> Path:
    """Make sure ``data.data_dir`` exists, generating the identity world there when it is missing.

    - missing folder and ``data.world.generate_if_missing``: the world of ``data.world`` is generated, with a message;
    - a world left unfinished by an interrupted run (``world.json`` with ``complete: false``): it is completed;
    - any other existing folder (a real photo dataset, a finished world): used as it is.

    Returns ``data.data_dir``. Raises :class:`DatasetError` when the folder is missing and generation is off.
    """
    root = Path(data.data_dir)
    manifest = read_manifest(root) if root.is_dir() else None
    if root.exists() and (manifest is None or manifest.get("complete")):
        return root
    if not root.exists() and not data.world.generate_if_missing:
        raise DatasetError(
            f"data_dir {root} does not exist and data.world.generate_if_missing is false; point data_dir at photos "
            "laid out as <bundle>/<character>/<image>, or generate a world with `dtback world --out DIR`"
        )
    world = data.world
    verb = "completing the unfinished" if manifest is not None else "generating the"
    log.info(
        "data_dir %s %s: %s identity world (%d characters x %d images, %d px, seed %d) ...",
        root, "is unfinished" if manifest is not None else "is missing", verb, world.characters,
        world.images_per_character, world.size, world.seed,
    )
    summary = write_world(root, world, progress=progress)
    log.info("identity world ready in %s: %d images written in %.1f s", root, summary.written, summary.seconds)
    return root


# ------------------------------------------------------------------------------------------------ world components


def world_models_dir(override: Path | str | None = None) -> Path:
    """Folder of the world components: ``override`` when given (e.g. ``identity.world_models_dir``), else the
    ``DTBACK_WORLD_MODELS`` environment variable, else the folder shipped in the package (``dtback/assets/world``)."""
    if override is not None:
        return Path(override)
    env = os.environ.get(WORLD_MODELS_ENV)
    return Path(env) if env else PACKAGED_WORLD_MODELS



def read_component_info(info_path: Path, rebuild: str, what: str) -> dict[str, Any]:
    """The JSON beside a world component (``what`` names it in messages), after checking it was trained on the
    current world version; ``rebuild`` is the command that rebuilds it."""
    from dtback.errors import MissingModelError  # noqa: PLC0415

    if not info_path.is_file():
        raise MissingModelError(f"no {what} in {info_path.parent} (no {info_path.name}); build it with `{rebuild}`")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        version = info["world_version"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise MissingModelError(f"{info_path}: unreadable ({type(err).__name__}: {err})") from None
    if version != WORLD_VERSION:
        raise MissingModelError(f"{info_path}: world version {version}, the renderer is at {WORLD_VERSION}; rebuild "
                                f"with `{rebuild}`")
    return info
