"""The trainer end to end on a tiny dataset: outputs, tracker logs, SIGKILL + resume, NaN stop, Ctrl-C, two ranks."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dtback.io import is_temporary
from dtback.config import load_config
from dtback.errors import ConfigError
from dtback.model.identity_flux import IdentityPreservingFlux, read_adapter
from dtback.training import trainer as trainer_module
from dtback.training.trackers import flat_hparams
from dtback.training.trainer import TrainingDiverged, train
from helpers import REPO, make_dataset, save_tiny_dinov2

SHIM = str(REPO / "train" / "run_training.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 10-character dataset of 32 px images, a tiny DINOv2 body model and a shared embedding cache."""
    root = tmp_path_factory.mktemp("tiny")
    data = make_dataset(root / "data", {"b": {f"c{i}": 3 for i in range(10)}}, size=(32, 32))
    body = save_tiny_dinov2(root / "dino")
    return {"data": data, "body": body, "cache": root / "cache"}


def overrides(tiny, run_dir: Path, **extra) -> list[str]:
    settings = {
        "data_dir": tiny["data"], "output_dir": run_dir, "input_size": 32, "batch_size": 2,
        "data.world.generate_if_missing": "false", "identity.body_model": tiny["body"],
        "identity.cache_dir": tiny["cache"], "identity.face_backend": "dlib", "model.simple_vae": "null",
        "model.simple_base": "null", "face_weight": 0, "body_weight": 0.1,
        "training.max_steps": 8, "training.checkpoint_every": 4, "training.validate_every": 1000,
        "training.val_sampling_steps": 2, "training.num_val_characters": 1, "training.warmup_steps": 2,
        "training.log_every": 2, "training.mixed_precision": "no", **extra,  # the same numbers on every CPU
    }
    return [f"{key}={value}" for key, value in settings.items()]


def run_shim(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "300"}
    return subprocess.run([sys.executable, SHIM, "--config", str(REPO / "train" / "config.yaml"), "--no-progress",
                           *args], capture_output=True, text=True, timeout=600, env=env, **kwargs)


def set_args(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(sorted((run_dir / "checkpoints").iterdir())[-1] / "trainable.safetensors")


@pytest.mark.slow
def test_training_writes_checkpoints_model_grids_and_report(tiny, tmp_path):
    run_dir = tmp_path / "run"
    # Validation with true CFG against no identity, and the person-weighted flow loss, on the way.
    settings = set_args(overrides(tiny, run_dir, **{"training.val_true_cfg": 2.0, "training.person_loss_weight": 3.0}))
    result = run_shim(settings)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-000004", "checkpoint-000008"]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4, 6, 8]
    assert all(m["loss/flow"] > 0 and "lr" in m for m in metrics)
    validation = json.loads((run_dir / "validation.jsonl").read_text().splitlines()[-1])
    assert validation["step"] == 8 and {"val/body_sim", "val/body_sim_no_id", "val/body_sim_shuffled"} <= set(validation)
    for name in ("report.html", "samples/step-000008.png", "curves/losses.png", "summary.json", "config.yaml",
                 "split.json", "base/model_index.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard" / "dtback").glob("events.out.tfevents.*"))
    # The seed's inference file loads (tensors-only) into the trained base it names.
    from diffusers import FluxTransformer2DModel

    base = FluxTransformer2DModel.from_pretrained(run_dir / "base" / "transformer")
    model = IdentityPreservingFlux.from_pretrained(run_dir / "best_model.pt", transformer=base)
    assert model.spec.extra.base_model == "base"
    assert f"report: {run_dir / 'report.html'}" in result.stdout + result.stderr
    assert "<img" in (run_dir / "report.html").read_text()  # the report shows the run's curves and grids
    # A second run resumes from the latest checkpoint: the run is complete, nothing more is trained.
    again = run_shim(settings)
    assert again.returncode == 0 and "resuming from" in again.stdout + again.stderr
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4


