"""Hostile input (issue 19): config values, filesystem oddities in datasets and builder sources, and output paths.

Each case ends in a message naming the file, key or value (exit status 2 on the command line, no traceback) or in
a counted skip with its reason, before any expensive work. Generate: tests/inference/test_hostile_generate.py;
evaluate: tests/evaluation/test_hostile_evaluate.py.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.config import DataConfig, ModelConfig, load_config
from dtback.errors import ConfigError, DatasetError
from helpers import make_dataset, write_image

# ------------------------------------------------------------------------------------------------ config (case 5)


def config_error(tmp_path: Path, text: str | None = None, overrides=()) -> tuple[str, Path | None]:
    path = None
    if text is not None:
        path = tmp_path / "cfg.yaml"
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value), path


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("seed: -1\n", "seed", "greater than or equal to 0"),
        ("seed: 100000000000000000000000\n", "seed", "less than or equal to 4294967295"),
        ("training:\n  adam_betas: [2, 3]\n", "training.adam_betas", "each beta must be in [0, 1)"),
        ("training:\n  adam_betas: [0.9, 1.0]\n", "training.adam_betas", "each beta must be in [0, 1)"),
        ("model:\n  resampler_dim: 64\n  resampler_heads: 3\n", "model", "resampler_heads=3 does not divide "
                                                                      "resampler_dim=64"),
        ("model:\n  adapter_dim: 64\n  adapter_heads: 5\n", "model", "adapter_heads=5 does not divide adapter_dim=64"),
        ("model:\n  adapter_double_blocks: [-1]\n", "model", "adapter_double_blocks must hold distinct block indices"),
        ("data:\n  val_fraction: 0\n", "data", "val_fraction is 0 and val_characters is empty"),
        ("training:\n  batch_size: true\n", "training.batch_size", "not the boolean true"),
        ("training:\n  batch_size: 4.0\n", "training.batch_size", "valid integer"),
        ("training:\n  batch_size: '4'\n", "training.batch_size", "valid integer"),
        ("training:\n  learning_rate: true\n", "training.learning_rate", "not the boolean true"),
        ("model:\n  adapter_single_blocks: [1, false]\n", "model.adapter_single_blocks", "item 1: Input should be a "
                                                                                         "number"),
        ("training:\n  learning_rate: .inf\n", "training.learning_rate", "finite number"),
        ("training:\n  max_grad_norm: .nan\n", "training.max_grad_norm", "finite number"),
        ("training:\n  adam_betas: [.nan, 0.9]\n", "training.adam_betas.0", "finite number"),
        ("data:\n  build:\n    video_fps: .inf\n", "data.build.video_fps", "finite number"),
        ("model:\n  face_scale: -.inf\n", "model.face_scale", "finite number"),
        ("data:\n  world:\n    seed: -3\n", "data.world.seed", "greater than or equal to 0"),
    ],
)
def test_bad_config_values_name_the_file_and_key(tmp_path, text, key, fragment):
    message, path = config_error(tmp_path, text)
    assert f"{path}: {key}: " in message and fragment in message, message


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("seed=-1", "seed: Input should be greater than or equal to 0"),
        ("seed=1e23", "seed: Input should be a valid integer"),
        ("training.learning_rate=inf", "training.learning_rate: Input should be a finite number"),
        ("training.learning_rate=nan", "training.learning_rate: Input should be a finite number"),
        ("batch_size=true", "training.batch_size: Input should be a number, not the boolean true"),
        ("training.adam_betas=[2,3]", "training.adam_betas: each beta must be in [0, 1)"),
        ("data.caption_template='{character:d}'", "data.caption_template: placeholder(s) {character:d} carry a format"),
        ("data.caption_template='{character!r} {bundle:>99999999999}'",
         "data.caption_template: placeholder(s) {character!r}, {bundle:>99999999999} carry a format spec"),
    ],
)
def test_bad_overrides_name_the_argument(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"--set {override}: {fragment}" in str(info.value)


def test_numbers_still_read_as_before(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("training:\n  learning_rate: 1e-4\n  adam_betas: [0.9, 0.99]\n  batch_size: 2\n"
                    "data:\n  val_fraction: 0\n  val_characters: [a/b]\n")
    cfg = load_config(path)
    assert cfg.training.learning_rate == 1e-4 and cfg.training.adam_betas == (0.9, 0.99)
    assert cfg.training.batch_size == 2 and cfg.data.val_characters == ["a/b"]  # val_fraction 0 with names: fine


def test_duplicate_yaml_key_names_key_lines_and_file(tmp_path, capsys):
    path = tmp_path / "dup.yaml"
    path.write_text("training:\n  batch_size: 2\n  learning_rate: 1.0e-4\n  batch_size: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}: key 'batch_size' is given twice in one mapping (lines 2 and 4)" in str(info.value)
    assert main(["config", "show", "--config", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "batch_size" in err and "Traceback" not in err
    merged = tmp_path / "merge.yaml"  # YAML merge keys may be overridden: that is no duplicate
    merged.write_text("training:\n  <<: {batch_size: 2, num_epochs: 3}\n  batch_size: 5\n")
    assert load_config(merged).training.batch_size == 5


def test_model_keys_that_do_not_fit_the_loaded_transformer_name_the_key():
    from dtback.model.adapters import check_model_fits_base
    from dtback.model.flux import SIMPLE_TRANSFORMER  # 2 double + 4 single blocks, width 128

    with pytest.raises(ConfigError, match=r"model.adapter_double_blocks=\[99\]: \[99\] out of range, the "
                                          r"transformer has 2 double blocks \(indices 0..1\)"):
        check_model_fits_base(ModelConfig(adapter_double_blocks=[99]), SIMPLE_TRANSFORMER)
    with pytest.raises(ConfigError, match=r"model.resampler_heads=3 does not divide the resampler width 128 "
                                          r"\(model.resampler_dim null: the transformer width 128"):
        check_model_fits_base(ModelConfig(resampler_heads=3), SIMPLE_TRANSFORMER)
    with pytest.raises(ConfigError, match=r"model.adapter_heads=3 does not divide the adapter width 128"):
        check_model_fits_base(ModelConfig(adapter_heads=3), SIMPLE_TRANSFORMER)
    check_model_fits_base(ModelConfig(adapter_double_blocks=[1], adapter_single_blocks=[3]), SIMPLE_TRANSFORMER)


def test_a_split_with_nothing_held_out_is_refused(tmp_path):
    from dtback.data.layout import scan_dataset
    from dtback.data.split import split_characters

    root = make_dataset(tmp_path / "d", {"b": {"only": 3}}, size=(16, 16))
    cfg = DataConfig(data_dir=root)
    with pytest.raises(DatasetError, match="1 usable character.*none left to hold out"):
        split_characters(scan_dataset(cfg, 0, progress=False), cfg, 0)


# ------------------------------------------------------------------------------------- dataset folders (case 4)


def finishes(call, seconds: float = 60.0):
    """Run ``call`` in a thread; fail (instead of hanging the suite) when it has not returned in ``seconds``."""
    box: dict = {}

    def target():
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the test thread, which raises it
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{call} hung (a FIFO opened?)"
    if "error" in box:
        raise box["error"]
    return box["value"]


BAD_NAME = b"caf\xe9"  # Latin-1, not UTF-8


@pytest.fixture
def odd_dataset(tmp_path) -> Path:
    """Three good characters and every oddity: FIFOs at each level, symlink loops, a non-UTF-8 character folder."""
    root = make_dataset(tmp_path / "ds", {"b1": {"a": 3, "b": 3, "c": 3}}, size=(16, 16))
    os.mkfifo(root / "fifo_top")
    os.mkfifo(root / "b1" / "fifo_bundle")
    os.mkfifo(root / "b1" / "a" / "pipe.png")
    os.symlink("loop", root / "b1" / "loop")  # points at itself
    os.symlink("x2", root / "b1" / "a" / "x1.png")
    os.symlink("x1.png", root / "b1" / "a" / "x2")
    bad = os.fsencode(root / "b1") + b"/" + BAD_NAME
    os.mkdir(bad)
    for i in range(3):
        write_image(Path(os.fsdecode(bad + f"/{i}.png".encode())), size=(16, 16))
    return root


def test_scan_counts_fifos_loops_and_undecodable_names_as_skips(odd_dataset):
    from dtback.data.layout import scan_dataset

    index = finishes(lambda: scan_dataset(DataConfig(data_dir=odd_dataset), 0, progress=False))
    assert [c.key for c in index.characters] == ["b1/a", "b1/b", "b1/c"]
    skips = {s.path: (s.reason, s.detail) for s in index.skips}
    assert skips["fifo_top"][0] == skips["b1/fifo_bundle"][0] == skips["b1/a/pipe.png"][0] == "not_a_regular_file"
    assert "FIFO" in skips["b1/a/pipe.png"][1] and "never opened" in skips["b1/a/pipe.png"][1]
    assert skips["b1/loop"][0] == skips["b1/a/x1.png"][0] == "symlink_loop"
    assert skips["b1/caf\\xe9"][0] == "name_not_utf8" and "rename it" in skips["b1/caf\\xe9"][1]
    json.dumps(index.report(), ensure_ascii=False).encode("utf-8")  # every name in the report is printable


def test_training_scan_and_split_writer_survive_the_oddities(odd_dataset, tmp_path):
    from dtback.data.prepare import prepare_dataset

    run = tmp_path / "run"
    run.mkdir()
    data = DataConfig(data_dir=odd_dataset, val_characters=["b1/c"])
    prepared = finishes(lambda: prepare_dataset(data, 0, run, progress=False))
    assert prepared.split.train == ("b1/a", "b1/b") and prepared.split.val == ("b1/c",)
    assert json.loads((run / "split.json").read_text())["val"] == ["b1/c"]


def test_inspect_cli_reports_the_oddities_and_a_looping_data_dir(odd_dataset, tmp_path, capsys):
    assert finishes(lambda: main(["dataset", "inspect", str(odd_dataset), "--no-progress"])) == 0
    err = capsys.readouterr().err
    assert "skipped b1/caf\\xe9: name_not_utf8" in err and "skipped fifo_top: not_a_regular_file" in err
    loop = tmp_path / "loop_root"
    os.symlink(loop, loop)
    assert main(["dataset", "inspect", str(loop), "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(loop) in err and "Traceback" not in err


def test_a_reference_or_image_that_is_a_fifo_or_folder_is_never_opened(tmp_path):
    from dtback.data.images import ImageSkip, load_rgb

    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageSkip, match="not_a_regular_file: a FIFO"):
        finishes(lambda: load_rgb(tmp_path / "pipe.png", 10**6))
    with pytest.raises(ImageSkip, match="not_a_regular_file: a folder where a file was expected"):
        load_rgb(tmp_path, 10**6)


def test_builder_sources_skip_fifos_loops_and_bad_names(tmp_path):
    from dtback.curate.sources import list_files

    src = tmp_path / "src"
    write_image(src / "a.jpg")
    write_image(src / "sub" / "b.jpg")
    os.mkfifo(src / "pipe.jpg")
    os.mkfifo(src / "sub" / "pipe2")
    os.symlink("loop", src / "loop")
    write_image(Path(os.fsdecode(os.fsencode(src) + b"/" + BAD_NAME + b".jpg")))
    os.mkdir(os.fsencode(src) + b"/" + BAD_NAME)
    files, skips = finishes(lambda: list_files([src], exclude=tmp_path / "out"))
    assert [f.relative_to(src).as_posix() for f in files] == ["a.jpg", "sub/b.jpg"]
    reasons = {Path(s.path).name: s.reason for s in skips}
    assert reasons == {"pipe.jpg": "not_a_regular_file", "pipe2": "not_a_regular_file", "loop": "symlink_loop",
                       "caf\\xe9.jpg": "name_not_utf8", "caf\\xe9": "name_not_utf8"}
    with pytest.raises(DatasetError, match=f"--from {src / 'pipe.jpg'}: a FIFO"):
        list_files([src / "pipe.jpg"], exclude=tmp_path / "out")
    with pytest.raises(DatasetError, match=f"--from {src / 'loop'} cannot be resolved"):
        list_files([src / "loop"], exclude=tmp_path / "out")


@pytest.mark.parametrize("where", ["same", "inside"])
def test_build_from_the_output_folder_is_refused_before_any_work(tmp_path, capsys, where):
    out = make_dataset(tmp_path / "data", {"b": {"x": 2}}, size=(16, 16))
    source = out if where == "same" else out / "b"
    assert main(["dataset", "build", "--from", str(source), "--out", str(out), "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"--from {source} is the output folder --out {out} or inside it" in err and "Traceback" not in err
    assert not (out / ".dtback-build").exists()  # nothing was written


def test_build_into_a_file_or_reporting_into_a_folder_is_refused(tmp_path, capsys):
    source = make_dataset(tmp_path / "photos", {"b": {"x": 2}}, size=(16, 16))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["dataset", "build", "--from", str(source), "--out", str(blocker)]) == EXIT_BAD_INPUT
    assert f"--out {blocker} is a file, not a folder" in capsys.readouterr().err
    assert main(["dataset", "build", "--from", str(source), "--out", str(tmp_path / "new"), "--report",
                 str(source)]) == EXIT_BAD_INPUT
    assert f"--report {source} is a folder, not a file" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------- output paths (case 11)


def test_inspect_json_naming_a_folder_is_refused_before_the_scan(tmp_path, capsys):
    root = make_dataset(tmp_path / "d", {"b": {"x": 3, "y": 3}}, size=(16, 16))
    target = tmp_path / "report_dir"
    target.mkdir()
    assert main(["dataset", "inspect", str(root), "--json", str(target), "--no-progress"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"--json {target} is a folder, not a file" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "d", "report_dir"] and not any(target.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["dataset", "inspect", str(root), "--json", str(blocker / "r.json"), "--no-progress"]) == 2
    assert f"inside {blocker}, which is a file" in capsys.readouterr().err


def test_download_into_a_file_is_refused(tmp_path, capsys):
    models = tmp_path / "models"
    models.write_text("not a folder")
    assert main(["download", "--models-dir", str(models), "--check"]) == EXIT_BAD_INPUT
    assert f"--models-dir {models} is a file, not a folder" in capsys.readouterr().err
    assert main(["download", "--models-dir", str(models / "sub"), "--check"]) == EXIT_BAD_INPUT
    assert f"is inside {models}, which is a file" in capsys.readouterr().err


# ------------------------------------------------------------------------- decoders that raise unusual exception types


def _bad_avif_and_dds(folder: Path) -> list[Path]:
    """An AVIF whose 'pixi' box claims 91 bits per channel (Pillow: RuntimeError) and a DDS with an unknown pixel
    format (NotImplementedError)."""
    import io  # noqa: PLC0415

    from PIL import Image, features  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    image, written = Image.new("RGB", (64, 48), (120, 90, 60)), []
    if features.check("avif"):
        buffer = io.BytesIO()
        image.save(buffer, "AVIF")
        data = bytearray(buffer.getvalue())
        data[data.find(b"pixi") + 9] = 91
        written.append(folder / "bad.avif")
        written[-1].write_bytes(data)
    buffer = io.BytesIO()
    image.save(buffer, "DDS")
    data = bytearray(buffer.getvalue())
    data[80] = 0x9C
    written.append(folder / "bad.dds")
    written[-1].write_bytes(data)
    return written


def _huge_header_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A few hundred bytes whose PNG header claims ``width`` x ``height`` (over Pillow's decompression-bomb limit)."""
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def test_decoder_runtime_errors_and_huge_headers_are_counted_skips_at_every_level(tmp_path, capsys):
    from dtback.data.images import ImageSkip, load_rgb  # noqa: PLC0415
    from dtback.data.layout import scan_dataset  # noqa: PLC0415

    root = make_dataset(tmp_path / "ds", {"b1": {"a": 3, "b": 3}}, size=(16, 16))
    in_character = _bad_avif_and_dds(root / "b1" / "a")
    at_bundle_level = _bad_avif_and_dds(root / "b1")
    _huge_header_png(root / "panorama.png")
    _huge_header_png(root / "b1" / "panorama.png")
    for path in in_character:
        with pytest.raises(ImageSkip) as caught:
            load_rgb(path, 50_000_000)
        assert caught.value.reason.value == "corrupt" and caught.value.path == path
    index = finishes(lambda: scan_dataset(DataConfig(data_dir=root), 0, progress=False))
    assert [(c.key, len(c.images)) for c in index.characters] == [("b1/a", 3), ("b1/b", 3)]
    skips = {s.path: s.reason for s in index.skips}
    assert {skips[f"b1/a/{p.name}"] for p in in_character} == {"corrupt"}
    assert skips["panorama.png"] == skips["b1/panorama.png"] == "misplaced"
    # their signatures say image: a damaged image beside the character folders is misplaced, not a README to ignore
    assert {skips[f"b1/{p.name}"] for p in at_bundle_level} == {"misplaced"} and index.ignored == []
    assert main(["dataset", "inspect", str(root), "--no-progress"]) == 0
    assert "skipped b1/a/bad.dds: corrupt" in capsys.readouterr().err


