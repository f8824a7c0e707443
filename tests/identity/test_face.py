"""Face encoders: dlib on real photos (identity separation), insightface end to end on a tiny test pack."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest

from dtback.data.images import load_rgb
from dtback.errors import ConfigError
from dtback.identity.face import DlibFaceEncoder, Face, choose_face, dlib_models_dir
from dtback.identity.insightface import InsightFaceEncoder, find_pack_models
from helpers import export_tiny_insightface_pack, face_scene


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive pair scores above a random negative one (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).mean()
    ties = (pos[:, None] == neg[None, :]).mean()
    return float(greater + 0.5 * ties)


def rgb(path: Path) -> np.ndarray:
    return np.asarray(load_rgb(path, 10**8))


@pytest.fixture(scope="module")
def dlib_encoder() -> DlibFaceEncoder:
    return DlibFaceEncoder()


# ------------------------------------------------------------------------------------------------------------ dlib


def test_dlib_models_are_found_without_importing_pkg_resources():
    code = (
        "import sys; from dtback.identity.face import dlib_models_dir; d = dlib_models_dir(); "
        "print(sorted(p.name for p in d.iterdir())); "
        "assert 'face_recognition_models' not in sys.modules and 'pkg_resources' not in sys.modules"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "dlib_face_recognition_resnet_model_v1.dat" in result.stdout
    assert dlib_models_dir().is_dir()


@pytest.mark.slow
def test_dlib_separates_identities_on_real_photos(people_dir, dlib_encoder):
    """krasserm_lfw: 10 people x 10 photos. Same-person vs different-person cosine similarity, ROC AUC >= 0.98."""
    files = sorted((people_dir / "krasserm_lfw").glob("*/*"))
    assert len(files) == 100
    embeddings, labels = [], []
    for path in files:
        result = dlib_encoder.encode(rgb(path))
        assert result is not None, f"no face found in {path}"
        embeddings.append(result.embedding)
        labels.append(path.parent.name)
    matrix = np.stack(embeddings)
    assert matrix.shape == (100, 128)
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, atol=1e-5)
    upper = np.triu_indices(100, 1)
    same = (np.array(labels)[:, None] == np.array(labels)[None, :])[upper]
    auc = roc_auc((matrix @ matrix.T)[upper], same)
    assert auc >= 0.98, f"AUC {auc:.4f}: detection or alignment is broken"


def test_dlib_on_grayscale_crops_and_full_bodies(people_dir, dlib_encoder):
    faces = [dlib_encoder.encode(rgb(p)) for p in sorted((people_dir / "faceapi_bbt").glob("*/*"))]
    assert len(faces) == 40
    assert sum(f is not None for f in faces) >= 38  # tight 150 px grayscale crops
    bodies = [dlib_encoder.encode(rgb(p)) for p in sorted((people_dir / "reid_market").glob("*/*"))]
    assert len(bodies) == 6 and all(b is None for b in bodies)  # 64x128 pedestrians: no detectable face


def test_dlib_result_fields(people_dir, dlib_encoder):
    image = rgb(next((people_dir / "krasserm_lfw" / "Tony_Blair").iterdir()))
    result = dlib_encoder.encode(image)
    x1, y1, x2, y2 = result.face.box
    assert 0 <= x1 < x2 <= image.shape[1] and 0 <= y1 < y2 <= image.shape[0]
    assert result.face.landmarks.shape == (5, 2)
    assert all(x1 - 10 <= x <= x2 + 10 and y1 - 10 <= y <= y2 + 10 for x, y in result.face.landmarks)
    assert result.aligned.shape == (150, 150, 3) and result.aligned.dtype == np.uint8
    assert result.num_faces == 1
    again = dlib_encoder.embed([result.aligned])[0]
    np.testing.assert_allclose(again, result.embedding, atol=1e-6)


def test_dlib_no_face_is_none_not_a_crash(dlib_encoder):
    noise = np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    assert dlib_encoder.encode(noise) is None
    with pytest.raises(ValueError, match="expected an \\(H, W, 3\\) uint8 RGB image"):
        dlib_encoder.encode(np.zeros((10, 10), dtype=np.uint8))


def test_dlib_refine_places_the_landmarks_again_from_a_coarse_box(dlib_encoder):
    """A face found on a smaller copy comes with a box off by a HOG cell and landmarks off by the copy's pixels:
    refine keeps the box and score and places the landmarks on the picture itself, as detection there does."""
    import skimage.data

    image = skimage.data.astronaut()
    face = dlib_encoder.detect(image)[0]
    coarse = Face(box=face.box + np.float32([6, -5, 6, -5]), landmarks=face.landmarks + 3, score=face.score)
    refined = dlib_encoder.refine(image, coarse)
    assert refined.score == face.score and np.array_equal(refined.box, coarse.box)
    assert refined.landmarks.shape == (5, 2) and np.abs(refined.landmarks - face.landmarks).max() <= 2


# ----------------------------------------------------------------------------------------------------- insightface


@pytest.fixture(scope="module")
def pack(tmp_path_factory) -> Path:
    return export_tiny_insightface_pack(tmp_path_factory.mktemp("buffalo_tiny"))


def test_pack_models_are_told_apart_by_signature(pack, tmp_path):
    detection, recognition = find_pack_models(pack)
    assert (detection.name, recognition.name) == ("det_10g.onnx", "w600k_r50.onnx")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'antelopev2'} does not exist: put an InsightFace model pack there"):
        find_pack_models(tmp_path / "antelopev2")
    half = tmp_path / "half"
    half.mkdir()
    (half / "det_10g.onnx").write_bytes(detection.read_bytes())
    with pytest.raises(ConfigError, match=r"found detection \['det_10g.onnx'\], recognition \[\]"):
        find_pack_models(half)


@pytest.mark.parametrize("scale", [1, 2])
def test_insightface_end_to_end(pack, scale):
    """A magenta 16 px cell at (144, 80) is a "face" to the tiny detector: SCRFD places the box at the cell's
    anchor point (144, 80) +- 1.5 cells. At scale 2 the image is twice the detector size, so boxes map back x2."""
    encoder = InsightFaceEncoder(pack, det_size=320)
    image = face_scene(size=(320 * scale, 240 * scale), square=(144 * scale, 80 * scale, 16 * scale))
    faces = encoder.detect(image)
    assert len(faces) == 1
    np.testing.assert_allclose(faces[0].box, np.array([120, 56, 168, 104]) * scale, atol=0.5)
    kps = np.array([[-0.6, -0.4], [0.6, -0.4], [0.0, 0.1], [-0.5, 0.7], [0.5, 0.7]])
    np.testing.assert_allclose(faces[0].landmarks, (np.array([144, 80]) + kps * 16) * scale, atol=0.5)
    assert faces[0].score > 0.99

    result = encoder.encode(image)
    assert result.aligned.shape == (112, 112, 3) and result.embedding.shape == (64,)
    assert encoder.embedding_dim == 64
    assert abs(np.linalg.norm(result.embedding) - 1) < 1e-5

    # The embedding is the recognizer run directly on the aligned RGB crop, normalised (x - 127.5) / 127.5.
    session = onnxruntime.InferenceSession(str(pack / "w600k_r50.onnx"), providers=["CPUExecutionProvider"])
    blob = ((result.aligned.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    direct = session.run(["683"], {"input.1": blob})[0][0]
    np.testing.assert_allclose(result.embedding, direct / np.linalg.norm(direct), atol=1e-5)


def test_insightface_torch_recognizer_matches_onnxruntime_and_is_differentiable(pack):
    """The training loss runs the recognizer in torch: same embedding as the ONNX path, gradients reach pixels."""
    import torch

    encoder = InsightFaceEncoder(pack, det_size=320)
    scenes = [face_scene(square=(144, 80, 16), background=(60 * i, 100, 40 * i)) for i in range(3)]
    crops = [encoder.encode(scene).aligned for scene in scenes]
    expected = encoder.embed(crops)
    recognizer = encoder.torch_recognizer()
    pixels = torch.tensor(np.stack(crops), dtype=torch.float32).permute(0, 3, 1, 2).requires_grad_(True)
    embedding = recognizer.embed(pixels)
    got = torch.nn.functional.normalize(embedding, dim=-1).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    embedding.sum().backward()
    assert pixels.grad is not None and float(pixels.grad.abs().sum()) > 0
    assert not any(p.requires_grad for p in recognizer.parameters())


def test_insightface_no_face_and_identity_of_the_models(pack, tmp_path):
    encoder = InsightFaceEncoder(pack, det_size=320)
    assert encoder.encode(face_scene(square=(0, 0, 0))) is None
    other = export_tiny_insightface_pack(tmp_path / "other")
    (other / "w600k_r50.onnx").write_bytes((pack / "w600k_r50.onnx").read_bytes()[:-4] + b"\x00\x00\x00\x00")
    assert InsightFaceEncoder(pack, det_size=320).encoder_id == encoder.encoder_id
    assert "w600k_r50.onnx" in encoder.encoder_id


# ---------------------------------------------------------------------------------------------------------- shared


def test_choose_face_rules():
    def face(x1, y1, x2, y2, score):
        return Face(box=np.array([x1, y1, x2, y2], np.float32), landmarks=np.zeros((5, 2), np.float32), score=score)

    big, sharp, central = face(0, 0, 60, 60, 0.6), face(150, 0, 170, 20, 0.99), face(90, 90, 110, 110, 0.7)
    faces = [sharp, big, central]
    assert choose_face(faces, (200, 200), "largest") is big
    assert choose_face(faces, (200, 200), "score") is sharp
    assert choose_face(faces, (200, 200), "center") is central
    with pytest.raises(ValueError):
        choose_face([], (200, 200))
