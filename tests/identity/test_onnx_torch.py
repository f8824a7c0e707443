"""OnnxModule against onnxruntime: exported tiny IResNet-like nets, single-op graphs built with onnx.helper,
gradients, unsupported ops, device/dtype moves and the recognizer loader."""

from __future__ import annotations

import io
import warnings
import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from dtback.identity.onnx_torch import (  # noqa: E402
    SUPPORTED_OPS,
    OnnxConversionError,
    OnnxModule,
    Recognizer,
    insightface_normalisation,
    load_recognizer,
)

TOL = 1e-4
INT64_MAX = 9_223_372_036_854_775_807  # what exporters write for "to the end"
EMBED = 64


# ------------------------------------------------------------------------------------------ tiny networks
class Block(nn.Module):
    """InsightFace's IBasicBlock: BN -> conv -> BN -> PReLU -> conv(stride) -> BN, plus a (downsampled) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin), nn.BatchNorm2d(cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False)
        self.prelu = nn.PReLU(cout)
        self.conv2, self.bn3 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + self.down(x)


class TinyIResNet(nn.Module):
    """(N, 3, 112, 112) -> (N, EMBED), shaped like arcface_torch's IResNet (flatten via torch.flatten -> Flatten)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
        self.layers = nn.Sequential(Block(width, width, 2), Block(width, 2 * width, 2), Block(2 * width, 2 * width, 2))
        self.bn2, self.dropout = nn.BatchNorm2d(2 * width), nn.Dropout(0.4)
        self.fc, self.features = nn.Linear(2 * width * 14 * 14, EMBED), nn.BatchNorm1d(EMBED)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn2(self.layers(self.stem(x)))
        return self.features(self.fc(self.dropout(torch.flatten(x, 1))))


class TinySENet(nn.Module):
    """Exercises what TinyIResNet does not: view-based flatten (Shape/Gather/Unsqueeze/Concat/Reshape), pooling,
    a squeeze-excitation gate (GlobalAveragePool, ReLU, Sigmoid, Mul), padding, LeakyReLU and a MatMul head."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.LeakyReLU(0.1), nn.MaxPool2d(3, 2, 1)
        )
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(width, 4, 1), nn.ReLU(), nn.Conv2d(4, width, 1), nn.Sigmoid()
        )
        self.grouped = nn.Conv2d(width, width, 3, 1, 2, dilation=2, groups=4)
        self.pool = nn.AvgPool2d(2, 2)
        self.head = nn.Parameter(torch.randn(width * 15 * 15, 32) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.grouped(x * self.se(x))
        x = self.pool(nn.functional.pad(x, (1, 1, 1, 1)))
        return x.view(x.size(0), -1) @ self.head


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine weights, then switch to eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
        if isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.rand(m.num_parameters, generator=g) * 0.5)
    return model.eval()


def export(model: nn.Module, output_name: str = "683", **kwargs) -> onnx.ModelProto:
    """Export with the TorchScript exporter, then rename the output: TorchScript refuses all-digit names such as
    glintr100's '683', which the real recognizers carry."""
    buffer = io.BytesIO()
    # The TorchScript exporter warns that it is deprecated, and about Slice steps it cannot fold; neither matters here.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(
            model, torch.zeros(1, 3, 112, 112), buffer, input_names=["input.1"], output_names=["embedding"],
            dynamic_axes={"input.1": {0: "batch"}}, dynamo=False, **kwargs,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    for node in proto.graph.node:
        node.output[:] = [output_name if o == "embedding" else o for o in node.output]
    proto.graph.output[0].name = output_name
    return proto


def run_ort(proto: onnx.ModelProto, *arrays: np.ndarray) -> np.ndarray:
    """The first output of ``proto`` run by onnxruntime on CPU."""
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, dict(zip(names, arrays)))[0]


def run_torch(proto: onnx.ModelProto, *arrays: np.ndarray) -> np.ndarray:
    """The output of ``proto`` run by OnnxModule."""
    with torch.no_grad():
        return OnnxModule(proto)(*[torch.from_numpy(a) for a in arrays]).numpy()


