"""The ``data`` section: the dataset folder and how pairs are drawn, with the generated world (``data.world``)
and the dataset builder (``data.build``)."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from dtback.config.section import FLUX_PIXEL_MULTIPLE, MAX_SEED, _Section

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
