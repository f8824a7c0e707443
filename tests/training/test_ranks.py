"""Several ranks (torchrun, 2 CPU ranks on gloo) given hostile input: every rank stops with one message, before any
step, and nothing in the run folder is half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, make_dataset, save_tiny_dinov2

pytestmark = pytest.mark.slow

SHIM = str(REPO / "train" / "run_training.py")

# Installed in every rank through PYTHONPATH: rank 1 (only) finds one image unreadable when it scans the dataset,
# as when a file is removed or damaged between the ranks' setups, or one machine sees other files.
ONE_RANK_SEES_A_BAD_IMAGE = textwrap.dedent("""
    import os
    if os.environ.get("LOCAL_RANK") == "1":
        import dtback.data.layout as layout
        from dtback.data.images import ImageSkip, SkipReason
        real = layout.probe_image
        def probe(path, *args):
            if str(path).endswith(os.environ["BAD_ON_RANK_1"]):
                raise ImageSkip(path, SkipReason.TRUNCATED, "cut short on this rank's view of the files")
            return real(path, *args)
        layout.probe_image = probe
""")


def two_ranks(root: Path, data: Path, run_dir: Path, body: Path) -> list[str]:
    values = {
        "data_dir": data, "output_dir": run_dir, "input_size": 32, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": body, "identity.cache_dir": root / "cache",
        "identity.face_backend": "dlib", "model.simple_vae": "null", "model.simple_base": "null", "face_weight": 0,
        "body_weight": 0.1, "training.max_steps": 4, "training.checkpoint_every": 2, "training.validate_every": 4,
        "training.val_sampling_steps": 2, "training.num_val_characters": 1, "training.warmup_steps": 2,
        "training.log_with": "[]", "training.mixed_precision": "no",
    }
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SHIM, "--config",
            str(REPO / "train" / "config.yaml"), "--no-progress",
            *[part for key, value in values.items() for part in ("--set", f"{key}={value}")]]


def run_with_a_bad_image_on_rank_1(tmp_path: Path, per_character: int) -> tuple[int, str, Path]:
    """Two ranks on 10 characters of ``per_character`` images, rank 1 finding c3/001.png unreadable: (exit status,
    output of both ranks and torchrun, run folder)."""
    data = make_dataset(tmp_path / "data", {"b": {f"c{i}": per_character for i in range(10)}}, size=(32, 32))
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(ONE_RANK_SEES_A_BAD_IMAGE)
    env = {**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1", "BAD_ON_RANK_1": "c3/001.png",
           "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    run_dir = tmp_path / "run"
    done = subprocess.run(two_ranks(tmp_path, data, run_dir, save_tiny_dinov2(tmp_path / "dino")),
                          capture_output=True, text=True, timeout=300, env=env)
    return done.returncode, done.stdout + done.stderr, run_dir


def rank_errors(output: str) -> list[str]:
    return sorted(line for line in output.splitlines() if line.startswith("error (rank "))


def test_ranks_that_read_different_images_stop_before_training(tmp_path):
    """Rank 1 loses one image of a 4-image character (the character stays): without a check the ranks would train
    on other image lists under the same indices, silently. Every rank names both counts; nothing is trained."""
    status, output, run_dir = run_with_a_bad_image_on_rank_1(tmp_path, per_character=4)
    assert status != 0, output[-3000:]
    errors = rank_errors(output)
    assert [line[:len("error (rank 0 of 2): ")] for line in errors] == ["error (rank 0 of 2): ", "error (rank 1 of 2): "]
    assert errors[0][len("error (rank 0 of 2): "):] == errors[1][len("error (rank 1 of 2): "):], output[-3000:]
    assert "rank 0: 40 images" in errors[0] and "rank 1: 39 images" in errors[0]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output  # (torchrun adds its own)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "config.yaml").exists()


def test_a_rank_that_stops_alone_in_setup_leaves_the_others_one_line(tmp_path):
    """Rank 1 loses one image of a 3-image character, which it then drops: it stops with its own error while rank 0
    waits for it in a collective, which gloo ends with "Connection closed by peer". Rank 0 says so in one line
    pointing at the other rank's error, not with a traceback."""
    status, output, run_dir = run_with_a_bad_image_on_rank_1(tmp_path, per_character=3)
    assert status != 0, output[-3000:]
    errors = rank_errors(output)
    assert len(errors) == 2, output[-4000:]
    assert errors[0].startswith("error (rank 0 of 2): another rank stopped"), output[-4000:]
    assert errors[1].startswith("error (rank 1 of 2): this rank splits") and "-['b/c3']" in errors[1]
    assert "[rank0]: Traceback" not in output and "[rank1]: Traceback" not in output, output[-4000:]
    assert not (run_dir / "checkpoints").exists()
