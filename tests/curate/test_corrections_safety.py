"""``dtback dataset fix`` never loses what a person wrote and never reaches outside the dataset: a refused fix leaves
``corrections.yaml`` byte for byte as it was, a recorded one keeps the file's comments and layout, and a
``character.json`` whose image names reach elsewhere is refused before anything is deleted or moved."""

from __future__ import annotations

import json
import shutil

import pytest

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.curate import corrections
from dtback.curate.characters import CHARACTER_FILE, read_characters
from dtback.curate.corrections import CORRECTIONS_FILE, append_correction, read_corrections
from dtback.errors import DatasetError
from curate_helpers import build, every_byte

HAND_WRITTEN = "# my own notes: keep them\ncorrections:\n- exclude: {old}   # a blurry one\n"


def fix(out, *args) -> int:
    return main(["dataset", "fix", str(out), *args])


@pytest.fixture()
def built(photos, tmp_path):
    """A copy of the session's built dataset (fixes change it)."""
    out = tmp_path / "dataset"
    shutil.copytree(photos["out"], out)
    return out


def test_a_refused_fix_leaves_corrections_yaml_byte_for_byte(built, photos, tmp_path, capsys):
    first, second = read_characters(built)[:2]
    text = HAND_WRITTEN.format(old="ef" * 32).encode()
    (built / CORRECTIONS_FILE).write_bytes(text)
    (built / first.bundle / "alice").mkdir()  # a folder of the person's own, not a character
    before = every_byte(built)

    assert fix(built, "rename", first.key, "alice") == EXIT_BAD_INPUT
    assert every_byte(built) == before
    assert "alice already exists" in capsys.readouterr().err
    photo = f"{second.key}/{second.images[0].file}"
    assert fix(built, "split", photo, "--into", "../../x/evil") == EXIT_BAD_INPUT
    assert every_byte(built) == before and not (tmp_path / "x").exists()
    err = capsys.readouterr().err
    assert "'../../x/evil'" in err and "not bundle/character" in err
    assert fix(built, "merge", first.key, first.key) == EXIT_BAD_INPUT
    assert every_byte(built) == before and "cannot be merged into itself" in capsys.readouterr().err

    # A file that cannot grow without being rewritten (flow style) is refused before the photo is touched.
    flow = b"corrections: []  # mine\n"
    (built / CORRECTIONS_FILE).write_bytes(flow)
    assert fix(built, "exclude", photo) == EXIT_BAD_INPUT
    assert "cannot add a correction without rewriting your text" in capsys.readouterr().err
    assert (built / CORRECTIONS_FILE).read_bytes() == flow and (second.folder(built) / second.images[0].file).is_file()

    # Later builds are not stopped by what was refused.
    (built / CORRECTIONS_FILE).write_bytes(text)
    (built / first.bundle / "alice").rmdir()
    build([photos["flat"]], built, photos["cache"])
    assert (built / CORRECTIONS_FILE).read_bytes() == text


def test_a_correction_refused_while_applied_is_not_recorded(built, monkeypatch):
    """Whatever refuses the correction, the entry is recorded only after it applied."""
    character = read_characters(built)[0]

    def refuse(*args, **kwargs):
        raise DatasetError("refused while applying")

    monkeypatch.setattr(corrections, "apply_corrections", refuse)
    assert fix(built, "exclude", f"{character.key}/{character.images[0].file}") == EXIT_BAD_INPUT
    assert not (built / CORRECTIONS_FILE).exists()


@pytest.mark.parametrize(
    "text",
    [
        HAND_WRITTEN,
        HAND_WRITTEN.rstrip("\n") + "\n# the last line has no line break",
        "# notes only, no list yet\n",
        "corrections:   # indented items\n  - exclude: {old}\n  # a comment between\n",
        "corrections:   # every entry deleted by hand\n# the end",
        HAND_WRITTEN.replace("\n", "\r\n"),
        "",
    ],
    ids=["comments", "no-final-newline", "comments-only", "indented", "empty-list", "crlf", "empty"],
)
def test_a_fix_keeps_every_byte_a_person_wrote(built, text):
    old = "ab" * 32
    character = read_characters(built)[0]
    photo, other = character.images[:2]
    written = text.format(old=old).encode()
    (built / CORRECTIONS_FILE).write_bytes(written)
    before = read_corrections(built)

    assert fix(built, "exclude", f"{character.key}/{photo.file}") == 0
    after = (built / CORRECTIONS_FILE).read_bytes()
    assert after.startswith(written) and len(after) > len(written)
    assert read_corrections(built) == [*before, {"exclude": {"id": photo.embedding_id,
                                                              "file": f"{character.key}/{photo.file}"}}]
    assert not (character.folder(built) / photo.file).exists()

    # The builder's "deleted by hand" entries are appended the same way.
    append_correction(built, {"exclude": {"id": other.embedding_id, "file": other.file}, "note": "deleted by hand"})
    assert (built / CORRECTIONS_FILE).read_bytes().startswith(after)
    assert read_corrections(built)[-1]["note"] == "deleted by hand" and len(read_corrections(built)) == len(before) + 2


def test_a_build_records_a_hand_deletion_below_the_hand_written_text(built, photos):
    written = HAND_WRITTEN.format(old="cd" * 32).encode()
    (built / CORRECTIONS_FILE).write_bytes(written)
    character = read_characters(built)[0]
    (character.folder(built) / character.images[0].file).unlink()
    build([photos["flat"]], built, photos["cache"])
    assert (built / CORRECTIONS_FILE).read_bytes().startswith(written)
    assert read_corrections(built)[-1]["exclude"]["id"] == character.images[0].embedding_id


@pytest.mark.parametrize("name", ["../../../victim.jpg", "ABSOLUTE", "sub/victim.jpg", "..\\victim.jpg", "..", "",
                                  CHARACTER_FILE, 7])
def test_a_character_json_naming_a_file_elsewhere_is_refused(built, photos, tmp_path, capsys, name):
    victim = tmp_path / "victim.jpg"
    victim.write_bytes(b"precious")
    character = read_characters(built)[0]
    path = character.folder(built) / CHARACTER_FILE
    data = json.loads(path.read_text())
    data["images"][0]["file"] = str(victim) if name == "ABSOLUTE" else name
    path.write_text(json.dumps(data))
    before = every_byte(built / character.bundle)

    assert fix(built, "exclude", data["images"][0]["embedding_id"]) == EXIT_BAD_INPUT
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {path}: images[0].file: {data['images'][0]['file']!r} is not the name of an image")
    with pytest.raises(DatasetError, match=r"images\[0\]\.file"):
        build([photos["flat"]], built, photos["cache"])
    assert victim.read_bytes() == b"precious"
    assert every_byte(built / character.bundle) == before and not (built / CORRECTIONS_FILE).exists()
