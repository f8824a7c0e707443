"""What ``dtback evaluate`` evaluates on: the held-out characters of a training run, their images, and the prompts.

Held-out characters are found as training split them, in this order: ``--characters`` when given (refused when the
run trained on one of them, unless ``--allow-trained``: then they are labelled trained, not held-out); every character
of ``--data-dir`` when that is another dataset than the run's (an identity world of other settings, e.g. another
seed, or a folder without the run's held-out characters: nothing in it was trained on); the run folder's
``split.json`` (written by training, see :mod:`dtback.data.split`); else the run's config: ``data.val_characters``,
or ``data.val_fraction`` applied again by :func:`~dtback.data.split.split_characters` (same seed, same split).

Per character the first readable image (sorted by name) is the **reference** the adapter is given; the other images
are its **gallery**: the character's identity embedding for scoring is the mean over the gallery, so an output that
copies the reference does not get a perfect score for free. On the identity world each image has a ``.json`` sidecar
holding the character's true face and body attributes.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from dtback.config import Config, load_config
from dtback.data.images import ImageSkip, is_utf8, load_rgb, shown
from dtback.data.layout import CONTACT_SHEET, SIDECAR_SUFFIXES, DatasetIndex, scan_dataset
from dtback.data.split import SPLIT_FILE, read_split, split_characters
from dtback.world.files import MANIFEST, read_manifest, world_command, world_settings
from dtback.world.people import caption_for
from dtback.world.reader import truth_problem
from dtback.errors import DatasetError, DtbackError
from dtback.io import is_inside, read_text_now

logger = logging.getLogger(__name__)

MAX_PIXELS = 50_000_000

# Scene captions in the world's own words (dtback.world.people.caption_for): scenes, poses and lights of the world's captions.
WORLD_SHOTS = (
    ("beach", "standing", "up", "front", "daylight"),
    ("forest", "walking", "down", "left", "warm"),
    ("city", "standing", "wave", "front", "cool"),
    ("snow", "walking", "out", "right", "bright"),
)
WORLD_PROMPTS = tuple(
    caption_for({"scene": scene, "lighting": light, "side_light": 0.0,
                 "pose": {"stance": stance, "arms": arms, "facing": facing}})
    for scene, stance, arms, facing, light in WORLD_SHOTS
)
PHOTO_PROMPTS = (
    "a photo of a person in a park",
    "a photo of a person on a city street at night",
    "a photo of a person sitting in a cafe",
    "a photo of a person standing on a beach at sunset",
)


@dataclass
class HeldOutCharacter:
    """A held-out character: its reference image (given to the adapter), its gallery (scored against) and, on the
    identity world, its true attributes ``{"face": {...}, "body": {...}}``."""

    key: str
    reference_paths: list[Path]
    references: list[Image.Image]
    gallery_paths: list[Path]
    gallery: list[Image.Image]
    truth: dict[str, dict[str, str]] | None

    @property
    def reference_path(self) -> Path:
        """The first reference (the grid's reference column)."""
        return self.reference_paths[0]

    @property
    def reference(self) -> Image.Image:
        return self.references[0]


@dataclass
class HeldOut:
    """The characters to evaluate, where they came from, and what was left out (with reasons)."""

    data_dir: Path
    characters: list[HeldOutCharacter]
    source: str
    skipped: list[dict[str, str]] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)  # keys the run trained on (only with --allow-trained)

    @property
    def is_world(self) -> bool:
        return all(c.truth is not None for c in self.characters)


