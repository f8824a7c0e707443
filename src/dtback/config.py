"""Typed configuration: one pydantic model tree loaded from YAML, plus ``--set key=value`` overrides.

The tree has one section per room (``data``, ``identity``, ``model``, ``training``, ``output``) and a top-level
``seed``. The seed project's flat keys (``learning_rate``, ``data_dir``, ...) keep their names: in a YAML file they
may be written at the top level (the seed's layout) or inside their section, and ``--set learning_rate=1e-4`` works
as well as ``--set training.learning_rate=1e-4``.

Every problem is reported before any work starts, as ``<source>: <key.path>: <what is wrong> (got <value>)``,
where the source is the YAML file or the ``--set`` argument that supplied the value.
"""

from __future__ import annotations

import difflib
import re
import reprlib
import string
import types
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dtback.errors import ConfigError
from dtback.io import is_inside, write_text

# Pixels per latent patch of FLUX: VAE downsamples by 8, the transformer packs 2x2 latents.
FLUX_PIXEL_MULTIPLE = 16
# Seeds feed torch, numpy and random; every one of them takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    """Rules for every key of the tree: no unknown keys, no infinite or NaN floats, and numbers given as numbers
    (a YAML ``true`` is not 1, ``4.0`` or ``"4"`` is not an int; a float key also takes a quoted number, ``"1e-4"``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        problem = _number_problem(cls.model_fields[info.field_name].annotation, value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _home_in_paths(cls, value: Any) -> Any:
        # `data_dir: ~/photos` means the home folder, as in a shell; left alone it would name a folder "~" here.
        return value.expanduser() if isinstance(value, Path) else value


def _number_kinds(annotation: Any) -> set[type]:
    """The scalar types an annotation allows (``int | None`` -> {int, NoneType}); containers are not unpacked."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_number_kinds(arg) for arg in get_args(annotation)))
    return {annotation}


def _number_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is not a number of ``annotation``'s kind (None when it is, or when it is no number key)."""
    origin = get_origin(annotation)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        for i, item in enumerate(value):
            problem = _number_problem(args[min(i, len(args) - 1)], item) if args else None
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            if get_origin(arg) in (list, tuple) and isinstance(value, (list, tuple)):
                return _number_problem(arg, value)
    kinds = _number_kinds(annotation)
    if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
        return f"Input should be a number, not the boolean {str(value).lower()}"
    if int in kinds and not kinds & {float, str, bool} and value is not None and not isinstance(value, int):
        return "Input should be a valid integer (a whole number, written without quotes or a decimal point)"
    return None


# Distinct faces the identity world can draw (the product of its face attributes' choices; a test keeps the two in
# step): a world of more characters would have two with one face.
WORLD_FACES = 8400


class WorldConfig(_Section):
    """The generated identity world (:mod:`dtback.world`): the images written into ``data_dir`` when that folder is
    missing, and the folder of its trained components."""

    generate_if_missing: bool = Field(True, description="Generate the identity world into data_dir when it is missing.")
    characters: int = Field(256, ge=2, le=WORLD_FACES, description="Characters (identities) in the generated world "
                            f"(at most {WORLD_FACES}: each has a face of its own).")
    images_per_character: int = Field(12, ge=2, le=1000, description="Images drawn of each character.")
    size: int = Field(128, ge=FLUX_PIXEL_MULTIPLE, le=2048, description="Side of the square world images in pixels.")
    seed: int = Field(0, ge=0, le=MAX_SEED,
                      description="World seed: the same seed always gives the same images, byte for byte.")
    bundle: str = Field("world", description="Bundle folder the characters are written into: a plain folder name (letters, "
                        "digits, '_', '-'), never a path.")
    components: Path | None = Field(
        None, description="Folder of the world's trained components (VAE, face/body encoders, reader, base; built by "
        "`dtback world-components --out DIR`); null: the folder shipped in the package."
    )



    @field_validator("bundle")
    @classmethod
    def _bundle_is_a_name(cls, value: str) -> str:
        # The world is written into <out>/<bundle>: a path here ('..', '/tmp/x') would write outside the folder.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
            raise ValueError(f"{value!r} is not a plain folder name (letters, digits, '_' or '-', starting with a "
                             "letter or digit)")
        return value


class BuildConfig(_Section):
    """``dtback dataset build``: photos and videos -> ``<data_dir>/<bundle>/<character>/`` by face clustering. The
    rules and how the defaults were measured: :mod:`dtback.curate.faces` and :mod:`dtback.curate.cluster`."""

    video_fps: float = Field(1.0, gt=0, le=120, description="Video frames sampled per second of video.")
    max_frames_per_video: int | None = Field(None, ge=1, description="Sample at most this many frames per video; null: all.")
    min_face_size: int = Field(48, ge=8, description="Faces narrower or shorter than this (px) are skipped as face_too_small.")
    min_join_face_size: int = Field(
        20, ge=8, description="Faces from this size up to min_face_size (full-body photos) may join a character at a "
        "stricter distance, never start one; larger than min_face_size switches it off."
    )
    upscale_small_faces: bool = Field(
        True, description="No face found: search again at 2x (images up to 2000 px), for full-body photos' small faces."
    )
    min_sharpness: float = Field(
        40.0, ge=0, description="Faces softer than this (Laplacian variance at 64 px) are skipped as blurred; 0 keeps all."
    )
    max_other_face_ratio: float = Field(
        0.3, gt=0, description="Skip as several_faces when another face is this fraction of the chosen face's area "
        "(0.3: about 55 % of its width, a co-subject)."
    )
    duplicate_face_distance: float | None = Field(
        None, ge=0, description="Near-duplicate: faces closer than this (null: 0.2 dlib, 0.4 insightface) and ..."
    )
    duplicate_face_correlation: float = Field(
        0.95, ge=-1, le=1, description="... the centres of their aligned face crops correlating at least this much."
    )
    cluster_linkage: Literal["complete", "average"] = Field(
        "complete", description="complete: every pair of faces in a character is closer than cluster_threshold."
    )
    cluster_threshold: float | None = Field(
        None, gt=0, description="Faces join a character when closer than this to all its faces (null: 0.44 dlib, "
        "1.15 insightface)."
    )
    cluster_margin: float | None = Field(
        None, ge=0, description="Faces or groups within cluster_threshold + this of a character, or as close to two, "
        "are left out as ambiguous (null: 0.04 dlib, 0.05 insightface)."
    )
    face_backend: Literal["dlib", "insightface"] | None = Field(
        None, description="Face backend that groups photos; null: identity.face_backend, or dlib when that is world "
        "(the world's encoder knows only drawn characters)."
    )
    bundle_prefix: str = Field(
        "built", description="Bundles are <prefix>_000, <prefix>_001, ... of data.max_chars_per_bundle characters each."
    )
    character_prefix: str = Field("person", description="Characters are <prefix>_0001, <prefix>_0002, ... by creation.")
    contact_sheet_tiles: int = Field(64, ge=1, description="Most images shown on a character's contact sheet.")

    @field_validator("bundle_prefix", "character_prefix")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
            raise ValueError("must be letters, digits, '_' or '-', starting with a letter or digit (it names folders)")
        return value


class DataConfig(_Section):
    """Where the photos are and how (references, target) pairs are drawn from them."""

    data_dir: Path = Field(Path("data/world"), description="Dataset root: <data_dir>/<bundle>/<character>/<image>.")
    max_chars_per_bundle: int | None = Field(
        None, ge=1, description="Keep at most this many characters per bundle (chosen by seed); null keeps all."
    )
    min_images_per_char: int = Field(
        3, ge=2, description="Characters with fewer usable images are dropped (a target needs another image as reference)."
    )
    input_size: int = Field(512, ge=FLUX_PIXEL_MULTIPLE, description="Training side length in pixels (multiple of 16).")
    bucketing: bool = Field(True, description="Aspect-ratio buckets of about input_size^2 pixels instead of square crops.")
    max_aspect_ratio: float = Field(2.0, ge=1.0, le=4.0, description="Widest bucket aspect ratio (and 1/x the tallest).")
    val_fraction: float = Field(
        0.1, ge=0.0, lt=1.0, description="Fraction of characters held out for validation (at least one character; "
        "0 only with val_characters: a run always validates on identities it never trained on)."
    )
    val_characters: list[str] = Field(
        default_factory=list, description="Explicit validation characters as 'bundle/character'; overrides val_fraction."
    )
    min_references: int = Field(1, ge=1, description="Fewest reference images drawn per target.")
    max_references: int = Field(3, ge=1, description="Most reference images drawn per target.")
    reference_size: int = Field(256, ge=FLUX_PIXEL_MULTIPLE, description="Reference images are letterboxed to this square.")
    caption_template: str = Field(
        "a photo of a person",
        description="Caption when an image has no <image>.txt sidecar; may use {character} and {bundle}.",
    )
    max_image_pixels: int = Field(
        50_000_000, ge=1, description="Images with more pixels are skipped (protects against decompression bombs)."
    )
    scan_threads: int = Field(4, ge=1, description="Threads that decode images while scanning the dataset.")
    world: WorldConfig = Field(default_factory=WorldConfig, description="The generated identity world.")
    build: BuildConfig = Field(default_factory=BuildConfig, description="The dataset builder (dtback dataset build).")

    @field_validator("input_size", "reference_size")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % FLUX_PIXEL_MULTIPLE:
            lower = value // FLUX_PIXEL_MULTIPLE * FLUX_PIXEL_MULTIPLE
            raise ValueError(
                f"must be a multiple of {FLUX_PIXEL_MULTIPLE} (FLUX latents are 8x downsampled and packed 2x2); "
                f"try {lower} or {lower + FLUX_PIXEL_MULTIPLE}"
            )
        return value

    @field_validator("caption_template")
    @classmethod
    def _known_placeholders(cls, value: str) -> str:
        allowed = {"character", "bundle"}
        parsed = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(value)
                  if name is not None]
        unknown = {name for name, _, _ in parsed} - allowed
        if unknown:
            raise ValueError(f"unknown placeholder(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
        # A format spec or conversion ({character:d}, {bundle!z}, {character:>99999999999}) would fail, or fill
        # memory, at the first caption, minutes into a run: the names are plain text, so none is needed.
        formatted = [f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}}"
                     for name, spec, conversion in parsed if spec or conversion]
        if formatted:
            raise ValueError(f"placeholder(s) {', '.join(formatted)} carry a format spec or conversion; write "
                             "{character} or {bundle} as they are")
        return value

    @field_validator("val_characters")
    @classmethod
    def _bundle_slash_character(cls, value: list[str]) -> list[str]:
        for key in value:
            if key.count("/") != 1 or key.startswith("/") or key.endswith("/"):
                raise ValueError(f"{key!r} is not of the form 'bundle/character'")
        return value

    @model_validator(mode="after")
    def _some_held_out(self) -> "DataConfig":
        # Validation and best_model need held-out identities; with none a run would fail after minutes of setup.
        if self.val_fraction == 0 and not self.val_characters:
            raise ValueError("val_fraction is 0 and val_characters is empty: no character would be held out, but "
                             "validation and best_model need held-out identities; set val_fraction > 0 (e.g. 0.1) or "
                             "name the held-out characters in val_characters")
        return self

    @model_validator(mode="after")
    def _reference_range(self) -> "DataConfig":
        if self.min_references > self.max_references:
            raise ValueError(
                f"min_references ({self.min_references}) must not exceed max_references ({self.max_references})"
            )
        return self


