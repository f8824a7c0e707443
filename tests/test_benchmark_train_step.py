"""benchmarks/train_step.py runs on a CPU (tiny config, one step per memory mode) and writes the fields it documents."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from helpers import REPO

BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def train_step():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARKS / "train_step.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_train_step_benchmark_runs_every_memory_mode_on_the_tiny_config(train_step, tmp_path):
    out = tmp_path / "train_step.json"
    assert train_step.main(["--preset", "tiny", "--warmup", "1", "--steps", "1", "--device", "cpu",
                            "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["base_dtype"] == "float32" and result["torch"]
    assert result["peak_tflops"] is None  # no peak for a CPU: no MFU, achieved TFLOP/s instead
    if importlib.util.find_spec("torchao") is not None:
        assert result["base_weight_gb_int8"] < result["base_weight_gb"]
    rows = {row["mode"]: row for row in result["rows"]}
    assert list(rows) == ["base", "checkpointing", "int8", "int8_adamw8bit"]
    needs = {"int8": "torchao", "int8_adamw8bit": "bitsandbytes"}
    for mode, row in rows.items():
        if mode in needs and importlib.util.find_spec(needs[mode]) is None:
            assert row["status"].startswith("skipped:") and "dtback[memory]" in row["status"]
            continue
        assert row["status"] == "ok" and row["size"] == 64 and row["batch"] == 1
        assert row["seconds"] > 0 and row["base_seconds"] > 0 and len(row["seconds_all"]) == 1
        assert row["samples_per_s"] == pytest.approx(1 / row["seconds"])
        assert row["achieved_tflops"] == pytest.approx(row["step_tflop"] / row["seconds"])
        assert row["adapter_overhead"] == pytest.approx(row["seconds"] / row["base_seconds"] - 1)
        assert row["peak_memory_gb"] is None and row["mfu"] is None
    # The analytic FLOPs do not depend on the memory mode (checkpointing's recomputation is not model FLOPs).
    assert len({row["step_tflop"] for row in rows.values() if row["status"] == "ok"}) == 1


def test_mfu_peak_is_taken_from_the_device_name(train_step):
    assert train_step.device_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert train_step.device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert train_step.device_peak_tflops("NVIDIA H200") == 989.4
    assert train_step.device_peak_tflops("Some Future GPU") is None


def test_compiled_int8_rows_are_skipped_with_the_reason(train_step, tmp_path):
    out = tmp_path / "train_step.json"
    assert train_step.main(["--preset", "tiny", "--warmup", "1", "--steps", "1", "--device", "cpu", "--compile",
                            "--modes", "int8", "int8_adamw8bit", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["int8", "int8_adamw8bit"]
    for row in rows:
        assert row["status"].startswith("skipped: torch.compile cannot compile a training step through torchao")
