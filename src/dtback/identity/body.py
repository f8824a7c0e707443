"""Body identity: crop the person around a face and read hair, outfit and build with a vision backbone.

**Person crop rule** (:func:`~dtback.identity.crops.person_box`, factors in :class:`~dtback.identity.crops.BodyCropRule`). For a face box ``(x1, y1, x2, y2)`` of
width ``w``, height ``h`` and centre ``cx``, the person region is

- horizontally ``cx ± width_factor · w`` (default 2.0: four face widths, the shoulders);
- vertically from ``y1 − top_factor · h`` (default 0.5: the hair above the face box) down to
  ``y1 + height_factor · h`` (default 7.5: a standing adult is about 7.5 heads tall, so the full body);

then clipped to the image. Without a face, or when the clipped box has no area, the whole image is used.

**Backbone.** :class:`BodyEncoder` wraps any ``transformers`` vision model loaded with ``AutoModel`` (DINOv2 such as
``facebook/dinov2-small`` is the intended default; SigLIP/CLIP checkpoints work too: their vision tower is used).
Preprocessing happens in torch, so the path pixels → features is differentiable and can serve as a loss:
``(B, 3, H, W)`` in [0, 1] → bilinear antialiased resize to the checkpoint's input size → ``(x − mean) / std``.
Input size, mean and std come from the checkpoint's ``preprocessor_config.json``; the crop size is taken when the
processor centre-crops (DINOv2: 224), but the image is resized, never centre-cropped, so no body part is cut off.
Without that file: ImageNet mean/std and 224 px.

**Features** (:class:`BodyFeatures`): ``pooled (B, D)`` is the model's ``pooler_output`` (DINOv2: the layer-normed CLS
token; SigLIP: its attention-pooling head); a model without one gets its CLS token, or the mean of the patch tokens
when it has no prefix tokens. ``tokens (B, N, D)`` are the patch tokens only (CLS and register tokens dropped),
``N = (H // patch) · (W // patch)`` at the model input size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, AutoModel
from transformers.utils import cached_file

from dtback.errors import MissingModelError
from dtback.identity.crops import BodyCropRule, crop_square, person_box

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = 224
DEFAULT_MODEL = "facebook/dinov2-small"
PREPROCESSOR_FILE = "preprocessor_config.json"
# Config keys that change with the machine or library version but not with the features.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "architectures")


# --------------------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class BodyPreprocess:
    """Model input settings: ``size`` is (height, width) in pixels; mean/std per RGB channel for [0, 1] pixels."""

    size: tuple[int, int] = (DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE)
    image_mean: tuple[float, float, float] = IMAGENET_MEAN
    image_std: tuple[float, float, float] = IMAGENET_STD


def preprocess_from_dict(settings: dict[str, Any], source: str) -> BodyPreprocess:
    """Read an image processor's settings (``preprocessor_config.json`` keys) into :class:`BodyPreprocess`.

    ``source`` names the file in error messages. Missing keys fall back to ImageNet mean/std and 224 px.
    """
    if settings.get("do_normalize", True):
        mean = _triple(settings.get("image_mean", IMAGENET_MEAN), "image_mean", source)
        std = _triple(settings.get("image_std", IMAGENET_STD), "image_std", source)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if any(s <= 0 for s in std):
        raise ValueError(f"{source}: image_std must be positive, got {std!r}")
    return BodyPreprocess(size=_input_size(settings, source), image_mean=mean, image_std=std)


def _input_size(settings: dict[str, Any], source: str) -> tuple[int, int]:
    """The crop size when the processor centre-crops, else its resize target, else 224 px."""
    crop, size = settings.get("crop_size") or {}, settings.get("size") or {}
    if isinstance(size, int):
        size = {"shortest_edge": size}
    for key, value in (("crop_size", crop if settings.get("do_center_crop") else {}), ("size", size)):
        if value.get("height") and value.get("width"):
            return _positive(value["height"], key, source), _positive(value["width"], key, source)
    if size.get("shortest_edge"):
        side = _positive(size["shortest_edge"], "size.shortest_edge", source)
        return side, side
    logger.warning("%s has no usable input size; using %d px", source, DEFAULT_INPUT_SIZE)
    return DEFAULT_INPUT_SIZE, DEFAULT_INPUT_SIZE


def _triple(value: Any, key: str, source: str) -> tuple[float, float, float]:
    values = [value] * 3 if isinstance(value, (int, float)) else list(value)
    if len(values) != 3:
        raise ValueError(f"{source}: {key} must have 3 values (R, G, B), got {value!r}")
    return tuple(float(v) for v in values)  # type: ignore[return-value]


def _positive(value: Any, key: str, source: str) -> int:
    if int(value) <= 0:
        raise ValueError(f"{source}: {key} must be a positive size in pixels, got {value!r}")
    return int(value)


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(B, 3, *size)`` with bilinear antialiased interpolation (identity when sizes match)."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)


def letterbox(pixels: torch.Tensor, aspect: float, fill: torch.Tensor) -> torch.Tensor:
    """Pad ``(B, 3, H, W)`` evenly to width/height ``aspect`` with the colour ``fill`` ``(3,)``; nothing is cut."""
    height, width = pixels.shape[-2:]
    new_h, new_w = max(height, round(width / aspect)), max(width, round(height * aspect))
    if (new_h, new_w) == (height, width):
        return pixels
    canvas = fill.to(pixels).view(1, 3, 1, 1).expand(pixels.shape[0], 3, new_h, new_w).clone()
    top, left = (new_h - height) // 2, (new_w - width) // 2
    canvas[..., top : top + height, left : left + width] = pixels
    return canvas


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """PIL RGB image → ``(1, 3, H, W)`` float32 in [0, 1]."""
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r} (convert with dtback.data.images.to_rgb)")
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


# --------------------------------------------------------------------------------------------------------- encoder


class BodyFeatures(NamedTuple):
    """``pooled (B, D)`` summary vector and ``tokens (B, N, D)`` patch tokens (CLS/registers excluded)."""

    pooled: torch.Tensor
    tokens: torch.Tensor


class BodyEncoderBase(torch.nn.Module):
    """The body encoder interface of every backend: ``forward(person crops) -> BodyFeatures``, :meth:`encode` one
    PIL image around its face, :meth:`encode_batch` several, and :meth:`embed_pixels`, the differentiable path the
    identity loss uses. Subclasses set ``encoder_id``, ``dim`` and ``num_tokens``."""

    crop_rule: BodyCropRule

    def encode(self, image: Image.Image, face_box: np.ndarray | None = None) -> BodyFeatures:
        raise NotImplementedError

    @torch.no_grad()
    def encode_batch(self, images: Sequence[Image.Image], face_boxes: Sequence[np.ndarray | None]) -> BodyFeatures:
        """:meth:`encode` of each image, concatenated (``B = len(images)``); backends that batch override this."""
        parts = [self.encode(image, box) for image, box in zip(images, face_boxes, strict=True)]
        return BodyFeatures(torch.cat([p.pooled for p in parts]), torch.cat([p.tokens for p in parts]))

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor, body_boxes: torch.Tensor) -> BodyFeatures:
        """Differentiable: whole images ``(B, 3, H, W)`` in [0, 1] with their face boxes and person boxes (``(B, 4)``
        pixels; :func:`~dtback.identity.crops.person_box` of the face) -> features of the person crops."""
        raise NotImplementedError


class BodyEncoder(BodyEncoderBase):
    """Frozen vision backbone with differentiable torch preprocessing; see the module docstring for the rules.

    Build it with :meth:`from_pretrained`. ``forward(pixels (B, 3, H, W) in [0, 1]) -> BodyFeatures``;
    :meth:`encode` crops one PIL image around its face first.
    """

    def __init__(
        self,
        backbone: torch.nn.Module,
        config: Any,
        preprocess: BodyPreprocess,
        name: str,
        crop_rule: BodyCropRule = BodyCropRule(),
        letterbox_crop: bool = True,
    ):
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.preprocess = preprocess
        self.name = name
        self.crop_rule = crop_rule
        self.letterbox_crop = letterbox_crop
        self.patch_size = _patch_size(config, name)
        self.register_buffer("mean", torch.tensor(preprocess.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess.image_std).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        *,
        local_files_only: bool = True,
        torch_dtype: torch.dtype | None = None,
        crop_rule: BodyCropRule = BodyCropRule(),
        letterbox_crop: bool = True,
    ) -> "BodyEncoder":
        """Load backbone and preprocessing from a local folder or hub id; frozen, in eval mode, on the CPU.

        A local folder must hold ``config.json`` (and the weights); with ``local_files_only`` (the default) a hub id
        must already be in the Hugging Face cache. Either miss raises :class:`MissingModelError` with the command that
        downloads it. ``letterbox_crop`` pads person crops to the input aspect in :meth:`encode` instead of stretching
        them, so the build is kept.
        """
        source, name = _resolve_source(name_or_path)
        model = _load_backbone(source, name, local_files_only, torch_dtype)
        preprocess = _load_preprocess(source, name, local_files_only)
        backbone, config = _vision_tower(model)
        backbone.eval().requires_grad_(False)
        encoder = cls(backbone, config, preprocess, name, crop_rule=crop_rule, letterbox_crop=letterbox_crop)
        logger.info("body encoder %s: input %s, D=%d, %d tokens", encoder.encoder_id, preprocess.size,
                    encoder.dim, encoder.num_tokens)
        return encoder

    @property
    def dim(self) -> int:
        """Feature width ``D``."""
        return int(self.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        """Patch tokens ``N`` at the model input size."""
        height, width = self.preprocess.size
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def encoder_id(self) -> str:
        """``<hub id or folder>@<12 hex>``; the hash covers model config, preprocessing, crop rule, letterboxing."""
        config = {k: v for k, v in self.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        settings = {"config": config, "preprocess": asdict(self.preprocess), "crop_rule": asdict(self.crop_rule),
                    "letterbox_crop": self.letterbox_crop}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
        return f"{self.name}@{digest[:12]}"

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → resized to the input size, mean/std normalised, in the backbone's dtype."""
        _check_pixels(pixels)
        resized = resize_pixels(pixels.float(), self.preprocess.size)
        return ((resized - self.mean) / self.std).to(self._dtype())

    def forward(self, pixels: torch.Tensor) -> BodyFeatures:
        """``pixels (B, 3, H, W)`` float in [0, 1] → :class:`BodyFeatures` (differentiable w.r.t. ``pixels``)."""
        model_input = self.normalise(pixels)
        output = self.backbone(pixel_values=model_input)
        return self._features(output, model_input.shape[-2:])

    @torch.no_grad()
    def encode(self, image: Image.Image, face_box: np.ndarray | None = None) -> BodyFeatures:
        """One PIL RGB image → :class:`BodyFeatures` with ``B = 1`` of its person crop (see :func:`person_box`)."""
        box = person_box(image.size, face_box, self.crop_rule)
        pixels = pil_to_pixels(image.crop(box)).to(self.mean.device)
        if self.letterbox_crop:
            height, width = self.preprocess.size
            pixels = letterbox(pixels, width / height, self.mean.view(3))
        return self(pixels)

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor, body_boxes: torch.Tensor) -> BodyFeatures:
        """The person boxes squared and resampled to the input size (:func:`~dtback.identity.crops.crop_square`)."""
        return self(crop_square(pixels, body_boxes.to(pixels.device), max(self.preprocess.size)))

    def _features(self, output: Any, input_size: tuple[int, int]) -> BodyFeatures:
        hidden = output.last_hidden_state
        num_patches = (input_size[0] // self.patch_size) * (input_size[1] // self.patch_size)
        num_prefix = hidden.shape[1] - num_patches
        if num_prefix < 0:
            raise RuntimeError(f"{self.name}: {hidden.shape[1]} tokens for {num_patches} patches of {input_size}")
        tokens = hidden[:, num_prefix:]
        pooled = getattr(output, "pooler_output", None)
        if pooled is None:
            pooled = hidden[:, 0] if num_prefix > 0 else tokens.mean(dim=1)
        return BodyFeatures(pooled=pooled, tokens=tokens)

    def _dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype


def _check_pixels(pixels: torch.Tensor) -> None:
    # Range is not checked: reading min/max would synchronise the GPU on every call.
    if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
        shape = tuple(pixels.shape)
        raise ValueError(f"pixels must be a float (B, 3, H, W) tensor in [0, 1], got {pixels.dtype} {shape}")


def _patch_size(config: Any, name: str) -> int:
    patch = getattr(config, "patch_size", None)
    if isinstance(patch, (tuple, list)):
        if len(set(patch)) != 1:
            raise ValueError(f"{name}: config.json patch_size {patch!r} is not square; square patches are needed")
        patch = patch[0]
    if not patch:
        raise ValueError(f"{name}: config.json has no patch_size; the body encoder needs a ViT-style patch backbone")
    return int(patch)


# --------------------------------------------------------------------------------------------------------- loading


def _resolve_source(name_or_path: str | Path) -> tuple[str, str]:
    """``(what transformers loads, name used in encoder_id)``: a resolved folder, or a hub id unchanged."""
    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise MissingModelError(f"body encoder path {path} is a file, not a model folder. {_download_hint(path.parent)}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingModelError(f"body encoder folder {path} has no config.json. {_download_hint(path)}")
        resolved = str(path.resolve())
        return resolved, resolved
    if isinstance(name_or_path, Path) or _looks_like_path(str(name_or_path)):
        raise MissingModelError(f"body encoder folder {path} does not exist. {_download_hint(path)}")
    return str(name_or_path), str(name_or_path)


def _looks_like_path(text: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not an existing folder is a missing folder.
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text or Path(text).is_absolute()


def _download_hint(folder: Path | None, repo_id: str = DEFAULT_MODEL) -> str:
    target = folder if folder is not None else Path("models") / repo_id.split("/")[-1]
    return f"Download it with: huggingface-cli download {repo_id} --local-dir {target}"


def _load_backbone(source: str, name: str, local_files_only: bool, torch_dtype: torch.dtype | None) -> Any:
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        return AutoModel.from_pretrained(source, **kwargs)
    except OSError as err:
        if Path(source).is_dir():
            raise MissingModelError(f"body encoder folder {source} could not be loaded: {err}") from err
        raise MissingModelError(
            f"body encoder {name!r} is neither a folder (no {Path(source).resolve()}) nor in the local Hugging Face "
            f"cache (local_files_only={local_files_only}). {_download_hint(None, name)} and pass that folder."
        ) from err


def _load_preprocess(source: str, name: str, local_files_only: bool) -> BodyPreprocess:
    """Preprocessing from the checkpoint's image processor (PIL backend, no torchvision), else from its JSON."""
    local = Path(source).is_dir()
    json_file = Path(source) / PREPROCESSOR_FILE
    if local and not json_file.is_file():
        logger.warning("%s not found; using ImageNet mean/std and %d px", json_file, DEFAULT_INPUT_SIZE)
        return BodyPreprocess()
    try:
        processor = AutoImageProcessor.from_pretrained(source, local_files_only=local_files_only)
        return preprocess_from_dict(processor.to_dict(), f"{name}/{PREPROCESSOR_FILE}")
    except OSError as err:
        # Only a hub id reaches here without a file: its cache holds the weights but no processor config.
        logger.warning("%s has no %s (%s); using ImageNet mean/std and %d px", name, PREPROCESSOR_FILE, err,
                       DEFAULT_INPUT_SIZE)
        return BodyPreprocess()
    except (ImportError, ValueError, KeyError) as err:
        # e.g. a processor class that needs torchvision: the JSON alone is enough for resize + normalise.
        if not local:
            json_file = Path(cached_file(source, PREPROCESSOR_FILE, local_files_only=local_files_only))
        logger.warning("image processor for %s unavailable (%s); reading %s directly", name, err, json_file)
        return preprocess_from_dict(_read_json(json_file), str(json_file))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read preprocessing settings from {path}: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _vision_tower(model: Any) -> tuple[torch.nn.Module, Any]:
    """The image part of a model: itself for vision models, ``vision_model`` for SigLIP/CLIP-style pairs."""
    config = model.config
    if hasattr(config, "vision_config") and hasattr(model, "vision_model"):
        return model.vision_model, config.vision_config
    return model, config
