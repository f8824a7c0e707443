"""Tests for dtback.viz: grids, tolerant run-log reading, curves and the HTML report (TensorBoard logs: the trainer's
tests, through accelerate's trackers)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dtback.viz import (
    append_jsonl,
    load_jsonl,
    make_grid,
    plot_curves,
    read_jsonl,
    save_sample_grid,
    write_report,
)
from dtback.viz.curves import group_validation, smooth
from dtback.viz.grid import BACKGROUND, BLANK, LETTERBOX, grid_layout
from dtback.viz.runlog import collect_series

RED, GREEN, BLUE = (220, 20, 20), (20, 200, 20), (20, 20, 220)


def _pixels(image: Image.Image, box) -> np.ndarray:
    return np.asarray(image.crop(box).convert("RGB")).reshape(-1, 3)


def _non_background(image: Image.Image, box) -> int:
    return int((_pixels(image, box) != np.array(BACKGROUND)).any(axis=1).sum())


def _center(box) -> tuple[int, int]:
    return (box[0] + box[2]) // 2, (box[1] + box[3]) // 2


def _write_run(run: Path, steps: int = 60) -> None:
    """A small finished-looking run folder following the trainer's contract."""
    for step in range(1, steps + 1):
        record = {"step": step, "epoch": step // 20, "loss": 1.0 / step, "loss/flow": 0.5, "loss/face": 0.3,
                  "lr": 1e-4, "grad_norm": 0.8}
        if step == 30:
            record["loss"] = float("nan")
        append_jsonl(run / "metrics.jsonl", record)
    for step in (20, 40, 60):
        append_jsonl(run / "validation.jsonl", {"step": step, "val/face_sim": step / 100, "val/face_sim_no_id": 0.1,
                                                "val/face_sim_shuffled": 0.05, "val/reader_face_acc": 0.5})
    grid = make_grid([[Image.new("RGB", (32, 32), RED)]], ["val/char_0001"], ["reference"], cell=32)
    for step in (20, 40, 60):
        save_sample_grid(run, step, grid)
    (run / "config.yaml").write_text("training:\n  learning_rate: 0.0001\nnote: <script>alert('x')</script>\n")
    (run / "checkpoints" / "checkpoint-000040").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-000040" / "adapters.safetensors").write_bytes(b"\0" * 2048)
    (run / "best_model.pt").write_bytes(b"\0" * 10)
    (run / "summary.json").write_text(json.dumps({"best_step": 60, "best": {"val/face_sim": 0.6}}))
    (run / "dataset_report.json").write_text(json.dumps({
        "data_dir": "data/world", "settings": {"min_images_per_char": 2},
        "totals": {"bundles": 1, "characters_found": 9, "characters_kept": 8, "characters_dropped": 1,
                   "images_decoded": 90, "images_kept": 80, "files_skipped": 3, "skipped_by_reason": {"corrupt": 3}},
        "bundles": {"films": {"characters_found": 9, "characters_kept": 8, "characters_dropped": 1,
                              "images_decoded": 90, "images_kept": 80, "files_skipped": 3,
                              "skipped_by_reason": {"corrupt": 3}}},
        "skipped_outside_bundles": 0, "ignored_files": [], "dropped_characters": [{"name": "x"}],
        "skipped_files": [{}, {}, {}]}))


# ---- grids ------------------------------------------------------------------------------------------------------