def faces(n: int = 3, seed: int = 1) -> np.ndarray:
    """A batch of normalised random 'faces' ``(n, 3, 112, 112)`` float32 in [-1, 1]."""
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, 112, 112)).astype(np.float32)


@pytest.fixture(scope="module")
def iresnet() -> tuple[nn.Module, onnx.ModelProto]:
    torch.manual_seed(0)
    model = randomise_batchnorm(TinyIResNet())
    return model, export(model)


# --------------------------------------------------------------------------------------------- exported nets
def test_exported_iresnet_matches_onnxruntime(iresnet):
    model, proto = iresnet
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "BatchNormalization", "PRelu", "Add", "Flatten", "Gemm"} <= ops
    x = faces(3)
    expected, got = run_ort(proto, x), run_torch(proto, x)
    assert got.shape == (3, EMBED)
    assert np.abs(got - expected).max() < TOL
    assert np.abs(expected).max() > 0.1  # the comparison is not between two near-zero outputs
    with torch.no_grad():
        assert np.abs(got - model(torch.from_numpy(x)).numpy()).max() < TOL


def test_exported_iresnet_batch_of_one_equals_row_of_batch(iresnet):
    _, proto = iresnet
    x = faces(3)
    assert np.abs(run_torch(proto, x[1:2])[0] - run_torch(proto, x)[1]).max() < TOL


def test_exported_net_with_shape_ops_pooling_and_unfolded_batchnorm(tmp_path):
    torch.manual_seed(1)
    proto = export(randomise_batchnorm(TinySENet(), seed=1), do_constant_folding=False)
    ops = {n.op_type for n in proto.graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape", "MaxPool", "AveragePool", "BatchNormalization",
            "GlobalAveragePool", "Sigmoid", "Pad", "MatMul", "LeakyRelu", "ConstantOfShape", "Slice",
            "Cast"} <= ops, ops
    x = faces(3, seed=2)
    expected, got = run_ort(proto, x), run_torch(proto, x)
    assert got.shape == (3, 32)
    assert np.abs(got - expected).max() < TOL


# ------------------------------------------------------------------------------------------------ gradients
def test_gradients_reach_input_and_match_torch_but_not_parameters(iresnet):
    model, proto = iresnet
    module = OnnxModule(proto)
    x = torch.from_numpy(faces(2)).requires_grad_(True)
    module(x).pow(2).sum().backward()
    reference = torch.from_numpy(faces(2)).requires_grad_(True)
    model(reference).pow(2).sum().backward()
    assert x.grad.abs().sum() > 0
    assert (x.grad - reference.grad).abs().max() < TOL * reference.grad.abs().max()
    params = list(module.parameters())
    assert len(params) >= 10
    assert all(not p.requires_grad and p.grad is None for p in params)


def test_requires_grad_true_makes_initializers_trainable(iresnet):
    _, proto = iresnet
    module = OnnxModule(proto).requires_grad_(True)
    module(torch.from_numpy(faces(1))).sum().backward()
    grads = [p.grad for p in module.parameters()]
    assert sum(g is not None and float(g.abs().sum()) > 0 for g in grads) >= 10


