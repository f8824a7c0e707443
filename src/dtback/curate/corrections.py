"""A person's corrections to a built dataset: ``DATA_DIR/corrections.yaml``, applied in order by every build.

The builder never splits, merges or renames a character by itself; a person does, and the builder remembers it::

    corrections:
    - exclude: built_000/person_0001/IMG_0412_3fa2b1c0.jpg   # never place this photo again
    - split: [built_000/person_0003/a_1b2c3d4e.jpg, /photos/IMG_0413.jpg]
      into: built_000/person_0020                          # these photos form (or join) this character
    - merge: built_000/person_0004                         # every photo of person_0004 ...
      into: built_000/person_0002                          # ... moves into person_0002
    - rename: built_000/person_0002
      to: alice                                            # a new folder name in the same bundle

A photo is named by its path in the dataset (``bundle/character/file``; only the file name counts, so the entry
stays valid after the photo moves), by a source path, or by its sha256 (``id``); ``dtback dataset fix`` writes
``{id: ..., file: ...}``. ``split`` also places photos the builder left out (``ambiguous``, ``face_too_small`` ...,
named by their source path): the next build puts them into the character without filtering or grouping them. Every correction is idempotent: applied again it changes nothing, so each build applies the
whole file before grouping (so excluded photos stay out and moved ones stay where they were put) and again after
writing (so characters formed by the run are corrected too). A placed image deleted by hand, or a whole character
folder, is recorded here as an exclusion (``note: deleted by hand ...``; the build state remembers what was placed);
delete the entry to let the builder place the photo again. New entries are appended below the text already there,
which is kept byte for byte (comments, layout); a ``dtback dataset fix`` that is refused records nothing.

Character names in ``merge``/``rename``/``into`` are the names at the time of the correction; after
``dtback dataset build --rebuild`` the builder numbers characters afresh, so check those entries.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from dtback.curate.characters import CHARACTER_FILE, Character, read_characters, write_character, write_contact_sheet
from dtback.errors import DatasetError
from dtback.io import write_bytes

log = logging.getLogger(__name__)

CORRECTIONS_FILE = "corrections.yaml"
HEADER = (
    "# Corrections to this dataset, applied in order by every `dtback dataset build` into this folder.\n"
    "# Operations: exclude (a photo), split (photos -> into a character), merge (a character -> into another),\n"
    "# rename (a character -> to a new name in its bundle). Photos: bundle/character/file, a source path, or id.\n"
    "# `dtback dataset fix --help` writes these for you; see the README, 'Checking and correcting a built dataset'.\n"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
_KEY_IN_NAME = re.compile(r"_([0-9a-f]{8})\.[A-Za-z0-9]+$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass
class Applied:
    """What applying the corrections did: ``excluded`` content ids (never placed), counts of each change."""

    excluded: set[str] = field(default_factory=set)
    removed: int = 0
    moved: int = 0
    merged: int = 0
    renamed: int = 0

    @property
    def changed(self) -> bool:
        return bool(self.removed or self.moved or self.merged or self.renamed)


def read_corrections(root: Path) -> list[dict[str, Any]]:
    """The list of ``root/corrections.yaml`` (empty when there is none), checked; raises :class:`DatasetError`
    naming the file and entry when it is malformed."""
    path = root / CORRECTIONS_FILE
    if not path.is_file():
        return []
    return _parse(path, _read_text(path))[1]


def _read_text(path: Path) -> str:
    """The file's text exactly as written (line endings untranslated, so that appending keeps every byte)."""
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not readable YAML ({err})") from None