class IdentityConfig(_Section):
    """Face and body identity encoders, their embedding cache, and the identity tokens handed to the adapters."""

    num_face_latents: int = Field(8, ge=1, description="Face identity tokens produced by the face resampler.")
    num_body_latents: int = Field(8, ge=1, description="Body identity tokens produced by the body resampler.")
    face_backend: Literal["world", "dlib", "insightface"] = Field(
        "world",
        description="world: the identity world's own encoder (data.world.components); dlib: offline, licence-clean models; "
        "insightface: ONNX pack from face_model_dir.",
    )
    face_model_dir: Path | None = Field(
        None, description="InsightFace pack folder (e.g. models/antelopev2) with detection + recognition ONNX files."
    )
    face_detector: Literal["hog", "cnn"] = Field("hog", description="dlib detector: hog (fast) or cnn (slower, more poses).")
    face_upsample: int = Field(1, ge=0, le=3, description="dlib: upsample the image this many times before detection.")
    face_recognizer: Literal["torch", "dlib"] = Field(
        "torch", description="dlib: who runs its ResNet on the face chips; torch: dtback.identity.dlib_torch, batched, "
        "on identity.device (descriptors equal dlib's within cosine 0.9999999); dlib: dlib's own C++, one CPU.")
    face_det_size: int = Field(640, ge=32, description="insightface: detector input side (multiple of 32).")
    face_choice: Literal["largest", "score", "center"] = Field(
        "largest", description="Which face of an image is the character's when there are several."
    )
    body_model: str | None = Field(
        "world",
        description="Body backbone: 'world' (the identity world's own encoder), a local folder or hub id (cached, "
        "e.g. facebook/dinov2-small); null skips body identity.",
    )
    body_width_factor: float = Field(2.0, gt=0, description="Person crop: face centre +- this many face widths.")
    body_top_factor: float = Field(0.5, ge=0, description="Person crop: starts this many face heights above the face.")
    body_height_factor: float = Field(7.5, gt=0, description="Person crop: ends this many face heights below the face top.")
    cache_dir: Path | None = Field(None, description="Embedding cache folder; null means <output_dir>/cache.")
    device: str = Field("auto", description="Device for the encoders: auto (cuda when available), cpu, cuda, cuda:1...")

    @field_validator("face_det_size")
    @classmethod
    def _multiple_of_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError("must be a multiple of 32 (the detector's largest stride)")
        return value

    @model_validator(mode="after")
    def _insightface_needs_models(self) -> "IdentityConfig":
        if self.face_backend == "insightface" and self.face_model_dir is None:
            raise ValueError("face_backend insightface needs face_model_dir (a folder with the ONNX model pack)")
        return self


