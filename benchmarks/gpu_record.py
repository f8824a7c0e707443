"""The rows of benchmarks/README.md from one ``benchmarks/gpu_check.sh`` output folder.

Reads ``env.json``, ``parts.json``, ``cuda_tests.xml``, ``train_step.json`` and ``sample.json`` (whichever exist: a
part that was stopped or failed is reported as such) and prints Markdown: the device and software, each part's exit
and time, the CUDA tests' outcomes, the training-step table per memory mode (s/step, samples/s, peak GB, MFU,
adapter/base step), the sampling ratio and peak memory with and without offload, and the issue-8 targets
(>= 40 % MFU at 512 px within 40 GB, adapter step <= 1.05x the base step, the 24 GB mode's peak <= 24 GB) as met,
missed or not measured.

Usage: python benchmarks/gpu_record.py OUT_DIR [> rows.md]
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MFU_TARGET, MEMORY_TARGET_GB, RATIO_TARGET, SMALL_CARD_GB = 0.40, 40.0, 1.05, 24.0


def read_json(path: Path):
    """The parsed file, or None when it is missing; a broken file is reported, not fatal (the run may have been
    stopped while writing another part)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        print(f"gpu_record: {path}: not JSON ({err}); left out", file=sys.stderr)
        return None


def test_outcomes(path: Path) -> list[tuple[str, str, float]]:
    """(test name, passed/failed/error/skipped, seconds) from pytest's JUnit XML (a file this check wrote)."""
    if not path.is_file():
        return []
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        print(f"gpu_record: {path}: not XML ({err}); left out", file=sys.stderr)
        return []
    rows = []
    for case in root.iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        rows.append((case.get("name", "?"), {"failure": "failed"}.get(outcome, outcome), float(case.get("time", 0))))
    return rows


def fmt(value, pattern: str = "{:.3f}") -> str:
    return "" if value is None else pattern.format(value)


def train_rows(train: dict) -> list[str]:
    lines = ["| device | px | mode | s/step | samples/s | peak GB | MFU | adapter / base step |",
             "|---|---|---|---|---|---|---|---|"]
    for row in train["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {train['device']} | {row.get('size')} | {row.get('mode')} | {row.get('status')} | | | | |")
            continue
        lines.append(f"| {train['device']} | {row['size']} | {row['mode']} | {row['seconds']:.3f} | "
                     f"{row['samples_per_s']:.2f} | {fmt(row.get('peak_memory_gb'), '{:.1f}')} | "
                     f"{fmt(row.get('mfu'), '{:.1%}')} | {row['seconds'] / row['base_seconds']:.3f} |")
    return lines


def sample_rows(sample: dict) -> list[str]:
    medians = sample["median_s"]
    lines = ["| device | config | px, steps | base s/image | attached s/image | identity s/image | identity / base "
             "| repeats |", "|---|---|---|---|---|---|---|---|",
             f"| {sample['device_name']} | {sample['config']} | {sample['size']}, {sample['steps']} | "
             f"{medians['base']:.3f} | {medians['attached']:.3f} | {medians['identity']:.3f} | "
             f"{sample['identity_ratio']:.3f} | {sample.get('repeats_done', sample['repeats'])} |"]
    memory = sample.get("memory") or {}
    if "on_gpu" in memory:
        lines += ["", "| device | peak GB, pipeline on the GPU | peak GB, model CPU offload | 2-step s on GPU / offload |",
                  "|---|---|---|---|"]
        offload = memory.get("model_cpu_offload", {})
        lines.append(f"| {sample['device_name']} | {memory['on_gpu']['peak_gb']:.1f} | "
                     f"{fmt(offload.get('peak_gb'), '{:.1f}')} | {memory['on_gpu']['seconds_2_steps']:.1f} / "
                     f"{fmt(offload.get('seconds_2_steps'), '{:.1f}')} |")
    elif memory:
        lines += ["", f"Memory: {json.dumps(memory)}"]
    else:
        lines += ["", "Memory: not measured (the part stopped before it)."]
    return lines


