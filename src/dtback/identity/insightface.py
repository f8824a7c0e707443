"""The ``insightface`` face backend: SCRFD detection + ArcFace recognition ONNX models from a local model pack folder
(antelopev2, buffalo_l), run by onnxruntime, behind :class:`~dtback.identity.face.FaceEncoder`. The weights are
non-commercial; they are never downloaded at run time. Its differentiable path is the ONNX recognizer converted to
torch (:mod:`dtback.identity.onnx_torch`).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from dtback.errors import ConfigError
from dtback.identity.crops import warp_to_template
from dtback.identity.face import Face, FaceChoice, FaceEncoder, _as_rgb_array, file_digest, l2_normalise

INSIGHTFACE_DOWNLOAD_HINT = (
    "put an InsightFace model pack there (antelopev2: scrfd_10g_bnkps.onnx + glintr100.onnx, or buffalo_l: "
    "det_10g.onnx + w600k_r50.onnx; unzip the pack from the insightface releases; non-commercial licence), "
    "or use identity.face_backend=dlib, which needs no download"
)


def onnx_providers(device: str) -> list[str]:
    """onnxruntime execution providers for a torch-style device string; CUDA only when that build is installed."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def find_pack_models(model_dir: Path) -> tuple[Path, Path]:
    """(detection, recognition) ONNX files of an InsightFace pack folder, told apart by their signatures:
    SCRFD detectors have 6/9/10/15 outputs; ArcFace recognizers take (N, 3, 112, 112) and give one output."""
    import onnx

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"identity.face_model_dir {model_dir} does not exist: {INSIGHTFACE_DOWNLOAD_HINT}")
    detection, recognition = [], []
    for path in sorted(model_dir.glob("*.onnx")):
        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except (OSError, ValueError) as err:
            raise ConfigError(f"{path}: not a readable ONNX model ({err})") from None
        initializers = {init.name for init in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        dims = [d.dim_value or d.dim_param for d in inputs[0].type.tensor_type.shape.dim] if inputs else []
        if len(graph.output) in (6, 9, 10, 15):
            detection.append(path)
        elif len(graph.output) == 1 and dims[1:] == [3, 112, 112]:
            recognition.append(path)
    if len(detection) != 1 or len(recognition) != 1:
        raise ConfigError(
            f"identity.face_model_dir {model_dir}: expected one SCRFD detection and one ArcFace recognition ONNX "
            f"model, found detection {[p.name for p in detection]}, recognition {[p.name for p in recognition]}; "
            + INSIGHTFACE_DOWNLOAD_HINT
        )
    return detection[0], recognition[0]


class InsightFaceEncoder(FaceEncoder):
    """InsightFace: SCRFD detector + ArcFace recognizer (512-d) from a local pack folder, run by onnxruntime.

    Uses the ``insightface`` package's model classes on explicit file paths, so nothing is downloaded.
    """

    aligned_size = 112

    def __init__(
        self,
        model_dir: Path,
        det_size: int = 640,
        det_threshold: float = 0.5,
        device: str = "cpu",
        choice: FaceChoice = "largest",
    ):
        super().__init__(choice)
        import onnxruntime
        from insightface.model_zoo.arcface_onnx import ArcFaceONNX
        from insightface.model_zoo.scrfd import SCRFD

        self.model_dir = Path(model_dir)
        self.det_path, self.rec_path = find_pack_models(self.model_dir)
        self.det_size = det_size
        self.det_threshold = det_threshold
        providers = onnx_providers(device)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.detector = SCRFD(
            model_file=str(self.det_path),
            session=onnxruntime.InferenceSession(str(self.det_path), options, providers=providers),
        )
        self.detector.prepare(0, input_size=(det_size, det_size), det_thresh=det_threshold)
        self.recognizer = ArcFaceONNX(
            model_file=str(self.rec_path),
            session=onnxruntime.InferenceSession(str(self.rec_path), options, providers=providers),
        )
        self.embedding_dim = int(self.recognizer.output_shape[-1])
        self._torch = None  # the differentiable recognizer, converted on first use

    @cached_property
    def encoder_id(self) -> str:
        return f"insightface:{self.det_path.name}:{file_digest(self.det_path)}:{self.rec_path.name}:{file_digest(self.rec_path)}"

    def settings(self) -> dict[str, Any]:
        return {"det_size": self.det_size, "det_threshold": self.det_threshold, "choice": self.choice}

    def detect(self, image: np.ndarray) -> list[Face]:
        bgr = np.ascontiguousarray(_as_rgb_array(image)[:, :, ::-1])  # insightface works in OpenCV's BGR
        boxes, landmarks = self.detector.detect(bgr, input_size=(self.det_size, self.det_size))
        faces = []
        for i, det in enumerate(boxes):
            points = landmarks[i] if landmarks is not None else np.zeros((5, 2), np.float32)
            faces.append(Face(box=det[:4].astype(np.float32), landmarks=points.astype(np.float32), score=float(det[4])))
        return faces

    def align(self, image: np.ndarray, face: Face) -> np.ndarray:
        from insightface.utils import face_align

        return face_align.norm_crop(_as_rgb_array(image), landmark=face.landmarks, image_size=self.aligned_size)

    def torch_recognizer(self):
        """The recognition model as a differentiable torch module (:class:`~dtback.identity.onnx_torch.Recognizer`):
        ``embed(pixels (N, 3, 112, 112) RGB 0..255)`` gives the same (unnormalised) embedding as onnxruntime."""
        from dtback.identity.onnx_torch import load_recognizer

        return load_recognizer(self.rec_path)

    differentiable = True

    def embed_pixels(self, pixels: torch.Tensor, face_boxes: torch.Tensor, landmarks: torch.Tensor) -> torch.Tensor:
        """ArcFace on the torch copy of the ONNX recognizer, after a similarity warp of the 5 landmarks onto its
        112 px template (:func:`~dtback.identity.crops.warp_to_template`)."""
        if self._torch is None:
            self._torch = self.torch_recognizer().requires_grad_(False)
        self._torch.to(pixels.device)
        aligned = warp_to_template(pixels, landmarks.to(pixels.device), self.aligned_size)
        return self._torch.embed(aligned * 255.0)

    def embed(self, aligned: Sequence[np.ndarray]) -> np.ndarray:
        if not len(aligned):
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        # get_feat expects BGR crops and swaps them to the RGB order the recognizer was trained on.
        crops = [np.ascontiguousarray(_as_rgb_array(crop)[:, :, ::-1]) for crop in aligned]
        return l2_normalise(self.recognizer.get_feat(crops))
