"""Reading a run folder that may still be written to: tolerant JSONL/JSON readers and per-key metric series.

The trainer appends one JSON object per line to ``metrics.jsonl`` and ``validation.jsonl``. A killed run can leave a
torn last line, a resumed run re-logs the steps after its checkpoint, and any key may be missing or hold
``NaN``/``null`` on a line. Everything here reads such files without crashing and counts what it skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any

from dtback.io import write_bytes

logger = logging.getLogger(__name__)
_WARNED: set[tuple[str, int]] = set()


@dataclass
class JsonlRecords:
    """The objects read from a JSONL file and the lines that were skipped, as ``(line number, reason)``."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def load_jsonl(path: Path) -> JsonlRecords:
    """Read every JSON object line of ``path``; blank lines are ignored, torn or non-object lines are skipped with
    a logged warning and counted. A missing file gives no records."""
    path = Path(path)
    result = JsonlRecords()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return result
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            result.skipped.append((number, f"not valid JSON ({err.msg})"))
            continue
        if not isinstance(value, dict):
            result.skipped.append((number, f"a JSON {type(value).__name__}, not an object"))
            continue
        result.records.append(value)
    for number, reason in result.skipped:
        # The report rereads the logs at every validation: say it once per torn line, not every time.
        first = (str(path), number) not in _WARNED
        _WARNED.add((str(path), number))
        logger.log(logging.WARNING if first else logging.DEBUG, "%s: line %d skipped: %s", path, number, reason)
    return result


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of ``path``, one per line, in file order. Torn or malformed lines (a killed run's last
    line) are skipped with a logged warning; a missing file gives ``[]``."""
    return load_jsonl(path).records


@dataclass
class JsonFile:
    """A JSON file read tolerantly: ``value`` when it parsed, else ``error`` says why (``missing`` included)."""

    value: Any = None
    error: str | None = None


def read_json(path: Path) -> JsonFile:
    """Parse ``path`` as JSON without raising: a missing, half-written or undecodable file gives an ``error``."""
    path = Path(path)
    try:
        return JsonFile(value=json.loads(path.read_text(encoding="utf-8", errors="replace")))
    except FileNotFoundError:
        return JsonFile(error="missing")
    except json.JSONDecodeError as err:
        logger.warning("%s: not valid JSON yet (%s)", path, err.msg)
        return JsonFile(error=f"not valid JSON ({err.msg} at line {err.lineno})")
    except OSError as err:
        logger.warning("%s: unreadable (%s)", path, err)
        return JsonFile(error=f"unreadable ({err.strerror or err})")


def as_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (``NaN``/``inf`` kept), else ``None``; bools are not numbers."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    return float(value)


def record_step(record: dict[str, Any]) -> int | None:
    """The integer ``step`` of a record, or ``None`` when it is missing or not a finite number."""
    step = as_number(record.get("step"))
    if step is None or not math.isfinite(step):
        return None
    return int(step)


@dataclass
class Series:
    """One metric over steps: ``steps`` ascending, ``values`` finite, ``nonfinite`` counts dropped NaN/inf points."""

    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    nonfinite: int = 0


def collect_series(records: list[dict[str, Any]], keep: Any = None) -> dict[str, Series]:
    """Per-key series from ``records`` for every numeric key except ``step``/``epoch`` (``keep(key)`` filters).

    When a step appears more than once (a resumed run re-logs the steps after its checkpoint) the later line wins.
    Non-numeric values and ``None`` are ignored; ``NaN``/``inf`` are counted in ``nonfinite`` and left out."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        step = record_step(record)
        if step is None:
            continue
        for key, raw in record.items():
            if key in ("step", "epoch") or (keep is not None and not keep(key)):
                continue
            value = as_number(raw)
            if value is not None:
                by_key.setdefault(key, {})[step] = value
    series: dict[str, Series] = {}
    for key, points in by_key.items():
        out = Series()
        for step in sorted(points):
            if math.isfinite(points[step]):
                out.steps.append(step)
                out.values.append(points[step])
            else:
                out.nonfinite += 1
        series[key] = out
    return series


def latest_values(records: list[dict[str, Any]]) -> dict[str, tuple[Any, int | None]]:
    """For every key but ``step``, its value on the last line that has it and that line's step."""
    latest: dict[str, tuple[Any, int | None]] = {}
    for record in records:
        step = record_step(record)
        for key, value in record.items():
            if key != "step" and value is not None:
                latest[key] = (value, step)
    return latest


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and one-element tensors (anything with ``.item()``)."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line to ``path``. When a killed run left a torn last line without its newline, a
    newline goes first so the torn line stays alone (and skipped) instead of swallowing this record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, default=_plain) + "\n"
    with path.open("a+b") as handle:
        if handle.tell() > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                line = "\n" + line
        handle.seek(0, os.SEEK_END)
        handle.write(line.encode("utf-8"))


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`dtback.io.write_bytes`), so a reader (a browser refreshing
    the report) never sees a half-written file."""
    return write_bytes(path, data)
