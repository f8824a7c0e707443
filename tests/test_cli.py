"""The command line and the seed's entry-point shims, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from pathlib import Path

from dtback.cli import EXIT_BAD_INPUT, EXIT_MISSING, main
from helpers import make_dataset

REPO = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_inspect_prints_table_and_writes_json(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", {"b1": {"a": 3, "b": 1}, "b2": {"c": 4}}, size=(16, 16))
    (root / "b1" / "a" / "broken.png").write_bytes(b"")
    out = tmp_path / "report.json"
    assert main(["dataset", "inspect", str(root), "--json", str(out), "--no-progress"]) == 0
    report = json.loads(out.read_text())
    assert report["totals"]["characters_kept"] == 2
    assert report["dropped_characters"][0]["character"] == "b1/b"
    assert report["skipped_files"] == [{"path": "b1/a/broken.png", "reason": "zero_byte", "detail": "file is empty"}]
    printed = capsys.readouterr().err
    assert "b1/b: too_few_images" in printed and "b1/a/broken.png: zero_byte" in printed
    assert "TOTAL" in printed


def test_inspect_writes_nothing_unasked_and_never_cuts_a_bundle_name(tmp_path, capsys, monkeypatch):
    name = "a_rather_long_bundle_name_from_a_photo_library"
    root = make_dataset(tmp_path / "data", {name: {"a": 3}}, size=(16, 16))
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setenv("COLUMNS", "60")
    assert main(["dataset", "inspect", str(root), "--no-progress"]) == 0
    assert list(here.iterdir()) == [] and list(root.glob("*.json")) == []  # no dataset_report.json anywhere
    assert name in capsys.readouterr().err


def test_inspect_real_photos(people_dir, tmp_path):
    out = tmp_path / "people.json"
    result = run("-m", "dtback", "dataset", "inspect", str(people_dir), "--json", str(out), "--set", "min_images_per_char=3")
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    totals = report["totals"]
    assert (totals["bundles"], totals["characters_found"], totals["images_decoded"]) == (3, 20, 146)
    assert totals["files_skipped"] == 0
    assert report["dropped_characters"] == [
        {
            "character": "reid_market/market_0002",
            "reason": "too_few_images",
            "detail": "2 usable images < min_images_per_char=3",
        }
    ]
    assert "dropped reid_market/market_0002: too_few_images" in result.stderr


def test_inspect_missing_folder_exits_2_naming_it(tmp_path):
    assert main(["dataset", "inspect", str(tmp_path / "nowhere"), "--json", str(tmp_path / "r.json")]) == EXIT_BAD_INPUT
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_train_on_a_missing_data_dir_names_it(tmp_path):
    result = run(
        "train/run_training.py", "--config", "train/config.yaml", "--set", f"data_dir={tmp_path / 'nowhere'}",
        "--set", "data.world.generate_if_missing=false", "--set", f"output_dir={tmp_path / 'run'}",
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stderr
    assert str(tmp_path / "nowhere") in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_bad_config_fails_before_any_work(tmp_path):
    run_dir = tmp_path / "run"
    result = run(
        "train/run_training.py", "--config", "train/config.yaml",
        "--set", "learning_rate=-1", "--set", f"output_dir={run_dir}",
    )
    assert result.returncode == EXIT_BAD_INPUT
    assert "--set learning_rate=-1: training.learning_rate: Input should be greater than 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_generate_shim_names_a_missing_model_and_download_check_names_missing_files(tmp_path):
    generate = run("inference/generate.py", "--model", "m.pt", "--reference", "r.jpg", "--prompt", "x", "--output", "o")
    assert generate.returncode == EXIT_BAD_INPUT and "--model m.pt does not exist" in generate.stderr
    download = run("scripts/download_models.py", "--check", "--models-dir", str(tmp_path), "--only", "body")
    assert download.returncode == EXIT_MISSING and "body: missing model.safetensors" in download.stderr


def test_config_commands(capsys):
    assert main(["config", "show", "--set", "batch_size=7"]) == 0
    assert "batch_size: 7" in capsys.readouterr().out
    assert main(["config", "keys"]) == 0
    assert "training.learning_rate" in capsys.readouterr().out


@pytest.mark.parametrize("threads", ["0", "-3", "two"])
def test_world_components_threads_must_be_a_whole_number_of_at_least_one(threads, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # was torch's RuntimeError traceback from set_num_threads
        main(["world-components", "--out", str(tmp_path / "parts"), "--threads", threads])
    assert exit_.value.code == 2
    assert "argument --threads:" in capsys.readouterr().err and not (tmp_path / "parts").exists()


def test_an_error_under_several_ranks_says_which_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["dataset", "inspect", str(tmp_path / "nowhere"), "--json", str(tmp_path / "r.json")]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error (rank 1 of 2): ")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["dataset", "inspect", str(tmp_path / "nowhere"), "--json", str(tmp_path / "r.json")]) == EXIT_BAD_INPUT
    assert capsys.readouterr().err.startswith("error: ")