def test_a_strip_image_is_cropped_before_it_is_resized(tmp_path):
    """A 3 KB PNG of 1,000,000 x 1 px would cover a 176 x 96 bucket at 96,000,000 x 96 px (28 GB) if resized first."""
    from PIL import Image  # noqa: PLC0415

    from dtback.data.buckets import bucket_transform, resize_to_bucket  # noqa: PLC0415

    strip = Image.new("RGB", (1_000_000, 1), (10, 200, 30))
    out = finishes(lambda: resize_to_bucket(strip, (176, 96)), seconds=20)
    assert out.size == (176, 96) and out.getpixel((88, 48)) == (10, 200, 30)
    scale, left, top = bucket_transform(1_000_000, 1, (176, 96))
    assert (scale, top) == (96.0, 0) and left == (96_000_000 - 176) // 2


# ------------------------------------------------------------------------- paths that silently meant something else


def test_home_in_a_path_is_the_home_folder_and_a_run_inside_its_data_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = load_config(None, ["data_dir=~/photos", "output_dir=~/runs/a", "identity.cache_dir=~/cache"])
    assert cfg.data.data_dir == tmp_path / "home" / "photos" and cfg.identity.cache_dir == tmp_path / "home" / "cache"
    assert cfg.output.output_dir == tmp_path / "home" / "runs" / "a"
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"data_dir={tmp_path / 'photos'}", f"output_dir={tmp_path / 'photos' / 'run'}"])
    assert f"--set output_dir={tmp_path / 'photos' / 'run'}" in str(info.value)
    assert "is inside data.data_dir" in str(info.value) and "read as a character" in str(info.value)


