"""Write an identity world to disk in the standard dataset layout, and generate it when its data_dir is missing.

Layout: ``<out>/<bundle>/<character>/<NNN>.png`` with ``<NNN>.txt`` (caption) and ``<NNN>.json`` (metadata: face
box, body box, attributes, pose, scene, lighting) beside each image, plus ``<out>/world.json`` (the settings and
every character's attributes). Each PNG is written last, through a temporary name, so an interrupted run leaves no
half image: running the same command again skips finished images and completes the world. An image already there is
checked first (its PNG chunks, its size, its two sidecars): a damaged one (cut short by a copy, emptied) is redrawn.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import ValidationError
from tqdm.auto import tqdm

from dtback.config import DataConfig, WorldConfig
from dtback.data.images import DECODE_ERRORS
from dtback.world.people import WORLD_VERSION, render_image, sample_characters
from dtback.errors import DatasetError, MissingModelError
from dtback.io import atomic_path, remove_stale_temporaries, write_json, write_text

log = logging.getLogger(__name__)

MANIFEST = "world.json"
# World components (VAE, face/body encoders, reader, base): shipped with the package, rebuilt by
# `dtback world-components`; another folder is chosen with `data.world.components`.
PACKAGED_WORLD_MODELS = Path(__file__).resolve().parents[1] / "assets" / "world"


@dataclass(frozen=True)
class WorldSummary:
    """What :func:`write_world` did: images written now (``redrawn`` of them replaced a damaged file), images
    already there, seconds spent."""

    root: Path
    written: int
    existing: int
    seconds: float
    redrawn: int = 0

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
    write_json(out / MANIFEST, {**settings, "complete": False, "roster": {}})

    written = existing = redrawn = 0
    start = time.perf_counter()
    total = cfg.characters * cfg.images_per_character
    with tqdm(total=total, desc=f"identity world -> {out}", unit="img", disable=not progress) as bar:
        for character in characters:
            folder = out / cfg.bundle / character.name
            folder.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(folder)  # PNGs a killed run left half written (hidden, an hour old)
            for j in range(cfg.images_per_character):
                image_path = folder / f"{j:03d}.png"
                if image_path.is_file() and _is_whole(image_path, cfg.size):
                    existing += 1
                    bar.update()
                    continue
                if image_path.exists():
                    redrawn += 1
                    log.info("%s is damaged (cut short, empty or without its sidecars): redrawing it", image_path)
                _write_image(render_image(character, j, cfg.size, cfg.seed), image_path)
                written += 1
                bar.update()
    seconds = time.perf_counter() - start
    roster = {c.name: {"face": c.face, "body": c.body} for c in characters}
    write_json(out / MANIFEST, {**settings, "complete": True, "roster": roster})
    return WorldSummary(root=out, written=written, existing=existing, seconds=seconds, redrawn=redrawn)


def _is_whole(image_path: Path, size: int) -> bool:
    """Whether a world image already on disk is finished: both sidecars there and a PNG of ``size`` px whose chunks
    all pass their checksums (``verify`` reads every chunk without decoding pixels: a file cut short fails it)."""
    if not (image_path.with_suffix(".txt").is_file() and image_path.with_suffix(".json").is_file()):
        return False
    try:
        with Image.open(image_path) as image:
            if image.format != "PNG" or image.size != (size, size):
                return False
            image.verify()
    except DECODE_ERRORS:  # each one means the file is to be redrawn, which the caller counts and logs
        return False
    return True


def _write_image(rendered, image_path: Path) -> None:
    # Sidecars first, the PNG last: a finished image means a finished triple. No fsync per file: a world is
    # regenerated byte for byte, so a crash costs a rerun, not data.
    write_text(image_path.with_suffix(".txt"), rendered.caption + "\n", fsync=False)
    write_json(image_path.with_suffix(".json"), rendered.meta, fsync=False)
    with atomic_path(image_path, fsync=False) as tmp:
        rendered.image.save(tmp, format="PNG")


def world_command(out: Path, settings: dict[str, Any]) -> str:
    """The ``dtback world`` command that writes (or finishes) the world of ``settings`` (a manifest's) in ``out``."""
    return (f"dtback world --out {out} --characters {settings.get('characters')} --images-per-character "
            f"{settings.get('images_per_character')} --size {settings.get('size')} --seed {settings.get('seed')} "
            f"--bundle {settings.get('bundle')}")


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


def stored_world(root: Path, manifest: dict[str, Any], world: WorldConfig) -> WorldConfig:
    """The settings of the world in ``root`` from its ``manifest``: an unfinished world is finished as it was
    started (``dtback world --seed 5`` killed, then a training on that folder), not as ``world`` would draw one."""
    keys = ("characters", "images_per_character", "size", "seed", "bundle")
    try:
        stored = WorldConfig(**{**world.model_dump(), **{key: manifest.get(key) for key in keys}})
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise DatasetError(f"{root / MANIFEST}: an unfinished world whose settings do not read ({problems}); delete "
                           "the folder to generate a new one") from None
    return stored


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
    - a world left unfinished by an interrupted run (``world.json`` with ``complete: false``): it is completed with
      the settings of its manifest (those it was started with, whatever ``data.world`` says);
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
    world = data.world if manifest is None else stored_world(root, manifest, data.world)
    verb = "completing the unfinished identity world with its own settings" if manifest is not None else \
        "generating the identity world"
    # A data_dir of the user's own that is missing is more likely a typo than a wish for the world: say it loudly.
    level = logging.INFO if manifest is not None or root == DataConfig.model_fields["data_dir"].default else \
        logging.WARNING
    log.log(
        level, "data_dir %s %s: %s (%d characters x %d images, %d px, seed %d)%s ...",
        root, "is unfinished" if manifest is not None else "is missing", verb, world.characters,
        world.images_per_character, world.size, world.seed,
        "" if level == logging.INFO else "; if you meant photos, check the path (data.world.generate_if_missing="
        "false makes a missing data_dir an error)",
    )
    summary = write_world(root, world, progress=progress)
    log.info("identity world ready in %s: %d images written in %.1f s", root, summary.written, summary.seconds)
    return root


# ------------------------------------------------------------------------------------------------ world components


def world_models_dir(folder: Path | str | None = None) -> Path:
    """Folder of the world components: ``folder`` when given (``data.world.components``), else the folder shipped in
    the package (``dtback/assets/world``)."""
    return Path(folder).expanduser() if folder is not None else PACKAGED_WORLD_MODELS



def read_component_info(info_path: Path, rebuild: str, what: str) -> dict[str, Any]:
    """The JSON beside a world component (``what`` names it in messages), after checking it was trained on the
    current world version; ``rebuild`` is the command that rebuilds it."""
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