def _parse(path: Path, text: str) -> tuple[Any, list[dict[str, Any]]]:
    """The YAML document of ``text`` and its checked ``corrections:`` list."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DatasetError(f"{path}: not readable YAML ({err})") from None
    if data is None:
        return None, []
    # `corrections:` with nothing under it is what deleting the last entry by hand leaves: an empty list.
    if not isinstance(data, dict) or not isinstance(data.get("corrections") or [], list):
        raise DatasetError(f"{path}: expected a mapping with a list 'corrections:'")
    entries = data.get("corrections") or []
    for number, entry in enumerate(entries, 1):
        _check(path, number, entry)
    return data, entries


def _check(path: Path, number: int, entry: Any) -> None:
    where = f"{path}: correction {number}"
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected a mapping like 'exclude: PHOTO', got {entry!r}")
    ops = [op for op in ("exclude", "split", "merge", "rename") if op in entry]
    if len(ops) != 1:
        raise DatasetError(f"{where}: needs exactly one of exclude, split, merge, rename (got {sorted(entry)})")
    op = ops[0]
    needed = {"exclude": set(), "split": {"into"}, "merge": {"into"}, "rename": {"to"}}[op]
    allowed = {op, "note", *needed}
    if missing := needed - set(entry):
        raise DatasetError(f"{where}: {op} needs '{sorted(missing)[0]}:'")
    if extra := set(entry) - allowed:
        raise DatasetError(f"{where}: unknown key '{sorted(extra)[0]}' for {op}")
    if op == "split" and not (isinstance(entry["split"], list) and entry["split"]):
        raise DatasetError(f"{where}: split needs a list of photos")
    if op in ("merge", "rename") and not isinstance(entry[op], str):
        raise DatasetError(f"{where}: {op} needs a character as bundle/character")
    if op == "rename" and not _NAME.fullmatch(str(entry["to"]).split("/")[-1]):
        raise DatasetError(f"{where}: 'to: {entry['to']}' must be letters, digits, '_' or '-' (it names a folder)")


def append_correction(root: Path, entry: dict[str, Any]) -> Path:
    """Add ``entry`` at the end of ``root/corrections.yaml`` (created with a header when missing), atomically; every
    byte already there is kept (comments, layout)."""
    path = root / CORRECTIONS_FILE
    return write_bytes(path, appended(root, [entry]))


def appended(root: Path, new: list[dict[str, Any]]) -> bytes:
    """The bytes of ``root/corrections.yaml`` with ``new`` checked and added at the end of its list, the text a
    person wrote kept byte for byte: the entries' YAML follows it as more ``- ...`` items. Nothing is written.

    Raises :class:`DatasetError` naming the file when it is malformed, when an entry is, or when the list cannot
    grow by appending (another key after it, flow style ``[...]``): a person's text is never rewritten."""
    path = root / CORRECTIONS_FILE
    text = _read_text(path) if path.exists() else ""
    data, entries = _parse(path, text)
    for number, entry in enumerate(new, len(entries) + 1):
        _check(path, number, entry)
    newline = "\r\n" if "\r\n" in text else "\n"
    if not text:
        text = HEADER.replace("\n", newline)
    elif not text.endswith(("\n", "\r")):
        text += newline  # a last line without its line break: the next item must start a line of its own
    items = yaml.safe_dump(new, sort_keys=False, allow_unicode=True, width=120).splitlines()
    expected = {**(data or {}), "corrections": [*entries, *new]}
    # The items go at the indentation of the existing ones; the one that reads back as the old document plus the
    # new entries is right (a wrong one fails to parse or reads as something else).
    heads = [] if isinstance(data, dict) and "corrections" in data else [f"corrections:{newline}"]
    for indent in ("", "  ", "    "):
        candidate = text + "".join(heads) + "".join(f"{indent}{line}{newline}" for line in items)
        try:
            if yaml.safe_load(candidate) == expected:
                return candidate.encode("utf-8")
        except yaml.YAMLError:
            continue
    flow = "; ".join(
        "- " + yaml.safe_dump(entry, sort_keys=False, allow_unicode=True, default_flow_style=True, width=1 << 20)
        .strip() for entry in new
    )
    raise DatasetError(
        f"{path}: cannot add a correction without rewriting your text: make 'corrections:' the last key, a block "
        f"list of '- ...' items, or add it at the end of that list yourself: {flow}"
    )


def photo_entry(root: Path, characters: list[Character], ref: str) -> dict[str, str]:
    """``{id, file}`` for a photo named on the command line (see :func:`resolve_photo`)."""
    content_id = resolve_photo(root, characters, ref, known=set())
    files = [f"{c.key}/{i.file}" for c in characters for i in c.images if i.embedding_id == content_id]
    return {"id": content_id, "file": files[0] if files else str(ref)}


def resolve_photo(root: Path, characters: list[Character], ref: Any, known: set[str]) -> str:
    """The content id (sha256) of a photo reference: a mapping with ``id``, a sha256, a path in the dataset or a
    source path, or a dataset file name ``<stem>_<8 hex>.<ext>`` matched against placed and ``known`` ids."""
    from dtback.identity.cache import content_hash

    if isinstance(ref, dict):
        if isinstance(ref.get("id"), str) and _SHA256.fullmatch(ref["id"]):
            return ref["id"]
        ref = ref.get("file", ref)
    text = str(ref)
    if _SHA256.fullmatch(text):
        return text
    name = Path(text).name
    placed = [i.embedding_id for c in characters for i in c.images if i.file == name]
    if placed:
        return placed[0]
    for path in (root / text, Path(text)):
        if path.is_file():
            return content_hash(path)
    match = _KEY_IN_NAME.search(name)
    if match:
        ids = {i.embedding_id for c in characters for i in c.images} | known
        found = sorted(i for i in ids if i.startswith(match.group(1)))
        if len(found) == 1:
            return found[0]
    raise DatasetError(f"{CORRECTIONS_FILE}: photo {text!r} is neither in the dataset, nor a file, nor a sha256 id")


