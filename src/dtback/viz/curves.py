"""Training curves as PNGs under ``<run>/curves/``: losses, validation similarities, learning rate.

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, no global state, no window), so this
is safe to call from the training loop of a headless machine.
"""

from __future__ import annotations

import io
import logging
import math
from pathlib import Path
from typing import Callable

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dtback.viz.runlog import Series, collect_series, load_jsonl, write_atomic

logger = logging.getLogger(__name__)

# Validation keys that are baselines of another metric: "val/face_sim_no_id" shares an axis with "val/face_sim".
BASELINE_SUFFIXES: tuple[tuple[str, str], ...] = (("_no_id", "no identity"), ("_shuffled", "shuffled identity"))
RAW_COLOR = "#9bb7d4"
SMOOTH_COLOR = "#1f4e8c"
VARIANT_COLORS = {"with identity": "#1f4e8c", "no identity": "#c0504d", "shuffled identity": "#9a9a9a"}


def is_loss_key(key: str) -> bool:
    """``loss``, ``loss/flow``, ``loss_face`` … — every key that starts with ``loss``."""
    return key.startswith("loss")


def is_lr_key(key: str) -> bool:
    """``lr`` and per-group rates such as ``lr/adapters``."""
    return key == "lr" or key.startswith("lr/")


def smooth(values: list[float], window: int | None = None) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard draws it) over ``values``.

    ``window`` is the effective span in points (alpha = 2 / (window + 1)); by default about 1/25 of the points."""
    if not values:
        return []
    window = window if window is not None else max(1, len(values) // 25)
    alpha = 2.0 / (window + 1.0)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = (1 - alpha) * average + alpha * value
        weight = (1 - alpha) * weight + alpha
        out.append(average / weight)
    return out


def split_variant(key: str) -> tuple[str, str]:
    """``"val/face_sim_no_id"`` → ``("val/face_sim", "no identity")``; a plain metric is ``"with identity"``."""
    for suffix, variant in BASELINE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], variant
    return key, "with identity"


def group_validation(keys: list[str]) -> dict[str, dict[str, str]]:
    """Validation keys grouped by metric: ``{"val/face_sim": {"with identity": "val/face_sim", "no identity":
    "val/face_sim_no_id", ...}}``, metrics in key order."""
    groups: dict[str, dict[str, str]] = {}
    for key in sorted(keys):
        base, variant = split_variant(key)
        groups.setdefault(base, {})[variant] = key
    return groups


def _new_figure(panels: int, columns: int = 2) -> tuple[Figure, list]:
    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    fig = Figure(figsize=(5.2 * columns, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_atomic(path, buffer.getvalue())


def _title(name: str, series: list[Series]) -> str:
    dropped = sum(s.nonfinite for s in series)
    return f"{name}  ({dropped} non-finite points left out)" if dropped else name


def _positive(series: Series) -> bool:
    return bool(series.values) and min(series.values) > 0


def plot_losses(series: dict[str, Series], path: Path) -> Path | None:
    """One panel per ``loss*`` key: raw points faint, the smoothed line over them. ``None`` when no data."""
    keys = [key for key in sorted(series, key=lambda k: (k != "loss", k)) if series[key].steps]
    if not keys:
        return None
    fig, axes = _new_figure(len(keys))
    for ax, key in zip(axes, keys):
        s = series[key]
        ax.plot(s.steps, s.values, color=RAW_COLOR, linewidth=0.8, marker="." if len(s.steps) < 50 else None,
                label="raw")
        if len(s.values) >= 5:
            ax.plot(s.steps, smooth(s.values), color=SMOOTH_COLOR, linewidth=1.8, label="smoothed (EMA)")
        ax.set_title(_title(key, [s]), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    return _save(fig, path)


def plot_validation(series: dict[str, Series], path: Path) -> Path | None:
    """One panel per validation metric, its with-identity / no-identity / shuffled variants on the same axis."""
    groups = group_validation([key for key, s in series.items() if s.steps])
    if not groups:
        return None
    fig, axes = _new_figure(len(groups))
    for ax, (base, variants) in zip(axes, groups.items()):
        for variant, key in variants.items():
            s = series[key]
            style = "-" if variant == "with identity" else "--"
            ax.plot(s.steps, s.values, style, marker="o", markersize=3, label=variant,
                    color=VARIANT_COLORS.get(variant))
        ax.set_title(_title(base, [series[k] for k in variants.values()]), fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_optimizer(series: dict[str, Series], path: Path) -> Path | None:
    """Learning rate(s) and gradient norm against step, each on its own panel. ``None`` when neither is logged."""
    lr_keys = sorted(key for key in series if is_lr_key(key) and series[key].steps)
    grad = series.get("grad_norm")
    panels = [p for p in ("lr" if lr_keys else None, "grad_norm" if grad and grad.steps else None) if p]
    if not panels:
        return None
    fig, axes = _new_figure(len(panels))
    for ax, panel in zip(axes, panels):
        if panel == "lr":
            for key in lr_keys:
                ax.plot(series[key].steps, series[key].values, label=key)
            if all(_positive(series[key]) for key in lr_keys):
                ax.set_yscale("log")
            ax.set_title(_title("learning rate", [series[key] for key in lr_keys]), fontsize=10)
            ax.legend(fontsize=8)
        else:
            ax.plot(grad.steps, grad.values, color=RAW_COLOR, linewidth=0.8, label="raw")
            if len(grad.values) >= 5:
                ax.plot(grad.steps, smooth(grad.values), color=SMOOTH_COLOR, linewidth=1.8, label="smoothed (EMA)")
            if _positive(grad) and max(grad.values) / min(grad.values) > 100:
                ax.set_yscale("log")
            ax.set_title(_title("grad_norm", [grad]), fontsize=10)
            ax.legend(fontsize=8)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_curves(run_dir: Path) -> list[Path]:
    """Draw ``<run>/curves/losses.png``, ``validation.png`` and ``lr.png`` from ``metrics.jsonl`` and
    ``validation.jsonl``; a plot with no data is skipped. Returns the paths written."""
    run_dir = Path(run_dir)
    curves = run_dir / "curves"
    metrics = load_jsonl(run_dir / "metrics.jsonl").records
    validation = load_jsonl(run_dir / "validation.jsonl").records
    plots: list[tuple[Callable[[dict[str, Series], Path], Path | None], dict[str, Series], str]] = [
        (plot_losses, collect_series(metrics, is_loss_key), "losses.png"),
        (plot_validation, collect_series(validation, lambda key: key.startswith("val/")), "validation.png"),
        (plot_optimizer, collect_series(metrics, lambda key: is_lr_key(key) or key == "grad_norm"), "lr.png"),
    ]
    written = []
    for plot, series, name in plots:
        path = plot(series, curves / name)
        if path is None:
            logger.debug("%s: no data for %s yet", run_dir, name)
        else:
            written.append(path)
    return written