def test_grid_places_cells_letterboxes_and_pads():
    tall = Image.new("RGB", (40, 80), RED)  # letterboxed: bars left and right
    rows = [[tall, Image.new("RGB", (64, 64), GREEN), Image.new("RGB", (64, 64), BLUE)], [Image.new("L", (64, 64), 0)]]
    labels, columns = ["val/char_0007", "val/char_0008"], ["reference", "with identity", "without identity"]
    grid = make_grid(rows, labels, columns, cell=64)
    layout = grid_layout(labels, columns, 3, cell=64)
    assert grid.mode == "RGB" and grid.size == layout.size
    assert grid.size[0] >= 3 * 64 + layout.label_width and grid.size[1] >= 2 * 64 + layout.header_height
    assert layout.label_width > 0 and layout.header_height > 0
    assert grid.getpixel(_center(layout.cell_box(0, 0))) == RED
    assert grid.getpixel((layout.cell_box(0, 0)[0] + 2, _center(layout.cell_box(0, 0))[1])) == LETTERBOX
    assert grid.getpixel(_center(layout.cell_box(0, 1))) == GREEN
    assert grid.getpixel(_center(layout.cell_box(0, 2))) == BLUE
    assert grid.getpixel(_center(layout.cell_box(1, 0))) == (0, 0, 0)  # greyscale input converted
    for column in (1, 2):  # the short row is padded with blank cells
        assert set(map(tuple, _pixels(grid, layout.cell_box(1, column)))) == {BLANK}
    # labels are drawn: dark text pixels inside every label area
    for column in range(3):
        assert _non_background(grid, layout.column_label_box(column)) > 20
    for row in range(2):
        assert _non_background(grid, layout.row_label_box(row)) > 20


def test_grid_without_labels_has_no_label_bands_and_wider_rows_than_header():
    rows = [[Image.new("RGB", (10, 10), RED)] * 3]
    grid = make_grid(rows, [""], [], cell=16)
    layout = grid_layout([""], [], 3, cell=16)
    assert layout.label_width == 0 and layout.header_height == 0
    assert grid.size == (layout.pad + 3 * (16 + layout.pad), layout.pad + 16 + layout.pad)
    assert grid.getpixel(_center(layout.cell_box(0, 2))) == RED


def test_grid_long_labels_wrap_and_transparency_is_flattened_on_white():
    transparent = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    label = "a column label much wider than one cell"
    grid = make_grid([[transparent]], ["x" * 200], [label], cell=48)
    layout = grid_layout(["x" * 200], [label], 1, cell=48)
    assert layout.label_width <= 2 * 48 + 2 * layout.pad  # row labels capped at two cells, then wrapped
    assert layout.header_height > 2 * 12  # the header label took several lines
    assert grid.getpixel(_center(layout.cell_box(0, 0))) == BACKGROUND


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match="2 rows but 1 row labels"):
        make_grid([[Image.new("RGB", (8, 8))], []], ["a"], [])
    with pytest.raises(ValueError, match="no rows"):
        make_grid([], [], ["reference"])


def test_sample_grid_saved_under_step_name(tmp_path):
    grid = make_grid([[Image.new("RGB", (8, 8), RED)]], ["a"], ["b"], cell=16)
    path = save_sample_grid(tmp_path, 500, grid)
    assert path == tmp_path / "samples" / "step-000500.png"
    with Image.open(path) as saved:
        assert saved.size == grid.size
    assert [p.name for p in path.parent.iterdir()] == ["step-000500.png"]  # no temporary file left behind


# ---- run logs ---------------------------------------------------------------------------------------------------


def test_torn_jsonl_is_tolerated_and_counted(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n\n[1, 2]\n{"step": 2, "loss": NaN, "lr": null}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING, logger="dtback.viz.runlog"):
        loaded = load_jsonl(path)
    assert [r["step"] for r in loaded.records] == [1, 2]
    assert math.isnan(loaded.records[1]["loss"]) and loaded.records[1]["lr"] is None
    assert [number for number, _ in loaded.skipped] == [3, 5]
    assert "not an object" in loaded.skipped[0][1] and "not valid JSON" in loaded.skipped[1][1]
    assert sum("skipped" in r.message for r in caplog.records) == 2
    assert read_jsonl(path) == loaded.records
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_append_after_torn_line_keeps_the_new_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a killed run
    append_jsonl(path, {"step": 2, "loss": np.float32(0.25)})
    loaded = load_jsonl(path)
    assert loaded.records == [{"step": 1}, {"step": 2, "loss": 0.25}] and len(loaded.skipped) == 1