def apply_corrections(root: Path, entries: list[dict[str, Any]], known: set[str], contact_tiles: int) -> Applied:
    """Apply ``entries`` to the characters under ``root`` (files moved, ``character.json`` and contact sheets
    rewritten where something changed). ``known``: content ids of this run's pictures, to resolve file names of
    photos no longer placed."""
    applied = Applied()
    touched: set[str] = set()
    for number, entry in enumerate(entries, 1):
        characters = {c.key: c for c in read_characters(root)}
        if "exclude" in entry:
            content_id = resolve_photo(root, list(characters.values()), entry["exclude"], known)
            applied.excluded.add(content_id)
            for character in characters.values():
                for image in [i for i in character.images if i.embedding_id == content_id]:
                    character.images.remove(image)
                    (character.folder(root) / image.file).unlink(missing_ok=True)
                    applied.removed += 1
                    touched.add(character.key)
                    _save(root, character)
        elif "split" in entry:
            ids = [resolve_photo(root, list(characters.values()), ref, known) for ref in entry["split"]]
            applied.moved += _move(root, characters, set(ids), _split_target(entries, number, root), touched)
        elif "merge" in entry:
            source = _key(entry["merge"], root, number)
            if source in characters:
                ids = {image.embedding_id for image in characters[source].images}
                _move(root, characters, ids, _key(entry["into"], root, number), touched)
                applied.merged += 1
        else:
            source = _key(entry["rename"], root, number)
            target = f"{source.split('/')[0]}/{str(entry['to']).split('/')[-1]}"
            if source in characters and target not in characters:
                _rename(root, characters[source], target.split("/")[1])
                touched.discard(source)
                touched.add(target)
                applied.renamed += 1
    for character in read_characters(root):
        if character.key in touched:
            write_contact_sheet(root, character, contact_tiles)
    return applied


def split_targets(root: Path, entries: list[dict[str, Any]], known: set[str]) -> dict[str, str]:
    """Content id -> character key for every photo a ``split`` names (the last correction wins). The builder places
    such a photo there even when it is not in the dataset yet (left out as ``ambiguous``, say)."""
    characters = read_characters(root)
    targets = {}
    for number, entry in enumerate(entries, 1):
        if "split" in entry:
            target = _split_target(entries, number, root)
            for ref in entry["split"]:
                targets[resolve_photo(root, characters, ref, known)] = target
    return targets


def _split_target(entries: list[dict[str, Any]], number: int, root: Path) -> str:
    """Where split ``number`` (1-based) puts its photos now: its ``into``, followed through later merges and renames
    (which were recorded after the split and so applied after it the first time)."""
    target = _key(entries[number - 1]["into"], root, number)
    for later in entries[number:]:
        if later.get("merge") == target:
            target = str(later["into"]).strip("/")
        elif later.get("rename") == target:
            target = f"{target.split('/')[0]}/{str(later['to']).split('/')[-1]}"
    return target


def corrected_names(entries: list[dict[str, Any]]) -> set[str]:
    """Character keys the corrections name (merged away, renamed, split into): never given to a new character, so
    that an old correction cannot apply to a newcomer of the same name."""
    names = set()
    for entry in entries:
        for op in ("merge", "rename", "into"):
            if isinstance(entry.get(op), str):
                names.add(str(entry[op]).strip("/"))
    return names


def _key(value: Any, root: Path, number: int) -> str:
    parts = str(value).strip("/").split("/")
    if len(parts) != 2 or not all(_NAME.fullmatch(p) for p in parts):
        raise DatasetError(f"{root / CORRECTIONS_FILE}: correction {number}: {value!r} is not bundle/character")
    return "/".join(parts)


def _move(root: Path, characters: dict[str, Character], ids: set[str], target_key: str, touched: set[str]) -> int:
    """Move the placed images with content ``ids`` into ``target_key`` (made when missing); returns how many."""
    moved = 0
    target = characters.get(target_key)
    for character in list(characters.values()):
        if character.key == target_key:
            continue
        images = [image for image in character.images if image.embedding_id in ids]
        if not images:
            continue
        if target is None:
            bundle, name = target_key.split("/")
            target = Character(bundle, name, dict(character.encoder))
            characters[target_key] = target
        for image in images:
            (target.folder(root)).mkdir(parents=True, exist_ok=True)
            (character.folder(root) / image.file).replace(target.folder(root) / image.file)
            character.images.remove(image)
            target.images.append(image)
            moved += 1
        touched.update({character.key, target_key})
        _save(root, target)  # first the target lists the images, then the source lets them go
        _save(root, character)
    return moved


