"""dlib's face recognition ResNet in torch: read ``dlib_face_recognition_resnet_model_v1.dat`` into an ``nn.Module``
that gives the 128-d descriptor dlib gives, with gradients, plus dlib's face chip cut as a differentiable warp.

**The network** (dlib's ``dnn_face_recognition_ex.cpp``, ``anet_type``), input 150 x 150 RGB, bottom to top::

    con 32 7x7 /2 -> affine -> relu -> max_pool 3x3 /2
    3 x res(32) | res_down(64), 3 x res(64) | res_down(128), 2 x res(128) | res_down(256), 2 x res(256)
    | res_down(256) -> avg_pool over everything -> fc 128 (no bias) -> loss_metric

    res(N)      = relu(x + affine(con3x3(relu(affine(con3x3(x))))))
    res_down(N) = relu(avg_pool2x2/2(x) + affine(con3x3(relu(affine(con3x3/2(x))))))

``affine`` is batch norm folded into a per-channel scale and shift. A stride-2 convolution has no padding, a
stride-1 one pads 1 (dlib's defaults). When the two branches of a sum differ in channels or size (32 -> 64
channels; 4 x 4 pooled against 3 x 3 convolved at 256), dlib's ``add_prev`` sums them into the larger shape with
the missing entries zero: the shortcut's extra channels are zeros, the smaller map sits at the top left.
Pixels enter as ``(value - channel mean) / 256`` with the means the file stores (122.782, 117.001, 104.298).

**The file format** (dlib's ``serialize``; read by :func:`read_dlib_resnet`, nothing else is used):

- integer: a control byte (low 4 bits: how many bytes follow; bit 7: negative), then that many little-endian bytes;
- float/double: two integers, mantissa and 16-bit exponent (value = mantissa * 2^exponent; exponents 32000/32001/
  32002 mean +inf, -inf, nan); bool: one byte ``'1'`` or ``'0'``; string: integer length, then the bytes;
- tensor: integer version 2, integers num_samples, k, nr, nc, then that many float32 little-endian values;
  alias tensor (a view into a layer's params): version 1 and its four sizes;
- the network nests from the top: the loss layer writes version 1, its details (``loss_metric_2``: margin, distance
  threshold) and then its subnetwork. Every ``add_layer`` writes its version (2; 3 for the one on the input) and
  *first its subnetwork*, then its details and state (3 bools, tensors x_grad / cached_output / params_grad, plus
  the sample expansion factor at version 3). Tags and skips write version 1 and their subnetwork only. So the file
  holds every version from the top down, the input layer (``input_rgb_image_sized``: 3 channel means, 150, 150),
  then each layer's details from the bottom up:

  - ``con_4``: params tensor (filters then biases), num_filters, nr, nc, stride y/x, padding y/x, filters and
    biases alias tensors, 4 learning-rate / weight-decay multipliers; filters are (out, in, nr, nc) like torch's;
  - ``affine_``: params tensor (gamma then beta), gamma and beta alias tensors, mode (0: per channel);
  - ``relu_``, ``add_prev_``: the name only; ``max_pool_2`` / ``avg_pool_2``: nr, nc, stride y/x, padding y/x
    (nr = nc = 0: the whole map);
  - ``fc_2``: num_outputs, num_inputs, params, weights alias (num_inputs, num_outputs), biases alias, bias mode
    (1: none), 4 multipliers.

**Licence.** The model file is Davis King's, trained by him for dlib. dlib-models' README (github.com/davisking/
dlib-models, read in a stored copy on 2026-11-26) says of all its model files: "anyone can do whatever they want with
these model files as I've released them into the public domain". The ``face_recognition_models`` package that ships
the file declares the MIT licence in its metadata, and its README notes that the recognition model was trained on
datasets under Creative Commons licences (public domain release of the weights; the training images' terms are
theirs). The 68-point predictor, not used here, is trained on iBUG 300-W, whose terms exclude commercial use.
Nothing here is InsightFace's.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dtback.errors import ConfigError, DtbackError
from dtback.identity.crops import similarity_transform

CHIP_SIZE = 150
CHIP_PADDING = 0.25
DESCRIPTOR_DIM = 128
MODEL_FILE = "dlib_face_recognition_resnet_model_v1.dat"

# (output channels, stride) of the residual blocks, bottom up (alevel4 ... alevel0).
BLOCKS = ((32, 1),) * 3 + ((64, 2),) + ((64, 1),) * 3 + ((128, 2),) + ((128, 1),) * 2 + ((256, 2),) + \
    ((256, 1),) * 2 + ((256, 2),)


class DlibModelError(DtbackError, ValueError):
    """The dlib network file is not the face recognition ResNet this module reads (named in the message)."""


# ------------------------------------------------------------------------------------------ dlib's serialization
class _Reader:
    """Reads dlib's ``serialize`` encoding from the bytes of ``path``; every error names the file and offset."""

    SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}

    def __init__(self, path: Path):
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def fail(self, what: str) -> DlibModelError:
        return DlibModelError(f"{self.path}: {what} at byte {self.pos}; expected dlib's face recognition ResNet "
                              f"({MODEL_FILE} of the face_recognition_models package)")

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise self.fail(f"the file ends early (wanted {count} more bytes)")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def int(self) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        if size > 8:
            raise self.fail(f"an integer of {size} bytes")
        value = int.from_bytes(self.take(size), "little")
        return -value if control & 0x80 else value

    def float(self) -> float:
        mantissa, exponent = self.int(), self.int()
        if exponent in self.SPECIAL_EXPONENTS:
            return self.SPECIAL_EXPONENTS[exponent]
        return math.ldexp(mantissa, exponent)

    def bool(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            raise self.fail(f"a bool byte {byte!r}")
        return byte == b"1"

    def string(self) -> str:
        return self.take(self.int()).decode("latin-1")

    def expect_int(self, expected: int, what: str) -> None:
        start, value = self.pos, self.int()
        if value != expected:
            self.pos = start
            raise self.fail(f"{what} {value} (expected {expected})")

    def expect_name(self, *names: str) -> str:
        start, name = self.pos, self.string()
        if name not in names:
            self.pos = start
            raise self.fail(f"layer {name[:40]!r} where {' or '.join(names)} belongs")
        return name

    def tensor(self) -> np.ndarray:
        self.expect_int(2, "tensor version")
        shape = tuple(self.int() for _ in range(4))
        count = int(np.prod(shape))
        return np.frombuffer(self.take(4 * count), dtype="<f4").reshape(shape).astype(np.float32)

    def alias(self) -> tuple[int, int, int, int]:
        self.expect_int(1, "alias tensor version")
        return tuple(self.int() for _ in range(4))


@dataclass
class _Layer:
    """One computational layer read from the file: its kind, hyperparameters and weights (None for relu etc.)."""

    kind: str
    sizes: tuple[int, ...] = ()  # con: stride y/x, padding y/x; pools: nr, nc, stride y/x, padding y/x
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


def _architecture() -> list[tuple[str, str]]:
    """``anet_type`` from the top down, as (what, layer): what is ``layer`` (an add_layer) or ``tag`` / ``skip``."""
    layers = [("layer", "fc"), ("layer", "avg_pool")]
    for _, stride in reversed(BLOCKS):
        block = [("layer", "affine"), ("layer", "con"), ("layer", "relu"), ("layer", "affine"), ("layer", "con")]
        if stride == 1:
            layers += [("layer", "relu"), ("layer", "add_prev"), *block, ("tag", "1")]
        else:
            layers += [("layer", "relu"), ("layer", "add_prev"), ("layer", "avg_pool"), ("skip", "1"), ("tag", "2"),
                       *block, ("tag", "1")]
    return layers + [("layer", "max_pool"), ("layer", "relu"), ("layer", "affine"), ("layer", "con")]


def _read_details(reader: _Reader, kind: str) -> _Layer:
    """One add_layer's details (see the module docstring for each layer's fields)."""
    if kind == "con":
        reader.expect_name("con_4")
        params = reader.tensor().reshape(-1)
        filters, rows, cols = reader.int(), reader.int(), reader.int()
        stride_y, stride_x, pad_y, pad_x = (reader.int() for _ in range(4))
        weight_shape, _bias_shape = reader.alias(), reader.alias()
        for _ in range(4):  # learning rate and weight decay multipliers: training only
            reader.float()
        count = int(np.prod(weight_shape))
        if weight_shape[0] != filters or weight_shape[2:] != (rows, cols) or params.size != count + filters:
            raise reader.fail(f"a con_4 layer whose filters {weight_shape} do not fit {filters} x {rows} x {cols} "
                              f"in {params.size} params")
        return _Layer("con", (stride_y, stride_x, pad_y, pad_x), params[:count].reshape(weight_shape),
                      params[count:])
    if kind == "affine":
        reader.expect_name("affine_")
        params = reader.tensor().reshape(-1)
        gamma, beta, mode = reader.alias(), reader.alias(), reader.int()
        channels = int(np.prod(gamma))
        if mode != 0 or int(np.prod(beta)) != channels or params.size != 2 * channels:
            raise reader.fail(f"an affine_ layer of mode {mode} with gamma {gamma}, beta {beta}")
        return _Layer("affine", (), params[:channels], params[channels:])
    if kind in ("relu", "add_prev"):
        reader.expect_name(f"{kind}_")
        return _Layer(kind)
    if kind in ("max_pool", "avg_pool"):
        reader.expect_name(f"{kind}_2")
        return _Layer(kind, tuple(reader.int() for _ in range(6)))
    if kind == "fc":
        reader.expect_name("fc_2")
        outputs, inputs = reader.int(), reader.int()
        params = reader.tensor().reshape(-1)
        weights, _biases, bias_mode = reader.alias(), reader.alias(), reader.int()
        for _ in range(4):
            reader.float()
        if bias_mode != 1 or weights[:2] != (inputs, outputs) or params.size != inputs * outputs:
            raise reader.fail(f"an fc_2 layer with weights {weights}, bias mode {bias_mode} (expected fc_no_bias)")
        return _Layer("fc", (inputs, outputs), params.reshape(inputs, outputs))
    raise AssertionError(kind)


def _skip_layer_state(reader: _Reader, version: int) -> None:
    """What add_layer writes after its details: 3 bools and 3 tensors (plus the sample expansion at version 3)."""
    for _ in range(3):
        reader.bool()
    for _ in range(3):
        reader.tensor()
    if version == 3:
        reader.int()


@dataclass(frozen=True)
class DlibResNetWeights:
    """What the file holds: the input's channel means and the layers bottom up (con, affine, relu, pools, fc)."""

    channel_means: tuple[float, float, float]
    input_size: tuple[int, int]
    layers: tuple[_Layer, ...]


def read_dlib_resnet(path: str | Path) -> DlibResNetWeights:
    """Parse dlib's serialized face recognition network (the module docstring has the format)."""
    reader = _Reader(Path(path))
    reader.expect_int(1, "loss layer version")
    reader.expect_name("loss_metric_2")
    reader.float(), reader.float()  # margin and distance threshold: training only
    architecture = _architecture()
    versions = []
    for index, (what, _) in enumerate(architecture):
        expected = 1 if what != "layer" else 3 if index == len(architecture) - 1 else 2
        reader.expect_int(expected, f"version of {what} {index} from the top")
        versions.append(expected)
    reader.expect_name("input_rgb_image_sized")
    means = (reader.float(), reader.float(), reader.float())
    size = (reader.int(), reader.int())
    layers = []
    for (what, kind), version in zip(reversed(architecture), reversed(versions)):
        if what != "layer":
            continue
        layers.append(_read_details(reader, kind))
        _skip_layer_state(reader, version)
    if reader.pos != len(reader.data):
        raise reader.fail(f"{len(reader.data) - reader.pos} bytes after the network")
    return DlibResNetWeights(means, size, tuple(layers))


# ------------------------------------------------------------------------------------------------ the torch network
class Affine(nn.Module):
    """dlib's ``affine`` (batch norm folded at the end of training): ``x * scale[c] + shift[c]``."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("scale", torch.ones(channels))
        self.register_buffer("shift", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale[:, None, None] + self.shift[:, None, None]


def _padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum in the larger of the two shapes, missing channels / rows / columns as zero."""
    shape = [max(x, y) for x, y in zip(a.shape[1:], b.shape[1:])]

    def grow(t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[1:]
        return F.pad(t, (0, shape[2] - w, 0, shape[1] - h, 0, shape[0] - c)) if [c, h, w] != shape else t

    return grow(a) + grow(b)


class ResidualBlock(nn.Module):
    """``res`` / ``res_down`` of the module docstring: two 3x3 convolutions with affine; a stride-2 block adds the
    2x2 average-pooled input instead of the input itself."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=0 if stride > 1 else 1)
        self.affine1 = Affine(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, padding=1)
        self.affine2 = Affine(cout)
        self.downsample = stride > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        shortcut = F.avg_pool2d(x, 2, 2) if self.downsample else x
        return F.relu(_padded_add(y, shortcut))


class DlibResNet(nn.Module):
    """dlib's face recognition ResNet: aligned chips ``(B, 3, 150, 150)`` RGB in 0..255 (as ``dlib.get_face_chip``
    makes them) -> ``(B, 128)`` descriptors, unnormalised, the values dlib's ``compute_face_descriptor`` gives."""

    def __init__(self, channel_means: tuple[float, float, float] = (122.782, 117.001, 104.298)):
        super().__init__()
        self.register_buffer("channel_means", torch.tensor(channel_means, dtype=torch.float32))
        self.stem_conv = nn.Conv2d(3, 32, 7, 2, padding=0)
        self.stem_affine = Affine(32)
        self.pool = (3, 2, 0)  # max pool window, stride, padding: replaced by the file's
        cins = [32] + [cout for cout, _ in BLOCKS[:-1]]
        self.blocks = nn.ModuleList(ResidualBlock(cin, cout, stride) for cin, (cout, stride) in zip(cins, BLOCKS))
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)

    def forward(self, chips: torch.Tensor) -> torch.Tensor:
        if chips.ndim != 4 or tuple(chips.shape[1:]) != (3, CHIP_SIZE, CHIP_SIZE):
            raise ValueError(f"DlibResNet takes (B, 3, {CHIP_SIZE}, {CHIP_SIZE}) RGB chips, got {tuple(chips.shape)}")
        x = (chips.to(self.channel_means.dtype) - self.channel_means[:, None, None]) / 256.0
        x = F.relu(self.stem_affine(self.stem_conv(x)))
        window, stride, padding = self.pool
        x = F.max_pool2d(x, window, stride, padding)
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))

    @classmethod
    def from_weights(cls, weights: DlibResNetWeights, source: str = "<weights>") -> "DlibResNet":
        """The network with the parsed layers; a layer whose kind or shape differs from ``anet_type`` is refused."""
        net = cls(weights.channel_means)
        layers = iter(weights.layers)

        def take(kind: str) -> _Layer:
            layer = next(layers)
            if layer.kind != kind:
                raise DlibModelError(f"{source}: found a {layer.kind} layer where {kind} belongs")
            return layer

        def load_conv(conv: nn.Conv2d) -> None:
            layer = take("con")
            geometry = (*conv.stride, *conv.padding)
            if layer.weight.shape != tuple(conv.weight.shape) or layer.sizes != geometry:
                raise DlibModelError(f"{source}: convolution {layer.weight.shape} stride/padding {layer.sizes}, "
                                     f"expected {tuple(conv.weight.shape)} {geometry}")
            conv.weight.data.copy_(torch.from_numpy(layer.weight))
            conv.bias.data.copy_(torch.from_numpy(layer.bias))

        def load_affine(affine: Affine) -> None:
            layer = take("affine")
            if layer.weight.shape != tuple(affine.scale.shape):
                raise DlibModelError(f"{source}: affine of {layer.weight.shape} where {tuple(affine.scale.shape)} fits")
            affine.scale.copy_(torch.from_numpy(layer.weight))
            affine.shift.copy_(torch.from_numpy(layer.bias))

        if weights.input_size != (CHIP_SIZE, CHIP_SIZE):
            raise DlibModelError(f"{source}: input size {weights.input_size}, expected {CHIP_SIZE} x {CHIP_SIZE}")
        load_conv(net.stem_conv)
        load_affine(net.stem_affine)
        take("relu")
        rows, cols, stride_y, stride_x, pad_y, pad_x = take("max_pool").sizes
        if rows != cols or stride_y != stride_x or pad_y != pad_x:
            raise DlibModelError(f"{source}: a non-square max pool {rows}x{cols}/{stride_y}x{stride_x}")
        net.pool = (rows, stride_y, pad_y)
        for block in net.blocks:
            load_conv(block.conv1)
            load_affine(block.affine1)
            take("relu")
            load_conv(block.conv2)
            load_affine(block.affine2)
            if block.downsample and take("avg_pool").sizes != (2, 2, 2, 2, 0, 0):
                raise DlibModelError(f"{source}: a residual shortcut that is not a 2x2/2 average pool")
            take("add_prev")
            take("relu")
        if take("avg_pool").sizes[:2] != (0, 0):
            raise DlibModelError(f"{source}: the last pool is not an average over the whole map")
        fc = take("fc")
        if fc.weight.shape != (256, DESCRIPTOR_DIM):
            raise DlibModelError(f"{source}: fc of {fc.weight.shape}, expected (256, {DESCRIPTOR_DIM})")
        net.fc.weight.data.copy_(torch.from_numpy(fc.weight.T.copy()))
        return net.eval().requires_grad_(False)