@pytest.mark.slow
def test_tensorboard_events_hold_the_loss_and_the_grid_and_log_with_empty_writes_none(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    short = {"training.max_steps": 2, "training.validate_every": 2, "training.checkpoint_every": 2}
    run_dir = tmp_path / "logged"
    train(load_config(REPO / "train" / "config.yaml", overrides(tiny, run_dir, **short)), resume=None,
          progress_bar=False)
    events = run_dir / "tensorboard" / "dtback"  # accelerate: <logging_dir>/<project name>
    assert len(list(events.glob("events.out.tfevents.*"))) == 1
    accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0, "images": 0}).Reload()
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert [(e.step, e.value) for e in accumulator.Scalars("loss")] == [(2, pytest.approx(logged["loss"], rel=1e-6))]
    assert {"loss/flow", "lr", "val/body_sim"} <= set(accumulator.Tags()["scalars"])
    (image,) = accumulator.Images("validation/grid")
    with Image.open(run_dir / "samples" / "step-000002.png") as grid:
        assert (image.step, image.width, image.height) == (2, *grid.size)
    (hparams,) = events.glob("*/hparams.yml")  # the flat config, as accelerate stores it next to the events
    assert "training.learning_rate:" in hparams.read_text()

    quiet = tmp_path / "quiet"
    train(load_config(REPO / "train" / "config.yaml", overrides(tiny, quiet, **short, **{"training.log_with": "[]"})),
          resume=None, progress_bar=False)
    assert (quiet / "metrics.jsonl").is_file() and (quiet / "samples" / "step-000002.png").is_file()
    assert not (quiet / "tensorboard").exists() and not list(quiet.rglob("events.out.tfevents.*"))


def test_log_with_takes_accelerates_trackers_and_refuses_unknown_names():
    from accelerate.utils import LoggerType

    for name in LoggerType.list():  # every tracker accelerate knows, and "all"
        assert load_config(None, [f"training.log_with=[{name}]"]).training.log_with == [name]
    assert load_config(None, []).training.log_with == ["tensorboard"]
    assert load_config(None, ["training.log_with=null"]).training.log_with == []
    assert load_config(None, ["training.log_with=wandb"]).training.log_with == ["wandb"]
    with pytest.raises(ConfigError, match=r"training\.log_with: unknown tracker\(s\) 'tensorbord'; choose from "):
        load_config(None, ["training.log_with=[tensorbord]"])


def test_a_missing_tracker_package_stops_the_run_before_it_starts(tmp_path, monkeypatch):
    import accelerate.tracking
    from accelerate.utils import LoggerType

    monkeypatch.setattr(accelerate.tracking, "get_available_trackers", lambda: [LoggerType.TENSORBOARD])
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", "training.log_with=[tensorboard, wandb]"])
    with pytest.raises(ConfigError, match=r"training\.log_with: wandb is not installed \(pip install wandb\)"):
        train(cfg, resume=None, progress_bar=False)
    assert not (tmp_path / "run").exists()  # nothing was built


def test_hyper_parameters_are_flat_scalars():
    cfg = load_config(REPO / "train" / "config.yaml", ["training.max_steps=null"])
    flat = flat_hparams(cfg)
    assert all(isinstance(value, (bool, int, float, str)) for value in flat.values())
    assert flat["training.learning_rate"] == cfg.training.learning_rate
    assert flat["training.adam_betas"] == "[0.9, 0.999]" and flat["training.max_steps"] == "null"
    assert flat["training.log_with"] == '["tensorboard"]' and flat["output.output_dir"] == str(cfg.output.output_dir)
    assert "data.world.seed" in flat and not any(isinstance(value, dict) for value in flat.values())


