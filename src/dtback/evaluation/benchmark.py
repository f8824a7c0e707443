"""``dtback evaluate``: generate held-out characters in new scenes with a trained adapter and measure identity.

For every held-out character (see :mod:`dtback.evaluation.heldout`) and every prompt, three conditions with the
same seed, so that they differ only in the identity given:

- ``with_identity``: the character's reference image;
- ``no_identity``: no identity (the plain base, as with scales 0);
- ``shuffled``: the reference of the next held-out character, scored against *this* character.

Scores (:mod:`dtback.evaluation.metrics`), each against the character's gallery (its images other than the
reference): face similarity with two independent recognizers (the checkpoint's face encoder — the training one —
and, on the identity world, the world identity reader's attribute accuracy, face and body separately; on other data
dlib, or InsightFace when dlib is the training encoder), body similarity (the checkpoint's body encoder), prompt
adherence (CLIP, when ``--clip-model`` is given) and the copy-paste score against the reference that was given.

Writes ``results.json`` (every number, per condition and per character, settings), ``results.md`` (the table),
``grid.png`` (reference | with | without | shuffled, first prompt) and every image under ``images/``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from tqdm.auto import tqdm

from dtback import backends, devices
from dtback.config import MAX_SEED, IdentityConfig
from dtback.errors import ConfigError, DtbackError
from dtback.io import atomic_path, is_inside, output_problem, write_json, write_text
from dtback.world.people import BODY_ATTRIBUTES, FACE_ATTRIBUTES
from dtback.world.reader import attribute_accuracy, attribute_hits
from dtback.evaluation.heldout import HeldOut, inside, key_problem, load_held_out, read_prompts, run_config
from dtback.evaluation.metrics import (
    ClipScorer, body_embedding, body_similarity, copy_paste_score, face_similarity, unit_mean,
)

logger = logging.getLogger(__name__)

CONDITIONS = {"with_identity": "with identity", "no_identity": "no identity", "shuffled": "shuffled reference"}
RESULTS_JSON, RESULTS_MD, GRID_PNG = "results.json", "results.md", "grid.png"
FACE_NAMES = {"world": "world face encoder"}


class EvaluateSettings(BaseModel):
    """Everything ``dtback evaluate`` takes; ``None`` means: from the checkpoint / run folder. Each field is the
    command-line flag of the same name (``_`` for ``-``); :meth:`create` turns validation errors into a
    :class:`ConfigError` naming the flag. Files and folders are checked when evaluating (:func:`check_settings`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: Path = Field(description="trained adapter, e.g. <run>/best_model.pt")
    out: Path = Field(description="output folder")
    data_dir: Path | None = Field(None, description="dataset folder (None: the run's config data_dir)")
    config: Path | None = Field(None, description="the run's config (None: config.yaml next to the model)")
    characters: list[str] = Field(default_factory=list, description="held-out characters as bundle/character "
                                  "(empty: the run's split)")
    allow_trained: bool = Field(False, description="let --characters name characters the run trained on (they are "
                                "labelled as trained in the results, not scored as held-out)")
    num_characters: int | None = Field(None, description="evaluate the first N held-out characters (None: all)")
    references: int = Field(1, description="reference images per character given to the adapter: the first N by "
                            "name (the rest is the gallery scored against)")
    prompts_file: Path | None = Field(None, description="one prompt per line (None: a built-in set for the data)")
    images_per_prompt: int = Field(1, description="images per prompt and condition")
    steps: int | None = Field(None, description="sampling steps (None: 28, or 20 for the simple model)")
    guidance: float = Field(3.5, description="guidance (distilled for FLUX.1-dev)")
    true_cfg: float | None = Field(None, description="true CFG scale of the images with identity (1 = off; None: "
                                   "the run's training.val_true_cfg, 1 without a run config)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed; character r, prompt p use seed + 1000 r + p")
    clip_model: Path | None = Field(None, description="local transformers CLIP folder for prompt adherence")
    base: str | None = Field(None, description="FLUX base folder or hub id (None: the one the adapter records)")
    device: str = Field("auto", min_length=1, description="cpu, cuda, cuda:1 ... or auto")
    progress: bool = Field(True, description="show a progress bar")

    @field_validator("images_per_prompt", "num_characters", "steps", "references")
    @classmethod
    def _at_least(cls, value: int | None, info: ValidationInfo) -> int | None:
        least = 2 if info.field_name == "num_characters" else 1
        if value is not None and value < least:
            raise ValueError(f"is too small (at least {least})")
        return value

    @field_validator("characters")
    @classmethod
    def _character_keys(cls, value: list[str]) -> list[str]:
        for key in value:
            problem = key_problem(key)
            if problem:
                raise ValueError(f"{key!r}: {problem}")
        return value

    @field_validator("true_cfg")
    @classmethod
    def _true_cfg_at_least_one(cls, value: float | None) -> float | None:
        if value is not None and value < 1.0:
            raise ValueError("must be >= 1 (1 = off)")
        return value

    @classmethod
    def create(cls, **values: Any) -> EvaluateSettings:
        """Validate ``values``; a :class:`ConfigError` names each bad flag and its value."""
        try:
            return cls(**values)
        except ValidationError as err:
            lines = []
            for item in err.errors():
                key = str(item["loc"][0]) if item["loc"] else ""
                message = item["msg"].removeprefix("Value error, ")
                if item["type"] == "extra_forbidden":
                    lines.append(f"unknown evaluate setting {key!r} (known: {', '.join(cls.model_fields)})")
                    continue
                separator = " " if item["type"] == "value_error" else ": "
                lines.append(f"--{key.replace('_', '-')} {item.get('input')}{separator}{message}")
            raise ConfigError("; ".join(lines)) from None


@dataclass
class Generated:
    """One generated image: its condition, target character (row), the character whose reference it was given
    (``source``, None without identity), prompt index and image index."""

    condition: str
    row: int
    source: int | None
    prompt: int
    index: int
    image: Image.Image
    path: str
    scores: dict[str, float | None] = field(default_factory=dict)
    attributes: dict[str, float] = field(default_factory=dict)  # reader hit (1/0) per attribute, on the world
    read: dict[str, str] = field(default_factory=dict)  # the value the reader read per attribute, on the world


def check_settings(settings: EvaluateSettings) -> None:
    """What the values alone cannot tell (the model validates them): the files and folders they name exist."""
    if not settings.model.exists():
        raise DtbackError(f"--model {settings.model} does not exist (train first, or point at a run's best_model.pt)")
    if settings.clip_model is not None and not (settings.clip_model / "config.json").is_file():
        raise DtbackError(f"--clip-model {settings.clip_model}: not a transformers CLIP folder (no config.json)")
    if settings.prompts_file is not None and not settings.prompts_file.exists():
        raise DtbackError(f"--prompts-file {settings.prompts_file} does not exist")
    problem = output_problem(settings.out, "folder")
    if problem:
        raise DtbackError(f"--out {problem}")
    devices.available_device(settings.device)


def evaluate(settings: EvaluateSettings) -> dict[str, Any]:
    """Run the evaluation (see the module docstring) and write its outputs into ``settings.out``; returns the JSON."""
    from dtback.inference.pipeline import IdentityFluxPipeline, default_steps  # noqa: PLC0415

    check_settings(settings)
    run_dir = settings.model.parent
    cfg = run_config(run_dir, settings.config)
    held = load_held_out(run_dir, cfg, settings.data_dir, settings.characters, settings.num_characters,
                         settings.references, settings.allow_trained)
    if is_inside(settings.out, held.data_dir):
        raise DtbackError(f"--out {settings.out} is inside the dataset {held.data_dir}: its grid and images would be "
                          "read as pictures of a character; write the evaluation elsewhere")
    world_encoders = [key for key, value in (("identity.face_backend", cfg.identity.face_backend if cfg else None),
                                             ("identity.body_model", cfg.identity.body_model if cfg else None))
                      if value == backends.WORLD]
    if world_encoders and not held.is_world:
        raise DtbackError(f"{held.data_dir} holds photos, not an identity world, but this adapter reads identity with "
                          f"the world's encoders ({', '.join(world_encoders)}: world), which know only drawn "
                          "characters: evaluate it on a world (dtback world --out DIR --seed 5)")
    prompts = read_prompts(settings.prompts_file, held.is_world)
    from_run = settings.true_cfg is None
    if from_run:
        settings = settings.model_copy(update={"true_cfg": cfg.training.val_true_cfg if cfg is not None else 1.0})
    device = str(devices.available_device(settings.device))
    pipe = IdentityFluxPipeline.from_pretrained(settings.model, base=settings.base, device=device)
    if from_run and settings.true_cfg > 1.0 and not pipe.supports_true_cfg:  # as the run's validation sampled it
        logger.info("%s has no true CFG (guidance-distilled): evaluating without it", type(pipe.pipeline).__name__)
        settings = settings.model_copy(update={"true_cfg": 1.0})
    pipe.pipeline.set_progress_bar_config(disable=True)
    extra = pipe.model.spec.extra
    size = extra.input_size
    steps = settings.steps if settings.steps is not None else default_steps(extra)
    identity, world = backends.identity_from_adapter(extra, device)
    clip = ClipScorer.from_pretrained(settings.clip_model, device) if settings.clip_model is not None else None

    generated = generate_all(pipe, held, prompts, settings, size, steps)
    scorer = Scorer(pipe, held, identity, world, clip, prompts)
    scorer.score(generated)
    results = summarise(generated, held, prompts, scorer, settings, {"size": size, "steps": steps, "device": device})
    write_outputs(settings.out, results, generated, held, prompts)
    return results


def generate_all(pipe, held: HeldOut, prompts: list[str], settings: EvaluateSettings, size: int,
                 steps: int) -> list[Generated]:
    """Every (character, condition, prompt) image; image files under ``<out>/images/<condition>/<character>/``."""
    references = [pipe.encode_references(c.references, [str(p) for p in c.reference_paths])[0]
                  for c in held.characters]
    count = len(held.characters)
    out: list[Generated] = []
    bar = tqdm(total=count * len(CONDITIONS) * len(prompts), desc="evaluate", unit="prompt",
               disable=not settings.progress)
    for row, character in enumerate(held.characters):
        for condition in CONDITIONS:
            source = {"with_identity": row, "no_identity": None, "shuffled": (row + 1) % count}[condition]
            inputs = None if source is None else references[source]
            folder = inside(settings.out, Path("images") / condition / character.key, "image folder")
            folder.mkdir(parents=True, exist_ok=True)
            for p, prompt in enumerate(prompts):
                # One seed per (character, prompt): the three conditions start from the same noise.
                # True CFG (against the same prompt without identity) applies where there is an identity.
                images = pipe(prompt, inputs, num_inference_steps=steps, guidance_scale=settings.guidance,
                              height=size, width=size, num_images_per_prompt=settings.images_per_prompt,
                              seed=settings.seed + 1000 * row + p,
                              true_cfg_scale=settings.true_cfg if inputs is not None else 1.0)
                for i, image in enumerate(images):
                    path = folder / f"p{p:02d}_{i:02d}.png"
                    with atomic_path(path, fsync=False) as tmp:
                        image.save(tmp, format="PNG")
                    out.append(Generated(condition, row, source, p, i, image,
                                         path.relative_to(settings.out).as_posix()))
                bar.update(1)
    bar.close()
    return out


class Scorer:
    """The recognizers of one evaluation and each character's gallery embeddings (see the module docstring)."""

    def __init__(self, pipe, held: HeldOut, identity: IdentityConfig, world: Path | None, clip: ClipScorer | None,
                 prompts: list[str]):
        self.held = held
        self.prompts = prompts
        self.face = pipe.face_encoder
        self.body = pipe.body_encoder
        self.clip = clip
        self.unavailable: dict[str, str] = {}
        self.recognizers: dict[str, str | None] = {
            "face_sim": self.face.encoder_id if self.face is not None else None,
            "body_sim": self.body.encoder_id if self.body is not None else None,
            "prompt_adherence": clip.name if clip is not None else None,
            "copy_paste": "Pearson correlation of 32x32 RGB pixels of the output and the reference it was given",
        }
        self.face_names = {"face_sim": FACE_NAMES.get(identity.face_backend, identity.face_backend)}
        self.reader = self.second = None
        if held.is_world:
            self.reader = backends.reader(world)
            self.recognizers["reader"] = self.reader.name
        else:
            self.second, name, reason = second_recognizer(identity)
            self.face_names["face_sim_2"] = name
            self.recognizers["face_sim_2"] = self.second.encoder_id if self.second is not None else None
            if self.second is None:
                self.unavailable["face_sim_2"] = reason
        if self.face is None:
            self.unavailable["face_sim"] = "n/a (the checkpoint has no face branch)"
        if self.body is None:
            self.unavailable["body_sim"] = "n/a (the checkpoint has no body branch)"
        if clip is None:
            self.unavailable["prompt_adherence"] = "n/a (no CLIP model)"
        if not held.is_world:
            for key in ("reader_face", "reader_body", "reader_mean"):
                self.unavailable[key] = "n/a (no world metadata)"
        self.face_refs, boxes = self._face_references(self.face)
        self.second_refs, _ = self._face_references(self.second)
        recognizers = (("face_sim", self.face, self.face_refs), ("face_sim_2", self.second, self.second_refs))
        for key, encoder, refs in recognizers:
            if encoder is not None and all(ref is None for ref in refs):
                self.unavailable[key] = f"n/a ({encoder.encoder_id} found no face in any gallery image)"
        self.body_refs = [None] * len(held.characters)
        if self.body is not None:
            self.body_refs = [unit_mean(torch.stack([body_embedding(self.body, image, box)
                                                     for image, box in zip(c.gallery, character_boxes)]))
                              for c, character_boxes in zip(held.characters, boxes)]

    def _face_references(self, encoder) -> tuple[list[torch.Tensor | None], list[list[np.ndarray | None]]]:
        """Per character: unit mean face embedding of its gallery (None when no face is found) and the face boxes."""
        refs, boxes = [], []
        for character in self.held.characters:
            if encoder is None:
                refs.append(None)
                boxes.append([None] * len(character.gallery))
                continue
            results = [encoder.encode(np.asarray(image)) for image in character.gallery]
            found = [torch.from_numpy(r.embedding).float() for r in results if r is not None]
            refs.append(unit_mean(torch.stack(found)) if found else None)
            boxes.append([None if r is None else r.face.box for r in results])
        return refs, boxes

    def score(self, generated: list[Generated]) -> None:
        """Fill ``scores`` of every generated image."""
        images = [g.image for g in generated]
        rows = [g.row for g in generated]
        boxes: list = [None] * len(images)
        if self.face is not None:
            faces = face_similarity(self.face, images, [self.face_refs[r] for r in rows])
            boxes = faces.boxes
            for g, sim, found in zip(generated, faces.sims, faces.detected):
                g.scores.update(face_sim=sim, face_detected=float(found))
        if self.second is not None:
            second = face_similarity(self.second, images, [self.second_refs[r] for r in rows])
            for g, sim in zip(generated, second.sims):
                g.scores["face_sim_2"] = sim
        if self.body is not None:
            for g, sim in zip(generated, body_similarity(self.body, images, boxes, [self.body_refs[r] for r in rows])):
                g.scores["body_sim"] = sim
        if self.reader is not None:
            for g, values in zip(generated, self.reader.read([np.asarray(image) for image in images])):
                truth = self.held.characters[g.row].truth
                face, body = attribute_accuracy(values, truth)
                g.scores.update(reader_face=face, reader_body=body, reader_mean=(face + body) / 2)
                g.attributes = attribute_hits(values, truth)
                g.read = dict(values)
        if self.clip is not None:
            sims = self.clip.similarity(images, [self.prompts[g.prompt] for g in generated])
            for g, sim in zip(generated, sims):
                g.scores["prompt_adherence"] = sim
        for g in generated:
            given = self.held.characters[g.row if g.source is None else g.source].references
            g.scores["copy_paste"] = max(copy_paste_score(g.image, reference) for reference in given)

    def columns(self) -> list[tuple[str, str]]:
        """(metric, table header) in table order."""
        second = ("reader_face", "face reader acc") if self.reader is not None else \
            ("face_sim_2", f"face sim ({self.face_names['face_sim_2']})")
        return [("face_sim", f"face sim ({self.face_names['face_sim']})"), second, ("body_sim", "body sim"),
                ("reader_body", "body reader acc"), ("reader_mean", "mean reader acc"),
                ("prompt_adherence", "prompt adherence (CLIP)"), ("copy_paste", "copy-paste")]


def second_recognizer(identity: IdentityConfig):
    """The second face recognizer on real data: dlib, or InsightFace when dlib is the training one.
    Returns (encoder or None, name, why it is missing)."""
    backend = "dlib" if identity.face_backend != "dlib" else "insightface"
    if backend == "insightface" and identity.face_model_dir is None:
        return None, backend, "n/a (skipped: insightface needs identity.face_model_dir; dlib is the training encoder)"
    try:
        return backends.face_encoder(identity.model_copy(update={"face_backend": backend})), backend, ""
    except (ImportError, ConfigError, FileNotFoundError) as err:
        return None, backend, f"n/a (skipped: {backend} not available: {err})"


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None


def summarise(generated: list[Generated], held: HeldOut, prompts: list[str], scorer: Scorer,
              settings: EvaluateSettings, run: dict[str, Any]) -> dict[str, Any]:
    """The ``results.json`` payload: mean of every metric per condition (and per character), deltas to baselines."""
    keys = [key for key, _ in scorer.columns()] + ["face_detected"]
    table: dict[str, dict[str, float | None]] = {}
    per_character: dict[str, dict[str, dict[str, float | None]]] = {}
    for condition in CONDITIONS:
        mine = [g for g in generated if g.condition == condition]
        table[condition] = {key: _mean([g.scores.get(key) for g in mine]) for key in keys}
        for row, character in enumerate(held.characters):
            per_character.setdefault(character.key, {})[condition] = {
                key: _mean([g.scores.get(key) for g in mine if g.row == row]) for key in keys}
    deltas = {
        f"with_identity_minus_{base}": {key: None if table["with_identity"][key] is None or table[base][key] is None
                                        else table["with_identity"][key] - table[base][key] for key in keys}
        for base in ("no_identity", "shuffled")
    }
    return {
        "model": str(settings.model),
        "data_dir": str(held.data_dir),
        "held_out_source": held.source,
        "trained_characters": list(held.trained),
        "characters": [{"key": c.key, "trained": c.key in held.trained, "reference": str(c.reference_path),
                        "references": [str(p) for p in c.reference_paths], "gallery": [str(p) for p in c.gallery_paths]}
                       for c in held.characters],
        "skipped": held.skipped,
        "prompts": prompts,
        "settings": {**settings.model_dump(mode="json"), **run},
        "recognizers": scorer.recognizers,
        "columns": [{"metric": key, "header": header} for key, header in scorer.columns()],
        "conditions": table,
        "deltas": deltas,
        "reader_attributes": reader_attributes(generated, scorer),
        "unavailable": scorer.unavailable,
        "per_character": per_character,
        "images": [{"condition": g.condition, "character": held.characters[g.row].key,
                    "reference_of": None if g.source is None else held.characters[g.source].key,
                    "prompt": g.prompt, "index": g.index, "path": g.path, "scores": g.scores,
                    **({"reader": {"read": g.read, "hits": g.attributes}} if g.read else {})} for g in generated],
    }


def reader_attributes(generated: list[Generated], scorer: Scorer) -> dict[str, Any] | None:
    """Per attribute: the reader's accuracy on the images of each condition, beside its own recorded accuracy on
    held-out renders and on their VAE round trips (the ceiling for generated images). None off the world."""
    if scorer.reader is None:
        return None
    out: dict[str, Any] = {}
    for name in (*FACE_ATTRIBUTES, *BODY_ATTRIBUTES):
        row = {"part": "face" if name in FACE_ATTRIBUTES else "body"}
        for condition in CONDITIONS:
            row[condition] = _mean([g.attributes[name] for g in generated if g.condition == condition and g.attributes])
        for split, figures in scorer.reader.held_out.items():
            row[f"reader_on_{split}"] = figures.get(name)
        out[name] = row
    return out


def attribute_table(attributes: dict[str, Any]) -> str:
    """The per-attribute table of ``results.md``."""
    splits = [key for key in next(iter(attributes.values())) if key.startswith("reader_on_")]
    header = ["attribute", "part", *CONDITIONS.values(), *(key.removeprefix("reader_on_") + " (reader)" for key in splits)]
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for name, row in attributes.items():
        cells = [f"{row[key]:.3f}" if row.get(key) is not None else "n/a" for key in (*CONDITIONS, *splits)]
        lines.append(f"| {name} | {row['part']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(results: dict[str, Any]) -> str:
    """``results.md``: the table (rows: conditions) and what its columns mean."""
    columns = results["columns"]
    lines = ["| condition | " + " | ".join(c["header"] for c in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for condition, label in CONDITIONS.items():
        cells = []
        for column in columns:
            value = results["conditions"][condition][column["metric"]]
            cells.append(f"{value:.3f}" if value is not None and math.isfinite(value) else
                         results["unavailable"].get(column["metric"], "n/a"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    settings = results["settings"]
    notes = [
        f"{len(results['characters'])} held-out characters ({results['held_out_source']}) x {len(results['prompts'])} "
        f"prompts x {settings['images_per_prompt']} image(s), {settings.get('references', 1)} reference(s) per "
        f"character, {settings['steps']} steps, {settings['size']} px, "
        f"seed {settings['seed']}; model `{results['model']}`.",
        "Similarities are cosines to the mean embedding of the character's gallery (its images other than the "
        "reference); a generated image without a detected face scores 0 face similarity. Reader accuracies are the "
        "fractions of face / body attributes the world identity reader reads as the character's true ones (mean: their "
        "average per image). "
        "The shuffled row gives each character another held-out character's reference and scores against its own.",
        "Copy-paste: Pearson correlation of the 32x32 RGB pixels of the output and the reference it was given (the "
        "highest over the references; high = the output copies a reference picture instead of following the prompt).",
        f"Recognizers: {', '.join(f'{k}: {v}' for k, v in results['recognizers'].items() if v)}.",
    ]
    if results.get("trained_characters"):
        notes.insert(0, f"**Not a held-out score**: the run trained on {len(results['trained_characters'])} of these "
                        f"characters ({', '.join(results['trained_characters'])}; --allow-trained).")
    if results.get("reader_attributes"):
        notes.append("Reader accuracy per attribute; the last columns are the reader's own recorded accuracy on "
                     "held-out renders and on their round trips through the world VAE (decoded: the ceiling for "
                     "generated images, which are decoded latents):\n\n" + attribute_table(results["reader_attributes"]))
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def write_outputs(out: Path, results: dict[str, Any], generated: list[Generated], held: HeldOut,
                  prompts: list[str]) -> None:
    from dtback.viz.grid import make_grid  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / RESULTS_JSON, results, indent=2)
    write_text(out / RESULTS_MD, markdown_table(results))
    first = {(g.condition, g.row): g.image for g in generated if g.prompt == 0 and g.index == 0}
    rows = [[c.reference] + [first[(condition, row)] for condition in CONDITIONS]
            for row, c in enumerate(held.characters)]
    grid = make_grid(rows, [c.key for c in held.characters], ["reference", *CONDITIONS.values()],
                     cell=grid_cell(results["settings"]["size"]), title=f"prompt: {prompts[0]}")
    with atomic_path(out / GRID_PNG) as tmp:
        grid.save(tmp, format="PNG")


def grid_cell(size: int) -> int:
    """Grid cell side for ``size``-px images: the images' size within 128..256 px."""
    return max(128, min(256, size))