# ------------------------------------------------------------------------------------ single-op graphs
def single_op(op: str, inputs: dict[str, np.ndarray], inits: dict[str, np.ndarray] | None = None,
              opset: int = 17, n_outputs: int = 1, **attrs) -> onnx.ModelProto:
    """A model of one node: graph inputs ``inputs`` (float32 fed at run time), initializers ``inits``; inputs
    named '' are skipped optional inputs."""
    inits = inits or {}
    dtype = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
    graph_inputs = [helper.make_tensor_value_info(n, dtype[a.dtype], a.shape) for n, a in inputs.items()]
    outputs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op, [*inputs, *inits], outputs, name=f"{op.lower()}_node", **attrs)
    graph = helper.make_graph(
        [node], "single", graph_inputs, [onnx.ValueInfoProto(name=o) for o in outputs],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def assert_matches_ort(proto: onnx.ModelProto, *arrays: np.ndarray) -> np.ndarray:
    """OnnxModule equals onnxruntime on ``arrays``; returns the output."""
    expected, got = run_ort(proto, *arrays), run_torch(proto, *arrays)
    assert got.shape == expected.shape
    assert got.dtype == expected.dtype
    assert np.abs(got.astype(np.float64) - expected).max() < TOL
    return got


def rnd(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_alpha_beta_transposes(trans_a, trans_b):
    a = rnd(*((6, 4) if trans_a else (4, 6)), seed=1)
    b = rnd(*((5, 6) if trans_b else (6, 5)), seed=2)
    inits = {"b": b, "c": rnd(5, seed=3)}
    proto = single_op("Gemm", {"a": a}, inits, alpha=0.5, beta=2.0, transA=trans_a, transB=trans_b)
    got = assert_matches_ort(proto, a)
    a2, b2 = (a.T if trans_a else a), (b.T if trans_b else b)
    assert np.abs(got - (0.5 * a2 @ b2 + 2.0 * rnd(5, seed=3))).max() < TOL


def test_gemm_without_bias_transb_like_linear():
    x, w = rnd(3, 10), rnd(7, 10, seed=1)
    got = assert_matches_ort(single_op("Gemm", {"x": x}, {"w": w}, transB=1), x)
    assert np.abs(got - x @ w.T).max() < TOL


def test_prelu_channel_slope_c11():
    x, slope = rnd(2, 4, 5, 6), np.array([0.1, 0.2, -0.3, 2.0], np.float32).reshape(4, 1, 1)
    got = assert_matches_ort(single_op("PRelu", {"x": x}, {"slope": slope}), x)
    assert np.abs(got - np.where(x >= 0, x, x * slope)).max() < TOL
    assert (x < 0).any() and (x > 0).any()


def test_prelu_vector_slope_on_features():
    x, slope = rnd(3, 4), np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    got = assert_matches_ort(single_op("PRelu", {"x": x}, {"slope": slope}), x)
    assert np.abs(got - np.where(x >= 0, x, x * slope)).max() < TOL


def test_prelu_vector_slope_on_images_is_per_channel():
    # ONNX would align a (C,) slope with W; onnxruntime refuses W != C, converted models mean per channel.
    x, slope = rnd(2, 4, 5, 6), np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    got = run_torch(single_op("PRelu", {"x": x}, {"slope": slope}), x)
    expected = torch.nn.functional.prelu(torch.from_numpy(x), torch.from_numpy(slope)).numpy()
    assert np.abs(got - expected).max() < TOL


SINGLE_OPS = {
    "conv_groups_dilation_bias": ("Conv", {"x": rnd(2, 4, 9, 9)}, {"w": rnd(6, 2, 3, 3, seed=1), "b": rnd(6, seed=2)},
                                  dict(group=2, dilations=[2, 1], strides=[2, 1], pads=[1, 2, 1, 2])),
    "conv_asymmetric_pads": ("Conv", {"x": rnd(1, 3, 8, 8)}, {"w": rnd(4, 3, 3, 3, seed=1)}, dict(pads=[0, 1, 2, 0])),
    "conv_same_upper": ("Conv", {"x": rnd(1, 3, 7, 8)}, {"w": rnd(2, 3, 4, 4, seed=1)},
                        dict(auto_pad="SAME_UPPER", strides=[2, 2])),
    "conv_1d": ("Conv", {"x": rnd(2, 3, 10)}, {"w": rnd(5, 3, 3, seed=1)}, dict(pads=[1, 1])),
    "batchnorm_2d_input": ("BatchNormalization", {"x": rnd(4, 3)},
                           {"s": rnd(3, seed=1), "b": rnd(3, seed=2), "m": rnd(3, seed=3),
                            "v": np.array([0.5, 1.5, 2.0], np.float32)},
                           dict(epsilon=1e-3)),
    "relu": ("Relu", {"x": rnd(2, 5)}, {}, {}),
    "leaky_relu": ("LeakyRelu", {"x": rnd(2, 5)}, {}, dict(alpha=0.2)),
    "sigmoid": ("Sigmoid", {"x": rnd(2, 5)}, {}, {}),
    "tanh": ("Tanh", {"x": rnd(2, 5)}, {}, {}),
    "clip": ("Clip", {"x": rnd(2, 5)}, {"lo": np.array(-0.5, np.float32), "hi": np.array(0.7, np.float32)}, {}),
    "add_broadcast": ("Add", {"x": rnd(2, 3, 4)}, {"c": rnd(3, 1, seed=1)}, {}),
    "sub": ("Sub", {"x": rnd(2, 3)}, {"c": np.float32(127.5) * np.ones(3, np.float32)}, {}),
    "mul": ("Mul", {"x": rnd(2, 3)}, {"c": rnd(2, 1, seed=1)}, {}),
    "div": ("Div", {"x": rnd(2, 3)}, {"c": np.array(3.0, np.float32)}, {}),
    "matmul_batched": ("MatMul", {"x": rnd(2, 3, 4)}, {"w": rnd(4, 5, seed=1)}, {}),
    "flatten_axis2": ("Flatten", {"x": rnd(2, 3, 4, 5)}, {}, dict(axis=2)),
    "flatten_axis0": ("Flatten", {"x": rnd(2, 3, 4)}, {}, dict(axis=0)),
    "reshape_zero_and_minus_one": ("Reshape", {"x": rnd(2, 3, 4, 5)}, {"s": i64(0, -1, 5)}, {}),
    "identity": ("Identity", {"x": rnd(2, 3)}, {}, {}),
    "dropout": ("Dropout", {"x": rnd(2, 3)}, {}, {}),
    "global_average_pool": ("GlobalAveragePool", {"x": rnd(2, 3, 5, 7)}, {}, {}),
    "average_pool": ("AveragePool", {"x": rnd(1, 2, 7, 7)}, {},
                     dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "average_pool_count_pad": ("AveragePool", {"x": rnd(1, 2, 6, 6)}, {},
                               dict(kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1], count_include_pad=1)),
    "max_pool": ("MaxPool", {"x": rnd(1, 2, 8, 8)}, {}, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])),
    "max_pool_asymmetric_ceil": ("MaxPool", {"x": rnd(1, 2, 7, 7)}, {},
                                 dict(kernel_shape=[2, 2], strides=[2, 2], pads=[0, 0, 1, 1], ceil_mode=0)),
    "pad_constant": ("Pad", {"x": rnd(1, 2, 3, 4)}, {"p": i64(0, 0, 1, 2, 0, 0, 3, 0), "v": np.array(0.5, np.float32)},
                     dict(mode="constant")),
    "pad_reflect": ("Pad", {"x": rnd(1, 2, 4, 4)}, {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, dict(mode="reflect")),
    "transpose": ("Transpose", {"x": rnd(2, 3, 4)}, {}, dict(perm=[2, 0, 1])),
    "transpose_default": ("Transpose", {"x": rnd(2, 3, 4)}, {}, {}),
    "concat": ("Concat", {"x": rnd(2, 3)}, {"c": rnd(2, 4, seed=1)}, dict(axis=1)),
    "unsqueeze_input_axes": ("Unsqueeze", {"x": rnd(2, 3)}, {"a": i64(0, -1)}, {}),
    "squeeze_input_axes": ("Squeeze", {"x": rnd(2, 1, 3, 1)}, {"a": i64(1, -1)}, {}),
    "squeeze_all": ("Squeeze", {"x": rnd(2, 1, 3, 1)}, {}, {}),
    "slice": ("Slice", {"x": rnd(4, 6)},
              {"s": i64(1, -5), "e": i64(INT64_MAX, 5), "ax": i64(0, 1), "st": i64(1, 2)}, {}),
    "slice_negative_step": ("Slice", {"x": rnd(4, 6)},
                            {"s": i64(-1, 4), "e": i64(-INT64_MAX, 0), "ax": i64(0, 1), "st": i64(-1, -2)}, {}),
    "constant_of_shape": ("ConstantOfShape", {"s": i64(2, 3)}, {},
                          dict(value=numpy_helper.from_array(np.array([1.5], np.float32)))),
    "gather_scalar_index": ("Gather", {"x": rnd(3, 4)}, {"i": np.array(-1, np.int64)}, dict(axis=1)),
    "gather_matrix_index": ("Gather", {"x": rnd(5, 4)}, {"i": i64(0, 4, 2, 2).reshape(2, 2)}, dict(axis=0)),
    "cast_to_double": ("Cast", {"x": rnd(2, 3)}, {}, dict(to=TensorProto.DOUBLE)),
}


@pytest.mark.parametrize("case", sorted(SINGLE_OPS))
def test_single_op_matches_onnxruntime(case):
    op, inputs, inits, attrs = SINGLE_OPS[case]
    assert_matches_ort(single_op(op, inputs, inits, **attrs), *inputs.values())


@pytest.mark.parametrize("op, x, attrs, shape", [
    ("Unsqueeze", rnd(2, 3), dict(axes=[0, 3]), (1, 2, 3, 1)),
    ("Squeeze", rnd(1, 3, 1), dict(axes=[0]), (3, 1)),
])
def test_opset11_axes_attribute_form(op, x, attrs, shape):
    got = assert_matches_ort(single_op(op, {"x": x}, opset=11, **attrs), x)
    assert got.shape == shape


def test_constant_shape_gather_graph_reshapes_like_flatten():
    # Shape -> Gather(0) -> Unsqueeze -> Concat(-1) -> Reshape, the subgraph of x.view(x.size(0), -1).
    nodes = [
        helper.make_node("Constant", [], ["minus1"], value=numpy_helper.from_array(i64(-1))),
        helper.make_node("Constant", [], ["zero"], value_int=0),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "flatten", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(i64(0), "axes0")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    x = rnd(3, 2, 3, 4)
    got = assert_matches_ort(proto, x)
    assert got.shape == (3, 24)
    assert np.abs(got - x.reshape(3, 24)).max() == 0


# ---------------------------------------------------------------------------------------------------- errors
def test_unsupported_op_names_op_node_and_file(tmp_path):
    proto = single_op("Hardmax", {"x": rnd(2, 3)})
    path = tmp_path / "bad.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ValueError) as info:
        OnnxModule.from_file(path)
    message = str(info.value)
    assert "'Hardmax'" in message and "hardmax_node" in message and str(path) in message
    assert isinstance(info.value, OnnxConversionError)
    assert "Hardmax" not in SUPPORTED_OPS and {"Conv", "PRelu", "Gemm", "Constant"} <= set(SUPPORTED_OPS)


def test_unnamed_node_and_dangling_input_are_located():
    constant = helper.make_node("Constant", [], ["k"], value_float=2.0)
    graph = helper.make_graph(
        [constant, helper.make_node("Hardmax", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [onnx.ValueInfoProto(name="y")],
    )
    with pytest.raises(OnnxConversionError, match=r"node '#1'.*'Hardmax'"):
        OnnxModule(helper.make_model(graph))
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [onnx.ValueInfoProto(name="y")],
    )
    with pytest.raises(OnnxConversionError, match=r"node 'adder' \(Add\) reads \['ghost'\]"):
        OnnxModule(helper.make_model(graph))


def test_custom_domain_op_is_refused_with_its_domain():
    node = helper.make_node("Relu", ["x"], ["y"], name="custom", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    with pytest.raises(OnnxConversionError, match=r"'com\.microsoft\.Relu'.*"):
        OnnxModule(helper.make_model(graph))


def test_runtime_failure_names_node_and_input_shapes():
    proto = single_op("Gemm", {"a": rnd(4, 6)}, {"b": rnd(5, 5)})
    module = OnnxModule(proto)
    with pytest.raises(OnnxConversionError, match=r"gemm_node.*\(Gemm\).*\[\(4, 6\), \(5, 5\)\]"):
        module(torch.zeros(4, 6))
    with pytest.raises(ValueError, match="expected 1 inputs"):
        module()


# ---------------------------------------------------------------------------------------- movement and I/O
def test_io_names_and_shapes(iresnet):
    _, proto = iresnet
    module = OnnxModule(proto)
    assert (module.input_name, module.output_name) == ("input.1", "683")
    assert module.input_shape == ("batch", 3, 112, 112)
    assert module.input_names == ("input.1",) and module.output_names == ("683",)


def test_to_double_casts_floats_keeps_integers_and_agrees(iresnet):
    _, proto = iresnet
    module = OnnxModule(proto)
    x = torch.from_numpy(faces(2))
    with torch.no_grad():
        single = module(x)
        module.to(torch.float64)
        double = module(x.double())
    assert double.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert (double - single.double()).abs().max() < TOL
    int_buffers = [b for b in module.buffers() if not b.is_floating_point()]
    assert all(b.dtype == torch.int64 for b in int_buffers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(iresnet):
    _, proto = iresnet
    x = torch.from_numpy(faces(2))
    with torch.no_grad():
        cpu = OnnxModule(proto)(x)
        gpu = OnnxModule(proto).to("cuda")(x.cuda())
    assert (gpu.cpu() - cpu).abs().max() < 1e-3


def test_state_dict_round_trip(iresnet):
    _, proto = iresnet
    a, b = OnnxModule(proto), OnnxModule(proto)
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(0.5)
        b.load_state_dict(a.state_dict())
        x = torch.from_numpy(faces(1))
        assert (a(x) - b(x)).abs().max() == 0


# ---------------------------------------------------------------------------------------------- recognizer
def test_load_recognizer_embeds_pixels_like_onnxruntime(iresnet, tmp_path):
    _, proto = iresnet
    path = tmp_path / "glintr100.onnx"
    onnx.save(proto, str(path))
    recognizer = load_recognizer(path)
    assert isinstance(recognizer, Recognizer) and not recognizer.training
    assert (recognizer.input_mean, recognizer.input_std) == (127.5, 127.5)
    pixels = np.random.default_rng(3).integers(0, 256, (3, 3, 112, 112)).astype(np.float32)
    expected = run_ort(proto, (pixels - 127.5) / 127.5)
    got = recognizer.embed(torch.from_numpy(pixels).requires_grad_(True))
    assert got.requires_grad
    assert np.abs(got.detach().numpy() - expected).max() < TOL


def test_mxnet_style_graph_takes_raw_pixels():
    nodes = [
        helper.make_node("Sub", ["data", "mean"], ["c"], name="_minus0"),
        helper.make_node("Mul", ["c", "scale"], ["d"], name="_mulscalar0"),
        helper.make_node("GlobalAveragePool", ["d"], ["e"], name="pool"),
        helper.make_node("Flatten", ["e"], ["fc1"], name="flat"),
    ]
    graph = helper.make_graph(
        nodes, "mx", [helper.make_tensor_value_info("data", TensorProto.FLOAT, [None, 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.float32(127.5), "mean"), numpy_helper.from_array(np.float32(0.0078125), "scale")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert insightface_normalisation(proto) == (0.0, 1.0)
    recognizer = Recognizer(proto)
    pixels = torch.full((1, 3, 112, 112), 255.0)
    assert recognizer.input_shape == (None, 3, 112, 112)
    assert torch.allclose(recognizer.embed(pixels), torch.full((1, 3), 127.5 * 0.0078125))


def test_load_recognizer_refuses_missing_file_and_wrong_channels(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        load_recognizer(tmp_path / "nowhere.onnx")
    with pytest.raises(OnnxConversionError, match=r"\(N, 3, H, W\).*\(1, 1, 112, 112\)"):
        Recognizer(single_op("Relu", {"x": rnd(1, 1, 112, 112)}))