def dlib_models_dir() -> Path:
    """The model folder of the ``face_recognition_models`` package, found without importing it (its ``__init__``
    imports ``pkg_resources``, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "identity.face_backend=dlib needs the dlib models: pip install dlib-bin face-recognition-models"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "models"
    if not folder.is_dir():
        raise ConfigError(f"face_recognition_models is installed but has no model folder at {folder}")
    return folder


def load_dlib_resnet(path: str | Path | None = None) -> DlibResNet:
    """The torch network of ``path`` (default: the ``face_recognition_models`` package's model file)."""
    if path is None:
        path = dlib_models_dir() / MODEL_FILE
    return DlibResNet.from_weights(read_dlib_resnet(path), str(path))


# ----------------------------------------------------------------------------------- dlib's face chip, in torch
# dlib's get_face_chip_details: where the 5 landmarks (outer/inner corner of one eye, of the other, nose base) sit in
# a chip of side 1 without padding.
CHIP_TEMPLATE = np.array([[0.8595674595992, 0.2134981538014], [0.6460604764104, 0.2289674387677],
                          [0.1205750620789, 0.2137274526848], [0.3340850613712, 0.2290642403242],
                          [0.4901123135679, 0.6277975316475]])


def chip_transform(landmarks: np.ndarray, size: int = CHIP_SIZE, padding: float = CHIP_PADDING) -> np.ndarray:
    """(2, 3) matrix taking chip pixel ``(column, row, 1)`` to image pixel ``(x, y)`` as ``dlib.get_face_chip``
    cuts: the least-squares similarity of the padded template onto the 5 ``landmarks (5, 2)``, applied to the chip
    pixel's centre (column + 0.5, row + 0.5). Against dlib's chips this differs by under 1.5 grey levels on
    average, most of it dlib rounding down to uint8."""
    points = np.asarray(landmarks, dtype=np.float64).reshape(5, 2)
    template = (padding + CHIP_TEMPLATE) / (2 * padding + 1) * size
    matrix = similarity_transform(template, points).astype(np.float64)
    matrix[:, 2] += matrix[:, :2] @ np.array([0.5, 0.5])
    return matrix


def cut_face_chips(pixels: torch.Tensor, landmarks: torch.Tensor, size: int = CHIP_SIZE,
                   padding: float = CHIP_PADDING) -> torch.Tensor:
    """Differentiable ``dlib.get_face_chip``: ``pixels (B, 3, H, W)`` and dlib 5-point ``landmarks (B, 5, 2)`` in
    pixels -> chips ``(B, 3, size, size)`` in the units of ``pixels``, bilinear, zero outside the image.

    Where the chip shrinks the face by more than 2 (dlib samples an image pyramid there), the source is first
    blurred by a box of about the shrink factor, so the chip keeps the face's detail rather than aliasing."""
    if pixels.ndim != 4 or landmarks.shape != (pixels.shape[0], 5, 2):
        raise ValueError(f"cut_face_chips: pixels (B, 3, H, W) and landmarks (B, 5, 2), got {tuple(pixels.shape)} "
                         f"{tuple(landmarks.shape)}")
    batch, _, height, width = pixels.shape
    matrices = [chip_transform(points, size, padding) for points in landmarks.detach().cpu().double().numpy()]
    steps = (torch.arange(size, device=pixels.device, dtype=torch.float64))
    rows, cols = torch.meshgrid(steps, steps, indexing="ij")
    chip_points = torch.stack([cols, rows, torch.ones_like(cols)], dim=-1)  # (size, size, 3)
    outs = []
    for i, matrix in enumerate(matrices):
        image_points = chip_points @ torch.from_numpy(matrix).to(chip_points).T  # (size, size, 2) x, y
        # pixel centres are whole numbers; align_corners=True puts -1 / +1 on the first / last centre
        grid = torch.stack([image_points[..., 0] / max(width - 1, 1), image_points[..., 1] / max(height - 1, 1)],
                           dim=-1) * 2 - 1
        sample = pixels[i:i + 1]
        shrink = float(np.hypot(*matrix[:, 0]))
        if shrink > 2:
            kernel = int(round(shrink)) | 1
            sample = F.avg_pool2d(sample, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        outs.append(F.grid_sample(sample, grid[None].to(sample.dtype), mode="bilinear", padding_mode="zeros",
                                  align_corners=True))
    return torch.cat(outs) if outs else pixels.new_zeros((0, pixels.shape[1], size, size))
