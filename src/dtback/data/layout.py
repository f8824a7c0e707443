"""Scan ``data_dir/<bundle>/<character>/<image>`` into an index of usable images, counting everything left out.

Every file below ``data_dir`` ends up either in a kept character, in a dropped character (with the reason), or in
the skip list (with the reason): nothing disappears silently. Images are fully decoded during the scan so that a
truncated file is found now and not in the middle of training.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from dtback.config import DataConfig
from dtback.data.captions import CAPTION_SUFFIX, read_caption
from dtback.data.images import (
    DECODE_ERRORS, ImageSkip, SkipReason, claimed_format, entry_problem, probe_image, shown,
)
from dtback.errors import DatasetError

log = logging.getLogger(__name__)

# Files next to an image that describe it rather than being images: <stem>.txt, <name>.txt or <stem>.caption caption,
# <stem>.json metadata.
SIDECAR_SUFFIXES = (".txt", CAPTION_SUFFIX, ".json")
# Written by the dataset builder (dtback.curate.build): its state folder at the root and a picture of each character's
# images for people to check; neither is a training image.
BUILD_STATE_DIR = ".dtback-build"
AMBIGUOUS_SHEET = "ambiguous.png"  # the builder's sheet of photos it left out as ambiguous
CONTACT_SHEET = "contact_sheet.png"


@dataclass(frozen=True)
class ImageEntry:
    """One usable image: its path, upright size, detected format and sidecar caption (None when absent)."""

    path: Path
    width: int
    height: int
    format: str
    caption: str | None = None


@dataclass
class CharacterEntry:
    """One identity: several images of the same person."""

    bundle: str
    name: str
    images: list[ImageEntry]

    @property
    def key(self) -> str:
        return f"{self.bundle}/{self.name}"


@dataclass(frozen=True)
class Skip:
    """A file (or folder) that was not used, with the reason and detail; ``path`` is relative to ``data_dir``."""

    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Drop:
    """A character left out as a whole."""

    character: str
    reason: str
    detail: str


@dataclass
class DatasetIndex:
    """The result of a scan: kept characters (sorted by key), skipped files and dropped characters."""

    root: Path
    characters: list[CharacterEntry]
    skips: list[Skip] = field(default_factory=list)
    drops: list[Drop] = field(default_factory=list)
    found: dict[str, dict[str, int]] = field(default_factory=dict)  # bundle -> character -> usable images
    ignored: list[str] = field(default_factory=list)  # non-image files outside character folders (README, ...)
    settings: dict[str, Any] = field(default_factory=dict)

    def character(self, key: str) -> CharacterEntry:
        for entry in self.characters:
            if entry.key == key:
                return entry
        raise KeyError(key)

    def report(self) -> dict[str, Any]:
        """Counts per bundle and in total, plus every skip and drop, as a JSON-ready dict."""
        bundles: dict[str, dict[str, Any]] = {}
        for bundle, chars in sorted(self.found.items()):
            kept = [c for c in self.characters if c.bundle == bundle]
            skips = [s for s in self.skips if s.path.split("/", 1)[0] == bundle]
            bundles[bundle] = {
                "characters_found": len(chars),
                "characters_kept": len(kept),
                "characters_dropped": len(chars) - len(kept),
                "images_decoded": sum(chars.values()),
                "images_kept": sum(len(c.images) for c in kept),
                "files_skipped": len(skips),
                "skipped_by_reason": dict(sorted(Counter(s.reason for s in skips).items())),
            }
        top_skips = [s for s in self.skips if s.path.split("/", 1)[0] not in bundles]
        totals = {
            "bundles": len(bundles),
            "characters_found": sum(b["characters_found"] for b in bundles.values()),
            "characters_kept": len(self.characters),
            "characters_dropped": len(self.drops),
            "images_decoded": sum(b["images_decoded"] for b in bundles.values()),
            "images_kept": sum(len(c.images) for c in self.characters),
            "files_skipped": len(self.skips),
            "skipped_by_reason": dict(sorted(Counter(s.reason for s in self.skips).items())),
        }
        return {
            "data_dir": str(self.root),
            "settings": self.settings,
            "totals": totals,
            "bundles": bundles,
            "skipped_outside_bundles": len(top_skips),
            "ignored_files": list(self.ignored),
            "dropped_characters": [vars(d) for d in self.drops],
            "skipped_files": [vars(s) for s in self.skips],
        }


def scan_dataset(cfg: DataConfig, seed: int, progress: bool = True) -> DatasetIndex:
    """Scan ``cfg.data_dir``, decode every candidate image, then apply ``min_images_per_char`` and
    ``max_chars_per_bundle``. Raises :class:`DatasetError` when the folder is missing or nothing usable is left."""
    root = Path(cfg.data_dir)
    if not root.exists():
        raise DatasetError(f"data_dir {root} does not exist (expected {root}/<bundle>/<character>/<image>)")
    if not root.is_dir():
        raise DatasetError(f"data_dir {root} is not a folder")
    try:
        real_root = root.resolve()
    except (RuntimeError, OSError) as err:  # Python 3.11 raises RuntimeError("Symlink loop ...")
        raise DatasetError(f"data_dir {root} cannot be resolved: {err}") from None
    walker = _Walker(real_root)
    candidates = walker.walk(root)
    decoded = _decode_all(candidates, cfg, progress)

    skips = list(walker.skips)
    shadowed: list[str] = []
    by_character: dict[tuple[str, str], list[ImageEntry]] = {key: [] for key in walker.characters}
    for (bundle, name, path), result in zip(candidates, decoded):
        if isinstance(result, Skip):
            skips.append(result)
            continue
        caption = read_caption(path, root)
        if caption.problem is not None:
            skips.append(Skip(path=shown(caption.file.relative_to(root).as_posix()),
                              reason=SkipReason.BAD_CAPTION.value, detail=caption.problem))
        if caption.shadowed is not None:
            shadowed.append(shown(caption.file.relative_to(root).as_posix()))
        by_character[(bundle, name)].append(
            ImageEntry(path=path, width=result[0], height=result[1], format=result[2], caption=caption.text)
        )
    if shadowed:
        log.warning("data_dir %s: %d image%s caption files with different text; the first of <stem>.txt, "
                    "<name>.txt, <stem>.caption is used (e.g. %s)", root, len(shadowed),
                    " has" if len(shadowed) == 1 else "s have", ", ".join(shadowed[:3]))

    found: dict[str, dict[str, int]] = {bundle: {} for bundle in walker.bundles}
    for (bundle, name), images in by_character.items():
        found[bundle][name] = len(images)
    characters, drops = _select_characters(by_character, cfg, seed)
    index = DatasetIndex(
        root=root,
        characters=characters,
        skips=sorted(skips, key=lambda s: s.path),
        drops=drops,
        found=found,
        ignored=walker.ignored,
        settings={
            "min_images_per_char": cfg.min_images_per_char,
            "max_chars_per_bundle": cfg.max_chars_per_bundle,
            "max_image_pixels": cfg.max_image_pixels,
            "seed": seed,
        },
    )
    if not characters:
        totals = index.report()["totals"]
        raise DatasetError(
            f"data_dir {root}: no usable characters "
            f"({totals['characters_found']} character folders found, {totals['images_decoded']} images decoded, "
            f"{totals['files_skipped']} files skipped {totals['skipped_by_reason']}, "
            f"{len(drops)} characters dropped {dict(Counter(d.reason for d in drops))}); "
            f"expected {root}/<bundle>/<character>/<image> with at least min_images_per_char={cfg.min_images_per_char} "
            "images per character"
        )
    return index


class _Walker:
    """Walks the three-level layout; records skips for hidden, misplaced and escaping entries."""

    def __init__(self, real_root: Path):
        self.real_root = real_root
        self.skips: list[Skip] = []
        self.bundles: list[str] = []
        self.characters: list[tuple[str, str]] = []
        self.ignored: list[str] = []

    def walk(self, root: Path) -> list[tuple[str, str, Path]]:
        self.root = root
        candidates: list[tuple[str, str, Path]] = []
        folders = []
        for bundle_dir in self._entries(root, "bundle"):
            self.bundles.append(bundle_dir.name)
            folders += [(bundle_dir, char_dir) for char_dir in self._entries(bundle_dir, "character")]
        for bundle_dir, char_dir in self._unique(folders):
            self.characters.append((bundle_dir.name, char_dir.name))
            for path in self._list(char_dir):
                if self._rejected(path):
                    continue
                if path.is_dir():
                    self._skip(path, SkipReason.MISPLACED, "nested folder inside a character folder is not read")
                elif path.suffix.lower() not in SIDECAR_SUFFIXES and path.name != CONTACT_SHEET:
                    candidates.append((bundle_dir.name, char_dir.name, path))
        return candidates

    def _unique(self, folders: list[tuple[Path, Path]]) -> list[tuple[Path, Path]]:
        """Character folders that are one folder on disk (a symlinked character or bundle) are one identity: keep
        the folder reached without a symlink (else the first) and count the others, which could otherwise put the
        same person in training and validation at once."""
        by_target: dict[Path, list[tuple[Path, Path]]] = {}
        for pair in folders:
            by_target.setdefault(pair[1].resolve(), []).append(pair)
        # min keeps the first of equals: the first folder reached without a symlink, else the first of the group
        firsts = {target: min(group, key=lambda p: p[0].is_symlink() or p[1].is_symlink())
                  for target, group in by_target.items()}
        keeper = {id(pair): firsts[target] for target, group in by_target.items() for pair in group}
        kept = []
        for pair in folders:
            first = keeper[id(pair)]
            if pair is first:
                kept.append(pair)
            else:
                self._skip(pair[1], SkipReason.DUPLICATE_FOLDER, f"the same folder as {first[0].name}/{first[1].name} "
                           "(a symlink): one identity is one character")
        return kept

    def _entries(self, folder: Path, level: str) -> list[Path]:
        """Sub-folders of ``folder`` at the given level; files found there are counted as misplaced."""
        folders = []
        for path in self._list(folder):
            if self._rejected(path):
                continue
            if path.is_dir():
                folders.append(path)
            elif _is_image(path):
                self._skip(path, SkipReason.MISPLACED, f"an image where a {level} folder was expected")
            else:
                # README, LICENSE, metadata: documentation around the layout, listed but not counted as skips.
                self.ignored.append(path.relative_to(self.root).as_posix())
        return folders

    def _list(self, folder: Path) -> list[Path]:
        try:
            return sorted(folder.iterdir())
        except OSError as err:
            if folder == self.root:
                raise DatasetError(f"data_dir {folder} cannot be listed: {err}") from None
            self._skip(folder, SkipReason.UNREADABLE, f"folder cannot be listed: {err}")
            return []

    def _rejected(self, path: Path) -> bool:
        if path.name in (BUILD_STATE_DIR, AMBIGUOUS_SHEET) and path.parent == self.root:
            self.ignored.append(path.name)  # the builder's cache and state, its sheet of left-out photos
            return True
        if path.name.startswith("."):
            self._skip(path, SkipReason.HIDDEN, "hidden " + ("folder" if path.is_dir() else "file"))
            return True
        # Never opened: a name that is not UTF-8, a symlink loop, a FIFO / socket / device (opening a FIFO hangs).
        problem = entry_problem(path)
        if problem is not None:
            self._skip(path, *problem)
            return True
        if path.is_symlink():
            target = path.resolve()
            if not target.exists():
                self._skip(path, SkipReason.BROKEN_SYMLINK, f"points to missing {target}")
                return True
            if not target.is_relative_to(self.real_root):
                self._skip(path, SkipReason.SYMLINK_OUTSIDE_ROOT, f"points to {target}, outside {self.real_root}")
                return True
        return False

    def _skip(self, path: Path, reason: SkipReason, detail: str) -> None:
        self.skips.append(Skip(path=shown(path.relative_to(self.root).as_posix()), reason=reason.value, detail=detail))


def _is_image(path: Path) -> bool:
    """Whether PIL recognises the content as an image (header only; a header too large to open is one too, and so
    is a file that starts with an image format's signature but is cut short before its header ends)."""
    try:
        with Image.open(path):
            return True
    except Image.DecompressionBombError:
        return True
    except (UnidentifiedImageError, *DECODE_ERRORS):
        return claimed_format(path) is not None


def _decode_all(
    candidates: list[tuple[str, str, Path]], cfg: DataConfig, progress: bool
) -> list[tuple[int, int, str] | Skip]:
    root = Path(cfg.data_dir)

    def probe(item: tuple[str, str, Path]) -> tuple[int, int, str] | Skip:
        path = item[2]
        try:
            return probe_image(path, cfg.max_image_pixels)
        except ImageSkip as skip:
            return Skip(path=shown(path.relative_to(root).as_posix()), reason=skip.reason.value, detail=skip.detail)

    with ThreadPoolExecutor(max_workers=cfg.scan_threads) as pool:
        results = pool.map(probe, candidates)
        return list(
            tqdm(results, total=len(candidates), desc=f"scanning {root}", unit="img", disable=not progress, leave=False)
        )


def _select_characters(
    by_character: dict[tuple[str, str], list[ImageEntry]], cfg: DataConfig, seed: int
) -> tuple[list[CharacterEntry], list[Drop]]:
    drops: list[Drop] = []
    eligible: dict[str, list[CharacterEntry]] = {}
    for (bundle, name), images in sorted(by_character.items()):
        entry = CharacterEntry(bundle=bundle, name=name, images=images)
        if len(images) < cfg.min_images_per_char:
            drops.append(
                Drop(
                    character=entry.key,
                    reason="too_few_images",
                    detail=f"{len(images)} usable images < min_images_per_char={cfg.min_images_per_char}",
                )
            )
            continue
        eligible.setdefault(bundle, []).append(entry)

    kept: list[CharacterEntry] = []
    limit = cfg.max_chars_per_bundle
    for bundle, entries in sorted(eligible.items()):
        if limit is None or len(entries) <= limit:
            kept.extend(entries)
            continue
        # Seeded by (seed, bundle) so a bundle's choice does not change when another bundle is added.
        chosen = set(random.Random(f"{seed}:{bundle}").sample(range(len(entries)), limit))
        for i, entry in enumerate(entries):
            if i in chosen:
                kept.append(entry)
            else:
                drops.append(
                    Drop(
                        character=entry.key,
                        reason="over_bundle_limit",
                        detail=f"bundle has {len(entries)} eligible characters > max_chars_per_bundle={limit} "
                        f"(choice seeded by seed={seed})",
                    )
                )
    return kept, sorted(drops, key=lambda d: d.character)
