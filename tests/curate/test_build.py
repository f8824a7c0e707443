"""Dataset builder end to end: real photos -> characters (faces found, purity, completeness), a video with known
identities, bad input as counted skips, reruns that change nothing and new sources that only add."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFilter
from sklearn.metrics import completeness_score, homogeneity_score

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.curate.build import REPORT_FILE, check_usable
from dtback.curate.characters import CHARACTER_FILE, read_characters
from dtback.curate.cluster import purity_completeness
from dtback.data.layout import scan_dataset
from dtback.errors import DatasetError
from curate_helpers import (
    PEOPLE_BUNDLES,
    build,
    characters_by_content,
    config,
    every_byte,
    placed_sources,
    snapshot,
)
from helpers import write_image, write_noise

def write_video(path: Path, frames: list[np.ndarray], fps: int = 4) -> Path:
    """Encode (H, W, 3) uint8 frames as an MPEG-4 video at ``fps`` frames per second."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for pixels in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return path


def on_canvas(image: np.ndarray, size=(256, 256), x: int = 0, y: int = 0) -> np.ndarray:
    canvas = np.full((size[1], size[0], 3), 90, dtype=np.uint8)
    canvas[y : y + image.shape[0], x : x + image.shape[1]] = image
    return canvas


# ------------------------------------------------------------------------------------------------ real photos


def test_real_photos_faces_found_purity_completeness(photos):
    report, truth = photos["report"], photos["truth"]
    people = sorted(name for name, (bundle, _) in truth.items() if bundle in PEOPLE_BUNDLES)
    assert len(people) == 140 and report.items == 146
    no_face = {Path(s.path).name for s in report.skips if s.reason == "no_face"}
    found = sum(name not in no_face for name in people) / len(people)
    assert found >= 0.95, f"faces found in {found:.1%} of the photos"
    # The full-body pedestrian crops (64 x 128 px) have no usable face: counted skips, never characters.
    market = {name for name, (bundle, _) in truth.items() if bundle == "reid_market"}
    too_small = {Path(s.path).name for s in report.skips if s.reason == "face_too_small"}
    assert len(market) == 6 and market <= no_face | too_small
    placed = placed_sources(photos["out"])
    assert not market & set(placed)
    # Photos left out (filtered) count as one-photo clusters, so they lower completeness.
    labels_true = np.array([truth[name][1] for name in people])
    labels_pred = np.array([placed.get(name, f"left-out/{name}") for name in people])
    purity, inverse_purity = purity_completeness(labels_true, labels_pred)
    completeness = completeness_score(labels_true, labels_pred)
    print(f"faces found {found:.3f}, placed {len(placed)}/140, purity {purity:.3f}, completeness {inverse_purity:.3f} "
          f"(sklearn homogeneity {homogeneity_score(labels_true, labels_pred):.3f}, completeness {completeness:.3f})")
    assert purity >= 0.9 and inverse_purity >= 0.9 and completeness >= 0.9
    assert len(report.new_characters) == 18 and report.characters == 18
    assert report.images_added == len(placed) >= 133


def test_written_characters_are_consistent_and_scan_cleanly(photos):
    out = photos["out"]
    characters = read_characters(out)
    for character in characters:
        folder = character.folder(out)
        assert (folder / CHARACTER_FILE).is_file()
        with Image.open(folder / "contact_sheet.png") as sheet:
            assert sheet.format == "PNG" and sheet.width == 128 * min(8, len(character.images))
        for image in character.images:
            data = (folder / image.file).read_bytes()
            assert hashlib.sha256(data).hexdigest() == image.embedding_id  # the embedding id names the content
            assert data == Path(image.source).read_bytes()  # photos are copied byte for byte
            x1, y1, x2, y2 = image.face_box
            left, top, right, bottom = image.body_box
            assert left <= x1 < x2 <= right and top <= y1 < y2 <= bottom
    index = scan_dataset(config(out, None).data, seed=0, progress=False)
    assert len(index.characters) == 18 and index.skips == []
    assert sum(len(c.images) for c in index.characters) == photos["report"].images_added
    assert set(index.ignored) == {".dtback-build", REPORT_FILE, "ambiguous.png"}
    # The photos left out as ambiguous are on a sheet of their own, for a person to place by hand.
    ambiguous = photos["report"].skipped_by_reason["ambiguous"]
    with Image.open(out / "ambiguous.png") as sheet:
        assert ambiguous >= 1 and sheet.width == 128 * min(8, ambiguous)
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["skipped_by_reason"]["no_face"] == 6 and report["faces_found"] == 140