def test_a_missing_data_dir_of_the_users_own_is_announced_as_a_warning(tmp_path, caplog):
    from dtback.world.files import ensure_world  # noqa: PLC0415

    data = DataConfig(data_dir=tmp_path / "dtaa_typo", world={"characters": 4, "images_per_character": 3, "size": 32})
    with caplog.at_level("INFO", logger="dtback.world.files"):
        ensure_world(data, progress=False)
    warning = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "dtaa_typo is missing" in warning[0].getMessage()
    assert "if you meant photos, check the path" in warning[0].getMessage()


def test_symlinked_captions_from_outside_and_symlinked_characters_are_not_used(tmp_path):
    from dtback.data.layout import scan_dataset  # noqa: PLC0415

    root = make_dataset(tmp_path / "ds", {"b": {"Gerhard": 3, "c": 3, "e": 3}}, size=(16, 16))
    secret = tmp_path / "secret.txt"
    secret.write_text("text from outside the dataset")
    os.symlink(secret, root / "b" / "Gerhard" / "000.txt")
    (root / "b" / "c" / "000.txt").write_text("a caption of the dataset's own")
    os.symlink("Gerhard", root / "b" / "alias")  # the same identity twice: it could land in train and val at once
    index = scan_dataset(DataConfig(data_dir=root), 0, progress=False)
    assert [c.key for c in index.characters] == ["b/Gerhard", "b/c", "b/e"]
    captions = {f"{c.key}/{image.path.name}": image.caption for c in index.characters for image in c.images}
    assert captions["b/Gerhard/000.png"] is None and captions["b/c/000.png"] == "a caption of the dataset's own"
    skips = {s.path: (s.reason, s.detail) for s in index.skips}
    assert skips["b/Gerhard/000.txt"][0] == "symlink_outside_root"
    assert skips["b/alias"] == ("duplicate_folder", "the same folder as b/Gerhard (a symlink): one identity is one "
                                                     "character")


