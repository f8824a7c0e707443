"""Crops shared by the encoders and the identity loss: the person region around a face (the body crop rule) and a
differentiable square crop of pixel tensors.

**Person crop rule** (:func:`person_box`, factors in :class:`BodyCropRule`). For a face box ``(x1, y1, x2, y2)`` of
width ``w``, height ``h`` and centre ``cx``, the person region is

- horizontally ``cx ± width_factor · w`` (default 2.0: four face widths, the shoulders);
- vertically from ``y1 − top_factor · h`` (default 0.5: the hair above the face box) down to
  ``y1 + height_factor · h`` (default 7.5: a standing adult is about 7.5 heads tall, so the full body);

then clipped to the image. Without a face, or when the clipped box has no area, the whole image is used.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

CROP_FILL = 0.5  # grey outside the image


@dataclass(frozen=True)
class BodyCropRule:
    """Person region in face units (see the module docstring): half-width, height below the face top, hair margin."""

    width_factor: float = 2.0
    height_factor: float = 7.5
    top_factor: float = 0.5

    @classmethod
    def from_config(cls, identity: Any) -> "BodyCropRule":
        """The rule of an ``IdentityConfig`` (``body_width_factor``, ``body_height_factor``, ``body_top_factor``)."""
        return cls(width_factor=identity.body_width_factor, height_factor=identity.body_height_factor,
                   top_factor=identity.body_top_factor)

    def __post_init__(self) -> None:
        for name in ("width_factor", "height_factor"):
            if not getattr(self, name) > 0:
                raise ValueError(f"BodyCropRule.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.top_factor >= 0:
            raise ValueError(f"BodyCropRule.top_factor must be >= 0, got {self.top_factor!r}")


def person_box(
    image_size: tuple[int, int], face_box: np.ndarray | None, rule: BodyCropRule = BodyCropRule()
) -> tuple[int, int, int, int]:
    """Person region ``(left, top, right, bottom)`` in integer pixels (right/bottom exclusive, as ``PIL.crop``).

    ``image_size`` is ``(width, height)``; ``face_box`` is ``(x1, y1, x2, y2)`` floats or None (→ whole image).
    The box is grown outward to whole pixels, clipped to the image, and falls back to the whole image when empty.
    """
    width, height = _check_image_size(image_size)
    whole = (0, 0, width, height)
    if face_box is None:
        return whole
    x1, y1, x2, y2 = _check_face_box(face_box)
    w, h, cx = x2 - x1, y2 - y1, (x1 + x2) / 2.0
    left = max(0, int(np.floor(cx - rule.width_factor * w)))
    right = min(width, int(np.ceil(cx + rule.width_factor * w)))
    top = max(0, int(np.floor(y1 - rule.top_factor * h)))
    bottom = min(height, int(np.ceil(y1 + rule.height_factor * h)))
    if right <= left or bottom <= top:
        logger.debug("person box for face %s in %dx%d image is empty; using the whole image", face_box, width, height)
        return whole
    return left, top, right, bottom


def _check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    width, height = (int(v) for v in image_size)
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be a positive (width, height), got {image_size!r}")
    return width, height


def _check_face_box(face_box: np.ndarray) -> tuple[float, float, float, float]:
    box = np.asarray(face_box, dtype=np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise ValueError(f"face_box must be 4 finite numbers (x1, y1, x2, y2), got {face_box!r}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"face_box must have x2 >= x1 and y2 >= y1, got {face_box!r}")
    return x1, y1, x2, y2


def crop_square(pixels: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Resample square regions: ``pixels (B, 3, H, W)``, ``boxes (B, 4)`` x1, y1, x2, y2 in pixels (made square
    around their centre by their longer side) -> ``(B, 3, size, size)``; bilinear, differentiable w.r.t. ``pixels``;
    area outside the image is :data:`CROP_FILL` grey.

    Shrinking by a zoom factor ``z`` area-averages first (a ``z``-wide box blur, so small features survive), over the
    part of the image the crop reaches only; from :data:`PRE_SHRINK_ZOOM` on, that part is first averaged down by an
    integer factor, so the blur's cost stays that of ``size`` and the whole crop costs one read of its region, for a
    12-megapixel photo as for a thumbnail. Each sample is cut alone, so a crop does not depend on its batch."""
    if pixels.ndim != 4 or boxes.shape != (pixels.shape[0], 4):
        raise ValueError(
            f"crop_square: pixels (B, 3, H, W) and boxes (B, 4), got {tuple(pixels.shape)} {tuple(boxes.shape)}"
        )
    height, width = pixels.shape[-2:]
    boxes = boxes.to(pixels.device, torch.float32)
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(dim=1, keepdim=True).clamp(min=1.0) / 2
    steps = (torch.arange(size, device=pixels.device, dtype=torch.float32) + 0.5) / size * 2 - 1  # cell centres
    xs = centre[:, 0:1] + half * steps  # (B, size) pixel coordinates (pixel i spans [i, i + 1))
    ys = centre[:, 1:2] + half * steps
    outs = []
    for i, zoom in enumerate((half.flatten() * 2 / size).tolist()):
        outs.append(_crop_one(pixels[i:i + 1], xs[i], ys[i], zoom, height, width))
    return torch.cat(outs) + CROP_FILL