def test_rerun_changes_nothing(photos):
    before = snapshot(photos["out"])
    report = build([photos["flat"]], photos["out"], photos["cache"])
    assert snapshot(photos["out"]) == before
    assert (report.images_added, report.new_characters, report.read.encoder_calls) == (0, [], 0)
    assert report.read.sources_unchanged == 146 and report.already_in_dataset == photos["report"].images_added
    assert report.read.cache_hits == 146  # every face record came from the cache


def test_rerun_writes_the_same_bytes(photos):
    """Every file of the dataset, the build state and build_report.json included, is byte for byte the same."""
    before = every_byte(photos["out"])
    build([photos["flat"]], photos["out"], photos["cache"])
    assert every_byte(photos["out"]) == before


def test_the_order_and_names_of_the_photos_do_not_matter(photos, tmp_path):
    """The same photos under other names, split over two sources given in the other order: the same characters
    with the same content, the same photos left out for the same reasons."""
    files = sorted(photos["flat"].iterdir())
    for number, path in enumerate(files):
        folder = tmp_path / ("b" if number % 2 else "a")
        folder.mkdir(exist_ok=True)
        shutil.copyfile(path, folder / f"{len(files) - number:04d}_renamed{path.suffix}")
    out = tmp_path / "dataset"
    report = build([tmp_path / "b", tmp_path / "a"], out, photos["cache"])
    assert characters_by_content(out) == characters_by_content(photos["out"])
    assert report.skipped_by_reason == photos["report"].skipped_by_reason


def test_a_rerun_with_other_settings_is_refused_until_rebuild(photos, tmp_path):
    out = tmp_path / "dataset"
    build([photos["flat"]], out, photos["cache"], "data.build.cluster_threshold=0.4", "data.min_images_per_char=4")
    before = every_byte(out)
    with pytest.raises(DatasetError) as refused:
        build([photos["flat"]], out, photos["cache"])
    message = str(refused.value)
    assert "data.build.cluster_threshold: 0.4 when built, now 0.44" in message
    assert "data.min_images_per_char: 4 when built, now 3" in message and "--rebuild" in message
    assert "cluster_margin" not in message and every_byte(out) == before  # nothing written
    # The same settings again: accepted. --rebuild: grouped again from scratch with the new settings.
    build([photos["flat"]], out, photos["cache"], "data.build.cluster_threshold=0.4", "data.min_images_per_char=4")
    build([photos["flat"]], out, photos["cache"], rebuild=True)
    assert characters_by_content(out) == characters_by_content(photos["out"])
    assert every_byte(out)[REPORT_FILE] == every_byte(photos["out"])[REPORT_FILE].replace(
        str(photos["out"]).encode(), str(out).encode())


