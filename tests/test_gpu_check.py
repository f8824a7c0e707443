"""benchmarks/gpu_check.sh --dry-run runs every part on the CPU and writes what it documents; gpu_record.py judges the
issue-8 targets from the JSON a GPU run writes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO

BENCHMARKS = REPO / "benchmarks"


@pytest.fixture(scope="module")
def gpu_record():
    spec = importlib.util.spec_from_file_location("gpu_record", BENCHMARKS / "gpu_record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's version of the check")
def test_dry_run_runs_every_part_on_the_cpu_and_records_them(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_WHEELS": "", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh"), "--dry-run", str(out)], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["cuda_tests.xml", "env.json", "gpu_check.log", "parts.json",
                                                      "rows.md", "sample.json", "train_step.json",
                                                      "train_step_profile.txt"]
    parts = json.loads((out / "parts.json").read_text())
    assert [(p["part"], p["exit"]) for p in parts] == [("cuda_tests", 0), ("train_step", 0), ("sample", 0)]
    assert json.loads((out / "env.json").read_text())["dry_run"] is True
    train = json.loads((out / "train_step.json").read_text())
    assert train["preset"] == "tiny" and train["cudnn_attention"] is False
    assert len(train["rows"]) == 4 and all(row["status"] == "ok" or row["status"].startswith("skipped: ")
                                           for row in train["rows"])
    profile = (out / "train_step_profile.txt").read_text()
    assert profile.count("=== 64 px ") == sum(row["status"] == "ok" for row in train["rows"]) > 0
    sample = json.loads((out / "sample.json").read_text())
    assert sample["repeats_done"] == 1 and sample["identity_ratio"] > 0 and sample["memory"]
    rows = (out / "rows.md").read_text()
    assert "dry run on the CPU" in rows and "| base |" in rows and "identity / base" in rows
    assert rows.count("| skipped |") == 7  # the CUDA tests are collected and skip without a GPU


def test_record_judges_the_issue_8_targets(gpu_record, tmp_path):
    def row(mode, size, seconds, base, peak, mfu):
        return {"mode": mode, "size": size, "status": "ok", "seconds": seconds, "base_seconds": base,
                "samples_per_s": 1 / seconds, "peak_memory_gb": peak, "mfu": mfu}

    train = {"device": "NVIDIA H100 80GB HBM3", "rows": [
        row("base", 512, 0.10, 0.098, 45.0, 0.46),  # fastest, but over 40 GB
        row("checkpointing", 512, 0.12, 0.112, 30.0, 0.38),
        row("int8_adamw8bit", 512, 0.20, 0.19, 19.5, 0.22),
        row("int8_adamw8bit", 1024, 0.70, 0.69, 25.5, 0.24),
        {"mode": "int8", "size": 1024, "status": "out of memory"},
    ]}
    (tmp_path / "train_step.json").write_text(json.dumps(train))
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "dry_run": False}))
    (tmp_path / "parts.json").write_text(json.dumps([{"part": "train_step", "exit": 124, "seconds": 220,
                                                      "limit_s": 200}]))
    text = gpu_record.record(tmp_path)
    assert "MFU >= 40% at 512 px within 40 GB: missed (checkpointing: 38.0%, 30.0 GB)" in text
    assert "adapter step <= 1.05x base step at 512 px: missed (worst checkpointing: 1.071)" in text
    assert "24 GB mode at 512 px peak <= 24 GB: met (19.5 GB)" in text
    assert "24 GB mode at 1024 px peak <= 24 GB: missed (25.5 GB)" in text
    assert "| 1024 | int8 | out of memory |" in text and "| train_step | 124 (time limit) | 220 | 200 |" in text
    assert "not measured (no sample.json)" in text


def test_record_reports_a_broken_file_and_goes_on(gpu_record, tmp_path, capsys):
    (tmp_path / "sample.json").write_text("{truncated")
    text = gpu_record.record(tmp_path)
    assert "not measured (no sample.json)" in text and "no 512 px row ran" in text
    assert "sample.json: not JSON" in capsys.readouterr().err


def test_gpu_wheels_drops_the_unused_bitsandbytes_libraries_and_keeps_the_rest(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_wheels", BENCHMARKS / "gpu_wheels.py")
    gpu_wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_wheels)
    import zipfile  # noqa: PLC0415

    names = ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
             "bitsandbytes/libbitsandbytes_cuda118.so", "bitsandbytes/libbitsandbytes_cuda126.so",
             "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes/libbitsandbytes_rocm64.so",
             "bitsandbytes/libbitsandbytes_xpu2025.so", "bitsandbytes-0.50.2.dist-info/RECORD"]
    wheels = {"bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl": names,
              "torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl": ["torchao/libbitsandbytes_rocm64.so"]}
    for wheel, members in wheels.items():
        with zipfile.ZipFile(tmp_path / wheel, "w") as archive:
            for name in members:
                archive.writestr(name, name.encode())
    untouched = (tmp_path / "torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl").read_bytes()
    assert gpu_wheels.main(["--out", str(tmp_path), "--no-download"]) == 0
    with zipfile.ZipFile(tmp_path / "bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl") as archive:
        assert archive.namelist() == ["bitsandbytes/__init__.py", "bitsandbytes/libbitsandbytes_cpu.so",
                                      "bitsandbytes/libbitsandbytes_cuda130.so", "bitsandbytes-0.50.2.dist-info/RECORD"]
        assert archive.read("bitsandbytes/libbitsandbytes_cuda130.so") == b"bitsandbytes/libbitsandbytes_cuda130.so"
    assert (tmp_path / "torchao-0.18.0-cp310-abi3-manylinux_2_28_x86_64.whl").read_bytes() == untouched
    assert sorted(p.name for p in tmp_path.glob("*.whl*")) == sorted(wheels)  # no partial file left behind