def head_choices(width: int) -> list[int]:
    """Head counts that split ``width`` evenly (at most 12 shown), for messages."""
    found = [heads for heads in range(1, width + 1) if width % heads == 0]
    return found if len(found) <= 12 else found[:6] + found[-6:]


class ModelConfig(_Section):
    """The FLUX base, and the identity resamplers and adapters attached to it."""

    base: Literal["flux1", "flux2", "flux2_klein"] = Field(
        "flux1", description="The FLUX family: flux1 (FLUX.1 [dev]/[schnell]), flux2 (FLUX.2 [dev]), flux2_klein "
        "(FLUX.2 [klein] 4B/9B); the simple model is built for each."
    )
    use_simple_model: bool = Field(
        True, description="Build a small FLUX-architecture model in code (offline) instead of loading FLUX.1."
    )
    pretrained_model: str = Field(
        "black-forest-labs/FLUX.1-dev",
        description="Real FLUX (use_simple_model: false): a local diffusers folder or a hub id already downloaded.",
    )
    simple_model_dir: Path | None = Field(
        None, description="Where the simple model is saved in diffusers format; null means <output_dir>/simple_base."
    )
    simple_vae: str | None = Field(
        "world",
        description="Simple model only: its VAE. world: the identity world's trained VAE; a diffusers AutoencoderKL "
        "folder; null: random weights (tests).",
    )
    train_simple_base: bool = Field(
        True, description="Simple model only: train its transformer together with the adapters (base_learning_rate); "
        "false freezes it, as real FLUX always is."
    )
    simple_base: str | None = Field(
        "world",
        description="Simple model only: its starting weights. world: pretrained on the identity world without identity "
        "(like FLUX.1-dev for real photos; needs simple_vae: world); a diffusers FluxPipeline folder; null: random "
        "weights by seed.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Base weights dtype; auto: bfloat16 for real FLUX on a GPU, float32 otherwise."
    )
    max_sequence_length: int | None = Field(
        None, ge=1, le=512, description="T5 prompt tokens; null: 512 for real FLUX, 32 for the simple model."
    )
    adapter_double_interval: int = Field(
        2, ge=0, description="Attach an identity adapter after every N-th double block (0: none), like PuLID."
    )
    adapter_single_interval: int = Field(
        4, ge=0, description="Attach an identity adapter after every N-th single block (0: none)."
    )
    adapter_double_blocks: list[int] | None = Field(
        None, description="Explicit double-block indices (overrides adapter_double_interval)."
    )
    adapter_single_blocks: list[int] | None = Field(
        None, description="Explicit single-block indices (overrides adapter_single_interval)."
    )
    adapter_dim: int | None = Field(
        None, ge=8, description="Inner width of each identity cross-attention; null: the transformer width, at most 1024."
    )
    adapter_heads: int | None = Field(
        None, ge=1, description="Heads of each identity cross-attention; null: adapter_dim / the transformer's head dim."
    )
    resampler_dim: int | None = Field(
        None, ge=8, description="Width of the perceiver resamplers; null: the transformer width, at most 1024."
    )
    resampler_depth: int = Field(2, ge=1, description="Perceiver layers per resampler.")
    resampler_heads: int = Field(8, ge=1, description="Heads of the perceiver resamplers.")
    tokens_per_embedding: int = Field(
        4, ge=1, description="Tokens each reference's global face/body vector is expanded to before the resampler."
    )
    face_scale: float = Field(1.0, ge=0.0, description="Strength of the face identity adapters (0: off).")
    body_scale: float = Field(1.0, ge=0.0, description="Strength of the body identity adapters (0: off).")
    lora_rank: int = Field(0, ge=0, description="LoRA rank on the base transformer through peft (0: no LoRA).")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA alpha; null: equal to the rank.")
    lora_targets: list[str] = Field(
        ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="Module names LoRA wraps in the transformer "
        "(on FLUX.2 the default also wraps its single blocks' fused to_qkv_mlp_proj)."
    )
    base_quantization: Literal["int8"] | None = Field(
        None, description="Memory mode: int8 stores the frozen base's block weights in 8 bits (torchao, halves them); "
        "null: the base dtype. Real FLUX only (see dtback.model.memory)."
    )
    offload_after_cache: bool = Field(
        False, description="Memory mode: move the text encoders and the VAE encoder off the training device once the "
        "latent and text caches are built."
    )

    @model_validator(mode="after")
    def _check_blocks(self) -> "ModelConfig":
        for key in ("adapter_double_blocks", "adapter_single_blocks"):
            blocks = getattr(self, key)
            if blocks is not None and (any(b < 0 for b in blocks) or len(set(blocks)) != len(blocks)):
                raise ValueError(f"{key} must hold distinct block indices >= 0 (got {blocks})")
        return self

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        # Only explicit widths can be checked here; a width taken from the transformer is checked when it is loaded
        # (dtback.model.identity_flux.check_model_fits_base).
        for dim_key, heads_key in (("resampler_dim", "resampler_heads"), ("adapter_dim", "adapter_heads")):
            dim, heads = getattr(self, dim_key), getattr(self, heads_key)
            if dim is not None and heads is not None and dim % heads:
                raise ValueError(f"{heads_key}={heads} does not divide {dim_key}={dim}: attention splits the width "
                                 f"into equal heads; choose one of {head_choices(dim)} heads")
        return self

    @model_validator(mode="after")
    def _check_family(self) -> "ModelConfig":
        if self.use_simple_model and self.base != "flux1":
            for key in ("simple_vae", "simple_base"):
                if getattr(self, key) == "world":
                    raise ValueError(f"{key}=world is a FLUX.1 model (the identity world's), but base={self.base}: "
                                     f"set {key}: null (random weights) or a {self.base} folder")
        return self

    @model_validator(mode="after")
    def _check_simple_base(self) -> "ModelConfig":
        if self.use_simple_model and self.simple_base == "world" and self.simple_vae != "world":
            raise ValueError(f"simple_base=world was pretrained on the world VAE's latents, but simple_vae="
                             f"{self.simple_vae}: set simple_vae: world, or simple_base: null (random weights)")
        return self

    @model_validator(mode="after")
    def _check_quantization(self) -> "ModelConfig":
        if self.base_quantization is not None and self.use_simple_model:
            raise ValueError(f"base_quantization={self.base_quantization} needs a frozen base, but the simple model's "
                             "transformer is trained: set use_simple_model: false or base_quantization: null")
        if self.base_quantization is not None and self.lora_rank > 0:
            raise ValueError(f"base_quantization={self.base_quantization} with lora_rank={self.lora_rank}: LoRA on a "
                             "quantized base is not supported; set one of them off")
        return self


