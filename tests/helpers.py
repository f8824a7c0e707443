"""Test helpers: image writers, tiny dataset trees and the path of the real-photo fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PEOPLE = REPO.parent / "shared" / "data" / "people"


def write_image(path: Path, size=(64, 48), color=(200, 30, 30), fmt: str = "PNG", mode: str = "RGB", **save) -> Path:
    """Write a solid image of ``size`` (width, height) in ``fmt``, whatever the extension of ``path`` says."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt, **save)
    return path


def write_noise(path: Path, size=(64, 64), fmt: str = "JPEG", seed: int = 0) -> Path:
    """An image with real entropy, so that truncating the file loses pixel data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_dataset(root: Path, layout: dict[str, dict[str, int]], size=(64, 80)) -> Path:
    """``layout`` = {bundle: {character: n_images}}; images get distinct colours."""
    for b, (bundle, chars) in enumerate(layout.items()):
        for c, (char, n) in enumerate(chars.items()):
            for i in range(n):
                write_image(root / bundle / char / f"{i:03d}.png", size=size, color=(40 * b % 256, 30 * c % 256, 20 * i % 256))
    return root


# ---------------------------------------------------------------------------------- tiny InsightFace-style ONNX packs

MAGENTA = (255, 0, 255)


def export_tiny_insightface_pack(folder: Path) -> Path:
    """Write a tiny model pack with the real SCRFD / ArcFace ONNX signatures (names and shapes of buffalo_l's
    det_10g.onnx and w600k_r50.onnx), so the insightface backend runs end to end without any download.

    The detector is not random: it "sees" a face wherever a stride-16 cell is magenta, with a box of +-1.5 cells
    around the cell centre and five landmarks at fixed offsets. The recognizer is a small random CNN -> 64-d.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class TinySCRFD(nn.Module):
        # 9 outputs: scores (N*2, 1), boxes (N*2, 4), landmarks (N*2, 10) for strides 8, 16, 32; 2 anchors per cell.
        kps = torch.tensor([[-0.6, -0.4, 0.6, -0.4, 0.0, 0.1, -0.5, 0.7, 0.5, 0.7]])

        def forward(self, x):
            scores, boxes, points = [], [], []
            for stride in (8, 16, 32):
                cell = F.avg_pool2d(x, stride)  # (1, 3, h, w), input normalised to about [-1, 1], RGB
                magenta = (cell[:, 0] + cell[:, 2]) / 2 - cell[:, 1]  # ~2 for magenta, <= 1 otherwise
                logit = 12.0 * (magenta - 1.5) if stride == 16 else magenta * 0.0 - 20.0
                score = torch.sigmoid(logit).reshape(-1, 1).repeat_interleave(2, dim=0)
                ones = torch.ones_like(score)
                scores.append(score)
                boxes.append(ones.expand(-1, 4) * 1.5)
                points.append(ones * self.kps)
            return (*scores, *boxes, *points)

    class TinyArcFace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.act = nn.PReLU(8)
            self.conv2 = nn.Conv2d(8, 16, 3, stride=4, padding=1)
            self.fc = nn.Linear(16 * 14 * 14, 64)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv2(self.act(self.bn(self.conv1(x)))), 1))

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    # TorchScript refuses numeric names, so export with placeholders and rename to the real ones afterwards.
    real_det = ["448", "471", "494", "451", "474", "497", "454", "477", "500"]
    det_outputs = [f"out{i}" for i in range(9)]
    torch.onnx.export(
        TinySCRFD().eval(), (torch.zeros(1, 3, 160, 160),), str(folder / "det_10g.onnx"),
        input_names=["input.1"], output_names=det_outputs,
        dynamic_axes={"input.1": {2: "height", 3: "width"}, **{n: {0: "anchors"} for n in det_outputs}},
        dynamo=False,
    )
    _rename_outputs(folder / "det_10g.onnx", dict(zip(det_outputs, real_det)))
    torch.onnx.export(
        TinyArcFace().eval(), (torch.zeros(1, 3, 112, 112),), str(folder / "w600k_r50.onnx"),
        input_names=["input.1"], output_names=["embedding"],
        dynamic_axes={"input.1": {0: "batch"}, "embedding": {0: "batch"}}, dynamo=False,
    )
    _rename_outputs(folder / "w600k_r50.onnx", {"embedding": "683"})
    return folder


def _rename_outputs(path: Path, names: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for node in model.graph.node:
        for i, name in enumerate(node.output):
            node.output[i] = names.get(name, name)
        for i, name in enumerate(node.input):
            node.input[i] = names.get(name, name)
    for output in model.graph.output:
        output.name = names.get(output.name, output.name)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def face_scene(size=(320, 240), square=(128, 64, 48), background=(120, 120, 120)):
    """A grey RGB image (H, W, 3) uint8 with a magenta square (x, y, side) that the tiny detector reads as a face."""
    import numpy as np

    image = np.full((size[1], size[0], 3), background, dtype=np.uint8)
    x, y, side = square
    image[y : y + side, x : x + side] = MAGENTA
    return image


# ------------------------------------------------------------------------------------------ tiny DINOv2 body backbone

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)
SIZE = 32
PATCH = 8
HIDDEN = 32


def save_tiny_dinov2(folder: Path, hidden: int = HIDDEN, layers: int = 2, processor: bool = True) -> Path:
    """A random DINOv2 (patch 8, 32 px) and a BitImageProcessor config with non-ImageNet mean/std."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, mlp_ratio=2, patch_size=PATCH,
        image_size=SIZE,
    )
    Dinov2Model(config).save_pretrained(folder)
    if processor:
        BitImageProcessor(
            size={"shortest_edge": SIZE + 8}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True,
            image_mean=list(MEAN), image_std=list(STD),
        ).save_pretrained(folder)
    return folder


def kill_when_half_done(script: str, *args: str) -> int:
    """Run ``python -c script *args``, wait for it to print ``half`` (its work half done), SIGKILL it; its return code."""
    import signal
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    try:
        assert child.stdout.readline() == "half\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    return child.returncode