def test_new_source_adds_only_new_images(photos, tmp_path):
    """First the LFW photos 1-7 of each person (+ the TV stills), then also photos 8-10: they join the right
    characters and nothing written before changes. Four characters per bundle."""
    flat, truth = photos["flat"], photos["truth"]
    first, later = tmp_path / "first", tmp_path / "later"
    for name, (bundle, _) in truth.items():
        number = None
        if bundle == "krasserm_lfw":
            number = sorted(n for n, t in truth.items() if t == truth[name]).index(name)
        if bundle in PEOPLE_BUNDLES:
            target = later if number is not None and number >= 7 else first
            target.mkdir(exist_ok=True)
            shutil.copyfile(flat / name, target / name)
    out = tmp_path / "dataset"
    one = build([first], out, photos["cache"], "data.max_chars_per_bundle=4")
    assert one.read.encoder_calls == 0  # same bytes as the module build: every face comes from the cache
    assert one.characters == 18 and one.bundles == [f"built_{i:03d}" for i in range(5)]
    before = snapshot(out)
    two = build([first, later], out, photos["cache"], "data.max_chars_per_bundle=4")
    # A new photo joins the right character or, close to the threshold, is left out as ambiguous.
    left_out = sum(s.reason == "ambiguous" and Path(s.path).parent == later.resolve() for s in two.skips)
    assert two.new_characters == [] and two.images_added == two.joined_existing == 30 - left_out and left_out <= 2
    after = snapshot(out)
    changed = {path for path in before if after[path] != before[path]}
    grown = {f"{c}/{name}" for c in two.grown_characters for name in (CHARACTER_FILE, "contact_sheet.png")}
    assert changed == grown | {".dtback-build/state.json"}  # the state remembers the new source files
    assert len(after) == len(before) + two.images_added and set(before) <= set(after)
    placed = placed_sources(out)
    for name in (p.name for p in later.iterdir() if p.name in placed_sources(out)):
        same_person = {placed[n] for n, t in truth.items() if t == truth[name] and n in placed}
        assert same_person == {placed[name]}


# ---------------------------------------------------------------------------------------------------- videos


def test_video_with_known_identities(people_dir, tmp_path):
    """1 s of grey, then 3 people x 4 photos, each photo held 1 s at 4 fps; sampled at 2 fps: 26 frames, the
    second frame of each photo is a near-duplicate, and each person becomes one character."""
    people = ["Tony_Blair", "Colin_Powell", "Hugo_Chavez"]
    frames = [on_canvas(np.zeros((0, 0, 3), np.uint8))] * 4  # grey
    spans = {}
    for person in people:
        spans[person] = (len(frames) / 4, (len(frames) + 16) / 4)
        for path in sorted((people_dir / "krasserm_lfw" / person).iterdir())[:4]:
            frames += [on_canvas(np.asarray(Image.open(path).convert("RGB")), x=3, y=3)] * 4
    (tmp_path / "src").mkdir()
    write_video(tmp_path / "src" / "clip.mp4", frames)
    out = tmp_path / "dataset"
    report = build([tmp_path / "src"], out, None, "data.build.video_fps=2")
    assert (report.read.videos, report.read.frames, report.items) == (1, 26, 26)
    reasons = report.skipped_by_reason
    # The two grey samples are byte-identical: the second is the same content as the first, which has no face.
    assert reasons["same_content"] == 1 and 1 <= reasons["no_face"] <= 3 and reasons["duplicate"] >= 8, reasons
    characters = read_characters(out)
    assert len(characters) == 3
    for character in characters:
        times = [image.frame_time for image in character.images]
        owners = {p for p, (start, end) in spans.items() for t in times if start <= t < end}
        assert len(owners) == 1 and len(times) >= 3
        for image in character.images:
            data = (character.folder(out) / image.file).read_bytes()
            assert image.source == str((tmp_path / "src" / "clip.mp4").resolve())
            assert hashlib.sha256(data).hexdigest() == image.embedding_id and data[:2] == b"\xff\xd8"  # JPEG
    # Rerun: the video is not decoded again and nothing changes.
    before = snapshot(out)
    again = build([tmp_path / "src"], out, None, "data.build.video_fps=2")
    assert again.read.sources_unchanged == 1 and again.read.encoder_calls == 0 and snapshot(out) == before