class TrainingConfig(_Section):
    """Optimisation and loss weights."""

    batch_size: int = Field(4, ge=1)
    num_epochs: int = Field(10, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    content_weight: float = Field(1.0, ge=0.0, description="Weight of the flow-matching loss.")
    face_weight: float = Field(0.1, ge=0.0, description="Weight of the face identity loss (1 - cos).")
    body_weight: float = Field(0.1, ge=0.0, description="Weight of the body identity loss (1 - cos).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimiser steps (overrides num_epochs).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches per optimiser step.")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="Several ranks (torchrun / accelerate launch): ddp keeps the whole model on every rank; "
        "fsdp shards base, adapters, gradients and optimiser state across the ranks (torch FSDP2, per block), for "
        "bases that do not fit one device with room to train. One rank: no effect.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null: no clipping.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 on a GPU that supports it, no mixed precision on a CPU. bf16 on a CPU "
        "without bf16 instructions (AVX512-BF16 or AMX) trains in float32, with a warning: emulated bf16 is slower."
    )
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_false(cls, value):
        # The loader reads a bare `no` as the word; `false` (or a config written for YAML 1.1) still means "no".
        return "no" if value is False else value

    cudnn_attention: bool = Field(
        False, description="Let scaled_dot_product_attention use cuDNN's attention while training. Off: on an H100 "
        "(torch 2.11, CUDA 13.0) its backward gave NaN gradients and an illegal memory access (benchmarks/README.md); "
        "flash / memory-efficient attention are used instead.",
    )
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit: AdamW moments in 8 bits through bitsandbytes (GPU or CPU; a memory mode)."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    lr_scheduler: Literal["cosine", "constant"] = Field("cosine", description="After warmup: cosine decay or constant.")
    warmup_steps: int = Field(100, ge=0, description="Linear learning-rate warmup steps.")
    base_learning_rate: float | None = Field(
        None, gt=0.0, description="Simple model only: learning rate of its transformer (trained too); null: learning_rate."
    )
    ema_decay: float | None = Field(
        0.999, ge=0.0, lt=1.0, description="EMA of the trainable weights (validation and best_model use it); null: off."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute transformer blocks in backward to save memory.")
    compile: bool = Field(
        False, description="torch.compile the transformer's repeated blocks (diffusers' compile_repeated_blocks; the "
        "adapters' hooks compile with their block). The first steps, and the first validation, compile; on the H200 "
        "the FLUX.1-dev step ran 18 % faster (benchmarks/README.md)."
    )
    gradient_checkpointing_every: int = Field(
        1, ge=1, description="With gradient_checkpointing: recompute every k-th transformer block (1: all; fewer "
        "saves less memory and less time)."
    )
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Train with an empty caption this often (CFG).")
    identity_dropout: float = Field(
        0.1, ge=0.0, le=1.0, description="Train without identity this often, so sampling without identity works."
    )
    timestep_sampling: Literal["logit_normal", "uniform"] = Field(
        "logit_normal", description="How the noise level is drawn (SD3/FLUX: logit-normal)."
    )
    logit_mean: float = Field(0.0, description="logit_normal: mean of the normal before the sigmoid.")
    logit_std: float = Field(1.0, gt=0, description="logit_normal: std of the normal before the sigmoid.")
    resolution_shift: bool = Field(
        True, description="Shift noise levels up for larger images, as FLUX samples (FLUX.2: also by "
        "training.val_sampling_steps, as its pipelines shift by the step count)."
    )
    person_loss_weight: float = Field(
        1.0, ge=1.0, description="Flow-matching loss weight of the latent patches inside the target's person box "
        "(1 elsewhere): where identity lives. 1 weighs every patch alike."
    )
    identity_loss_max_samples: int = Field(
        4, ge=1, description="Identity losses on at most this many low-noise samples per micro-batch (VAE decode cost)."
    )
    identity_loss_every: int = Field(
        1, ge=1, description="Identity losses on every k-th optimiser step only (1: every step); between them a step "
        "is the flow loss alone, without the VAE decode and the encoders' forward and backward.",
    )
    identity_loss_max_sigma: float = Field(
        0.6, ge=0.0, le=1.0, description="Identity losses only on samples with noise level sigma below this."
    )
    checkpoint_every: int = Field(500, ge=1, description="Write a checkpoint every N optimiser steps (and at the end).")
    keep_checkpoints: int = Field(3, ge=1, description="Keep the last K checkpoints.")
    validate_every: int = Field(500, ge=1, description="Validate (held-out identity similarity, sample grid) every N steps.")
    num_val_characters: int = Field(4, ge=1, description="Held-out characters in the validation grid and metrics.")
    val_sampling_steps: int = Field(20, ge=1, description="Sampling steps for validation images.")
    val_guidance: float = Field(3.5, ge=0.0, description="Guidance for validation images (distilled for FLUX.1-dev).")
    val_true_cfg: float = Field(
        1.0, ge=1.0, description="True CFG scale of validation images with identity, against the same prompt without "
        "identity (amplifies what the adapters add; 1 = off, one transformer call per step)."
    )
    log_every: int = Field(10, ge=1, description="Log losses every N optimiser steps.")
    log_with: list[str] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers that get the losses, validation metrics and grids, through accelerate: "
        "tensorboard (events in <output_dir>/tensorboard/), wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, "
        "trackio; all: every one installed; [] or null: none (metrics.jsonl and validation.jsonl are always written).",
    )

    @field_validator("adam_betas")
    @classmethod
    def _betas_below_one(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("each beta must be in [0, 1); the usual values are [0.9, 0.999]")
        return value

    @field_validator("log_with", mode="before")
    @classmethod
    def _known_trackers(cls, value: Any) -> list[str]:
        # accelerate's LoggerType values less "all" (not imported here: it would import torch for every config).
        trackers = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab", "trackio")
        choices = f"choose from {', '.join(trackers)}, or 'all' (every one installed), or [] / null for none"
        if value is None:
            return []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list of tracker names; {choices}")
        unknown = [name for name in value if name not in (*trackers, "all")]
        if unknown:
            raise ValueError(f"unknown tracker(s) {', '.join(repr(name) for name in unknown)}; {choices}")
        return list(dict.fromkeys(value))

    @model_validator(mode="after")
    def _some_loss(self) -> "TrainingConfig":
        if self.content_weight == 0 and self.face_weight == 0 and self.body_weight == 0:
            raise ValueError("content_weight, face_weight and body_weight are all 0: nothing would be trained")
        return self


# Why training.compile and model.base_quantization exclude each other (the benchmark's int8 rows say it too).
COMPILE_WITH_QUANTIZATION = ("torch.compile cannot compile a training step through torchao's quantized weights "
                             "(aliased outputs beside tensor-subclass inputs)")


class OutputConfig(_Section):
    """Where a run writes checkpoints and reports."""

    output_dir: Path = Field(Path("checkpoints/identity_preserving"), description="Run folder.")


class Config(_Section):
    """The whole configuration tree."""

    seed: int = Field(42, ge=0, le=MAX_SEED,
                      description="Seeds character selection, the split, pair sampling and training.")
    data: DataConfig = Field(default_factory=DataConfig)
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="after")
    def _run_outside_data(self) -> "Config":
        # The run's curves and samples are PNGs: inside data_dir they would be scanned as a character of their own.
        # is_inside answers for a looping data_dir too: the scan reports the loop, not a RuntimeError here
        if is_inside(self.output.output_dir, self.data.data_dir):
            raise ValueError(f"output.output_dir={self.output.output_dir} is inside data.data_dir="
                             f"{self.data.data_dir}: the run's own images would be read as a character; put the run "
                             "outside the dataset")
        cache = self.identity.cache_dir
        if cache is not None and is_inside(cache, self.data.data_dir):  # its folders would be scanned as characters
            raise ValueError(f"identity.cache_dir={cache} is inside data.data_dir={self.data.data_dir}: the scan "
                             "would read the cache's folders as characters; put the cache outside the dataset")
        return self

    @model_validator(mode="after")
    def _compile_with_int8(self) -> "Config":
        # torch 2.13 with torchao 0.18: AOT autograd refuses a graph with aliased outputs (FLUX's norms chunk one
        # projection into views) once torchao's int8 weights are among its inputs, so the first step would stop
        # with an inductor traceback (benchmarks/README, training step).
        if self.training.compile and self.model.base_quantization is not None:
            raise ValueError(f"training.compile=true with model.base_quantization={self.model.base_quantization}: "
                             f"{COMPILE_WITH_QUANTIZATION}; turn one of them off: compile speeds the bfloat16 base, "
                             "int8 saves memory")
        return self

    def cache_dir(self) -> Path:
        """The embedding cache folder: ``identity.cache_dir``, else ``<output_dir>/cache``."""
        return Path(self.identity.cache_dir) if self.identity.cache_dir is not None else self.output.output_dir / "cache"

    def to_yaml(self) -> str:
        return yaml.dump(self.model_dump(mode="json"), Dumper=_QuotingDumper, sort_keys=False)

    def save(self, path: Path) -> None:
        write_text(path, self.to_yaml())  # atomic: a reader sees the old config or the new one


