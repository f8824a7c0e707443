"""Corrections to a built dataset (``corrections.yaml``, ``dtback dataset fix``): exclude, split, merge and rename,
each honoured by every later build; malformed files are errors naming the entry."""

from __future__ import annotations

import pytest

from dtback.cli import main
from dtback.curate.characters import read_characters
from dtback.curate.corrections import CORRECTIONS_FILE, read_corrections
from dtback.errors import DatasetError
from curate_helpers import build, characters_by_content, every_byte


def fix(out, *args) -> int:
    return main(["dataset", "fix", str(out), *args])


def test_each_correction_is_kept_by_later_builds(photos, tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    # Written by hand before the first build: a source photo, named by its source path.
    banned = sorted(photos["flat"].iterdir())[0]
    (out / CORRECTIONS_FILE).write_text(f"corrections:\n- exclude: {banned}\n")
    build([photos["flat"]], out, photos["cache"])
    assert banned.name not in {i.source.split("/")[-1] for c in read_characters(out) for i in c.images}
    first, second, third = sorted(read_characters(out), key=lambda c: -len(c.images))[:3]

    excluded = first.images[0]
    assert fix(out, "exclude", f"{first.key}/{excluded.file}") == 0
    assert fix(out, "split", f"{first.key}/{first.images[1].file}", f"{first.key}/{first.images[2].file}",
               "--into", f"{first.bundle}/split_off") == 0
    assert fix(out, "merge", second.key, third.key) == 0
    assert fix(out, "rename", third.key, "alice") == 0
    expected = characters_by_content(out)
    alice = f"{third.bundle}/alice"
    assert expected[alice] == {i.embedding_id for i in second.images + third.images}
    assert expected[f"{first.bundle}/split_off"] == {first.images[1].embedding_id, first.images[2].embedding_id}
    assert second.key not in expected and third.key not in expected
    assert excluded.embedding_id not in set().union(*expected.values())
    assert not (first.folder(out) / excluded.file).exists()
    assert len(read_corrections(out)) == 5

    # Later builds keep every correction, write nothing new, and give no new character an old name.
    report = build([photos["flat"]], out, photos["cache"])
    assert characters_by_content(out) == expected and report.new_characters == []
    assert report.skipped_by_reason["excluded"] == 2
    before = every_byte(out)
    build([photos["flat"]], out, photos["cache"])
    assert every_byte(out) == before
    # --rebuild groups every source again and applies the corrections again: the exclusions hold.
    build([photos["flat"]], out, photos["cache"], "data.build.cluster_threshold=0.43", rebuild=True)
    placed = set().union(*characters_by_content(out).values())
    assert excluded.embedding_id not in placed


def test_bad_corrections_name_the_entry(photos, tmp_path):
    out = tmp_path / "dataset"
    build([photos["flat"]], out, photos["cache"])
    key = read_characters(out)[0].key
    for text, words in [
        ("corrections:\n- drop: x.jpg\n", "correction 1: needs exactly one of"),
        ("corrections:\n- exclude: nowhere/never_00000000.jpg\n", "'nowhere/never_00000000.jpg' is neither"),
        (f"corrections:\n- merge: {key}\n", "correction 1: merge needs 'into:'"),
        (f"corrections:\n- rename: {key}\n  to: a/b c\n", "must be letters"),
        ("corrections: [\n", "not readable YAML"),
    ]:
        (out / CORRECTIONS_FILE).write_text(text)
        with pytest.raises(DatasetError, match=words.replace("(", r"\(")):
            build([photos["flat"]], out, photos["cache"])
    (out / CORRECTIONS_FILE).unlink()
    assert fix(out, "merge", "built_000/nobody", key) == 2
    assert fix(tmp_path / "missing", "exclude", "x.jpg") == 2


def test_a_character_folder_deleted_by_hand_stays_deleted(photos, tmp_path):
    import shutil

    out = tmp_path / "dataset"
    build([photos["flat"]], out, photos["cache"])
    victim = read_characters(out)[0]
    ids = {image.embedding_id for image in victim.images}
    shutil.rmtree(victim.folder(out))
    report = build([photos["flat"]], out, photos["cache"])
    assert not ids & set().union(*characters_by_content(out).values()) and report.new_characters == []
    assert report.skipped_by_reason["excluded"] == len(ids)
    assert sum("deleted by hand" in str(entry.get("note")) for entry in read_corrections(out)) == len(ids)
    # Deleting the entries from corrections.yaml lets the builder place the photos again.
    (out / CORRECTIONS_FILE).unlink()
    build([photos["flat"]], out, photos["cache"])
    assert ids in [set(v) for v in characters_by_content(out).values()]


def test_a_left_out_photo_is_placed_by_split_into(photos, tmp_path, capsys):
    out = tmp_path / "dataset"
    report = build([photos["flat"]], out, photos["cache"])
    left_out = next(skip for skip in report.skips if skip.reason == "ambiguous")
    target = read_characters(out)[-1].key
    assert fix(out, "split", left_out.path, "--into", target) == 0
    assert "go to " + target + " on the next `dtback dataset build`" in capsys.readouterr().err
    assert fix(out, "rename", target, "carol") == 0  # before the build: the photo follows the character
    target = f"{target.split('/')[0]}/carol"
    again = build([photos["flat"]], out, photos["cache"])
    (character,) = [c for c in read_characters(out) if c.key == target]
    assert again.new_characters == []
    assert left_out.path in {image.source for image in character.images} and again.images_added == 1
    assert "ambiguous" not in {s.reason for s in again.skips if s.path == left_out.path}
    before = every_byte(out)
    build([photos["flat"]], out, photos["cache"])
    assert every_byte(out) == before
