"""The shared face search: turned faces mapped back into the file's pixels, the cost of an upright face."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data

from dtback.identity.face import DlibFaceEncoder, Face
from dtback.identity.search import Search, in_file_pixels, search_faces


@pytest.fixture(scope="module")
def encoder() -> DlibFaceEncoder:
    return DlibFaceEncoder()


@pytest.mark.parametrize("scale", [1, 2])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_a_face_found_turned_is_given_in_the_files_pixels(turns, scale):
    """A pixel marked in a 7 x 5 file, found in the file turned ``turns`` quarter turns counter-clockwise (and
    enlarged ``scale`` times): its landmark and its one-pixel box come back on the marked pixel."""
    file = np.zeros((5, 7), np.uint8)
    file[2, 1] = 1  # x 1, y 2
    turned = np.rot90(file, turns).repeat(scale, axis=0).repeat(scale, axis=1)
    y, x = (int(v) for v in np.argwhere(turned)[0])
    found = Face(box=np.array([x, y, x + scale, y + scale], np.float32),
                 landmarks=np.array([[x + (scale - 1) / 2, y + (scale - 1) / 2]] * 5, np.float32), score=1.0)
    back = in_file_pixels(found, Search(faces=[found], searched=np.zeros((*turned.shape, 3), np.uint8), scale=scale,
                                        rotation=90 * turns))
    np.testing.assert_allclose(back.box, [1, 2, 2, 3], atol=1e-5)
    np.testing.assert_allclose(back.landmarks, [[1, 2]] * 5, atol=1e-5)


def test_an_upright_face_costs_one_detection(encoder, monkeypatch):
    calls = []
    detect = encoder.detect
    monkeypatch.setattr(encoder, "detect", lambda image: calls.append(image.shape) or detect(image))
    found = search_faces(encoder, skimage.data.astronaut(), upscale=True)
    assert calls == [(512, 512, 3)] and found.rotation == 0 and found.best_score > 1