SEED_KEYS = (
    "data_dir",
    "max_chars_per_bundle",
    "min_images_per_char",
    "use_simple_model",
    "input_size",
    "num_face_latents",
    "num_body_latents",
    "batch_size",
    "num_epochs",
    "learning_rate",
    "weight_decay",
    "face_weight",
    "body_weight",
    "content_weight",
    "output_dir",
)


def _section_of(key: str) -> str:
    for section, info in Config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section) and key in annotation.model_fields:
            return section
    raise KeyError(key)


SEED_KEY_PATHS: dict[str, str] = {key: f"{_section_of(key)}.{key}" for key in SEED_KEYS}

# Keys of earlier versions: still accepted (config files and the config.yaml of old runs), with a deprecation note.
RENAMED_KEYS: dict[str, str] = {"identity.world_models_dir": "data.world.components"}
REMOVED_KEYS: dict[str, str] = {
    "data.num_workers": "features are precomputed in memory; no DataLoader workers run",
    "data.build.duplicate_hash_bits": "near-duplicates are decided from the face crop (data.build.duplicate_face_"
                                      "correlation), not a whole-image hash",
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; None means all defaults), apply ``--set`` overrides, validate the whole tree."""
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(Path(path)) if path is not None else {}
    sources: dict[str, str] = {}
    raw = _lift_seed_keys(raw, source)
    raw = _renamed_keys(raw, source)
    for override in overrides:
        key, value = _parse_override(override)
        if key is None:
            continue
        _set_path(raw, key, value, f"--set {override}")
        sources[key] = f"--set {override}"
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw, source, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        problem = "a folder, not a config file" if path.is_dir() else \
            "not a regular file (a pipe or a device): give a YAML file" if path.exists() else "config file not found"
        raise ConfigError(f"{path}: {problem}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in the YAML file gives the same key twice (PyYAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping, naming it and both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged keys may be overridden, that is what merging is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: construct_mapping below reports it
            if first != line:
                raise DuplicateKeyError(f"key {key!r} is given twice in one mapping (lines {first} and {line}); "
                                        "YAML would silently keep the last one: keep one")
        return super().construct_mapping(node, deep=deep)


# Scalars are read as YAML 1.2's core schema reads them, not as PyYAML's YAML 1.1: a person writing `010` means ten
# (1.1: octal 8), `1:30` is no number (1.1: sexagesimal 90), `no`, `off`, `yes` and `on` are words (1.1: booleans;
# a caption template "no" or a bundle "off" stays a string, while a boolean key still takes them, through pydantic),
# `1e-4` is a float (1.1: a string) and `2024-05-01` is a folder name, not a date. Kept from 1.1 because nobody
# means anything else by them: `_` between digits (`1_000`) and the 0x / 0o / 0b prefixes.
_CORE_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_CORE_INT = re.compile(r"^[-+]?(?:0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+|[0-9][0-9_]*)$")
_CORE_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_YAML_11_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
_CORE_RESOLVERS = [("tag:yaml.org,2002:bool", _CORE_BOOL, "tTfF"), ("tag:yaml.org,2002:int", _CORE_INT, "-+0123456789"),
                   ("tag:yaml.org,2002:float", _CORE_FLOAT, "-+.0123456789")]
_BASES = {"0x": 16, "0o": 8, "0b": 2}


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    try:
        return sign * int(digits[2:], _BASES[digits[:2].lower()]) if digits[:2].lower() in _BASES \
            else sign * int(digits, 10)
    except ValueError:  # an explicit `!!int abc`: a YAML error naming the line, not a traceback
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    try:
        return yaml.SafeLoader.construct_yaml_float(loader, node)
    except ValueError:  # an explicit `!!float abc`
        raise yaml.constructor.ConstructorError(None, None, f"{loader.construct_scalar(node)!r} is not a float",
                                                node.start_mark) from None


_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in _CORE_RESOLVERS:
    _UniqueKeyLoader.add_implicit_resolver(_tag, _regexp, list(_first))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _QuotingDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that quotes every string either schema would read as something else (``"1e5"`` for the
    core schema, ``"no"`` for YAML 1.1): the run's ``config.yaml`` reads back the same here and in any YAML tool."""


