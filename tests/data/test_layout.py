"""Scanning <bundle>/<character>/<image>: every file is kept, skipped with a reason, or in a dropped character."""

from __future__ import annotations

import json
import os

import pytest
from PIL import features

from dtback.config import DataConfig
from dtback.data.layout import scan_dataset
from dtback.errors import DatasetError
from helpers import make_dataset, write_image, write_noise


def cfg(root, **kw) -> DataConfig:
    return DataConfig(data_dir=root, **kw)


def reasons(index) -> dict[str, str]:
    return {s.path: s.reason for s in index.skips}


@pytest.fixture
def messy(tmp_path):
    """A dataset with one file of every bad class, next to good images."""
    root = make_dataset(tmp_path / "data", {"film": {"alice": 3, "bob": 3}, "shoot": {"carol": 4}})
    alice = root / "film" / "alice"
    write_image(alice / "jpeg_named.png", fmt="JPEG")  # good: decoded by content
    (alice / "zero.jpg").write_bytes(b"")
    (alice / "notes.jpg").write_text("not an image")
    noisy = write_noise(alice / "cut.jpg")
    noisy.write_bytes(noisy.read_bytes()[:300])
    write_image(alice / ".hidden.png")
    write_image(alice / "nested" / "deep.png")
    write_image(root / "film" / ".cache" / "x" / "y.png")
    outside = write_image(tmp_path / "elsewhere" / "secret.png")
    os.symlink(outside, alice / "escape.png")
    os.symlink(tmp_path / "missing.png", alice / "dangling.png")
    os.symlink(root / "shoot" / "carol" / "000.png", alice / "inside_link.png")  # good: stays in the root
    write_image(root / "stray.png")
    write_image(root / "film" / "loose.png")
    (root / "README.md").write_text("about this dataset")
    (alice / "000.txt").write_text("  alice waving at the sea \n")
    (alice / "001.txt").write_bytes(b"\xff\xfe caf\xe9")  # not UTF-8
    write_image(root / "film" / "dave" / "only.png")  # 1 image: dropped
    (root / "film" / "empty").mkdir()  # 0 images: dropped
    return root


def test_every_bad_file_is_counted_with_its_reason(messy):
    index = scan_dataset(cfg(messy), seed=0, progress=False)
    assert reasons(index) == {
        "film/alice/zero.jpg": "zero_byte",
        "film/alice/notes.jpg": "not_an_image",
        "film/alice/cut.jpg": "truncated",
        "film/alice/.hidden.png": "hidden",
        "film/alice/nested": "misplaced",
        "film/.cache": "hidden",
        "film/alice/escape.png": "symlink_outside_root",
        "film/alice/dangling.png": "broken_symlink",
        "stray.png": "misplaced",
        "film/loose.png": "misplaced",
        "film/alice/001.txt": "bad_caption",
    }
    assert index.ignored == ["README.md"]


def test_good_files_are_kept_with_captions(messy):
    index = scan_dataset(cfg(messy), seed=0, progress=False)
    alice = index.character("film/alice")
    names = sorted(e.path.name for e in alice.images)
    assert names == ["000.png", "001.png", "002.png", "inside_link.png", "jpeg_named.png"]
    by_name = {e.path.name: e for e in alice.images}
    assert by_name["jpeg_named.png"].format == "JPEG"
    assert by_name["000.png"].caption == "alice waving at the sea"
    assert by_name["001.png"].caption is None  # bad sidecar: template later
    assert (by_name["000.png"].width, by_name["000.png"].height) == (64, 80)


def test_characters_below_minimum_are_dropped_with_reason(messy):
    index = scan_dataset(cfg(messy, min_images_per_char=3), seed=0, progress=False)
    assert [c.key for c in index.characters] == ["film/alice", "film/bob", "shoot/carol"]
    drops = {d.character: (d.reason, d.detail) for d in index.drops}
    assert drops == {
        "film/dave": ("too_few_images", "1 usable images < min_images_per_char=3"),
        "film/empty": ("too_few_images", "0 usable images < min_images_per_char=3"),
    }
    index4 = scan_dataset(cfg(messy, min_images_per_char=4), seed=0, progress=False)
    assert [c.key for c in index4.characters] == ["film/alice", "shoot/carol"]
    assert {d.character for d in index4.drops} == {"film/bob", "film/dave", "film/empty"}


def test_report_counts_add_up(messy):
    report = scan_dataset(cfg(messy), seed=0, progress=False).report()
    json.dumps(report)  # JSON-ready
    film = report["bundles"]["film"]
    assert film["characters_found"] == 4 and film["characters_kept"] == 2 and film["characters_dropped"] == 2
    assert film["images_decoded"] == 5 + 3 + 1
    assert film["images_kept"] == 8
    assert film["skipped_by_reason"]["hidden"] == 2
    assert report["totals"]["files_skipped"] == 11
    assert report["totals"]["characters_kept"] == 3
    assert report["skipped_outside_bundles"] == 1  # stray.png
    assert report["ignored_files"] == ["README.md"]


