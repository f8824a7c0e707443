"""Everything a run builds once before its first step, and the run folder's outputs (logs, grids, report).

Order: run folder → dataset (generating the identity world when the default folder is missing) → split →
identity embeddings (cached) → FLUX base → latents and text embeddings (cached) → identity model attached to the
transformer → identity loss. Stages that write shared files run on the main process first; the other processes
then read what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate.utils import broadcast_object_list
from PIL import Image

from dtback import backends
from dtback.config import Config
from dtback.data.images import ImageSkip, load_rgb, shown
from dtback.data.prepare import prepare_dataset
from dtback.errors import DtbackError
from dtback.identity.crops import BodyCropRule
from dtback.identity.precompute import IdentityPrecomputer
from dtback.io import WRITE_ERRORS, write_failure, write_json
from dtback.model.adapters import check_model_fits_base
from dtback.model.flux import base_content_id, local_base_folder, max_sequence_length, save_pipeline_atomic
from dtback.model.identity_flux import IdentityPreservingFlux
from dtback.model.memory import finish_caching, place_for_caching, quantize_base
from dtback.training import distributed
from dtback.training.checkpoint import Progress, latest_checkpoint
from dtback.training.features import FeatureStore, build_feature_store
from dtback.training.identity_loss import IdentityLoss
from dtback.training.trackers import TrackerWrites
from dtback.training.validation import (
    CONDITIONS, ValidationSet, make_validation_set, run_validation, selection_metric, similarity_scorer,
)
from dtback.viz import make_grid, plot_curves, sample_grid_path, save_sample_grid, write_report
from dtback.viz.runlog import append_jsonl
from dtback.world.reader import validation_scorer

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
    trackers: TrackerWrites | None = None  # the run's accelerate trackers (training.log_with): they get the logs
    sharded_module: Any = None  # the FSDP-sharded training module (training.distributed: fsdp), None otherwise
    record: dict = field(default_factory=dict)  # the config and data fingerprint every checkpoint records
    # FLUX.2 pipelines shift their noise levels by the sampling step count too: training shifts as validation samples
    empirical_mu_steps: int | None = None
    skipped_previews: int = 0  # sample grids, curves and report.html that could not be written (:meth:`_preview`)

    def log(self, terms: dict[str, float]) -> None:
        with _written(self.run_dir / METRICS_FILE, self.run_dir):
            append_jsonl(self.run_dir / METRICS_FILE, terms)
        self._track(int(terms["step"]), {k: v for k, v in terms.items() if k not in ("step", "epoch")})

    def _track(self, step: int, values: dict[str, Any]) -> None:
        if self.trackers is not None:
            self.trackers.scalars(step, values)

    def validate(self, progress: Progress, ema, accelerator, params: list[torch.nn.Parameter]) -> None:
        """Held-out metrics and grid with the EMA weights (main process); keeps ``best_model.pt`` up to date.
        ``params`` are the trainable parameters in the order the EMA was built with. Under FSDP every rank samples
        (each holds a slice of the model) and gathers the best model; the main process scores and writes."""
        sharded = self.sharded_module is not None
        if not self.val_set.characters or not (sharded or accelerator.is_main_process):
            accelerator.wait_for_everyone()
            return
        swap = contextlib.nullcontext() if ema is None else distributed.weights_swapped(ema, params)
        with swap:
            self._validate(progress, accelerator)
        accelerator.wait_for_everyone()

    def _validate(self, progress: Progress, accelerator) -> None:
        t = self.cfg.training
        transformer = self.pipeline.transformer
        was_training = transformer.training
        transformer.eval()
        main = accelerator.is_main_process
        sharded = self.sharded_module is not None
        # FSDP gathers its parameters in training.mixed_precision's dtype: under autocast the float32 VAE (the
        # simple model's) decodes the bf16 latents they give.
        precision = accelerator.autocast() if sharded else contextlib.nullcontext()
        try:
            with distributed.unsharded(self.sharded_module, sharded), precision:
                metrics, images = run_validation(
                    self.pipeline, self.model, self.store, self.val_set, self.scorers if main else [],
                    self.cfg.data.input_size, t.val_sampling_steps, t.val_guidance, self.cfg.seed,
                    true_cfg=t.val_true_cfg,
                )
        finally:
            transformer.train(was_training)
        metrics["step"] = progress.step
        metric = selection_metric(metrics)
        # a non-finite score (selection_metric gives -inf for NaN) never names a best model, not even the first
        best = math.isfinite(metric) and (progress.best_metric is None or metric > progress.best_metric)
        if self.sharded_module is not None:  # the main process decides; every rank gathers
            best = broadcast_object_list([best])[0]
            self.save_best(accelerator, gather_only=not best)
            if not main:
                return
        if best:
            progress.best_metric, progress.best_step = metric, progress.step
            if self.sharded_module is None:
                self.save_best(accelerator)
        metrics["best_step"] = progress.best_step
        with _written(self.run_dir / VALIDATION_FILE, self.run_dir):
            append_jsonl(self.run_dir / VALIDATION_FILE, metrics)
        grid = self._grid(images)
        self._preview(sample_grid_path(self.run_dir, progress.step),
                      lambda: save_sample_grid(self.run_dir, progress.step, grid))
        self._track(progress.step, {k: v for k, v in metrics.items() if k.startswith("val/")})
        if self.trackers is not None:
            self.trackers.image("validation/grid", grid, progress.step)
        self.report()
        logger.info("validation at step %d: %s", progress.step,
                    ", ".join(f"{k}={v:.3f}" for k, v in metrics.items() if k.startswith("val/")))

    def _grid(self, images: dict[str, list[Image.Image]]) -> Image.Image:
        rows, labels = [], []
        for row, character in enumerate(self.val_set.characters):
            reference = self._reference_picture(self.store_path(self.val_set.references[row][0]))
            rows.append([reference] + [images[c][row] for c in CONDITIONS])
            labels.append(self.store.characters[character])
        return make_grid(rows, labels, ["reference", "with identity", "without identity", "shuffled reference"],
                         cell=max(128, min(256, self.cfg.data.input_size)))

    def _reference_picture(self, path: Path) -> Image.Image:
        """The reference photo as a person sees it (EXIF orientation applied, as training read it); one that can no
        longer be read (removed or rewritten during the run) is a grey tile and a warning, not a stopped run."""
        try:
            return load_rgb(path, self.cfg.data.max_image_pixels)
        except ImageSkip as skip:
            logger.warning("validation grid: reference %s is no longer readable (%s): drawn grey", shown(path),
                           skip.reason.value)
            return Image.new("RGB", (64, 64), (128, 128, 128))

    def store_path(self, image: int) -> Path:
        return Path(self.cfg.data.data_dir) / self.store.keys[image]

    def save_best(self, accelerator, gather_only: bool = False) -> None:
        """``best_model.pt`` (tensors-only adapter) and, for the simple model, its trained base next to it. Under
        FSDP every rank calls it (the weights are gathered from the shards; ``gather_only``: nothing to save, which
        every rank then knows without gathering) and the main process writes."""
        base = self.base_trainable or (self.cfg.model.use_simple_model and not (self.run_dir / TRAINED_BASE).is_dir())
        if self.sharded_module is None:
            self._write_best(self.pipeline if base else None)  # a frozen simple base: saved once
            return
        if gather_only:
            return
        main = accelerator.is_main_process
        base = broadcast_object_list([base])[0]
        module = self.sharded_module
        own = distributed.gather_state(module.identity_model, lambda name: True, main)
        trainable = {name for name, p in module.named_parameters() if p.requires_grad}
        lora = distributed.gather_state(module, lambda name: name in trainable and name.startswith("transformer."),
                                        main)
        transformer = distributed.gather_state(module.transformer, lambda name: ".lora_" not in name, main) \
            if base else None
        if not main:
            return
        state = self.model.adapter_state_dict(own=own, transformer_state={k.removeprefix("transformer."): v
                                                                          for k, v in lora.items()})
        self._write_best(distributed.whole_pipeline(self.pipeline, transformer) if transformer is not None else None,
                         state)

    def _write_best(self, base_pipeline, state: dict[str, torch.Tensor] | None = None) -> None:
        """``base/`` from ``base_pipeline`` (None: not now), then ``best_model.pt`` bound to it (``state``: the
        adapter state, None: the live one); records of the run (:func:`_written`)."""
        if base_pipeline is not None:
            with _written(self.run_dir / TRAINED_BASE, self.run_dir):
                save_pipeline_atomic(base_pipeline, self.run_dir / TRAINED_BASE)
        self._bind_base()
        with _written(self.run_dir / BEST_MODEL, self.run_dir):
            self.model.save_pretrained(self.run_dir / BEST_MODEL, state=state)

    def trained_base(self, trainable: dict[str, torch.Tensor]) -> torch.nn.Module | None:
        """A co-trained simple base's transformer holding ``trainable`` (a checkpoint's snapshot: the live weights,
        gathered whole under FSDP), for the checkpoint's adapter to record its fingerprint; None when the base is
        frozen (the adapter then records :meth:`_bind_base`'s)."""
        if not self.base_trainable:
            return None
        if self.sharded_module is None:
            return self.pipeline.transformer
        prefix = "transformer."
        state = {k[len(prefix):]: v for k, v in trainable.items() if k.startswith(prefix) and ".lora_" not in k}
        return distributed.whole_pipeline(self.pipeline, state).transformer

    def _bind_base(self) -> None:
        """Record the content fingerprint of the base this adapter goes with (the run's ``base/`` just written, or
        the FLUX folder / hub snapshot it loaded), so generate refuses any other base; a base that is no local folder
        records none."""
        if self.cfg.model.use_simple_model:
            folder = self.run_dir / TRAINED_BASE
        else:
            folder = local_base_folder(self.cfg.model.pretrained_model)
        if folder is not None and (folder / "transformer" / "config.json").is_file():
            self.model.spec.extra.base_content_id = base_content_id(folder)

    def report(self) -> None:
        self._preview(self.run_dir / "curves", lambda: plot_curves(self.run_dir))
        self._preview(self.run_dir / "report.html", lambda: write_report(self.run_dir, curves=False))

    def _preview(self, path: Path, write: Callable[[], Any]) -> None:
        """``write()``, which writes the preview ``path`` (a sample grid, the curves, ``report.html``). Previews can
        be drawn again from the run's records, so one that cannot be written (a full disk, a read-only folder) is a
        logged, counted skip (``summary.json``'s ``skipped_previews``) and training goes on."""
        try:
            write()
        except OSError as err:
            self.skipped_previews += 1
            logger.warning("could not write %s (%s): skipped, training goes on (%d preview writes skipped)", path,
                           err.strerror or err, self.skipped_previews)

    def finish(self, progress: Progress) -> None:
        summary = {"steps": progress.step, "best_step": progress.best_step, "best_metric": progress.best_metric,
                   "train_images": len(self.train_images), "val_characters": len(self.val_set.characters),
                   "skipped_images": self.store.skipped, "skipped_previews": self.skipped_previews,
                   "skipped_tracker_writes": self.trackers.skipped if self.trackers is not None else 0}
        validations = _read_last_jsonl(self.run_dir / VALIDATION_FILE)
        if validations:
            summary["last_validation"] = validations
        with _written(self.run_dir / "summary.json", self.run_dir):
            write_json(self.run_dir / "summary.json", summary, indent=2, default=str)
        self.report()

    def close(self) -> None:
        """Finish the trackers now, also when the run failed (:meth:`TrackerWrites.finish`)."""
        if self.trackers is not None:
            self.trackers.finish()


@contextlib.contextmanager
def _written(path: Path, run_dir: Path) -> Iterator[None]:
    """A record of the run (a log line, ``best_model.pt``, ``base/``, ``summary.json``) that cannot be written, for
    a full disk or a read-only folder, ends the run in one line naming it; the checkpoints stay intact."""
    try:
        yield
    except WRITE_ERRORS as err:
        raise DtbackError(
            f"could not write {path} ({write_failure(err)}); training stopped. The checkpoints are intact, the last good one is "
            f"{latest_checkpoint(run_dir) or 'none'}: resume from it once {path.parent} has room and can be written"
        ) from err


def setup(cfg: Config, accelerator, progress_bar: bool = True) -> RunParts:
    """Build the run (see the module docstring)."""
    run_dir = Path(cfg.output.output_dir)
    is_main = accelerator.is_main_process
    show = progress_bar and is_main
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)  # config.yaml: the trainer writes it once a resume is accepted
    with accelerator.main_process_first():
        backends.world_data(cfg.data, progress=show)
        prepared = prepare_dataset(cfg.data, cfg.seed, run_dir, progress=show,
                                   after_main=not accelerator.is_main_process)
    characters = prepared.split.characters(prepared.index, "train") + prepared.split.characters(prepared.index, "val")
    cache_dir = cfg.cache_dir()
    world = backends.world_folder(cfg)
    face_encoder = backends.face_encoder(cfg.identity, world)
    body_encoder = backends.body_encoder(cfg.identity, world)
    with accelerator.main_process_first():
        precomputer = IdentityPrecomputer(face_encoder, body_encoder, cache_dir, cfg.data.max_image_pixels)
        subset = _Subset(prepared.index.root, characters)
        precomputer.run(subset, progress=show)
        pipeline = backends.load_base(cfg.model, run_dir, seed=cfg.seed, device=accelerator.device, world=world)
        check_model_fits_base(cfg.model, pipeline.transformer.config)  # before the feature caching, not after it
        quantize_base(pipeline.transformer, cfg.model.base_quantization)  # memory modes: dtback.model.memory
        place_for_caching(pipeline, accelerator.device, cfg.model)
        pipeline.set_progress_bar_config(disable=True)  # validation sampling: the training bar is enough
        crop_rule = body_encoder.crop_rule if body_encoder is not None else BodyCropRule.from_config(cfg.identity)
        pipeline.vae.to(memory_format=torch.channels_last)  # its convolutions run faster so, on CPUs as on GPUs
        store = build_feature_store(pipeline, characters, cfg.data, precomputer.face_cache, precomputer.body_cache,
                                    cache_dir, max_sequence_length(cfg.model), crop_rule, progress=show)
        finish_caching(pipeline, accelerator.device, cfg.model)
    transformer = pipeline.transformer
    dims = {"face_dim": store.face_embeds.shape[1] if store.face_embeds is not None else 0,
            "body_dim": store.body_pooled.shape[1] if store.body_pooled is not None else 0,
            "body_token_dim": store.body_tokens.shape[2] if store.body_tokens is not None else 0}
    if not dims["face_dim"] and not dims["body_dim"]:
        raise DtbackError(
            f"no identity signal in {cfg.data.data_dir}: the {face_encoder.encoder_id} face encoder found no face "
            "in any image and identity.body_model is null; set a body model or a face backend that sees these faces"
        )
    torch.manual_seed(cfg.seed)
    model = IdentityPreservingFlux.from_config(cfg.model, cfg.identity, transformer.config, **dims)
    # What inference needs to rebuild the run's setting from best_model.pt alone.
    model.spec.extra.update(
        base_model=TRAINED_BASE if cfg.model.use_simple_model else cfg.model.pretrained_model,
        identity=cfg.identity.model_dump(mode="json"), input_size=cfg.data.input_size,
        world=str(world) if world is not None else None,
        max_sequence_length=max_sequence_length(cfg.model),
    )
    model.to(accelerator.device).attach(transformer)
    base_trainable = cfg.model.use_simple_model and cfg.model.train_simple_base
    transformer.requires_grad_(base_trainable).train(base_trainable)
    model.train()
    identity_loss = None
    if cfg.training.face_weight > 0 or cfg.training.body_weight > 0:
        identity_loss = IdentityLoss(cfg.training, pipeline.vae, face_encoder, body_encoder)
    train_keys = set(prepared.split.train)
    n_train_chars = sum(1 for key in store.characters if key in train_keys)
    train_images = [i for i in range(len(store)) if int(store.character[i]) < n_train_chars]
    val_characters = list(range(n_train_chars, len(store.characters)))
    val_set = make_validation_set(store, val_characters, cfg.training.num_val_characters, cfg.data.max_references)
    parts = RunParts(
        cfg=cfg, run_dir=run_dir, pipeline=pipeline, model=model, store=store, train_images=train_images,
        val_set=val_set, identity_loss=identity_loss, face_encoder=face_encoder, body_encoder=body_encoder,
        guidance=cfg.training.val_guidance if transformer.config.guidance_embeds else None,
        scheduler_config=dict(pipeline.scheduler.config), base_trainable=base_trainable, is_main=is_main,
        empirical_mu_steps=cfg.training.val_sampling_steps if cfg.model.base != "flux1" else None,
    )
    parts.scorers = [similarity_scorer(store, val_set, face_encoder, body_encoder)]
    reader_scorer = validation_scorer(Path(cfg.data.data_dir), world, store.characters)
    if reader_scorer is not None:  # the data is the identity world: its attribute reader scores too
        parts.scorers.append(reader_scorer)
    parts.trackers = TrackerWrites(accelerator)  # logs go to its trackers (training.log_with), which the trainer starts
    logger.info("training on %d images of %d characters; %d held-out characters", len(train_images),
                n_train_chars, len(val_characters))
    return parts


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
