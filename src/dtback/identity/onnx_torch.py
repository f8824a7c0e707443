"""Run an ONNX graph with torch ops, so that an ArcFace recognizer is differentiable with respect to its input.

The identity loss needs gradients through an InsightFace recognizer (``glintr100.onnx``, ``w600k_r50.onnx``:
``(N, 3, 112, 112)`` RGB in, ``(N, 512)`` embedding out). onnxruntime gives no gradients and ``onnx2torch``
imports torchvision, which pins a torch build, so :class:`OnnxModule` interprets the graph itself: every
initializer becomes a frozen parameter (floating point) or a buffer (integers), and ``forward`` executes the
nodes in order through a table of torch functions (``_OPS``). Anything outside that table is refused when the
model is loaded, not halfway through training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from dtback.errors import OnnxConversionError

Value = torch.Tensor | None
OpResult = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class _Node:
    """One graph node, ready to run; ``drop_after`` lists values no later node reads (freed to save memory)."""

    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict
    drop_after: tuple[str, ...]


# --------------------------------------------------------------------------------------------- small helpers
def _ints(t: torch.Tensor) -> list[int]:
    """An integer tensor of any shape (a shape, axes, pads) as a flat Python list."""
    return [int(v) for v in t.reshape(-1).tolist()]


def _opt(inputs: list[Value], i: int) -> Value:
    """Input ``i`` if present; ONNX marks a skipped optional input with an empty name (read here as None)."""
    return inputs[i] if i < len(inputs) else None


def _axes(inputs: list[Value], attrs: dict, i: int) -> list[int] | None:
    """Axes from input ``i`` (opset >= 13) or from the ``axes`` attribute (older opsets); None when absent."""
    t = _opt(inputs, i)
    if t is not None:
        return _ints(t)
    return list(attrs["axes"]) if "axes" in attrs else None


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX pads (all begins, then all ends; first axis first) -> ``F.pad`` order (last axis first, pairs)."""
    return [v for b, e in reversed(list(zip(begins, ends))) for v in (b, e)]