def test_video_of_the_astronaut_and_interrupted_writes(tmp_path, capsys):
    """Always available: skimage's astronaut at three places of a 10 fps video, sampled at 1 fps. A placed image
    deleted afterwards (as an interrupted run leaves it) is copied again by the next run."""
    astronaut = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((384, 384), Image.Resampling.LANCZOS))
    frames = [on_canvas(np.zeros((0, 0, 3), np.uint8), size=(768, 384))] * 20  # 2 s of grey
    for x in (0, 192, 384):
        frames += [on_canvas(astronaut, size=(768, 384), x=x)] * 10
    source = write_video(tmp_path / "astronaut.mp4", frames, fps=10)
    out = tmp_path / "dataset"
    # The same photo at three places of the frame is one picture (a near-duplicate): switched off to get three.
    same = "data.build.duplicate_face_distance=0"
    report = build([source], out, None, "data.build.max_frames_per_video=4", same)
    grey = {"no_face": 1, "same_content": 1}  # two byte-identical grey frames
    assert report.read.frames == 4 and report.skipped_by_reason == grey | {"unclustered": 2}
    assert report.characters == 0
    run_report = tmp_path / "run.json"
    code = main(["dataset", "build", "--from", str(source), "--out", str(out), "--no-progress", "--report",
                 str(run_report), "--rebuild", "--set", same])  # other sampling settings: --rebuild applies them
    assert code == 0 and "new characters" in capsys.readouterr().err
    report = json.loads(run_report.read_text())
    assert report["read"]["frames"] == 5 and report["read"]["encoder_calls"] == 1  # sampling changed: 4 cached
    assert report["new_characters"] == ["built_000/person_0001"] and report["skipped_by_reason"] == grey
    character = read_characters(out)[0]
    assert [image.frame_time for image in character.images] == [2.0, 3.0, 4.0]
    # Deleted by hand: recorded as excluded in corrections.yaml and never copied back.
    lost = character.folder(out) / character.images[1].file
    lost.unlink()
    report = build([source], out, None, same)
    assert not lost.exists() and report.images_added == 0 and report.read.encoder_calls == 0
    assert report.skipped_by_reason["excluded"] == 1
    assert [i.frame_time for i in read_characters(out)[0].images] == [2.0, 4.0]
    assert "deleted by hand" in (out / "corrections.yaml").read_text()


def test_crops_letterboxes_and_resizes_of_a_kept_photo_are_duplicates(people_dir, tmp_path):
    """Three photos of one person and, of the first, a crop, a letterbox and a resize: one character of three
    photos; of the four versions of the first one is kept and the other three are skipped as its duplicates."""
    paths = sorted((people_dir / "krasserm_lfw" / "Tony_Blair").iterdir())[:3]
    src = tmp_path / "src"
    src.mkdir()
    for path in paths:
        shutil.copyfile(path, src / path.name)
    photo = Image.open(paths[0]).convert("RGB")
    photo.crop((30, 20, 225, 240)).save(src / "crop.png")
    letterbox = Image.new("RGB", (375, 250))
    letterbox.paste(photo, (62, 0))
    letterbox.save(src / "letterbox.jpg", quality=92)
    photo.resize((400, 400), Image.Resampling.BICUBIC).save(src / "resize.jpg", quality=90)
    out = tmp_path / "dataset"
    report = build([src], out)
    duplicates = {Path(skip.path).name: skip.detail for skip in report.skips if skip.reason == "duplicate"}
    versions = {paths[0].name, "crop.png", "letterbox.jpg", "resize.jpg"}
    assert len(duplicates) == 3 and set(duplicates) < versions, report.skipped_by_reason
    (kept,) = versions - set(duplicates)
    assert kept == "resize.jpg"  # the largest face is kept
    assert all(detail.endswith(kept) for detail in duplicates.values())
    placed = {Path(i.source).name for c in read_characters(out) for i in c.images}
    assert placed == {kept, paths[1].name, paths[2].name} and len(read_characters(out)) == 1


