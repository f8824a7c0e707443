"""Training sharded across ranks (``training.distributed: fsdp``, torch FSDP2) on two CPU ranks (gloo), proven
against one rank with the same global batch (2 ranks x 1 micro-batch = 1 rank x 2 accumulated micro-batches):
the same weights, optimiser and EMA; whole checkpoints that resume on 1 or 2 ranks; a SIGKILLed rank; a failing
rank; ``best_model.pt`` in ``dtback generate``; and two "nodes" on one machine.

Tolerance: FSDP reduces gradients across ranks where one rank sums its accumulated micro-batches, so float32
rounding differs; measured at most 5e-7 on these weights (|w| <= ~1) after 6 steps; the tests allow 1e-5."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dtback import devices

from helpers import REPO, make_dataset, save_tiny_dinov2

pytestmark = pytest.mark.slow

SHIM = str(REPO / "train" / "run_training.py")
TOLERANCE = 1e-5
STEPS = 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = make_dataset(root / "data", {"b": {f"c{i}": 3 for i in range(10)}}, size=(32, 32))
    return {"data": data, "body": save_tiny_dinov2(root / "dino"), "cache": root / "cache", "root": root}


def settings(tiny, run_dir: Path, **extra) -> list[str]:
    values = {
        "data_dir": tiny["data"], "output_dir": run_dir, "input_size": 32, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": tiny["body"],
        "identity.cache_dir": tiny["cache"], "identity.face_backend": "dlib", "model.simple_vae": "null",
        "model.simple_base": "null", "face_weight": 0, "body_weight": 0.1, "training.max_steps": STEPS,
        "training.checkpoint_every": 2, "training.validate_every": STEPS, "training.val_sampling_steps": 2,
        "training.num_val_characters": 1, "training.warmup_steps": 2, "training.log_every": 1,
        "training.log_with": "[]", "training.mixed_precision": "no", **extra,  # float32: the same on every CPU
    }
    return [part for key, value in values.items() for part in ("--set", f"{key}={value}")]


def one_rank(tiny, run_dir: Path, *extra: str) -> list[str]:
    """The same global batch on one process: 2 accumulated micro-batches per step."""
    return [sys.executable, SHIM, "--config", str(REPO / "train" / "config.yaml"), "--no-progress", *extra,
            *settings(tiny, run_dir, **{"training.gradient_accumulation_steps": 2})]


def two_ranks(tiny, run_dir: Path, *extra: str, launcher: tuple[str, ...] = ("--standalone", "--nproc_per_node", "2"),
              **values) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *launcher, SHIM, "--config",
            str(REPO / "train" / "config.yaml"), "--no-progress", *extra,
            *settings(tiny, run_dir, **{"training.distributed": "fsdp", **values})]


ENV = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}


def run(command: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def last(run_dir: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "checkpoints").iterdir())[-1] / name)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= TOLERANCE, worst


def assert_same_run(a: Path, b: Path) -> None:
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert_close(last(a, name), last(b, name))


@pytest.fixture(scope="module")
def runs(tiny):
    """Uninterrupted runs: one rank (2 accumulated micro-batches) and two FSDP ranks."""
    one, fsdp = tiny["root"] / "one", tiny["root"] / "fsdp"
    run(one_rank(tiny, one))
    output = run(two_ranks(tiny, fsdp))
    return {"one": one, "fsdp": fsdp, "output": output.stdout + output.stderr}


def test_two_fsdp_ranks_train_the_weights_one_rank_trains(runs):
    assert "FSDP: 13 units + the root" in runs["output"]  # 2 double + 4 single blocks, 6 adapters, the resampler
    assert sorted(p.name for p in (runs["fsdp"] / "checkpoints").iterdir()) == [
        "checkpoint-000002", "checkpoint-000004", "checkpoint-000006"]
    assert_same_run(runs["one"], runs["fsdp"])
    # The checkpoint holds whole tensors in the one-rank layout: same names and shapes as the one-rank run's.
    one, fsdp = last(runs["one"], "trainable.safetensors"), last(runs["fsdp"], "trainable.safetensors")
    assert {k: v.shape for k, v in one.items()} == {k: v.shape for k, v in fsdp.items()}
    # best_model.pt is one full adapter file, equal to the one-rank run's.
    a = torch.load(runs["one"] / "best_model.pt", weights_only=True)["state_dict"]
    b = torch.load(runs["fsdp"] / "best_model.pt", weights_only=True)["state_dict"]
    assert_close(a, b)
    lines = (runs["fsdp"] / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == STEPS  # one writer


def test_fsdp_with_gradient_checkpointing_trains_the_same_weights(runs, tiny, tmp_path):
    """Blocks recomputed in backward (memory mode) under FSDP2: the same weights as the run that stores them."""
    checkpointed = tmp_path / "checkpointed"
    output = run(two_ranks(tiny, checkpointed, **{"training.gradient_checkpointing": "true"}))
    assert "gradient checkpointing on 6 of 6 blocks" in output.stdout + output.stderr
    assert_same_run(runs["fsdp"], checkpointed)


def resumed_copy(source: Path, target: Path, keep_step: int) -> Path:
    """A copy of a run folder as it was after checkpoint ``keep_step`` (later checkpoints removed)."""
    shutil.copytree(source, target)
    for folder in (target / "checkpoints").iterdir():
        if int(folder.name.split("-")[1]) > keep_step:
            shutil.rmtree(folder)
    return target


def test_an_fsdp_checkpoint_resumes_on_one_rank_and_on_two(runs, tiny, tmp_path):
    on_one = resumed_copy(runs["fsdp"], tmp_path / "on_one", 2)
    run(one_rank(tiny, on_one, "--resume"))
    assert_same_run(runs["fsdp"], on_one)
    on_two = resumed_copy(runs["fsdp"], tmp_path / "on_two", 2)
    run(two_ranks(tiny, on_two, "--resume"))
    assert_same_run(runs["fsdp"], on_two)


def test_a_one_rank_checkpoint_resumes_on_two_fsdp_ranks(runs, tiny, tmp_path):
    target = resumed_copy(runs["one"], tmp_path / "one_to_two", 4)
    run(two_ranks(tiny, target, "--resume"))
    assert_same_run(runs["one"], target)


def test_sigkill_of_one_rank_then_resume(runs, tiny, tmp_path):
    killed = tmp_path / "killed"
    launcher = subprocess.Popen(two_ranks(tiny, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "checkpoint-000002").exists():
            assert launcher.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if SHIM in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[-1].send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0  # the launcher ends the other rank and fails
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert not (killed / "checkpoints" / f"checkpoint-{STEPS:06d}").exists(), "killed too late to prove anything"
    run(two_ranks(tiny, killed, "--resume"))
    assert_same_run(runs["fsdp"], killed)


def test_a_failing_rank_ends_the_job_with_its_error(tiny, tmp_path):
    """Rank 1 raises at its third step; rank 0 must not wait for it forever: the job ends, the error is shown."""
    script = tmp_path / "fail_rank_1.py"
    script.write_text(
        "import os, sys\n"
        "from dtback.training import trainer\n"
        "real = trainer.compute_loss\n"
        "calls = {'n': 0}\n"
        "def failing(*args, **kwargs):\n"
        "    calls['n'] += 1\n"
        "    if os.environ['RANK'] == '1' and calls['n'] == 3:\n"
        "        raise RuntimeError('rank 1 broke on purpose')\n"
        "    return real(*args, **kwargs)\n"
        "trainer.compute_loss = failing\n"
        "from dtback.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               "train", "--config", str(REPO / "train" / "config.yaml"), "--no-progress",
               *settings(tiny, tmp_path / "run", **{"training.distributed": "fsdp"})]
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0
    assert "rank 1 broke on purpose" in result.stdout + result.stderr
    assert time.time() - started < 240


def test_best_model_of_an_fsdp_run_generates_on_one_device(runs, tiny, tmp_path):
    reference = next((tiny["data"] / "b" / "c0").iterdir())
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "dtback", "generate", "--model", str(runs["fsdp"] / "best_model.pt"),
         "--reference", str(reference), "--prompt", "a person", "--steps", "2", "--width", "32", "--height", "32",
         "--output", str(out), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    images = sorted(out.glob("*.png"))
    assert images and Image.open(images[0]).size == (32, 32)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_nodes_on_one_machine(runs, tiny, tmp_path):
    """``torchrun --nnodes 2``: two launchers (one per "node", one rank each) meet at a local rendezvous; the
    sharded run equals the one-rank run, as on one node."""
    run_dir, port = tmp_path / "nodes", free_port()
    launchers = [
        subprocess.Popen(
            two_ranks(tiny, run_dir, launcher=("--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank),
                                               "--master_addr", "127.0.0.1", "--master_port", str(port))),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
        for rank in (0, 1)
    ]
    outputs = [launcher.communicate(timeout=600)[0] for launcher in launchers]
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert_same_run(runs["one"], run_dir)


@pytest.mark.skipif(not devices.cpu_has_native_bf16(), reason="this CPU has no bf16 instructions: bf16 runs in float32")
def test_two_fsdp_ranks_train_and_validate_in_bf16(tiny, tmp_path):
    """training.mixed_precision=bf16 under FSDP: the ranks gather bf16 weights, and validation (whose float32 VAE
    decodes the bf16 latents they give) runs under autocast; the run ends with its best model."""
    run_dir = tmp_path / "bf16"
    run(two_ranks(tiny, run_dir, **{"training.mixed_precision": "bf16"}))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS and all(math.isfinite(row["loss"]) for row in rows)
    assert (run_dir / "best_model.pt").is_file() and (run_dir / "validation.jsonl").read_text().strip()
