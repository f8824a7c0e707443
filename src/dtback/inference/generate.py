"""``dtback generate`` / ``inference/generate.py``: references + prompts → images and a JSON of every setting.

The JSON (``settings.json`` in the output folder) holds everything needed to make the same images again:
``dtback generate --settings out/settings.json --output again/`` reproduces them. Its keys are the fields of
:class:`GenerateSettings` (each the name of a command-line flag, ``_`` for ``-``), plus what the run found:
``reference_faces`` and ``images``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from tqdm.auto import tqdm

from dtback.config import FLUX_PIXEL_MULTIPLE, MAX_SEED, DataConfig
from dtback.data.images import ImageSkip, SkipReason, load_rgb
from dtback.errors import ConfigError, DtbackError
from dtback.io import WRITE_ERRORS, atomic_path, output_problem, read_text_now, write_failure, write_json

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
# Limits that keep one command's cost bounded (an image side of 160000 px is accepted by FLUX and runs for minutes).
MAX_REFERENCE_PIXELS = DataConfig.model_fields["max_image_pixels"].default  # as for training images
MAX_SIDE = 4096
MAX_STEPS = 1000
MAX_IMAGES = 64
OFFLOAD_CHOICES = ("none", "model", "sequential")  # dtback.inference.pipeline.OFFLOAD_MODES, without importing torch
# Settings that one command-line flag sets directly (``--identity-start`` sets ``identity_start``).
FLAG_KEYS = ("model", "base", "seed", "face_scale", "body_scale", "identity_start", "identity_end", "steps",
             "guidance", "height", "width", "num_images", "require_face", "no_identity", "device", "true_cfg",
             "negative_prompt", "offload")
# What a run records about itself in settings.json; accepted when it is read back, then replaced by the new run's.
OUTPUT_KEYS = ("reference_faces", "images")


class GenerateSettings(BaseModel):
    """Every setting of ``dtback generate``: defaults < ``--settings`` file < command-line flags.

    ``None`` means: decided when the adapter is loaded (its scales, its training size,
    :func:`dtback.inference.pipeline.default_steps`). Paths are strings, as ``settings.json`` holds them; values
    are strict JSON types (``"steps": "20"`` or ``"no_identity": "yes"`` are refused).
    """

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str | None = Field(None, description="trained adapter: best_model.pt, a .safetensors file or a folder")
    base: str | None = Field(None, description="FLUX base folder or hub id (None: the one the adapter records)")
    reference: list[str] = Field(default_factory=list, description="reference images of the character")
    prompt: list[str] = Field(default_factory=list, description="prompts (those of --prompts-file included)")
    prompts_file: str | None = Field(None, description="the --prompts-file the prompts were read from (a record: "
                                     "its prompts are in `prompt`, it is not read again)")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the first prompt's images; prompt p uses seed + p")
    face_scale: float | None = Field(None, ge=0.0, description="face identity strength (None: the adapter's)")
    body_scale: float | None = Field(None, ge=0.0, description="body identity strength (None: the adapter's)")
    identity_start: float = Field(0.0, ge=0.0, le=1.0, description="fraction of the steps before identity starts")
    identity_end: float = Field(1.0, ge=0.0, le=1.0, description="fraction of the steps after which identity stops")
    steps: int | None = Field(None, ge=1, le=MAX_STEPS,
                              description="sampling steps (None: 28, or 20 for the simple model)")
    guidance: float = Field(3.5, ge=0.0, description="guidance (distilled for FLUX.1-dev)")
    height: int | None = Field(None, description=f"pixels, a multiple of 16 up to {MAX_SIDE} (None: the training size)")
    width: int | None = Field(None, description=f"pixels, a multiple of 16 up to {MAX_SIDE} (None: the training size)")
    num_images: int = Field(1, ge=1, le=MAX_IMAGES, description="images per prompt")
    require_face: bool = Field(False, description="refuse references without a detectable face")
    no_identity: bool = Field(False, description="the plain base, for comparison")
    device: str = Field("auto", min_length=1, description="cpu, cuda, cuda:1 ... or auto")
    true_cfg: float = Field(1.0, description="true classifier-free guidance scale (1 = off)")
    negative_prompt: str | None = Field(None, description="prompt of the true-CFG negative branch (None: the prompt)")
    offload: Literal["none", "model", "sequential"] = Field("none", description="diffusers' CPU offload mode")
    lora: list[str] = Field(default_factory=list, description="FLUX LoRA files or folders loaded on the base")
    lora_scale: list[float] = Field(default_factory=list,
                                    description="LoRA strengths: none (1), one for all, or one per LoRA; "
                                    "after validation always one per LoRA")
    reference_faces: list[int] | None = Field(None, description="written by the run: faces found per reference")
    images: list[str] = Field(default_factory=list, description="written by the run: the image files, in order")

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_16(cls, value: int | None) -> int | None:
        if value is not None and (value <= 0 or value % FLUX_PIXEL_MULTIPLE or value > MAX_SIDE):
            raise ValueError(f"must be a positive multiple of {FLUX_PIXEL_MULTIPLE} (FLUX latents are 8x downsampled "
                             f"and packed 2x2) and at most {MAX_SIDE}")
        return value

    @field_validator("true_cfg")
    @classmethod
    def _true_cfg_at_least_one(cls, value: float) -> float:
        if value < 1:
            raise ValueError("must be >= 1 (1 = off)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> GenerateSettings:
        if self.identity_start > self.identity_end:
            raise ValueError(f"--identity-start {self.identity_start} must be <= --identity-end {self.identity_end}")
        scales, count = list(self.lora_scale), len(self.lora)
        if scales and not count:  # it would be dropped without a word
            raise ValueError(f"--lora-scale {scales[0]} is given without a --lora to scale")
        if len(scales) > 1 and len(scales) != count:
            raise ValueError(f"--lora-scale given {len(scales)} times for {count} --lora: give it once for all "
                             f"LoRAs or once per LoRA")
        self.lora_scale = scales if len(scales) == count else [scales[0] if scales else 1.0] * count
        return self

    def check_inputs(self) -> None:
        """What a run needs beyond valid values: a model, prompts, references, and the files they name."""
        if not self.model:
            raise DtbackError("--model is required (e.g. checkpoints/identity_preserving/best_model.pt)")
        if not Path(self.model).exists():
            raise DtbackError(f"--model {self.model} does not exist")
        if not self.prompt:
            raise DtbackError("no prompt: give --prompt TEXT (repeatable) or a non-empty --prompts-file")
        if not self.reference and not self.no_identity:
            raise DtbackError("no reference image: give --reference IMAGE (repeatable), or --no-identity")
        for path in [] if self.no_identity else self.reference:
            if not Path(path).exists() and not Path(path).is_symlink():  # a broken link is named by the decoder
                raise DtbackError(f"--reference {path} does not exist")
        for path in self.lora:
            if not Path(path).exists():
                raise DtbackError(f"--lora {path} does not exist")
        if self.lora:  # before the base is loaded (minutes for FLUX); the pipeline checks them again when loading
            from dtback.inference.loras import check_lora_weights  # noqa: PLC0415  (torch only when generating)

            for path in self.lora:
                check_lora_weights(path)

    def to_json(self) -> dict[str, Any]:
        """The ``settings.json`` payload (``reference_faces`` only when references were encoded)."""
        data = self.model_dump(mode="json")
        if data["reference_faces"] is None:
            del data["reference_faces"]
        return data


def _flag(key: str) -> str:
    return f"--{key.replace('_', '-')}"


def validate_settings(data: dict[str, Any], origins: dict[str, str] | None = None) -> GenerateSettings:
    """``data`` as :class:`GenerateSettings`; a :class:`ConfigError` names each bad key or flag and its value.

    ``origins`` maps a key to where it came from (``--settings out/settings.json``); other keys came from flags."""
    origins = origins or {}
    try:
        return GenerateSettings.model_validate(data)
    except ValidationError as err:
        lines = []
        for item in err.errors():
            message = item["msg"].removeprefix("Value error, ")
            if not item["loc"]:  # a check across keys: its message names the flags
                lines.append(message)
                continue
            key = str(item["loc"][0])
            where = ".".join(str(part) for part in item["loc"][1:])
            where = f"[{where}]" if where else ""
            origin = origins.get(key)
            if item["type"] == "extra_forbidden":
                lines.append(f"{origin or 'settings'}: unknown key {key!r} (known keys: "
                             f"{', '.join(GenerateSettings.model_fields)})")
                continue
            value = item.get("input")
            separator = " " if item["type"] == "value_error" else ": "
            if origin is not None:
                flag = "" if key in OUTPUT_KEYS else f" (flag {_flag(key)})"
                lines.append(f"{origin}: key {key + where!r}{flag} = {value!r}{separator}{message}")
            else:
                lines.append(f"{_flag(key)}{where} {value}{separator}{message}")
        if len(lines) == 1:
            raise ConfigError(lines[0]) from None
        raise ConfigError("invalid generate settings:\n  " + "\n  ".join(lines)) from None


def read_text_argument(flag: str, path: Path) -> str:
    """The text of the file a flag names (``--prompts-file``, ``--settings``), or a :class:`ConfigError` naming the
    flag and the file: missing, a folder, not UTF-8, unreadable. A byte-order mark (Windows editors write one) is
    dropped: it would otherwise start the first prompt."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a folder, not a text file")
    if not path.exists():
        raise ConfigError(f"{flag} {path} does not exist")
    try:
        text = read_text_now(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                          "save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{flag} {path}: unreadable ({err.strerror or err})") from None
    return text.removeprefix("\ufeff")