PRE_SHRINK_ZOOM = 8.0  # from this zoom on, crop_square averages the region down by int(zoom / 4) before the blur


def _blur_kernel(zoom: float) -> int:
    return int(zoom) | 1 if zoom > 1.5 else 1


def _crop_one(image: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor, zoom: float, height: int, width: int):
    """One :func:`crop_square` sample, minus :data:`CROP_FILL` (zero outside the image)."""
    kernel = _blur_kernel(zoom)
    reach = kernel // 2 + 2  # bilinear neighbours and their blur window
    x0, x1 = max(0, math.floor(xs[0]) - reach), min(width, math.ceil(xs[-1]) + reach)
    y0, y1 = max(0, math.floor(ys[0]) - reach), min(height, math.ceil(ys[-1]) + reach)
    if x0 >= x1 or y0 >= y1:  # wholly outside the image
        return image.new_zeros(1, image.shape[1], len(ys), len(xs), dtype=torch.float32)
    region = image[:, :, y0:y1, x0:x1].float() - CROP_FILL
    xs, ys = xs - x0, ys - y0
    if zoom >= PRE_SHRINK_ZOOM:
        factor = int(zoom / 4)
        region = F.avg_pool2d(region, factor, stride=factor, ceil_mode=True)  # edge cells average what they hold
        xs, ys, kernel = xs / factor, ys / factor, _blur_kernel(zoom / factor)
    if kernel > 1:
        region = F.avg_pool2d(region, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
    gx = xs / region.shape[-1] * 2 - 1  # align_corners=False units
    gy = ys / region.shape[-2] * 2 - 1
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
    return F.grid_sample(region, grid.to(region.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


# ------------------------------------------------------------------------------------------ landmark alignment

# insightface.utils.face_align.arcface_dst: where ArcFace expects the 5 landmarks in its 112 x 112 crop.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]], np.float32
)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama) mapping points ``src (N, 2)`` onto ``dst (N, 2)``: a (2, 3) matrix."""
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    cov = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_c.var(0).sum()
    matrix = np.zeros((2, 3), np.float32)
    matrix[:, :2] = scale * rotation
    matrix[:, 2] = dst_mean - scale * rotation @ src_mean
    return matrix


def warp_to_template(pixels: torch.Tensor, landmarks: torch.Tensor, size: int = 112) -> torch.Tensor:
    """Differentiable ArcFace alignment: ``pixels (B, 3, H, W)``, ``landmarks (B, 5, 2)`` → ``(B, 3, size, size)``."""
    batch, _, height, width = pixels.shape
    thetas = []
    template = ARCFACE_TEMPLATE * (size / 112.0)
    for points in landmarks.detach().cpu().numpy():
        forward = np.vstack([similarity_transform(points, template), [0, 0, 1]])
        inverse = np.linalg.inv(forward)  # output pixel -> input pixel
        # Normalised output coords (align_corners=False) -> output pixels -> input pixels -> normalised input coords.
        to_out = np.array([[size / 2, 0, size / 2 - 0.5], [0, size / 2, size / 2 - 0.5], [0, 0, 1]])
        to_in = np.array([[2 / width, 0, 1 / width - 1], [0, 2 / height, 1 / height - 1], [0, 0, 1]])
        thetas.append((to_in @ inverse @ to_out)[:2])
    theta = torch.tensor(np.stack(thetas), dtype=pixels.dtype, device=pixels.device)
    grid = F.affine_grid(theta, (batch, 3, size, size), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