def targets(train: dict | None) -> list[str]:
    """Issue 8's targets, judged on the 512 px rows that ran."""
    ok = [row for row in (train or {}).get("rows", []) if row.get("status") == "ok"]
    at_512 = [row for row in ok if row["size"] == 512]
    if not at_512:
        return ["- issue-8 targets: not measured (no 512 px row ran)"]
    lines = []
    fitting = [row for row in at_512 if row.get("peak_memory_gb") is not None and row["peak_memory_gb"] <= MEMORY_TARGET_GB]
    best = max(fitting, key=lambda row: row.get("mfu") or 0.0, default=None)
    if best is None or best.get("mfu") is None:
        lines.append(f"- MFU >= {MFU_TARGET:.0%} at 512 px within {MEMORY_TARGET_GB:.0f} GB: not measured "
                     "(no 512 px row with a peak and an MFU)")
    else:
        verdict = "met" if best["mfu"] >= MFU_TARGET else "missed"
        lines.append(f"- MFU >= {MFU_TARGET:.0%} at 512 px within {MEMORY_TARGET_GB:.0f} GB: {verdict} "
                     f"({best['mode']}: {best['mfu']:.1%}, {best['peak_memory_gb']:.1f} GB)")
    worst = max(at_512, key=lambda row: row["seconds"] / row["base_seconds"])
    ratio = worst["seconds"] / worst["base_seconds"]
    lines.append(f"- adapter step <= {RATIO_TARGET}x base step at 512 px: {'met' if ratio <= RATIO_TARGET else 'missed'}"
                 f" (worst {worst['mode']}: {ratio:.3f})")
    small = [row for row in ok if row["mode"] == "int8_adamw8bit" and row.get("peak_memory_gb") is not None]
    for row in small:
        verdict = "met" if row["peak_memory_gb"] <= SMALL_CARD_GB else "missed"
        lines.append(f"- 24 GB mode at {row['size']} px peak <= {SMALL_CARD_GB:.0f} GB: {verdict} "
                     f"({row['peak_memory_gb']:.1f} GB)")
    return lines


def record(out: Path) -> str:
    env = read_json(out / "env.json") or {}
    parts = read_json(out / "parts.json") or []
    train, sample = read_json(out / "train_step.json"), read_json(out / "sample.json")
    tests = test_outcomes(out / "cuda_tests.xml")
    title = "dry run on the CPU" if env.get("dry_run") else env.get("device", "unknown device")
    lines = [f"### GPU check: {title}, {env.get('date', '?')}", "",
             f"torch {env.get('torch')} (CUDA {env.get('cuda')}), diffusers {env.get('diffusers')}, transformers "
             f"{env.get('transformers')}, torchao {env.get('torchao')}, bitsandbytes {env.get('bitsandbytes')}; "
             f"{env.get('nvidia_smi') or env.get('device', '')}", "",
             "| part | exit | seconds | limit s |", "|---|---|---|---|"]
    lines += [f"| {p['part']} | {p['exit']}{' (time limit)' if p['exit'] in (124, 137) else ''} | {p['seconds']} | "
              f"{p['limit_s']} |" for p in parts]
    counts = {}
    for _, outcome, _ in tests:
        counts[outcome] = counts.get(outcome, 0) + 1
    lines += ["", "CUDA tests: " + (", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no results"), ""]
    if tests:
        lines += ["| test | outcome | s |", "|---|---|---|"]
        lines += [f"| {name} | {outcome} | {seconds:.1f} |" for name, outcome, seconds in tests]
    lines += ["", "Training step (`benchmarks/train_step.py`):", ""]
    lines += train_rows(train) if train else ["not measured (no train_step.json)"]
    lines += ["", "Sampling (`benchmarks/sample.py`):", ""]
    lines += sample_rows(sample) if sample else ["not measured (no sample.json)"]
    lines += ["", "Targets:"] + targets(train)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder benchmarks/gpu_check.sh wrote")
    args = parser.parse_args(argv)
    if not args.out.is_dir():
        parser.error(f"{args.out}: no such folder")
    sys.stdout.write(record(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
