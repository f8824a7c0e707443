"""The dataset builder's memory in ``DATA_DIR/.dtback-build/state.json``: what each source gave, the settings the
dataset was built with, and every picture placed (so that a character deleted by hand is noticed).

``{"format": "dtback-build-state", "version": 1, "sources": {path: {...}}, "settings": {key: value},
"placed": [content ids], "writing": [character keys, only while a run writes]}``
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from dtback.curate.characters import CHARACTER_FILE, Character, write_atomic
from dtback.data.layout import BUILD_STATE_DIR, CONTACT_SHEET
from dtback.errors import DatasetError

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_FORMAT = "dtback-build-state"
REPORT_FILE = "build_report.json"


def changed_settings_message(root: Path, before: dict[str, Any], now: dict[str, Any]) -> str:
    changed = sorted(key for key in set(before) | set(now) if before.get(key) != now.get(key))
    lines = ", ".join(f"{key}: {before.get(key)!r} when built, now {now.get(key)!r}" for key in changed)
    return (
        f"{root} was built with other settings ({lines}). Run again with the settings it was built with "
        f"(--set), build into a new --out, or pass --rebuild to remove its built characters and group every "
        f"source again with the new settings (the face cache and corrections.yaml are kept)"
    )


def remove_built_characters(root: Path, characters: list[Character], report_too: bool = True) -> int:
    """Delete the folders of the builder's ``characters`` (their images are copies of the sources) and the report.
    Refuses, naming the file, when a folder holds a file the builder did not write."""
    for character in characters:
        folder = character.folder(root)
        ours = {CHARACTER_FILE, CONTACT_SHEET, *(image.file for image in character.images)}
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
        if foreign:
            raise DatasetError(f"--rebuild: {folder / foreign[0]} was not written by the builder; move it out first")
    for character in characters:
        shutil.rmtree(character.folder(root))
        bundle = root / character.bundle
        if not any(bundle.iterdir()):
            bundle.rmdir()
    if report_too:
        (root / REPORT_FILE).unlink(missing_ok=True)
    return len(characters)


def remembered_setting(root: Path, key: str, default: Any) -> Any:
    """The value of setting ``key`` the dataset at ``root`` was built with (``default`` when not recorded)."""
    return load_state(root / BUILD_STATE_DIR / STATE_FILE).get("settings", {}).get(key, default)


def load_state(path: Path) -> dict[str, Any]:
    empty = {"format": STATE_FORMAT, "version": 1, "sources": {}}
    if not path.is_file():
        return empty
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        log.warning("%s: unreadable build state (%s); every source is read again", path, err)
        return empty
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("sources"), dict):
        log.warning("%s: not a %s file; every source is read again", path, STATE_FORMAT)
        return empty
    return state


def save_state(state: dict[str, Any], path: Path) -> None:
    text = json.dumps(state, indent=1, sort_keys=True) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return  # unchanged: a rerun with the same sources writes nothing
    write_atomic(path, text.encode("utf-8"))