for _tag, _regexp, _first in _CORE_RESOLVERS:
    _QuotingDumper.add_implicit_resolver(_tag, _regexp, list(_first))


def _lift_seed_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Move the seed's flat top-level keys into their sections (``learning_rate`` -> ``training.learning_rate``)."""
    raw = dict(raw)
    for key, dotted in SEED_KEY_PATHS.items():
        if key not in raw:
            continue
        section = dotted.split(".")[0]
        block = raw.get(section)
        if block is None:
            block = {}
        if not isinstance(block, dict):
            continue  # the validator reports the malformed section with its path
        if key in block:
            raise ConfigError(f"{source}: {key} is given both at the top level and as {dotted}; keep one")
        raw[section] = {**block, key: raw.pop(key)}
    return raw


def _renamed_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Move renamed keys to their new place and drop removed ones, each with a deprecation warning."""
    for old, new in (*RENAMED_KEYS.items(), *((old, None) for old in REMOVED_KEYS)):
        *parents, key = old.split(".")
        node: Any = raw
        for part in parents:  # copy the dicts on the way down: the caller's mapping is left as it was
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                node = None
                break
            node[part] = node = dict(child)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        if new is None:
            warnings.warn(f"{source}: {old} is no longer used ({REMOVED_KEYS[old]}); remove it", FutureWarning,
                          stacklevel=3)
            continue
        warnings.warn(f"{source}: {old} is renamed {new}; the old name still works for now", FutureWarning,
                      stacklevel=3)
        if _get_path(raw, new) is not None and value is not None:
            raise ConfigError(f"{source}: both {old} (old name) and {new} are set; keep {new}")
        if value is not None:
            _set_path(raw, new, value, source)
    return raw


def _get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _parse_override(override: str) -> tuple[str | None, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override}: expected key=value, e.g. --set training.learning_rate=1e-4")
    key = SEED_KEY_PATHS.get(key, key)
    if key in RENAMED_KEYS:
        warnings.warn(f"--set {override}: {key} is renamed {RENAMED_KEYS[key]}", FutureWarning, stacklevel=3)
        key = RENAMED_KEYS[key]
    if key in REMOVED_KEYS:
        warnings.warn(f"--set {override}: {key} is no longer used ({REMOVED_KEYS[key]})", FutureWarning,
                      stacklevel=3)
        return None, None
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        # `{character} in a park` is a broken YAML mapping, not the caption template the user typed
        hint = "; text that starts with '{' must be in quotes" if text.lstrip().startswith("{") else ""
        raise ConfigError(f"--set {override}: value is not valid YAML: {_yaml_problem(err)}{hint}") from None
    _check_key_path(key, override)
    return key, value


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line (its own text spans five, with the source quoted under a caret)."""
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context}: {problem}{where}" if context else f"{problem}{where}"