def _save(root: Path, character: Character) -> None:
    """Write ``character.json``, or remove the folder when the character has no image left."""
    folder = character.folder(root)
    if character.images:
        write_character(root, character)
        return
    for name in (CHARACTER_FILE, "contact_sheet.png"):
        (folder / name).unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
    log.info("%s: no image left, folder removed", character.key)


def _rename(root: Path, character: Character, name: str) -> None:
    old = character.folder(root)
    renamed = replace(character, name=name)
    if renamed.folder(root).exists():
        raise DatasetError(f"rename {character.key}: {renamed.folder(root)} already exists")
    old.rename(renamed.folder(root))
    write_character(root, renamed)


def fix(root: Path, operation: str, args: list[str], into: str | None, contact_tiles: int) -> str:
    """``dtback dataset fix``: apply one correction now and record it in ``root/corrections.yaml``; returns what
    was done, for people. ``args``: photos (exclude, split), FROM INTO (merge), CHARACTER NEW_NAME (rename).

    The entry is recorded only once it applied: a refused one (:class:`DatasetError`) leaves the file byte for byte
    as it was, so that later builds do not meet it again. The new file's bytes are made (and the file checked)
    before anything changes, and written atomically after."""
    from dtback.curate.characters import new_slots

    if not root.is_dir():
        raise DatasetError(f"{root}: no such dataset folder")
    characters = read_characters(root)
    if not characters:
        raise DatasetError(f"{root}: no character built by `dtback dataset build` ({CHARACTER_FILE}) in it")
    keys = {c.key for c in characters}
    if operation in ("merge", "rename"):
        if len(args) != 2:
            raise DatasetError(f"dataset fix {operation} needs two arguments, got {len(args)}: {' '.join(args)}")
        if args[0].strip("/") not in keys:
            raise DatasetError(f"{root}: no character {args[0]} (characters are bundle/character, e.g. {min(keys)})")
    if operation == "exclude":
        entries = [{"exclude": photo_entry(root, characters, ref)} for ref in args]
    elif operation == "split":
        photos = [photo_entry(root, characters, ref) for ref in args]
        if into is None:
            holders = [c.bundle for c in characters for i in c.images if i.embedding_id == photos[0]["id"]]
            bundle = holders[0] if holders else characters[0].bundle
            reserved = corrected_names(read_corrections(root))
            slot = new_slots(root, characters, 1, bundle, "person", None, reserved)[0]
            into = f"{bundle}/{slot[1]}" if slot[0] == bundle else "/".join(slot)
        parts = into.strip("/").split("/")
        if len(parts) != 2 or not all(_NAME.fullmatch(part) for part in parts):
            raise DatasetError(f"dataset fix split --into {into!r}: not bundle/character (letters, digits, '_' or '-', "
                               f"e.g. {characters[0].bundle}/bob)")
        entries = [{"split": photos, "into": into}]
    elif operation == "merge":
        if args[1].strip("/") not in keys:
            raise DatasetError(f"{root}: no character {args[1]} to merge into")
        if args[0].strip("/") == args[1].strip("/"):
            raise DatasetError(f"dataset fix merge {args[0]} {args[1]}: a character cannot be merged into itself")
        entries = [{"merge": args[0].strip("/"), "into": args[1].strip("/")}]
    elif operation == "rename":
        entries = [{"rename": args[0].strip("/"), "to": args[1]}]
        target = root / args[0].strip("/").split("/")[0] / args[1].split("/")[-1]
        if _NAME.fullmatch(target.name) and target.exists():
            raise DatasetError(f"dataset fix rename {args[0]} {args[1]}: {target} already exists; pick another name "
                               "(or merge into that character)")
    else:
        raise DatasetError(f"dataset fix: unknown operation {operation!r} (exclude, split, merge, rename)")
    recorded = appended(root, entries)
    applied = apply_corrections(root, entries, set(), contact_tiles)
    write_bytes(root / CORRECTIONS_FILE, recorded)
    later = ""
    if operation == "split" and applied.moved < len(entries[0]["split"]):
        later = (f"; {len(entries[0]['split']) - applied.moved} photo(s) not in the dataset yet go to {into} "
                 "on the next `dtback dataset build`")
    return (
        f"{CORRECTIONS_FILE}: +{len(entries)} correction(s); removed {applied.removed} image(s), moved {applied.moved}, "
        f"merged {applied.merged}, renamed {applied.renamed} character(s){later}; later builds keep them"
    )
