"""Everything a run builds once before its first step, and the run folder's outputs (logs, grids, report).

Order: run folder + config → dataset (generating the identity world when the default folder is missing) → split →
identity embeddings (cached) → FLUX base → latents and text embeddings (cached) → identity model attached to the
transformer → identity loss. Stages that write shared files run on the main process first; the other processes
then read what it wrote.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dtback.config import Config
from dtback.data.prepare import prepare_dataset
from dtback.errors import DtbackError
from dtback.identity.body import BodyCropRule
from dtback.identity.precompute import IdentityPrecomputer
from dtback.model.flux import load_base, max_sequence_length, save_pipeline_atomic
from dtback.model.identity_flux import IdentityPreservingFlux
from dtback.model.memory import finish_caching, place_for_caching, quantize_base
from dtback.training.checkpoint import Progress
from dtback.training.features import FeatureStore, build_feature_store
from dtback.training.identity_loss import IdentityLoss
from dtback.viz.runlog import append_jsonl
from dtback.training.validation import (
    CONDITIONS, ValidationSet, make_validation_set, run_validation, selection_metric, similarity_scorer,
)

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"
BEST_MODEL = "best_model.pt"
TRAINED_BASE = "base"


@dataclass
class RunParts:
    """The built run: base pipeline, identity model, features, losses, and the run folder's writers."""

    cfg: Config
    run_dir: Path
    pipeline: Any
    model: IdentityPreservingFlux
    store: FeatureStore
    train_images: list[int]
    val_set: ValidationSet
    identity_loss: IdentityLoss | None
    face_encoder: Any
    body_encoder: Any
    guidance: float | None
    scheduler_config: dict
    base_trainable: bool
    is_main: bool
    scorers: list = field(default_factory=list)
    writer: Any = None

    def log(self, terms: dict[str, float]) -> None:
        append_jsonl(self.run_dir / METRICS_FILE, terms)
        if self.writer is not None:
            self.writer.log_scalars(int(terms["step"]), {k: v for k, v in terms.items() if k not in ("step", "epoch")})

    def validate(self, progress: Progress, ema, accelerator, params: list[torch.nn.Parameter]) -> None:
        """Held-out metrics and grid with the EMA weights (main process); keeps ``best_model.pt`` up to date.
        ``params`` are the trainable parameters in the order the EMA was built with."""
        if accelerator.is_main_process and self.val_set.characters:
            if ema is not None:
                ema.store(params)
                ema.copy_to(params)
            try:
                self._validate(progress)
            finally:
                if ema is not None:
                    ema.restore(params)
        accelerator.wait_for_everyone()

    def _validate(self, progress: Progress) -> None:
        t = self.cfg.training
        transformer = self.pipeline.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            metrics, images = run_validation(
                self.pipeline, self.model, self.store, self.val_set, self.scorers, self.cfg.data.input_size,
                t.val_sampling_steps, t.val_guidance, self.cfg.seed, true_cfg=t.val_true_cfg,
            )
        finally:
            transformer.train(was_training)
        metrics["step"] = progress.step
        metric = selection_metric(metrics)
        if progress.best_metric is None or metric > progress.best_metric:
            progress.best_metric, progress.best_step = metric, progress.step
            self.save_best()
        metrics["best_step"] = progress.best_step
        append_jsonl(self.run_dir / VALIDATION_FILE, metrics)
        grid = self._grid(images)
        grid_path = self.run_dir / "samples" / f"step-{progress.step:06d}.png"
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(grid_path)
        if self.writer is not None:
            self.writer.log_scalars(progress.step, {k: v for k, v in metrics.items() if k.startswith("val/")})
            self.writer.log_image("validation/grid", grid, progress.step)
        self.report()
        logger.info("validation at step %d: %s", progress.step,
                    ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("val/")))

    def _grid(self, images: dict[str, list[Image.Image]]) -> Image.Image:
        from dtback.viz.report import make_grid  # noqa: PLC0415

        rows, labels = [], []
        for row, character in enumerate(self.val_set.characters):
            reference = Image.open(self.store_path(self.val_set.references[row][0])).convert("RGB")
            rows.append([reference] + [images[c][row] for c in CONDITIONS])
            labels.append(self.store.characters[character])
        return make_grid(rows, labels, ["reference", "with identity", "without identity", "shuffled reference"],
                         cell=max(128, min(256, self.cfg.data.input_size)))

    def store_path(self, image: int) -> Path:
        return Path(self.cfg.data.data_dir) / self.store.keys[image]

    def save_best(self) -> None:
        """``best_model.pt`` (tensors-only adapter) and, for the simple model, its trained base next to it."""
        if self.base_trainable:
            save_pipeline_atomic(self.pipeline, self.run_dir / TRAINED_BASE)
        self.model.save_pretrained(self.run_dir / BEST_MODEL)

    def report(self) -> None:
        from dtback.viz.report import plot_curves, write_report  # noqa: PLC0415

        plot_curves(self.run_dir)
        write_report(self.run_dir)

    def finish(self, progress: Progress) -> None:
        summary = {"steps": progress.step, "best_step": progress.best_step, "best_metric": progress.best_metric,
                   "train_images": len(self.train_images), "val_characters": len(self.val_set.characters),
                   "skipped_images": self.store.skipped}
        validations = _read_last_jsonl(self.run_dir / VALIDATION_FILE)
        if validations:
            summary["last_validation"] = validations
        _write_json(self.run_dir / "summary.json", summary)
        self.report()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def setup(cfg: Config, accelerator, progress_bar: bool = True) -> RunParts:
    """Build the run (see the module docstring)."""
    run_dir = Path(cfg.output.output_dir)
    is_main = accelerator.is_main_process
    show = progress_bar and is_main
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(run_dir / "config.yaml")
    with accelerator.main_process_first():
        _ensure_data(cfg, show)
        prepared = prepare_dataset(cfg.data, cfg.seed, run_dir, progress=show)
    characters = prepared.split.characters(prepared.index, "train") + prepared.split.characters(prepared.index, "val")
    cache_dir = Path(cfg.identity.cache_dir) if cfg.identity.cache_dir is not None else run_dir / "cache"
    with accelerator.main_process_first():
        precomputer = IdentityPrecomputer(cfg.identity, cache_dir, cfg.data.max_image_pixels)
        subset = _Subset(prepared.index.root, characters)
        precomputer.run(subset, progress=show)
        pipeline = load_base(cfg.model, run_dir, seed=cfg.seed, device=accelerator.device)
        quantize_base(pipeline.transformer, cfg.model.base_quantization)  # memory modes: dtback.model.memory
        place_for_caching(pipeline, accelerator.device, cfg.model)
        pipeline.set_progress_bar_config(disable=True)  # validation sampling: the training bar is enough
        crop_rule = getattr(precomputer.body, "crop_rule", BodyCropRule())
        store = build_feature_store(pipeline, characters, cfg.data, precomputer.face_cache, precomputer.body_cache,
                                    cache_dir, max_sequence_length(cfg.model), crop_rule, progress=show)
        finish_caching(pipeline, accelerator.device, cfg.model)
    transformer = pipeline.transformer
    dims = {"face_dim": store.face_embeds.shape[1] if store.face_embeds is not None else 0,
            "body_dim": store.body_pooled.shape[1] if store.body_pooled is not None else 0,
            "body_token_dim": store.body_tokens.shape[2] if store.body_tokens is not None else 0}
    if not dims["face_dim"] and not dims["body_dim"]:
        raise DtbackError(
            f"no identity signal in {cfg.data.data_dir}: the {precomputer.face.encoder_id} face encoder found no face "
            "in any image and identity.body_model is null; set a body model or a face backend that sees these faces"
        )
    torch.manual_seed(cfg.seed)
    model = IdentityPreservingFlux.from_config(cfg.model, cfg.identity, transformer.config, **dims)
    # What inference needs to rebuild the run's setting from best_model.pt alone.
    model.spec.extra.update(
        base_model=TRAINED_BASE if cfg.model.use_simple_model else cfg.model.pretrained_model,
        identity=cfg.identity.model_dump(mode="json"), input_size=cfg.data.input_size,
        max_sequence_length=max_sequence_length(cfg.model),
    )
    model.to(accelerator.device).attach(transformer)
    base_trainable = cfg.model.use_simple_model
    transformer.requires_grad_(base_trainable).train(base_trainable)
    model.train()
    identity_loss = None
    if cfg.training.face_weight > 0 or cfg.training.body_weight > 0:
        identity_loss = IdentityLoss(cfg.training, pipeline.vae, precomputer.face, precomputer.body)
    train_keys = set(prepared.split.train)
    n_train_chars = sum(1 for key in store.characters if key in train_keys)
    train_images = [i for i in range(len(store)) if int(store.character[i]) < n_train_chars]
    val_characters = list(range(n_train_chars, len(store.characters)))
    val_set = make_validation_set(store, val_characters, cfg.training.num_val_characters, cfg.data.max_references)
    parts = RunParts(
        cfg=cfg, run_dir=run_dir, pipeline=pipeline, model=model, store=store, train_images=train_images,
        val_set=val_set, identity_loss=identity_loss, face_encoder=precomputer.face, body_encoder=precomputer.body,
        guidance=cfg.training.val_guidance if transformer.config.guidance_embeds else None,
        scheduler_config=dict(pipeline.scheduler.config), base_trainable=base_trainable, is_main=is_main,
    )
    parts.scorers = [similarity_scorer(store, val_set, precomputer.face, precomputer.body)]
    parts.scorers += _extra_scorers(cfg, store, val_set)
    if is_main:
        from dtback.viz.report import TensorBoardWriter  # noqa: PLC0415

        parts.writer = TensorBoardWriter(run_dir)
    logger.info("training on %d images of %d characters; %d held-out characters", len(train_images),
                n_train_chars, len(val_characters))
    return parts


def _ensure_data(cfg: Config, progress: bool) -> None:
    """Generate the identity world into ``data_dir`` when the config asks for it and the folder is missing."""
    world = getattr(cfg.data, "world", None)
    if world is not None and getattr(world, "generate_if_missing", False) and not Path(cfg.data.data_dir).exists():
        from dtback.data.world_files import ensure_world  # noqa: PLC0415

        ensure_world(cfg.data, progress=progress)


def _extra_scorers(cfg: Config, store: FeatureStore, val_set: ValidationSet) -> list:
    """Scorers beyond the training encoders: the world identity reader when the data is the identity world."""
    try:
        from dtback.evaluation.reader import validation_scorer  # noqa: PLC0415
    except ImportError:
        return []
    scorer = validation_scorer(cfg, store, val_set)
    return [scorer] if scorer is not None else []


class _Subset:
    """The slice of a dataset index the run uses (train + val characters), for the identity precompute."""

    def __init__(self, root: Path, characters):
        self.root = root
        self.characters = characters


def _read_last_jsonl(path: Path) -> dict | None:
    if not path.is_file():
        return None
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in reversed(lines):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def _write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