def test_series_later_line_wins_and_nonfinite_counted():
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": float("nan")}, {"step": 3, "loss": 0.5},
               {"step": 2, "loss": 0.7, "lr": None, "note": "resumed"}, {"loss": 9.0}, {"step": 4, "loss": float("inf")}]
    series = collect_series(records)
    assert list(series) == ["loss"]
    assert series["loss"].steps == [1, 2, 3] and series["loss"].values == [1.0, 0.7, 0.5]
    assert series["loss"].nonfinite == 1


def test_smooth_and_validation_grouping():
    assert smooth([2.0] * 10, window=3) == pytest.approx([2.0] * 10)
    assert smooth([1.0, 3.0], window=1) == [1.0, 3.0]
    groups = group_validation(["val/face_sim_shuffled", "val/face_sim", "val/face_sim_no_id", "val/reader_face_acc"])
    assert groups == {"val/face_sim": {"with identity": "val/face_sim", "no identity": "val/face_sim_no_id",
                                       "shuffled identity": "val/face_sim_shuffled"},
                      "val/reader_face_acc": {"with identity": "val/reader_face_acc"}}


# ---- curves -----------------------------------------------------------------------------------------------------


def test_plot_curves_writes_valid_pngs(tmp_path):
    _write_run(tmp_path)
    paths = plot_curves(tmp_path)
    assert [p.name for p in paths] == ["losses.png", "validation.png", "lr.png"]
    for path in paths:
        assert path.parent == tmp_path / "curves"
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
        with Image.open(path) as image:
            assert image.size[0] >= 500 and image.size[1] >= 300
            assert len(np.unique(np.asarray(image.convert("L")))) > 10  # something was drawn


def test_plot_curves_skips_plots_without_data(tmp_path):
    assert plot_curves(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": null}\n')
    assert [p.name for p in plot_curves(tmp_path)] == ["losses.png"]


# ---- report -----------------------------------------------------------------------------------------------------


def test_report_links_tables_and_escapes(tmp_path):
    _write_run(tmp_path)
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 61, "loss": 0.')  # torn last line
    path = write_report(tmp_path, title="run <b>7</b>")
    assert path == tmp_path / "report.html"
    page = path.read_text()
    assert "<title>run &lt;b&gt;7&lt;/b&gt;</title>" in page
    for link in ("curves/losses.png", "curves/validation.png", "curves/lr.png"):
        assert f'src="{link}"' in page
    assert 'src="samples/step-000060.png"' in page  # latest grid shown
    assert 'href="samples/step-000040.png"' in page and 'href="samples/step-000020.png"' in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<script" not in page
    assert "<details>" in page
    assert "<td>best.val/face_sim</td>" in page  # summary.json flattened into a table
    assert "<th>val/face_sim_shuffled</th>" in page and '<td class="num">0.4</td>' in page
    assert "checkpoints/checkpoint-000040" in page and "2.0 KiB" in page and "best_model.pt" in page
    assert "<td>characters_kept</td>" in page and "<td>skipped_by_reason.corrupt</td>" in page
    assert "1 malformed line(s) skipped" in page
    assert "http://" not in page and "https://" not in page
    assert write_report(tmp_path, title="run <b>7</b>").read_text() == page  # regenerates identically
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files


def test_report_on_empty_and_half_written_runs(tmp_path):
    page = write_report(tmp_path / "fresh").read_text()
    assert page.count("not yet") == 8  # summary, config, metrics, curves, samples, validation, checkpoints, data
    assert not (tmp_path / "fresh" / "curves").exists()
    run = tmp_path / "half"
    run.mkdir()
    (run / "summary.json").write_text('{"best_step": ')
    (run / "validation.jsonl").write_text('{"val/face_sim": 0.3}\n{"step": 5, "val/')  # no step, then torn
    page = write_report(run).read_text()
    assert "summary.json: not valid JSON" in page
    assert "<h2 id=\"validation\">Validation</h2>\n<p class=\"muted\">not yet</p>" in page