def test_max_chars_per_bundle_is_deterministic_by_seed(tmp_path):
    root = make_dataset(tmp_path / "d", {"big": {f"c{i:02d}": 3 for i in range(12)}, "small": {"x": 3, "y": 3}})

    def kept(seed):
        index = scan_dataset(cfg(root, max_chars_per_bundle=4), seed=seed, progress=False)
        return [c.key for c in index.characters], index.drops

    first, drops = kept(seed=1)
    assert kept(seed=1)[0] == first
    big = [k for k in first if k.startswith("big/")]
    assert len(big) == 4 and "small/x" in first and "small/y" in first
    assert len(drops) == 8 and {d.reason for d in drops} == {"over_bundle_limit"}
    choices = {tuple(kept(seed=s)[0]) for s in range(6)}
    assert len(choices) > 1  # the seed, not the listing order, decides


def test_limit_applies_after_the_minimum(tmp_path):
    root = make_dataset(tmp_path / "d", {"b": {"few": 1, "p": 3, "q": 3}})
    index = scan_dataset(cfg(root, max_chars_per_bundle=2), seed=0, progress=False)
    assert sorted(c.key for c in index.characters) == ["b/p", "b/q"]
    assert [(d.character, d.reason) for d in index.drops] == [("b/few", "too_few_images")]


def test_missing_data_dir_names_it(tmp_path):
    with pytest.raises(DatasetError, match=f"data_dir {tmp_path / 'nope'} does not exist"):
        scan_dataset(cfg(tmp_path / "nope"), seed=0, progress=False)


def test_data_dir_that_is_a_file(tmp_path):
    path = write_image(tmp_path / "x.png")
    with pytest.raises(DatasetError, match="is not a folder"):
        scan_dataset(cfg(path), seed=0, progress=False)


def test_empty_dataset_is_a_clear_error_naming_data_dir(tmp_path):
    root = tmp_path / "junk"
    (root / "b" / "c").mkdir(parents=True)
    (root / "b" / "c" / "a.jpg").write_text("nope")
    write_image(root / "b" / "d" / "one.png")
    with pytest.raises(DatasetError) as info:
        scan_dataset(cfg(root), seed=0, progress=False)
    message = str(info.value)
    assert f"data_dir {root}: no usable characters" in message
    assert "not_an_image" in message and "too_few_images" in message


def test_real_photos(people_dir, tmp_path):
    """The shared LFW / BBT / Market-1501 photos: 3 bundles, 20 characters, 146 images, all decoded."""
    index = scan_dataset(cfg(people_dir, min_images_per_char=3), seed=0, progress=False)
    report = index.report()
    totals = report["totals"]
    assert totals["bundles"] == 3
    assert totals["characters_found"] == 20
    assert totals["images_decoded"] == 146
    assert totals["files_skipped"] == 0
    assert [(d.character, d.reason) for d in index.drops] == [("reid_market/market_0002", "too_few_images")]
    assert totals["characters_kept"] == 19 and totals["images_kept"] == 144
    formats = {e.format for c in index.characters for e in c.images}
    assert formats == {"JPEG", "PNG"}


def test_captions_are_read_from_stem_txt_or_full_name_txt(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", {"film": {"alice": 4}})
    alice = root / "film" / "alice"
    (alice / "000.png.txt").write_text("full-name caption\n")  # the kohya-style <name>.txt
    (alice / "001.txt").write_text("stem caption")
    (alice / "002.txt").write_text("stem wins")
    (alice / "002.png.txt").write_text("full name loses")
    (alice / "003.txt").write_text("the same words")
    (alice / "003.png.txt").write_text("the same words\n")
    with caplog.at_level("WARNING", logger="dtback.data"):
        index = scan_dataset(cfg(root), seed=0, progress=False)
    captions = {e.path.name: e.caption for e in index.character("film/alice").images}
    assert captions == {"000.png": "full-name caption", "001.png": "stem caption", "002.png": "stem wins",
                        "003.png": "the same words"}
    assert index.skips == [] and index.ignored == []
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "1 image has caption files with different text" in warnings[0]
    assert "film/alice/002.txt" in warnings[0]


def test_kohya_dot_caption_files_are_captions_not_skipped_images(tmp_path, caplog):
    root = make_dataset(tmp_path / "d", {"film": {"alice": 3}})
    alice = root / "film" / "alice"
    (alice / "000.caption").write_text("alice on a beach\n")  # kohya's / EveryDream's --caption_extension .caption
    (alice / "001.txt").write_text("the .txt wins")
    (alice / "001.caption").write_text("a .caption of other words")
    with caplog.at_level("WARNING", logger="dtback.data"):
        index = scan_dataset(cfg(root), seed=0, progress=False)
    captions = {e.path.name: e.caption for e in index.character("film/alice").images}
    assert captions == {"000.png": "alice on a beach", "001.png": "the .txt wins", "002.png": None}
    assert index.skips == [] and index.ignored == []  # was: two not_an_image skips
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "film/alice/001.txt" in warnings[0] and "<stem>.caption" in warnings[0]


def test_a_truncated_avif_is_counted_as_truncated_in_a_character_and_misplaced_beside_one(tmp_path):
    if not features.check("avif"):
        pytest.skip("Pillow was built without AVIF")
    root = make_dataset(tmp_path / "d", {"film": {"alice": 3}})
    for folder in (root / "film" / "alice", root / "film"):
        cut = write_noise(folder / "cut.avif", fmt="AVIF")
        cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    index = scan_dataset(cfg(root), seed=0, progress=False)
    assert reasons(index) == {"film/alice/cut.avif": "truncated", "film/cut.avif": "misplaced"}
    assert index.ignored == []
