"""``<run>/report.html``: one static, self-contained page per training run that a person can open.

The page links the PNGs of the run folder by relative path (curves, sample grids), needs no JavaScript and loads
nothing from outside. It is regenerated at every validation and at the end of training, so every section reads a
folder that may be half-written: a missing or torn file makes its section say "not yet" instead of failing.
"""

from __future__ import annotations

import html
import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import quote

from dtback.viz.curves import group_validation, plot_curves
from dtback.viz.grid import make_grid, sample_grid_path, save_sample_grid
from dtback.viz.runlog import (
    JsonFile,
    latest_values,
    load_jsonl,
    read_json,
    read_jsonl,
    record_step,
    write_atomic,
)

# The trainer's whole surface is importable from here as well as from ``dtback.viz``.
__all__ = ["make_grid", "plot_curves", "read_jsonl", "sample_grid_path", "save_sample_grid", "write_report"]

logger = logging.getLogger(__name__)

CURVES = (("losses.png", "Losses"), ("validation.png", "Validation"), ("lr.png", "Learning rate and gradient norm"))
STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
STEP_PNG = re.compile(r"^step-(\d+)\.png$")
NOT_YET = '<p class="muted">not yet</p>'
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; }
th { background: #f4f4f4; text-align: left; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; } .muted { color: #888; } img { max-width: 100%; border: 1px solid #eee; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; } figure { margin: 1em 0; }
"""


def esc(value: Any) -> str:
    """``value`` as text with ``& < > " '`` escaped."""
    return html.escape(str(value), quote=True)


def format_value(value: Any) -> str:
    """A number to 5 significant digits, ``NaN``/``inf`` spelled out, ``None`` as a dash, anything else as text
    (lists and dicts as compact JSON); the result is not yet escaped."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.5g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{esc(format_value(value))}</td>' if numeric else f"<td>{esc(format_value(value))}</td>"


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    """An HTML table, every cell escaped; numbers right-aligned."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: ``{"a": {"b": 1}}`` → ``{"a.b": 1}``; other values stay as they are."""
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def link(run_dir: Path, path: Path) -> str:
    """``path`` relative to ``run_dir``, URL-quoted and HTML-escaped for an ``href``/``src`` attribute."""
    return esc(quote(path.relative_to(run_dir).as_posix()))


def _size(path: Path) -> int:
    """Bytes in ``path`` (a file, or a folder walked); files vanishing mid-walk (a checkpoint being rotated) count 0."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except FileNotFoundError:
                continue
    return total


def human_bytes(count: int) -> str:
    """``1536`` → ``"1.5 KiB"``."""
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _file_problem(name: str, loaded: JsonFile) -> str:
    return NOT_YET if loaded.error == "missing" else f'<p class="muted">{esc(name)}: {esc(loaded.error)}</p>'


def section_summary(run_dir: Path) -> str:
    """``summary.json`` (the final numbers) as a key/value table."""
    loaded = read_json(run_dir / "summary.json")
    if loaded.error:
        return _file_problem("summary.json", loaded)
    if not isinstance(loaded.value, dict):
        return table(["summary"], [[loaded.value]])
    return table(["key", "value"], flatten(loaded.value).items())


def section_config(run_dir: Path) -> str:
    """``config.yaml`` verbatim, escaped, in a collapsed block."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return NOT_YET
    text = path.read_text(encoding="utf-8", errors="replace")
    return f"<details><summary>config.yaml ({len(text.splitlines())} lines)</summary><pre>{esc(text)}</pre></details>"


def section_latest(run_dir: Path, name: str) -> str:
    """For every key of ``name`` (a JSONL log), its latest value and the step it was logged at."""
    loaded = load_jsonl(run_dir / name)
    if not loaded.records and not loaded.skipped:
        return NOT_YET
    latest = latest_values(loaded.records)
    steps = [s for s in map(record_step, loaded.records) if s is not None]
    note = f"{len(loaded.records)} lines, last step {max(steps) if steps else '—'}"
    if loaded.skipped:
        note += f"; {len(loaded.skipped)} malformed line(s) skipped (e.g. line {loaded.skipped[0][0]})"
    rows = [[key, value, step] for key, (value, step) in sorted(latest.items())]
    return f'<p class="muted">{esc(name)}: {esc(note)}</p>' + table(["key", "latest value", "at step"], rows)


def section_curves(run_dir: Path) -> str:
    """The curve PNGs that exist."""
    parts = []
    for name, caption in CURVES:
        path = run_dir / "curves" / name
        if path.is_file():
            parts.append(f'<figure><img src="{link(run_dir, path)}" alt="{esc(caption)}">'
                         f"<figcaption>{esc(caption)}</figcaption></figure>")
    return "".join(parts) or NOT_YET


def sample_grids(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``samples/step-XXXXXX.png``, oldest first."""
    folder = run_dir / "samples"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_file() and (m := STEP_PNG.match(p.name))]
    return sorted(found)


def section_samples(run_dir: Path) -> str:
    """The latest sample grid at full width and links to the earlier ones, newest first."""
    grids = sample_grids(run_dir)
    if not grids:
        return NOT_YET
    step, latest = grids[-1]
    out = (f'<figure><a href="{link(run_dir, latest)}"><img src="{link(run_dir, latest)}" alt="samples at step '
           f'{step}"></a><figcaption>step {step} — {esc(latest.name)}</figcaption></figure>')
    if len(grids) > 1:
        items = "".join(f'<li><a href="{link(run_dir, p)}">step {s}</a> ({esc(p.name)})</li>'
                        for s, p in reversed(grids[:-1]))
        out += f"<p>Earlier grids:</p><ul>{items}</ul>"
    return out


def section_validation(run_dir: Path) -> str:
    """Every validation as a row (step × metric); a step logged twice keeps its later line."""
    records = [r for r in read_jsonl(run_dir / "validation.jsonl") if record_step(r) is not None]
    if not records:
        return NOT_YET
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        by_step[record_step(record)] = record
    keys = {key for record in records for key in record if key != "step"}
    val_keys = [k for variants in group_validation([k for k in keys if k.startswith("val/")]).values()
                for k in variants.values()]
    columns = val_keys + sorted(keys - set(val_keys))
    rows = [[step] + [by_step[step].get(key) for key in columns] for step in sorted(by_step)]
    return table(["step"] + columns, rows)


def section_checkpoints(run_dir: Path) -> str:
    """``checkpoints/checkpoint-XXXXXX/`` folders and ``best_model*`` with their sizes."""
    rows: list[list[Any]] = []
    folder = run_dir / "checkpoints"
    if folder.is_dir():
        found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
        rows += [[p.relative_to(run_dir).as_posix(), step, human_bytes(_size(p))] for step, p in sorted(found)]
    rows += [[p.name, "best", human_bytes(_size(p))] for p in sorted(run_dir.glob("best_model*"))]
    return table(["path", "step", "size"], rows) if rows else NOT_YET


def section_dataset(run_dir: Path) -> str:
    """Highlights of ``dataset_report.json`` (see ``DatasetIndex.report``): totals, skip reasons, bundles."""
    loaded = read_json(run_dir / "dataset_report.json")
    if loaded.error:
        return _file_problem("dataset_report.json", loaded)
    report = loaded.value
    if not isinstance(report, dict):
        return table(["dataset report"], [[report]])
    highlights: dict[str, Any] = {}
    for key, value in report.items():
        if key in ("bundles", "settings"):
            continue
        if isinstance(value, list):
            highlights[key] = f"{len(value)} entries"
        else:
            highlights.update(flatten(value, "" if key == "totals" else key))
    out = table(["item", "value"], highlights.items()) if highlights else ""
    bundles = report.get("bundles")
    if isinstance(bundles, dict) and bundles and all(isinstance(b, dict) for b in bundles.values()):
        columns = [k for k in next(iter(bundles.values())) if k != "skipped_by_reason"]
        out += "<p>Per bundle:</p>" + table(["bundle"] + columns,
                                            [[name] + [b.get(k) for k in columns] for name, b in bundles.items()])
    return out or NOT_YET


def _status(run_dir: Path) -> str:
    """One line: finished or not, and when the run's logs last changed (from file times, so reruns are stable)."""
    finished = (run_dir / "summary.json").is_file()
    times = [p.stat().st_mtime for p in (run_dir / n for n in ("metrics.jsonl", "validation.jsonl", "summary.json"))
             if p.is_file()]
    state = "finished (summary.json written)" if finished else "in progress, or stopped before the end"
    when = datetime.fromtimestamp(max(times), tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if times else "—"
    return f"<p>Run folder <code>{esc(run_dir.name)}</code>: {esc(state)}; logs last written {esc(when)}.</p>"


def render_report(run_dir: Path, title: str = "dtback training run") -> str:
    """The report page as HTML text, from whatever the run folder holds now."""
    run_dir = Path(run_dir)
    sections = [
        ("Summary", section_summary(run_dir) + section_config(run_dir)),
        ("Latest metrics", section_latest(run_dir, "metrics.jsonl")),
        ("Curves", section_curves(run_dir)),
        ("Samples", section_samples(run_dir)),
        ("Validation", section_validation(run_dir)),
        ("Checkpoints", section_checkpoints(run_dir)),
        ("Dataset", section_dataset(run_dir)),
    ]
    body = "".join(f'<h2 id="{esc(name.lower().replace(" ", "-"))}">{esc(name)}</h2>\n{html_}\n'
                   for name, html_ in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{esc(title)}</h1>\n{_status(run_dir)}\n{body}</body></html>\n")


def write_report(run_dir: Path, title: str = "dtback training run", *, curves: bool = True) -> Path:
    """Regenerate the curves (unless ``curves=False``) and write ``<run>/report.html`` atomically; safe to call at
    every validation, on a half-written or empty run folder. Returns the report's path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if curves:
        plot_curves(run_dir)
    path = write_atomic(run_dir / "report.html", render_report(run_dir, title).encode("utf-8"))
    logger.info("report written: %s", path)
    return path
