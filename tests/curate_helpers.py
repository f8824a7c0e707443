"""Shared by the dataset builder's tests (tests/curate): build into a folder, compare folders."""

from __future__ import annotations

import json
from pathlib import Path

from dtback import backends
from dtback.config import load_config
from dtback.curate.build import REPORT_FILE, build_dataset
from dtback.curate.characters import read_characters

PEOPLE_BUNDLES = ("krasserm_lfw", "faceapi_bbt")


def config(out: Path, cache: Path | None, *overrides: str):
    settings = [f"data.data_dir={json.dumps(str(out))}", *overrides]
    if cache is not None:
        settings.append(f"identity.cache_dir={json.dumps(str(cache))}")
    return load_config(None, settings)


def build(sources: list[Path], out: Path, cache: Path | None = None, *overrides: str, rebuild: bool = False):
    cfg = config(out, cache, *overrides)
    identity, _ = backends.builder_identity(cfg)
    return build_dataset(sources, cfg.data, identity, backends.face_encoder(identity), progress=False, rebuild=rebuild)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` except the run report: (size, modification time in ns)."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != REPORT_FILE
    }


def placed_sources(root: Path) -> dict[str, str]:
    """source file name -> character key, over every character the builder wrote."""
    return {Path(image.source).name: c.key for c in read_characters(root) for image in c.images}


def every_byte(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def characters_by_content(root: Path) -> dict[str, set[str]]:
    return {c.key: {image.embedding_id for image in c.images} for c in read_characters(root)}
