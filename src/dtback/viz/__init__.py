"""Visualisation of a training run: sample grids, curves and the HTML report.

The trainer appends its logs with :func:`append_jsonl`, calls :func:`make_grid` + :func:`save_sample_grid` at each
validation and :func:`write_report` after it (which redraws the curves with :func:`plot_curves`); its TensorBoard
(or other tracker) logs go through accelerate's trackers (``training.log_with``). Everything reads the run folder
contract: ``metrics.jsonl``, ``validation.jsonl``, ``samples/step-XXXXXX.png``, ``checkpoints/``,
``best_model*``, ``config.yaml``, ``dataset_report.json``, ``summary.json``.
"""

from dtback.viz.curves import plot_curves
from dtback.viz.grid import make_grid, sample_grid_path, save_sample_grid
from dtback.viz.report import render_report, write_report
from dtback.viz.runlog import append_jsonl, load_jsonl, read_jsonl

__all__ = [
    "append_jsonl",
    "load_jsonl",
    "make_grid",
    "plot_curves",
    "read_jsonl",
    "render_report",
    "sample_grid_path",
    "save_sample_grid",
    "write_report",
]