def _check_key_path(dotted: str, override: str) -> None:
    """Refuse ``--set a.b.c=...`` where ``a.b`` is a value of the tree, not a section (the validator would say only
    that ``a.b`` is not a number); unknown names are left to the validator, which suggests the close ones."""
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        info = model.model_fields.get(part)
        if info is None:
            return
        annotation = info.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {override}: {where} is a value, not a section, so {dotted} cannot be set "
                              f"(set {where}=...)")
        model = annotation


def _set_path(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: {where} is a value, not a section, so {dotted} cannot be set")
        node = child
    node[parts[-1]] = value


def _format_errors(err: ValidationError, raw: dict[str, Any], source: str, sources: dict[str, str]) -> str:
    lines = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        key = ".".join(loc) if loc else "(top level)"
        origin = _origin(key, source, sources)
        if not loc:  # a rule across sections: name the overrides its message mentions
            origin = ", ".join([source, *(where for overridden, where in sources.items()
                                          if overridden.split(".")[-1] in item["msg"])])
        if item["type"] == "extra_forbidden":
            lines.append(f"{origin}: {key}: unknown key{_suggestion(loc)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "string_type" and isinstance(item.get("input"), (dict, list)):
            # `{character} in a park` or `a: b` unquoted is a YAML mapping (and `[x]` a list), not the text typed
            kind = "mapping" if isinstance(item["input"], dict) else "list"
            message += f"; YAML read the value as a {kind}: put it in quotes"
        got = f" (got {_short_repr(item['input'])})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"{origin}: {key}: {message}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut at ``limit`` characters: a YAML alias bomb expands to millions of elements."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 8, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin(key: str, source: str, sources: dict[str, str]) -> str:
    for overridden, where in sources.items():
        if key == overridden or key.startswith(overridden + ".") or overridden.startswith(key + "."):
            return where
    return source


def _suggestion(loc: list[str]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    valid = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = ".".join(loc[:-1]) or "the top level"
    return f"{hint} (valid keys in {where}: {', '.join(valid)})"


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterable[tuple[str, str, str]]:
    """Yield (dotted key, default, description) for every leaf key, for CLI help and docs."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from describe_keys(annotation, f"{prefix}{name}.")
        else:
            default = info.get_default(call_default_factory=True)
            yield f"{prefix}{name}", repr(default if not isinstance(default, Path) else str(default)), info.description or ""