def test_a_sideways_photo_without_a_tag_joins_its_person_upright(people_dir, tmp_path):
    """Four photos of one person, one stored turned 90 degrees without an EXIF tag (a scan): it joins the other three,
    written upright as PNG (the source's pixels turned back), its face box on the face of the written picture; the
    dataset scan reads it like the others."""
    paths = sorted((people_dir / "krasserm_lfw" / "Tony_Blair").iterdir())[:4]
    src = tmp_path / "src"
    src.mkdir()
    for path in paths[:3]:
        shutil.copyfile(path, src / path.name)
    photo = Image.open(paths[3]).convert("RGB")
    photo.transpose(Image.Transpose.ROTATE_90).save(src / "scan.jpg", quality=95)
    out = tmp_path / "dataset"
    report = build([src], out)
    assert report.skipped_by_reason == {} and report.images_added == 4
    (character,) = read_characters(out)
    (turned,) = [image for image in character.images if Path(image.source).name == "scan.jpg"]
    assert turned.rotation == 270 and turned.file.endswith(".png")
    written = Image.open(character.folder(out) / turned.file)
    expected = Image.open(src / "scan.jpg").convert("RGB").transpose(Image.Transpose.ROTATE_270)
    assert written.size == (250, 250)
    np.testing.assert_array_equal(np.asarray(written.convert("RGB")), np.asarray(expected))
    x1, y1, x2, y2 = turned.face_box
    assert 60 < x1 < (x1 + x2) / 2 < 190 and 60 < y1 < (y1 + y2) / 2 < 190 and x2 - x1 > 80
    assert sum(1 for image in character.images if image.rotation == 0) == 3
    assert build([src], out).images_added == 0  # a rerun changes nothing


def full_body(path: Path, face: int = 28) -> Image.Image:
    """A head-and-shoulders photo shrunk so that its face is about ``face`` px, on a tall grey canvas."""
    photo = Image.open(path).convert("RGB")
    scale = face / (0.4 * photo.width)
    small = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (small.width * 3, small.height * 5), (110, 110, 110))
    canvas.paste(small, (small.width, 0))
    return canvas


def test_full_body_photos_with_small_faces_join_only_their_own_character(people_dir, tmp_path):
    """Five photos of Tony Blair make a character; full-body versions (faces ~28 px) of two more of his photos join
    it, at the stricter distance, with a correct body box; one of Colin Powell, who has no character, is skipped as
    face_too_small and never starts one."""
    blair = sorted((people_dir / "krasserm_lfw" / "Tony_Blair").iterdir())
    powell = sorted((people_dir / "krasserm_lfw" / "Colin_Powell").iterdir())
    src = tmp_path / "src"
    src.mkdir()
    for path in blair[:5]:
        shutil.copyfile(path, src / path.name)
    for path in (blair[5], blair[6], powell[0]):
        full_body(path).save(src / f"full_body_{path.stem}.png")
    report = build([src], tmp_path / "dataset")
    (character,) = read_characters(tmp_path / "dataset")
    joined = {Path(i.source).name: i for i in character.images if i.source.endswith(".png")}
    assert set(joined) == {f"full_body_{blair[5].stem}.png", f"full_body_{blair[6].stem}.png"}, report.skips
    for image in joined.values():
        x1, y1, x2, y2 = image.face_box
        left, top, right, bottom = image.body_box
        assert 18 <= x2 - x1 < 48 and left <= x1 < x2 <= right and top <= y1 < y2 <= bottom
        assert bottom - top >= 5 * (y2 - y1)  # the person below the face, not a face crop
    (skip,) = [s for s in report.skips if Path(s.path).name == f"full_body_{powell[0].stem}.png"]
    assert skip.reason == "face_too_small" and "small faces join only below" in skip.detail