def read_settings_file(path: Path) -> dict[str, Any]:
    """The JSON object of a ``settings.json`` (unvalidated: see :func:`validate_settings`)."""
    text = read_text_argument("--settings", path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"--settings {path}: unreadable (not JSON: {err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--settings {path}: expected a JSON object of settings, got {type(data).__name__}")
    return data


def load_settings(path: Path) -> GenerateSettings:
    """A ``settings.json`` written by an earlier run, validated."""
    data = read_settings_file(path)
    return validate_settings(data, {key: f"--settings {path}" for key in data})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="trained adapter: best_model.pt, a .safetensors file or a folder")
    parser.add_argument("--base", help="FLUX base folder or hub id (default: the one the adapter records)")
    parser.add_argument("--reference", action="append", type=Path, help="reference image of the character (repeatable)")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path,
                        help="a UTF-8 text file with one prompt per line (blank lines skipped), after any --prompt")
    parser.add_argument("--output", type=Path, default=Path("out"), help="output folder (default: out/)")
    parser.add_argument("--seed", type=int, help=f"seed of the first prompt's images, 0..{MAX_SEED}; prompt p uses "
                        "seed + p (default 0)")
    parser.add_argument("--face-scale", type=float, help="face identity strength (default: the adapter's)")
    parser.add_argument("--body-scale", type=float, help="body identity strength (default: the adapter's)")
    parser.add_argument("--identity-start", type=float, help="fraction of the steps before identity starts (0)")
    parser.add_argument("--identity-end", type=float, help="fraction of the steps after which identity stops (1)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 28, or 20 for the simple model)")
    parser.add_argument("--guidance", type=float, help="guidance (distilled for FLUX.1-dev), >= 0 (default 3.5)")
    parser.add_argument("--true-cfg", type=float,
                        help="true classifier-free guidance scale; > 1 adds a negative branch without identity and "
                        "doubles the transformer calls (default 1: off)")
    parser.add_argument("--negative-prompt",
                        help="prompt of the true-CFG negative branch, used only with --true-cfg > 1 (default: the "
                        "prompt itself, so the guidance is on identity alone)")
    parser.add_argument("--height", type=int,
                        help=f"pixels, a multiple of 16 up to {MAX_SIDE} (default: the training size)")
    parser.add_argument("--width", type=int,
                        help=f"pixels, a multiple of 16 up to {MAX_SIDE} (default: the training size)")
    parser.add_argument("--num-images", type=int, help=f"images per prompt, 1..{MAX_IMAGES} (default 1)")
    parser.add_argument("--require-face", action="store_true", default=None,
                        help="refuse references without a detectable face (default: warn and use the body only)")
    parser.add_argument("--no-identity", action="store_true", default=None, help="the plain base, for comparison")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--offload", choices=OFFLOAD_CHOICES,
                        help="diffusers' CPU offload for small GPUs: model (one component on the GPU at a time) or "
                        "sequential (one layer at a time: least memory, slowest); needs a GPU (default: none)")
    parser.add_argument("--lora", action="append", type=Path,
                        help="a diffusers/kohya FLUX LoRA file or folder to load on the base (repeatable)")
    parser.add_argument("--lora-scale", action="append", type=float,
                        help="strength of the LoRAs: once for all, or once per --lora in the same order (default 1)")
    parser.add_argument("--settings", type=Path, help="reuse a settings.json written by an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_settings(args: argparse.Namespace) -> GenerateSettings:
    """Defaults < ``--settings`` file < command-line flags; validated, prompts read, paths made strings.

    What the run itself needs (a model, prompts, existing files) is checked by :meth:`GenerateSettings.check_inputs`
    when generating."""
    data: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if args.settings is not None:
        data = read_settings_file(args.settings)
        origins = {key: f"--settings {args.settings}" for key in data}
    for key in FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            data[key] = str(value) if isinstance(value, Path) else value
            origins.pop(key, None)
    for key, values in (("reference", args.reference), ("lora", args.lora), ("lora_scale", args.lora_scale)):
        if values:
            data[key] = [str(v) if isinstance(v, Path) else v for v in values]
            origins.pop(key, None)
    if args.prompt:
        data["prompt"] = list(args.prompt)
        origins.pop("prompt", None)
    if args.prompts_file is not None:
        lines = read_text_argument("--prompts-file", args.prompts_file).splitlines()
        prompts = data.get("prompt") or []
        if isinstance(prompts, list):  # otherwise validation names the settings file's bad "prompt"
            data["prompt"] = prompts + [line.strip() for line in lines if line.strip()]
        data["prompts_file"] = str(args.prompts_file)
        origins.pop("prompts_file", None)
    return validate_settings(data, origins)


def load_references(paths: list[str]):
    images = []
    for path in paths:
        try:
            images.append(load_rgb(Path(path), MAX_REFERENCE_PIXELS))
        except ImageSkip as skip:
            # The decoder names training's key (max_image_pixels); generate has no such setting to raise.
            hint = f"; a reference may have at most {MAX_REFERENCE_PIXELS:,} pixels: downscale it" \
                if skip.reason is SkipReason.TOO_MANY_PIXELS else ""
            raise DtbackError(f"--reference {path}: {skip.reason.value} ({skip.detail}){hint}") from None
    return images


def run_generate(args: argparse.Namespace) -> Path:
    """``dtback generate``: resolve the settings (see :func:`resolve_settings`) and :func:`generate`."""
    return generate(resolve_settings(args), Path(args.output), progress=not args.no_progress)


def generate(settings: GenerateSettings, output: Path, progress: bool = True) -> Path:
    """Generate and write ``<output>/<prompt index>_<image index>.png`` plus ``settings.json`` (the settings with
    everything the adapter decided filled in); returns the folder."""
    from dtback import devices  # noqa: PLC0415  (heavy imports only when generating)
    from dtback.inference.pipeline import IdentityFluxPipeline, default_steps  # noqa: PLC0415

    settings.check_inputs()
    if settings.negative_prompt is not None and settings.true_cfg == 1:
        logger.warning("--negative-prompt is not used: it is the prompt of true CFG's negative branch, which "
                       "--true-cfg 1 (the default) switches off; give --true-cfg > 1 to use it")
    problem = output_problem(Path(output), "folder") or _not_writable(Path(output))
    if problem:
        raise DtbackError(f"--output {problem}")
    device = str(devices.available_device(settings.device))  # before any model is loaded
    if settings.device == "auto" and settings.offload != "none":
        device = None  # offload: the GPU the pipeline finds
    reference_images = None if settings.no_identity else load_references(settings.reference)
    pipe = IdentityFluxPipeline.from_pretrained(settings.model, base=settings.base, device=device,
                                                offload=settings.offload)
    if not progress:
        pipe.pipeline.set_progress_bar_config(disable=True)  # diffusers' per-image sampling bar too
    for path, scale in zip(settings.lora, settings.lora_scale):
        pipe.load_lora_weights(path, scale=scale)
    extra = pipe.model.spec.extra
    size = extra.input_size
    settings = settings.model_copy(update={
        "height": settings.height or size, "width": settings.width or size,
        "steps": settings.steps if settings.steps is not None else default_steps(extra),
        "reference_faces": None, "images": [],
    })
    references = None
    if not settings.no_identity:
        inputs, report = pipe.encode_references(reference_images, settings.reference, require_face=settings.require_face)
        settings.reference_faces = list(report.faces)
        references = inputs
    out = Path(output)
    written: list[str] = []
    _write(out, lambda: out.mkdir(parents=True, exist_ok=True), written)
    for p, prompt in enumerate(tqdm(settings.prompt, desc="prompts", disable=not progress)):
        images = pipe(prompt, references, face_scale=settings.face_scale, body_scale=settings.body_scale,
                      identity_start=settings.identity_start, identity_end=settings.identity_end,
                      num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                      height=settings.height, width=settings.width,
                      num_images_per_prompt=settings.num_images, seed=settings.seed + p,
                      true_cfg_scale=settings.true_cfg, negative_prompt=settings.negative_prompt)
        for i, image in enumerate(images):
            path = out / f"{p:03d}_{i:02d}.png"
            _write(path, lambda: _save_png(image, path), written)
            written.append(path.name)
    settings.images = written
    _write(out / SETTINGS_FILE, lambda: write_json(out / SETTINGS_FILE, settings.to_json(), indent=2), written)
    return out


def _not_writable(output: Path) -> str | None:
    """Why ``output`` cannot be written (None: it can, as far as permissions say), before any model is loaded."""
    existing = next((folder for folder in (output, *output.parents) if folder.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{output} cannot be written: {existing} is not writable"
    return None


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _write(path: Path, write, written: list[str]) -> None:
    """``write()``; a full disk or a folder turned read-only ends in one line naming the file, and what was written
    before it stays (each file is whole: atomic)."""
    try:
        write()
    except WRITE_ERRORS as err:
        kept = f"; the {len(written)} images written before it are kept" if written else ""
        raise DtbackError(f"--output: cannot write {path} ({write_failure(err)}){kept}") from None