def _spatial_pads(
    attrs: dict, size: tuple[int, ...], kernel: list[int], strides: list[int], dilations: list[int]
) -> list[int]:
    """Explicit pads ``[begin..., end...]`` of a Conv/pool node, resolving ``auto_pad`` SAME_UPPER/SAME_LOWER/VALID."""
    rank, auto_pad = len(kernel), attrs.get("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        return list(attrs.get("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        return [0] * 2 * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise ValueError(f"auto_pad {auto_pad!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    begins, ends = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        total = max((math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n, 0)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _pad_symmetric(x: torch.Tensor, pads: list[int], value: float) -> tuple[torch.Tensor, list[int]]:
    """Return ``(x, per-axis padding)`` for torch's symmetric ``padding=``; asymmetric pads are applied to x here."""
    rank = len(pads) // 2
    begins, ends = pads[:rank], pads[rank:]
    if begins == ends:
        return x, begins
    return F.pad(x, _torch_pad(begins, ends), value=value), [0] * rank


def _window(attrs: dict, x: torch.Tensor, kernel: list[int]) -> tuple[list[int], list[int], list[int]]:
    """``(strides, dilations, pads)`` of a Conv/pool node over the spatial axes of x ``(N, C, *spatial)``."""
    rank = len(kernel)
    strides = list(attrs.get("strides", [1] * rank))
    dilations = list(attrs.get("dilations", [1] * rank))
    return strides, dilations, _spatial_pads(attrs, tuple(x.shape[2:]), kernel, strides, dilations)


# ---------------------------------------------------------------------------------------------------- ops
# Each op takes (inputs, attrs) and returns a tensor, or a tuple matched to the node's outputs in order.
def _conv(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Conv: x ``(N, C, *S)``, w ``(M, C/group, *K)``, optional bias ``(M,)`` -> ``(N, M, *S')``; 1-3 spatial axes."""
    x, w, b = inputs[0], inputs[1], _opt(inputs, 2)
    strides, dilations, pads = _window(attrs, x, list(w.shape[2:]))
    x, padding = _pad_symmetric(x, pads, 0.0)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
    return conv(x, w, b, strides, padding, dilations, attrs.get("group", 1))


def _batch_norm(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """BatchNormalization with running statistics (inference): x ``(N, C, ...)``; scale, bias, mean, var ``(C,)``."""
    if attrs.get("training_mode", 0):
        raise ValueError("training_mode=1 is not supported: export the model in eval mode")
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    if not (mean.requires_grad or var.requires_grad):
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    # F.batch_norm refuses gradients into the statistics, which are ordinary initializers once unfrozen.
    per_channel = (-1, *[1] * (x.dim() - 2))
    factor = (scale / torch.sqrt(var + eps)).reshape(per_channel)
    return (x - mean.reshape(per_channel)) * factor + bias.reshape(per_channel)


def _prelu(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """PRelu: ONNX broadcasting of the slope (``(C, 1, 1)``, scalar, ...); a ``(C,)`` slope that does not broadcast
    against x ``(N, C, H, W)`` is read per channel, as ``nn.PReLU`` and converted mxnet models mean it."""
    x, slope = inputs[0], inputs[1]
    if not _broadcasts_to(slope.shape, x.shape):
        if x.dim() < 2 or slope.numel() != x.shape[1]:
            raise ValueError(f"slope of shape {tuple(slope.shape)} fits neither x {tuple(x.shape)} nor its channels")
        slope = slope.reshape(-1, *[1] * (x.dim() - 2))
    return torch.where(x >= 0, x, x * slope)


def _broadcasts_to(small: torch.Size, big: torch.Size) -> bool:
    """Whether ``small`` broadcasts to ``big`` without changing it (ONNX unidirectional broadcasting)."""
    if len(small) > len(big):
        return False
    return all(s in (1, b) for s, b in zip(reversed(small), reversed(big)))


def _gemm(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Gemm: ``alpha * A' @ B' + beta * C`` with A' = A or A.T (transA), B' = B or B.T (transB); 2-D A and B."""
    a, b, c = inputs[0], inputs[1], _opt(inputs, 2)
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    return y if c is None else y + attrs.get("beta", 1.0) * c


def _flatten(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Flatten: x ``(d0, ..., dn)`` -> ``(d0*...*d(axis-1), d(axis)*...*dn)``; axis default 1, may be negative."""
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Reshape: a 0 in the shape copies x's size on that axis (unless allowzero=1), a -1 is inferred."""
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _pool_kernel(attrs: dict) -> list[int]:
    """The ``kernel_shape`` attribute of a pooling node, which ONNX requires."""
    if "kernel_shape" not in attrs:
        raise ValueError("pooling node has no kernel_shape attribute")
    return list(attrs["kernel_shape"])


def _average_pool(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """AveragePool over 1-3 spatial axes; pads must be symmetric (torch's ``padding=`` semantics)."""
    x, kernel = inputs[0], _pool_kernel(attrs)
    strides, dilations, pads = _window(attrs, x, kernel)
    if any(d != 1 for d in dilations):
        raise ValueError(f"dilations {dilations} are not supported by AveragePool")
    if pads[: len(kernel)] != pads[len(kernel):]:
        raise ValueError(f"asymmetric pads {pads} are not supported by AveragePool")
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(kernel)]
    ceil_mode, count_include_pad = bool(attrs.get("ceil_mode", 0)), bool(attrs.get("count_include_pad", 0))
    return pool(x, kernel, strides, pads[: len(kernel)], ceil_mode, count_include_pad)


def _max_pool(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """MaxPool over 1-3 spatial axes (dilations, ceil_mode; asymmetric pads are filled with -inf first)."""
    x, kernel = inputs[0], _pool_kernel(attrs)
    strides, dilations, pads = _window(attrs, x, kernel)
    x, padding = _pad_symmetric(x, pads, float("-inf"))
    pool = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}[len(kernel)]
    return pool(x, kernel, strides, padding, dilations, bool(attrs.get("ceil_mode", 0)))


def _pad(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Pad (constant, reflect, edge, wrap): pads from input 1 (opset >= 11) or the attribute; optional axes input."""
    x = inputs[0]
    pads = _ints(inputs[1]) if _opt(inputs, 1) is not None else list(attrs["pads"])
    value_t = _opt(inputs, 2)
    value = float(value_t.reshape(-1)[0]) if value_t is not None and value_t.numel() else attrs.get("value", 0.0)
    axes = [a % x.dim() for a in _ints(inputs[3])] if _opt(inputs, 3) is not None else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[len(axes) + i]
    torch_pads = _torch_pad(begins, ends)
    while torch_pads and torch_pads[-2:] == [0, 0]:  # leading axes without padding (torch wants them left out)
        torch_pads = torch_pads[:-2]
    mode = attrs.get("mode", "constant")
    torch_mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if torch_mode is None:
        raise ValueError(f"Pad mode {mode!r} is not one of constant, reflect, edge, wrap")
    return F.pad(x, torch_pads, mode=torch_mode, value=value if torch_mode == "constant" else None)


def _div(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Div: true division for floats, truncating division for integers (as ONNX does)."""
    a, b = inputs[0], inputs[1]
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _shape(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Shape: the int64 shape of x, optionally sliced by ``start``/``end`` (opset >= 15)."""
    x = inputs[0]
    dims = x.shape[attrs.get("start", 0): attrs.get("end", x.dim())]
    return torch.tensor(list(dims), dtype=torch.int64, device=x.device)


def _gather(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Gather: result shape ``data.shape[:axis] + indices.shape + data.shape[axis+1:]``; negative indices wrap."""
    data, indices = inputs[0], inputs[1].to(device=inputs[0].device, dtype=torch.int64)
    axis = attrs.get("axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))


def _unsqueeze(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Unsqueeze: insert size-1 axes; axes count in the output's rank and may be negative."""
    x, axes = inputs[0], _axes(inputs, attrs, 1)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _squeeze(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Squeeze: drop the given size-1 axes, or all size-1 axes when none are given."""
    x, axes = inputs[0], _axes(inputs, attrs, 1)
    return x.squeeze() if axes is None else x.squeeze(tuple(a % x.dim() for a in axes))


def _slice(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Slice: starts/ends/axes/steps from inputs (opset >= 10) or attributes (older); clamped like Python slices,
    negative steps included (PyTorch exports of ``F.pad`` reverse the pads with step -1)."""
    x = inputs[0]
    if len(inputs) > 1:
        starts, ends = _ints(inputs[1]), _ints(inputs[2])
        axes = _ints(inputs[3]) if _opt(inputs, 3) is not None else list(range(len(starts)))
        steps = _ints(inputs[4]) if _opt(inputs, 4) is not None else [1] * len(starts)
    else:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = list(attrs.get("axes", range(len(starts)))), [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= x.dim()
        first, stop, step = slice(start, end, step).indices(x.shape[axis])
        if step > 0:
            x = x[(slice(None),) * axis + (slice(first, stop, step),)]
        else:  # torch tensors do not take negative slice steps
            x = x.index_select(axis, torch.arange(first, stop, step, device=x.device))
    return x


def _constant_of_shape(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """ConstantOfShape: a tensor of the shape in input 0, filled with the one-element ``value`` (default float 0)."""
    value = np.asarray(attrs.get("value", np.zeros(1, np.float32))).reshape(-1)
    dtype = torch.from_numpy(value[:0].copy()).dtype
    return torch.full(_ints(inputs[0]), value[0].item(), dtype=dtype, device=inputs[0].device)


def _clip(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Clip: bounds from inputs 1 and 2 (opset >= 11) or the ``min``/``max`` attributes (older)."""
    low, high = _opt(inputs, 1), _opt(inputs, 2)
    low = float(low) if low is not None else attrs.get("min")
    high = float(high) if high is not None else attrs.get("max")
    return torch.clamp(inputs[0], low, high)


def _cast(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """Cast to the ONNX element type in ``to``."""
    np_dtype = helper.tensor_dtype_to_np_dtype(attrs["to"])
    return inputs[0].to(torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype)


def _global_average_pool(inputs: list[Value], attrs: dict) -> torch.Tensor:
    """GlobalAveragePool: x ``(N, C, *S)`` -> ``(N, C, 1, ...)``."""
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _dropout(inputs: list[Value], attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Dropout at inference: x unchanged, and an all-true mask for a node that asks for one."""
    return inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)


_OPS: dict[str, Callable[[list[Value], dict], OpResult]] = {
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "PRelu": _prelu,
    "Relu": lambda i, a: F.relu(i[0]),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
    "Tanh": lambda i, a: torch.tanh(i[0]),
    "Clip": _clip,
    "Add": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "Div": _div,
    "Flatten": _flatten,
    "Reshape": _reshape,
    "Gemm": _gemm,
    "MatMul": lambda i, a: torch.matmul(i[0], i[1]),
    "Identity": lambda i, a: i[0],
    "Dropout": _dropout,
    "GlobalAveragePool": _global_average_pool,
    "AveragePool": _average_pool,
    "MaxPool": _max_pool,
    "Pad": _pad,
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(reversed(range(i[0].dim()))))),
    "Concat": lambda i, a: torch.cat([t for t in i if t is not None], dim=a["axis"]),
    "Shape": _shape,
    "Gather": _gather,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Slice": _slice,
    "Cast": _cast,
    "ConstantOfShape": _constant_of_shape,
}
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted([*_OPS, "Constant"]))


# -------------------------------------------------------------------------------------------- graph reading
def _attributes(node: onnx.NodeProto) -> dict:
    """Node attributes as Python values: strings decoded, tensors as numpy arrays."""
    attrs = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        attrs[attr.name] = value
    return attrs


def _constant_value(attrs: dict, where: str) -> np.ndarray:
    """The value of a Constant node from whichever ``value*`` attribute it carries."""
    if "value" in attrs:
        return np.asarray(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                       ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    raise OnnxConversionError(
        f"{where}: Constant has none of value, value_float(s), value_int(s) (got attributes {sorted(attrs)})"
    )


def _node_label(node: onnx.NodeProto, index: int) -> str:
    """A node's name, or its position when the exporter left the name empty."""
    return node.name or f"#{index}"


def _dims(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...]:
    """Declared shape of a graph input: ints where fixed, the symbolic name (e.g. 'batch') or None where not."""
    dims = value_info.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims)


def _last_uses(nodes: list[onnx.NodeProto], keep: set[str]) -> list[tuple[str, ...]]:
    """For each node, the node outputs that no later node reads and that are not graph outputs (``keep``)."""
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in [*node.input, *node.output]:
            last[name] = i
    produced = {name for node in nodes for name in node.output}
    drops: list[list[str]] = [[] for _ in nodes]
    for name, i in last.items():
        if name in produced and name not in keep and name:
            drops[i].append(name)
    return [tuple(d) for d in drops]


class OnnxModule(nn.Module):
    """An ONNX graph run with torch ops; differentiable with respect to its inputs.

    Floating-point initializers become parameters with ``requires_grad=False`` (call ``requires_grad_(True)`` to
    train them), integer ones become buffers, so ``.to(device, dtype)`` moves everything. ``input_names``,
    ``input_shapes`` (ints, or symbolic names such as ``'batch'``) and ``output_names`` describe the graph.
    ``train()``/``eval()`` change nothing: BatchNormalization always uses its running statistics and Dropout is the
    identity, as in the exported inference graph.
    """

    def __init__(self, model: onnx.ModelProto, source: str = "<in-memory ONNX model>"):
        super().__init__()
        self.source = source
        self._keys: dict[str, str] = {}  # ONNX tensor name -> attribute name on this module
        graph = model.graph
        for tensor in graph.initializer:
            self._store(tensor.name, numpy_helper.to_array(tensor))
        inputs = [v for v in graph.input if v.name not in self._keys]
        self.input_names = tuple(v.name for v in inputs)
        self.input_shapes = tuple(_dims(v) for v in inputs)
        self.output_names = tuple(v.name for v in graph.output)
        self._nodes = self._prepare_nodes(list(graph.node))

    @classmethod
    def from_file(cls, path: str | Path) -> "OnnxModule":
        """Load ``path`` (external data next to it is read too) and build the module."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ONNX model file not found")
        return cls(onnx.load(str(path)), source=str(path))

    @property
    def input_name(self) -> str:
        """Name of the graph's first input (the image, for a recognizer)."""
        return self.input_names[0]

    @property
    def input_shape(self) -> tuple[int | str | None, ...]:
        """Declared shape of the first input, e.g. ``(None, 3, 112, 112)`` or ``('batch', 3, 112, 112)``."""
        return self.input_shapes[0]

    @property
    def output_name(self) -> str:
        """Name of the graph's first output (the embedding, for a recognizer)."""
        return self.output_names[0]

    def _store(self, onnx_name: str, array: np.ndarray) -> None:
        """Register one constant tensor: floating point as a frozen parameter, anything else as a buffer."""
        key = f"c{len(self._keys)}_" + re.sub(r"\W", "_", onnx_name)
        tensor = torch.from_numpy(np.array(array, copy=True))
        if tensor.is_floating_point():
            self.register_parameter(key, nn.Parameter(tensor, requires_grad=False))
        else:
            self.register_buffer(key, tensor)
        self._keys[onnx_name] = key

    def _prepare_nodes(self, nodes: list[onnx.NodeProto]) -> list[_Node]:
        """Check every op and input once, fold Constant nodes into buffers, and plan when values can be freed."""
        known = set(self._keys) | set(self.input_names) | {""}
        runnable: list[tuple[onnx.NodeProto, str]] = []
        for index, node in enumerate(nodes):
            label = _node_label(node, index)
            where = f"{self.source}: node '{label}'"
            op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            if op != "Constant" and op not in _OPS:
                raise OnnxConversionError(
                    f"{where}: op type '{op}' is not supported by OnnxModule (supported: {', '.join(SUPPORTED_OPS)})"
                )
            missing = [name for name in node.input if name not in known]
            if missing:
                raise OnnxConversionError(f"{where} ({op}) reads {missing}, which no earlier node or initializer makes")
            known.update(node.output)
            if op == "Constant":
                self._store(node.output[0], _constant_value(_attributes(node), where))
            else:
                runnable.append((node, label))
        drops = _last_uses([n for n, _ in runnable], set(self.output_names))
        return [
            _Node(n.op_type, label, tuple(n.input), tuple(n.output), _attributes(n), d)
            for (n, label), d in zip(runnable, drops)
        ]

    def forward(self, *inputs: torch.Tensor) -> OpResult:
        """Run the graph: one tensor per graph input, in ``input_names`` order (a recognizer: x ``(N, 3, 112, 112)``).

        Returns the single output (a recognizer: ``(N, 512)``), or a tuple in ``output_names`` order.
        """
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"{self.source}: expected {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}"
            )
        env: dict[str, Value] = {name: getattr(self, key) for name, key in self._keys.items()}
        env.update(zip(self.input_names, inputs))
        env[""] = None
        for node in self._nodes:
            self._run_node(node, env)
        outputs = tuple(env[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def _run_node(self, node: _Node, env: dict[str, Value]) -> None:
        """Execute one node on ``env`` (ONNX name -> tensor), store its outputs, free values no one reads again."""
        args = [env[name] for name in node.inputs]
        try:
            result = _OPS[node.op_type](args, node.attrs)
        except torch.cuda.OutOfMemoryError:
            raise  # callers catch this one by type (to retry with a smaller batch); wrapping would hide it
        except (ValueError, RuntimeError, TypeError, IndexError, KeyError) as err:
            shapes = [None if a is None else tuple(a.shape) for a in args]
            raise OnnxConversionError(
                f"{self.source}: node '{node.name}' ({node.op_type}) failed on inputs {shapes}: {err}"
            ) from err
        results = (result,) if isinstance(result, torch.Tensor) else result
        env.update(zip(node.outputs, results))
        for name in node.drop_after:
            env.pop(name, None)


class Recognizer(OnnxModule):
    """An InsightFace ArcFace recognizer: RGB faces ``(N, 3, 112, 112)`` -> embeddings ``(N, 512)``.

    ``input_mean``/``input_std`` are what the graph expects subtracted and divided from 0-255 pixels: 127.5/127.5
    for PyTorch-trained models (glintr100, w600k_r50); 0/1 for mxnet exports that normalise inside the graph.
    """

    def __init__(self, model: onnx.ModelProto, source: str = "<in-memory ONNX model>"):
        super().__init__(model, source)
        if len(self.input_names) != 1 or len(self.output_names) != 1:
            raise OnnxConversionError(
                f"{source}: a recognizer has one input and one output "
                f"(got inputs {self.input_names}, outputs {self.output_names})"
            )
        shape = self.input_shape
        if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
            raise OnnxConversionError(f"{source}: input '{self.input_name}' should be (N, 3, H, W) (got {shape})")
        self.input_mean, self.input_std = insightface_normalisation(model)

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed aligned RGB faces ``(N, 3, 112, 112)`` with values 0-255 -> ``(N, 512)`` (not L2-normalised)."""
        return self((pixels - self.input_mean) / self.input_std)


def insightface_normalisation(model: onnx.ModelProto) -> tuple[float, float]:
    """``(mean, std)`` of the input, by InsightFace's own rule (``ArcFaceONNX``): mxnet exports start with Sub and
    Mul nodes (named ``Sub*``/``_minus*`` and ``Mul*``/``_mul*``) that normalise inside the graph, so they take raw
    pixels."""
    names = [node.name for node in model.graph.node[:8]]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return (0.0, 1.0) if has_sub and has_mul else (127.5, 127.5)


def load_recognizer(path: str | Path) -> Recognizer:
    """Load an ArcFace ``.onnx`` recognizer as a frozen, eval-mode torch module that passes gradients to its input."""
    module = Recognizer.from_file(path)
    return module.eval().requires_grad_(False)