def test_an_interrupted_write_is_finished_by_the_next_run(tmp_path, monkeypatch):
    from dtback.curate import build as build_module

    astronaut = skimage.data.astronaut()
    src = tmp_path / "src"
    for number, size in enumerate((512, 400, 300)):
        write_image(src / f"{number}.png", size=(8, 8))
        Image.fromarray(astronaut).resize((size, size), Image.Resampling.LANCZOS).save(src / f"{number}.png")
    copy_in = build_module.DatasetBuilder._copy_in
    calls = []

    def stop_at_the_second(self, image, character):
        calls.append(image)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return copy_in(self, image, character)

    monkeypatch.setattr(build_module.DatasetBuilder, "_copy_in", stop_at_the_second)
    out = tmp_path / "dataset"
    with pytest.raises(KeyboardInterrupt):
        build([src], out, None, "data.build.duplicate_face_distance=0")
    monkeypatch.setattr(build_module.DatasetBuilder, "_copy_in", copy_in)
    build([src], out, None, "data.build.duplicate_face_distance=0")
    character = read_characters(out)[0]
    assert len(character.images) == 3 and all((character.folder(out) / i.file).is_file() for i in character.images)
    assert not (out / "corrections.yaml").exists()


# ------------------------------------------------------------------------------------------------- bad input


def test_bad_input_is_counted_and_nothing_usable_exits_2(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "broken.mp4").write_bytes(b"this is not a video" * 50)
    write_image(src / "empty.jpg", size=(8, 8)).write_bytes(b"")
    (src / "notes.txt").write_text("holiday 2019")
    (src / ".DS_Store").write_bytes(b"\0\0")
    write_noise(src / "sub" / "noise.jpg", size=(200, 200))
    truncated = write_noise(src / "sub" / "cut.jpg", size=(200, 200), seed=1)
    truncated.write_bytes(truncated.read_bytes()[:600])
    astronaut = Image.fromarray(skimage.data.astronaut())
    astronaut.filter(ImageFilter.GaussianBlur(3)).save(src / "blurred.png")
    astronaut.resize((180, 180), Image.Resampling.LANCZOS).save(src / "small.png")
    pair = np.concatenate([skimage.data.astronaut(), skimage.data.astronaut()[:, ::-1]], axis=1)
    Image.fromarray(pair).save(src / "sub" / "two.jpg")
    out = tmp_path / "dataset"
    code = main(["dataset", "build", "--from", str(src), "--out", str(out), "--no-progress"])
    assert code == EXIT_BAD_INPUT
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["skipped_by_reason"] == {
        "blurred": 1, "face_too_small": 1, "hidden": 1, "no_face": 1, "not_an_image": 1, "several_faces": 1,
        "truncated": 1, "unreadable_video": 1, "zero_byte": 1,
    }
    assert report["characters"] == 0 and report["read"]["files"] == 8  # + the hidden one, not read
    printed = capsys.readouterr().err
    for words in ("skipped: unreadable_video", "skipped: blurred", "characters in total", "error: nothing usable in"):
        assert words in printed
    assert "contact_sheet.png" not in printed  # no character, no sheet to check
    with pytest.raises(DatasetError, match="nothing usable"):
        check_usable(build([src], out))
    with pytest.raises(DatasetError, match="no such file or folder"):
        build([tmp_path / "missing"], out)
    # A missing source leaves no --out folder behind.
    assert main(["dataset", "build", "--from", str(tmp_path / "missing"), "--out", str(tmp_path / "new")]) == 2
    assert not (tmp_path / "new").exists()


def test_an_interrupted_read_resumes_where_it_stopped(tmp_path, monkeypatch):
    from dtback.curate import sources

    src = tmp_path / "src"
    for i in range(4):
        write_noise(src / f"{i}.jpg", size=(96, 96), seed=i)
    out = tmp_path / "dataset"
    read = sources.SourceReader.read
    calls = []

    def stop_at_the_third(self, path):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return read(self, path)

    monkeypatch.setattr(sources.SourceReader, "read", stop_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        build([src], out)
    monkeypatch.setattr(sources.SourceReader, "read", read)
    report = build([src], out)
    assert report.read.sources_unchanged == 2 and report.read.encoder_calls == 2
    assert report.skipped_by_reason == {"no_face": 4}