def run_config(run_dir: Path, config: Path | None) -> Config | None:
    """The run's resolved config (``<run>/config.yaml``, written by training) or ``config``; None when neither."""
    path = config if config is not None else run_dir / "config.yaml"
    if config is None and not path.is_file():
        return None
    if not path.is_file():
        raise DtbackError(f"--config {path} does not exist")
    return load_config(path)


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a ``bundle/character`` key naming a folder inside a dataset (None: it is one)."""
    parts = key.split("/")
    if len(parts) != 2 or not all(parts):
        return "expected bundle/character: two folder names joined by one '/'"
    if any(part.startswith(".") for part in parts) or "\\" in key or "\0" in key or not is_utf8(key):
        return "a folder name may not start with '.' ('..' leaves the dataset) nor hold '\\', NUL or non-UTF-8 bytes"
    return None


def inside(folder: Path, relative: Path, what: str) -> Path:
    """``folder / relative``, refused with :class:`DtbackError` when it would land outside ``folder`` (a '..' or an
    absolute part, a symlink leading out)."""
    path = Path(folder) / relative
    if not is_inside(path, folder):
        raise DtbackError(f"{what} {path} would be outside {folder}; refusing to write there")
    return path


def trained_keys(run_dir: Path, cfg: Config | None, data_dir: Path) -> tuple[set[str], str]:
    """The characters the run trained on, as far as ``data_dir`` holds them, and where that was read: the run's
    ``split.json`` (or its config's split applied again); none when ``data_dir`` is another dataset."""
    split_path = run_dir / SPLIT_FILE
    split = read_split(split_path) if split_path.is_file() else None
    if cfg is not None and another_dataset(cfg, data_dir, list(split.val) if split is not None else []):
        return set(), f"{data_dir} is another dataset than the run's"
    if split is not None:
        return set(_in_their_bundle(list(split.train), cfg, data_dir)), str(split_path)
    if cfg is None:
        return set(), "no split.json or config.yaml in the run folder"
    data_cfg = cfg.data.model_copy(update={"data_dir": data_dir})
    split = split_characters(scan_dataset(data_cfg, cfg.seed, progress=False), data_cfg, cfg.seed)
    return set(split.train), f"the config's split (seed {cfg.seed})"


def check_not_trained(run_dir: Path, cfg: Config | None, data_dir: Path, keys: list[str],
                      allow_trained: bool) -> list[str]:
    """The ``--characters`` the run trained on (sorted); refused with :class:`DtbackError` unless ``allow_trained``:
    scored as held-out they would overstate how well identity carries to new people."""
    trained, where = trained_keys(run_dir, cfg, data_dir)
    found = sorted(set(keys) & trained)
    if found and not allow_trained:
        shown = ", ".join(found[:10]) + (f" and {len(found) - 10} more" if len(found) > 10 else "")
        raise DtbackError(
            f"--characters names {len(found)} character(s) the run trained on ({shown}; from {where}): they are not "
            "held out, so their scores would overstate identity on new people; name held-out characters (the 'val' "
            f"list of {run_dir / SPLIT_FILE}), or pass --allow-trained to score them labelled as trained")
    return found


def held_out_keys(run_dir: Path, cfg: Config | None, data_dir: Path, explicit: list[str],
                  skipped: list[dict[str, str]] | None = None) -> tuple[list[str], str]:
    """``bundle/character`` keys of the held-out characters and where they came from (see the module docstring).
    On another dataset, the characters and folders its scan leaves out are appended to ``skipped``."""
    if explicit:
        return list(explicit), "--characters"
    split_path = run_dir / SPLIT_FILE
    split_val = list(read_split(split_path).val) if split_path.is_file() else None
    if cfg is not None and another_dataset(cfg, data_dir, split_val or []):
        # A reference and one gallery image are enough to be evaluated.
        data_cfg = cfg.data.model_copy(update={"data_dir": data_dir, "max_chars_per_bundle": None,
                                               "min_images_per_char": 2})
        index = scan_dataset(data_cfg, cfg.seed, progress=False)
        if skipped is not None:
            skipped.extend(scan_losses(index, data_dir))
        return [c.key for c in index.characters], \
            f"every character of {data_dir} (another dataset than the run's {cfg.data.data_dir})"
    if split_val is not None:
        return _in_their_bundle(split_val, cfg, data_dir), str(split_path)
    if cfg is None:
        raise DtbackError(
            f"no held-out characters: {run_dir} has neither {SPLIT_FILE} nor config.yaml; pass --characters "
            "bundle/character (repeatable) or --config with the training config"
        )
    if cfg.data.val_characters:
        return list(cfg.data.val_characters), "config data.val_characters"
    data_cfg = cfg.data.model_copy(update={"data_dir": data_dir})
    split = split_characters(scan_dataset(data_cfg, cfg.seed, progress=False), data_cfg, cfg.seed)
    return list(split.val), f"config data.val_fraction={cfg.data.val_fraction} (seed {cfg.seed})"


def scan_losses(index: DatasetIndex, data_dir: Path) -> list[dict[str, str]]:
    """What the scan of ``data_dir`` left out, as ``skipped`` entries: dropped characters (too few images, ...) and
    skipped files or folders outside the kept characters (a folder name that is not UTF-8, ...). The files of kept
    characters are not listed: :func:`read_character` records those itself. Paths as every entry has them: the
    dataset folder joined with the scan's relative path (already shown with ``\\xNN`` escapes)."""
    kept = tuple(f"{c.key}/" for c in index.characters)
    losses = [{"path": f"{shown(data_dir)}/{drop.character}", "reason": drop.reason, "detail": drop.detail}
              for drop in index.drops]
    losses += [{"path": f"{shown(data_dir)}/{skip.path}", "reason": skip.reason, "detail": skip.detail}
               for skip in index.skips if not skip.path.startswith(kept)]
    return losses


def skipped_summary(skipped: list[dict[str, str]]) -> str:
    """``skipped`` in a few words for a one-line error: the count per reason with one example each."""
    if not skipped:
        return "none"
    by_reason: dict[str, list[dict[str, str]]] = {}
    for entry in skipped:
        by_reason.setdefault(entry["reason"], []).append(entry)
    parts = [f"{reason}: {len(entries)}; e.g. {entries[0]['path']}: {entries[0]['detail']}"
             for reason, entries in by_reason.items()]
    return f"{len(skipped)} ({'; '.join(parts)})"


def another_dataset(cfg: Config, data_dir: Path, split_val: list[str]) -> bool:
    """Is ``data_dir`` another dataset than the one the run trained on (so none of its characters was trained on)?
    An identity world is another one when its settings (seed, characters, images, size, version) differ from the
    run's world (its ``world.json``, else the run's ``data.world`` settings); any other folder when it lacks one of
    the run's held-out characters."""
    run_data = Path(cfg.data.data_dir)
    if run_data.resolve() == Path(data_dir).resolve():
        return False
    theirs = read_manifest(data_dir)
    if theirs is not None:
        # A world's seed (and version) draws its identities, in the same order whatever the counts and the size: a
        # world of the run's seed holds the run's characters (other pictures of them), so it is not another dataset.
        return any(theirs.get(key) != _run_world(cfg).get(key) for key in IDENTITY_KEYS)
    return bool(split_val) and not all((Path(data_dir) / key).is_dir() for key in split_val)


# The world settings that decide who its characters are (the others decide only their pictures).
IDENTITY_KEYS = ("world_version", "seed")


def _run_world(cfg: Config) -> dict[str, Any]:
    """The settings of the run's world: its ``world.json``, else the run's ``data.world``."""
    run_data = Path(cfg.data.data_dir)
    mine = read_manifest(run_data) if run_data.is_dir() else None
    return mine if mine is not None else world_settings(cfg.data.world)


def _in_their_bundle(keys: list[str], cfg: Config | None, data_dir: Path) -> list[str]:
    """``keys`` of the run's world as they are named in the world at ``data_dir`` (its bundle folder may differ)."""
    theirs = read_manifest(data_dir) if cfg is not None else None
    if theirs is None or theirs.get("bundle") == _run_world(cfg).get("bundle"):
        return keys
    return [f"{theirs.get('bundle')}/{key.split('/', 1)[1]}" for key in keys]


def load_held_out(run_dir: Path, cfg: Config | None, data_dir: Path | None, explicit: list[str],
                  limit: int | None, references: int = 1, allow_trained: bool = False) -> HeldOut:
    """Resolve and read the held-out characters; at least 2 with ``references`` + 1 readable images are needed
    (the shuffled baseline gives each character another one's references). ``explicit`` characters the run trained
    on are refused unless ``allow_trained`` (:func:`check_not_trained`)."""
    if data_dir is None:
        if cfg is None:
            raise DtbackError(f"--data-dir is needed: {run_dir / 'config.yaml'} (the run's config) does not exist")
        data_dir = Path(cfg.data.data_dir)
    if not data_dir.is_dir():
        what = "is a file, not a folder" if data_dir.exists() else "does not exist"
        raise DatasetError(f"dataset folder {data_dir} {what} (pass --data-dir: a folder of "
                           "<bundle>/<character>/<image>)")
    manifest = read_manifest(data_dir)
    if manifest is not None and not manifest.get("complete"):
        # Its characters past the kill point are missing: scores would silently cover a part of the world.
        raise DatasetError(f"{data_dir / MANIFEST}: an unfinished identity world (its generation was interrupted: "
                           f"complete is not true); finish it with `{world_command(data_dir, manifest)}`")
    skipped: list[dict[str, str]] = []
    keys, source = held_out_keys(run_dir, cfg, data_dir, explicit, skipped)
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:  # the shuffled baseline would hand a character its own references and read as "with identity"
        raise DtbackError(f"{source} names {', '.join(map(shown, twice))} more than once: each held-out character once")
    for key in keys:  # split.json and folder names are files a user may have edited, too
        problem = key_problem(key)
        if problem:
            raise DatasetError(f"held-out character {key!r} (from {source}): {problem}")
    trained = check_not_trained(run_dir, cfg, data_dir, keys, allow_trained) if explicit else []
    if trained:
        source += f" ({len(trained)} trained on, --allow-trained: labelled, not held-out)"
    if not keys:
        raise DtbackError(
            f"no held-out characters in {source} (was the run trained with data.val_fraction: 0?); pass "
            "--characters bundle/character (repeatable)"
        )
    held = HeldOut(data_dir=data_dir, characters=[], source=source, trained=trained, skipped=skipped)
    for key in keys:
        if limit is not None and len(held.characters) >= limit:
            break
        if not explicit and not (data_dir / key).is_dir():
            # The run's held-out people that a smaller world of its seed does not draw: the others are evaluated.
            held.skipped.append({"path": shown(data_dir / key), "reason": "not_in_dataset",
                                 "detail": f"held out by the run ({source}) but {data_dir} has no such folder"})
            continue
        character = read_character(data_dir, key, held.skipped, references, world=manifest is not None)
        if character is not None:
            held.characters.append(character)
    if len(held.characters) < 2:
        raise DtbackError(
            f"need at least 2 held-out characters with {references + 1}+ readable images in {data_dir} (from {source}), found "
            f"{len(held.characters)}; skipped: {skipped_summary(held.skipped)}"
        )
    return held


def read_character(data_dir: Path, key: str, skipped: list[dict[str, str]],
                   references: int = 1, world: bool = False) -> HeldOutCharacter | None:
    """Read one character folder: the first ``references`` readable images (sorted by name) are its references,
    the rest its gallery. Unreadable images, characters without a gallery image beyond the references and, on a
    ``world``, characters without any readable attributes are recorded in ``skipped`` and left out."""
    folder = data_dir / key
    if not folder.is_dir():
        raise DatasetError(f"held-out character {shown(key)}: no folder {shown(folder)} (does --data-dir match the "
                           "run?)")
    images: list[tuple[Path, Image.Image]] = []
    for path in sorted(folder.iterdir()):
        if (not path.is_file() or path.name.startswith(".") or path.suffix.lower() in SIDECAR_SUFFIXES
                or path.name == CONTACT_SHEET):
            continue
        try:
            images.append((path, load_rgb(path, MAX_PIXELS)))
        except ImageSkip as skip:
            skipped.append({"path": shown(path), "reason": skip.reason.value, "detail": skip.detail})
    if len(images) < references + 1:
        skipped.append({"path": shown(folder), "reason": "too_few_images",
                        "detail": f"{len(images)} readable image(s); {references} reference(s) and a gallery image "
                                  "are needed"})
        return None
    truth = next(filter(None, (world_truth(path) for path, _ in images)), None)
    if world and truth is None:
        skipped.append({"path": shown(folder), "reason": "no_world_metadata",
                        "detail": f"none of its {len(images)} images has a readable .json sidecar with its "
                                  "attributes"})
        return None
    return HeldOutCharacter(
        key=key, reference_paths=[p for p, _ in images[:references]],
        references=[image for _, image in images[:references]], gallery_paths=[p for p, _ in images[references:]],
        gallery=[image for _, image in images[references:]], truth=truth,
    )


def world_truth(image_path: Path) -> dict[str, dict[str, str]] | None:
    """The true attributes in the identity world's sidecar ``<image>.json``; None when it is missing, unreadable
    (cut short, edited) or holds none: every image of a character carries the same, so the caller asks the next."""
    sidecar = image_path.with_suffix(".json")
    if not sidecar.is_file():
        return None
    try:
        attributes: Any = json.loads(sidecar.read_text(encoding="utf-8")).get("attributes")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        logger.warning("%s: unreadable world metadata (%s: %s); reading the character's next image's", sidecar,
                       type(err).__name__, err)
        return None
    if attributes is None:
        return None
    problem = truth_problem(attributes)
    if problem:
        logger.warning("%s: world metadata without a whole set of attributes (%s); reading the character's next "
                       "image's", sidecar, problem)
        return None
    return attributes


def read_prompts(prompts_file: Path | None, is_world: bool) -> list[str]:
    """One prompt per non-empty line of ``prompts_file``; without one, the built-in set for the kind of data."""
    if prompts_file is None:
        return list(WORLD_PROMPTS if is_world else PHOTO_PROMPTS)
    try:
        lines = read_text_now(prompts_file).splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DtbackError(f"--prompts-file {prompts_file}: unreadable ({err})") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise DtbackError(f"--prompts-file {prompts_file} holds no prompt (one prompt per line)")
    return prompts