@pytest.mark.slow
def test_sigkill_then_resume_reaches_the_uninterrupted_weights(tiny, tmp_path):
    settings = dict(**{"training.max_steps": 24, "training.checkpoint_every": 4})
    straight = tmp_path / "straight"
    assert run_shim(set_args(overrides(tiny, straight, **settings))).returncode == 0
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, SHIM, "--config", str(REPO / "train" / "config.yaml"), "--no-progress",
                                *set_args(overrides(tiny, killed, **settings))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not (killed / "checkpoints" / "checkpoint-000008").exists():
            assert process.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.02)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (killed / "checkpoints" / "checkpoint-000024").exists(), "killed too late to prove anything"
    resumed = run_shim(["--resume", *set_args(overrides(tiny, killed, **settings))])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not [p for p in (killed / "checkpoints").iterdir() if is_temporary(p)]
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    cfg = load_config(REPO / "train" / "config.yaml", overrides(tiny, tmp_path / "run", **{"training.checkpoint_every": 2}))
    real = trainer_module.compute_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 4:  # the 4th step's loss
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_module, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4 .* last good checkpoint is .*checkpoint-000002"):
        train(cfg, resume=None, progress_bar=False)
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-000002"]
    weights = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-000002" / "trainable.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


@pytest.mark.slow
def test_nan_through_the_cli_exits_2_without_traceback(tiny, tmp_path):
    result = run_shim(set_args(overrides(tiny, tmp_path / "run", learning_rate=1e20, **{"training.max_grad_norm": "null",
                                                                                         "training.warmup_steps": 0})))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "loss is" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_two_cpu_ranks_end_with_identical_weights_and_one_writer(tiny, tmp_path):
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SHIM,
         "--config", str(REPO / "train" / "config.yaml"), "--no-progress", *set_args(overrides(tiny, run_dir))],
        capture_output=True, text=True, timeout=600, env=env,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    digests = dict(re.findall(r"rank (\d+) of 2: final trainable weights sha256 ([0-9a-f]{16})", output))
    assert set(digests) == {"0", "1"} and digests["0"] == digests["1"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["checkpoint-000004", "checkpoint-000008"]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8]  # one writer: no line twice
    assert len(list((run_dir / "tensorboard" / "dtback").glob("events.out.tfevents.*"))) == 1  # main process only


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130(tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = set_args(overrides(tiny, run_dir, **{"training.max_steps": 100000, "training.checkpoint_every": 4}))
    process = subprocess.Popen([sys.executable, SHIM, "--config", str(REPO / "train" / "config.yaml"), "--no-progress",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoints" / "checkpoint-000004").exists():
            assert process.poll() is None and time.time() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert "continue with --resume" in stderr
    saved = sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").iterdir())
    assert saved[-1] >= 4 and not [p for p in (run_dir / "checkpoints").iterdir() if is_temporary(p)]
    state = json.loads((run_dir / "checkpoints" / f"checkpoint-{saved[-1]:06d}" / "state.json").read_text())
    assert state["progress"]["step"] == saved[-1]


@pytest.mark.slow
def test_a_frozen_simple_base_keeps_its_weights_and_only_the_adapters_train(tiny, tmp_path):
    """model.train_simple_base=false: the simple model stays as it started (as real FLUX would), the adapters
    train, and best_model.pt still finds its base next to it."""
    from diffusers import FluxTransformer2DModel

    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "train" / "config.yaml", overrides(tiny, run_dir, **{
        "model.train_simple_base": "false", "training.validate_every": 8}))
    train(cfg, resume=None, progress_bar=False)
    start = FluxTransformer2DModel.from_pretrained(run_dir / "simple_base" / "transformer").state_dict()
    saved = FluxTransformer2DModel.from_pretrained(run_dir / "base" / "transformer")
    assert all(torch.equal(start[name], tensor) for name, tensor in saved.state_dict().items())
    trainable = final_weights(run_dir)
    assert trainable and not any(name.startswith("transformer.") for name in trainable)
    model = IdentityPreservingFlux.from_pretrained(run_dir / "best_model.pt", transformer=saved)
    assert model.spec.extra.base_model == "base"
    assert any(p.abs().sum() > 0 for name, p in model.named_parameters() if "to_out" in name)  # zero-init moved


def test_training_runs_with_cudnn_attention_as_the_config_says(monkeypatch):
    import contextlib

    seen = []

    @contextlib.contextmanager
    def backends(cudnn):
        seen.append(("enter", cudnn))
        yield
        seen.append(("exit", cudnn))

    monkeypatch.setattr(trainer_module.devices, "attention_backends", backends)
    monkeypatch.setattr(trainer_module, "_train", lambda cfg, resume, progress_bar: seen.append("train") or "done")
    for value in (False, True):
        seen.clear()
        cfg = load_config(None, [f"training.cudnn_attention={str(value).lower()}"])
        assert train(cfg, resume=None, progress_bar=False) == "done"
        assert seen == [("enter", value), "train", ("exit", value)]


def test_train_called_from_python_never_runs_world_encoders_on_photos(tmp_path):
    data = make_dataset(tmp_path / "photos", {"b": {f"c{i}": 3 for i in range(3)}}, size=(32, 32))
    cfg = load_config(REPO / "train" / "config.yaml", [f"data_dir={data}", f"output_dir={tmp_path / 'run'}"])
    assert (cfg.identity.face_backend, cfg.identity.body_model) == ("world", "world")
    with pytest.raises(ConfigError, match="identity.body_model=world"):
        train(cfg, resume=None, progress_bar=False)
    assert not (tmp_path / "run").exists()  # stopped before any work


def test_identity_loss_every_k_steps_leaves_the_steps_between_to_the_flow_loss(tiny, tmp_path):
    """training.identity_loss_every=2: the body loss is computed (and logged) on steps 1 and 3, not on 2 and 4."""
    run_dir = tmp_path / "run"
    cfg = load_config(REPO / "train" / "config.yaml", overrides(tiny, run_dir, **{
        "training.identity_loss_every": 2, "training.max_steps": 4, "training.log_every": 1,
        "training.identity_dropout": 0, "training.identity_loss_max_sigma": 1.0}))
    train(cfg, resume=None, progress_bar=False)
    rows = {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert sorted(rows) == [1, 2, 3, 4]
    assert [step for step in rows if "loss/body" in rows[step]] == [1, 3]
    for step in (2, 4):
        assert rows[step]["loss"] == pytest.approx(rows[step]["loss/flow"] * cfg.training.content_weight)


@pytest.mark.slow
def test_compiled_blocks_train_to_the_same_losses_as_eager(tiny, tmp_path, monkeypatch):
    """training.compile: every FLUX block, its adapter hook included, runs as a torch.compile region and the run's
    losses are the eager run's. Dynamo traces for real; its graphs run eagerly here (backend "eager") so the test
    checks the wiring and that the hooks trace, not inductor's code generation (torch's own tests do that)."""
    from diffusers import FluxTransformer2DModel

    compiled = []
    real_compile = torch.nn.Module.compile

    def eager_backend(module, *args, **kwargs):
        compiled.append(type(module).__name__)
        return real_compile(module, *args, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", eager_backend)
    losses = {}
    for flag in (False, True):
        run_dir = tmp_path / f"compile_{flag}"
        cfg = load_config(REPO / "train" / "config.yaml", overrides(tiny, run_dir, **{
            "training.compile": str(flag).lower(), "training.max_steps": 3, "training.log_every": 1,
            "training.identity_dropout": 0, "training.identity_loss_max_sigma": 1.0}))
        train(cfg, resume=None, progress_bar=False)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [(row["loss/flow"], row["loss/body"]) for row in rows]
    blocks = FluxTransformer2DModel._repeated_blocks
    assert compiled and set(compiled) == set(blocks)  # only the repeated blocks, and only when asked
    assert len(losses[True]) == 3 and all(0 < flow < 10 for flow, _ in losses[True])
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-6)


def test_bf16_on_a_cpu_without_bf16_instructions_trains_in_float32_with_a_warning(monkeypatch, caplog):
    cfg = load_config(None, ["training.mixed_precision=bf16"])
    monkeypatch.setattr(trainer_module, "_has_gpu", lambda: False)
    monkeypatch.setattr(trainer_module.devices, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level("WARNING", logger=trainer_module.logger.name):
        assert trainer_module.mixed_precision(cfg) == "no"
    assert "no bf16 instructions" in caplog.text
    monkeypatch.setattr(trainer_module.devices, "cpu_has_native_bf16", lambda: True)
    assert trainer_module.mixed_precision(cfg) == "bf16"
    assert trainer_module.mixed_precision(load_config(None, ["training.mixed_precision=no"])) == "no"


def test_bf16_training_steps_on_a_cpu_use_the_math_attention_kernel():
    from dtback import devices

    flags = (torch.backends.cuda.flash_sdp_enabled, torch.backends.cuda.math_sdp_enabled)
    before = [flag() for flag in flags]
    with devices.cpu_bf16_attention(torch.device("cpu"), "bf16"):
        assert [flag() for flag in flags] == [False, True]
    assert [flag() for flag in flags] == before
    for device, precision in (("cpu", "no"), ("cuda", "bf16")):
        with devices.cpu_bf16_attention(torch.device(device), precision):
            assert [flag() for flag in flags] == before


@pytest.mark.slow
def test_a_bf16_cpu_run_trains_close_to_float32_on_the_same_float32_latents(tiny, tmp_path, monkeypatch):
    """training.mixed_precision=bf16 on a CPU: autocast steps under the math attention kernel, on the latents a
    float32 run encoded (the cache's one namespace: latents are never encoded under autocast). Where the CPU has no
    bf16 instructions torch emulates them: slower, the same path."""
    monkeypatch.setattr(trainer_module.devices, "cpu_has_native_bf16", lambda: True)
    entered = []
    real = trainer_module.devices.cpu_bf16_attention
    monkeypatch.setattr(trainer_module.devices, "cpu_bf16_attention",
                        lambda device, precision: entered.append((device.type, precision)) or real(device, precision))
    cache, rows = tmp_path / "cache", {}
    for precision in ("no", "bf16"):
        run_dir = tmp_path / precision
        cfg = load_config(REPO / "train" / "config.yaml", overrides(tiny, run_dir, **{
            "training.mixed_precision": precision, "identity.cache_dir": cache, "training.max_steps": 3,
            "training.log_every": 1, "training.identity_dropout": 0, "training.identity_loss_max_sigma": 1.0}))
        train(cfg, resume=None, progress_bar=False)
        rows[precision] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {("cpu", "no"), ("cpu", "bf16")} <= set(entered)
    assert all(math.isfinite(row["loss"]) and "loss/body" in row for row in rows["bf16"])
    first_fp32, first_bf16 = rows["no"][0], rows["bf16"][0]  # same weights, noise and batch: bf16 rounding only
    for key in ("loss/flow", "loss/body"):
        assert first_bf16[key] == pytest.approx(first_fp32[key], rel=0.05, abs=0.01)
    assert first_bf16["loss/flow"] != first_fp32["loss/flow"]  # autocast did run
    assert len(list((cache / "latents").glob("*/encoder.json"))) == 1


def test_a_damaged_best_model_of_a_finished_run_is_written_anew_at_its_end(tiny_config, tmp_path, caplog):
    # Validated at steps 2 and 4, no EMA: the best model is the live adapter of the step validated.
    run_dir = tmp_path / "run"
    cfg = tiny_config(run_dir, **{"training.validate_every": 2, "training.ema_decay": "null"})
    train(cfg, resume=None, progress_bar=False)
    best = run_dir / "best_model.pt"
    best.write_bytes(b"torn")  # a full disk or an interrupted copy
    with caplog.at_level(logging.WARNING):
        result = train(cfg, resume="auto", progress_bar=False)  # at its last step: no step left to validate at
    assert result.steps == 4 and "renamed to best_model.pt.damaged" in caplog.text
    assert result.best_model == best  # was None: the run ended with no best model at all
    validations = [json.loads(line) for line in (run_dir / "validation.jsonl").read_text().splitlines()]
    assert [(v["step"], v["best_step"]) for v in validations][-1] == (4, 4)  # the final weights, validated now
    _, state = read_adapter(best)
    _, expected = read_adapter(run_dir / "checkpoints" / "checkpoint-000004" / "adapter")
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    assert json.loads((run_dir / "summary.json").read_text())["best_step"] == 4
    # A best model that reads is kept as it is: no validation is added when the run has nothing left to train.
    kept = best.read_bytes()
    train(cfg, resume="auto", progress_bar=False)
    assert best.read_bytes() == kept and len((run_dir / "validation.jsonl").read_text().splitlines()) == 3