def test_generate_reads_a_prompts_or_settings_fifo_nobody_writes_to_without_waiting(tmp_path, capsys):
    reference = write_image(tmp_path / "ref.png")
    (tmp_path / "best_model.pt").write_bytes(b"")  # settings are checked before the model is read
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    common = ["generate", "--model", str(tmp_path / "best_model.pt"), "--reference", str(reference),
              "--output", str(tmp_path / "out")]
    assert finishes(lambda: main([*common, "--prompts-file", str(fifo)])) == EXIT_BAD_INPUT
    assert "no prompt: give --prompt TEXT (repeatable) or a non-empty --prompts-file" in capsys.readouterr().err
    assert finishes(lambda: main([*common, "--prompt", "a person", "--settings", str(fifo)])) == EXIT_BAD_INPUT
    assert f"--settings {fifo}: unreadable" in capsys.readouterr().err
    assert finishes(lambda: main([*common, "--prompts-file", "/dev/zero"])) == EXIT_BAD_INPUT
    assert "--prompts-file /dev/zero: unreadable" in capsys.readouterr().err


def test_a_caption_file_far_beyond_a_prompt_is_a_counted_skip(tmp_path):
    from dtback.data.captions import MAX_CAPTION_BYTES  # noqa: PLC0415
    from dtback.data.layout import scan_dataset  # noqa: PLC0415

    root = make_dataset(tmp_path / "ds", {"b": {"a": 3, "c": 3}}, size=(16, 16))
    (root / "b" / "a" / "000.txt").write_text("word " * (MAX_CAPTION_BYTES // 5 + 1))
    (root / "b" / "a" / "001.txt").write_text("a person by the sea")
    index = scan_dataset(DataConfig(data_dir=root), 0, progress=False)
    captions = {image.path.name: image.caption for image in index.characters[0].images}
    assert captions == {"000.png": None, "001.png": "a person by the sea", "002.png": None}
    skip = {s.path: s for s in index.skips}["b/a/000.txt"]
    assert skip.reason == "bad_caption" and f"over {MAX_CAPTION_BYTES} bytes" in skip.detail


def test_a_yaml_alias_bomb_is_refused_in_a_short_message(tmp_path):
    rows = ['a: &a ["x","x","x","x","x","x","x","x","x","x"]']
    for level, name in enumerate("bcde"):
        previous = "abcd"[level]
        rows.append(f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(rows) + "\ntraining: {batch_size: *e}\n")  # 100,000 strings where an int belongs
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert f"{path}: training.batch_size: Input should be a valid integer" in message and len(message) < 2000


# ------------------------------------------------------------------------------------ the world and the cache


@pytest.mark.parametrize(("flags", "message"), [
    (["--bundle", ".."], "--bundle: '..' is not a plain folder name"),
    (["--bundle", "/tmp/elsewhere"], "--bundle: '/tmp/elsewhere' is not a plain folder name"),
    (["--characters", "8401"], "--characters: Input should be less than or equal to 8400"),
    (["--images-per-character", "100000000"], "--images-per-character: Input should be less than or equal to 1000"),
    (["--size", "100000"], "--size: Input should be less than or equal to 2048"),
])
def test_world_settings_that_would_write_elsewhere_or_never_end_are_refused(tmp_path, capsys, flags, message):
    victim = tmp_path / "victim"
    victim.mkdir()
    out = victim / "w"
    assert main(["world", "--out", str(out), "--characters", "2", "--images-per-character", "2", *flags]) == \
        EXIT_BAD_INPUT
    assert message in capsys.readouterr().err
    assert list(victim.iterdir()) == []


def test_the_world_face_count_is_the_product_of_its_face_attributes():
    import math  # noqa: PLC0415

    from dtback.config import WORLD_FACES  # noqa: PLC0415
    from dtback.world.people import FACE_ATTRIBUTES  # noqa: PLC0415

    assert WORLD_FACES == math.prod(len(choices) for choices in FACE_ATTRIBUTES.values())


def test_world_out_and_cache_dir_inside_a_file_are_refused(tmp_path, capsys):
    from dtback.identity.cache import EmbeddingCache  # noqa: PLC0415

    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["world", "--out", str(a_file / "sub"), "--characters", "2", "--images-per-character", "2"]) == \
        EXIT_BAD_INPUT
    assert f"--out {a_file / 'sub'} is inside {a_file}, which is a file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=f"identity.cache_dir: {a_file}/.* is inside {a_file}, which is a file"):
        EmbeddingCache(a_file, "face:test", {})
    assert a_file.read_text() == "mine"


def test_ctrl_c_outside_training_ends_in_one_line_not_a_traceback(monkeypatch, capsys):
    import dtback.cli as cli  # noqa: PLC0415

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_precompute", interrupted)
    assert main(["precompute"]) == cli.EXIT_INTERRUPTED == 130
    err = capsys.readouterr().err
    assert "interrupted: finished files are kept" in err and "Traceback" not in err


def test_cached_identity_entries_of_another_shape_are_named_before_training(tmp_path):
    import torch  # noqa: PLC0415

    from dtback.training.features import check_entry_shapes  # noqa: PLC0415

    rows = [{"key": f"k{i}", "face": torch.zeros(128), "body_pooled": torch.zeros(32)} for i in range(4)]
    check_entry_shapes(rows, {"face": None, "body_pooled": None})  # one shape each: nothing to say
    rows[2]["face"] = torch.zeros(64)
    rows[3]["face"] = None  # no face found: not an entry of another shape
    with pytest.raises(DatasetError, match=r"face entries of another shape than \(128,\): k2 \(64,\); the cache is "
                                           r"damaged or was edited: delete that folder"):
        check_entry_shapes(rows, {"face": None, "body_pooled": None})


def test_names_with_a_newline_or_control_characters_are_printed_escaped_on_one_line(tmp_path, capsys):
    root = make_dataset(tmp_path / "ds", {"film\x1b[2J": {"bob": 3, "al\nice": 1}}, size=(16, 16))
    (root / "film\x1b[2J" / "bob" / "z\rq.png").write_bytes(b"")
    (root / "notes\n.md").write_text("about")
    assert main(["dataset", "inspect", str(root), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "dropped film\\x1b[2J/al\\nice: too_few_images" in err
    assert "skipped film\\x1b[2J/bob/z\\rq.png: zero_byte" in err
    assert "ignored (not images, outside character folders): notes\\n.md" in err
    assert not any(c in err for c in "\r\x1b") and "film\\x1b[2J" in err
