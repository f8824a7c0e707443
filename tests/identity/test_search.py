"""The shared face search: turned faces mapped back into the file's pixels, the darkened look of over-exposed
photos (on skimage's astronaut, always available, and on the real photos, skipped when absent)."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageEnhance

from dtback.identity import search
from dtback.identity.face import DlibFaceEncoder, Face
from dtback.identity.search import Search, in_file_pixels, relit, search_faces


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


def test_only_a_light_picture_is_darkened_and_its_median_lands_at_mid_grey():
    ordinary = np.full((8, 8, 3), 191, np.uint8)
    assert relit(ordinary) is None
    light = np.full((8, 8, 3), 230, np.uint8)
    light[0, 0] = 40
    darker = relit(light)
    assert int(np.median(darker)) == 128 and darker[0, 0, 0] < 40
    assert relit(np.full((8, 8, 3), 255, np.uint8)).max() == 255  # white stays white (a finite gamma)


def test_an_upright_face_costs_one_detection(encoder, monkeypatch):
    calls = []
    detect = encoder.detect
    monkeypatch.setattr(encoder, "detect", lambda image: calls.append(image.shape) or detect(image))
    found = search_faces(encoder, skimage.data.astronaut(), upscale=True)
    assert calls == [(512, 512, 3)] and found.rotation == 0 and not found.relit and found.best_score > 1


def test_a_false_face_of_the_darkened_copy_under_its_floor_is_not_taken(encoder):
    """skimage's astronaut at 2.5x brightness: no face upright (also at 2x); the darkened copy shows only a weak
    false face on her suit (0.13, under RELIGHT_MIN_SCORE 0.2), which is not taken."""
    burnt = np.asarray(ImageEnhance.Brightness(Image.fromarray(skimage.data.astronaut())).enhance(2.5))
    faces = encoder.detect(relit(burnt))
    assert len(faces) == 1 and 0.1 < faces[0].score < search.RELIGHT_MIN_SCORE and faces[0].box[1] > 300
    found = search_faces(encoder, burnt, upscale=True)
    assert not found.relit


def test_over_exposed_real_photos_are_found_on_the_darkened_copy(encoder):
    """Four LFW / TV photos at 2-2.5x brightness (clipped highlights) that show no face upright scoring 0.3, also at
    2x (none, or 0.006 and 0.154): the darkened copy finds each (scores 0.54-0.70 measured), and the face cut from the
    photo itself stays within cosine 0.89 of the original photo's (measured 0.893-0.922)."""
    from dtback.data.images import load_rgb
    from helpers import PEOPLE

    if not PEOPLE.is_dir():
        pytest.skip(f"real photos not present at {PEOPLE}")
    cases = [("faceapi_bbt/penny", 0, 2.0), ("faceapi_bbt/bernadette", 0, 2.0), ("faceapi_bbt/stuart", 0, 2.5),
             ("krasserm_lfw/Ariel_Sharon", 0, 2.5)]
    for folder, index, factor in cases:
        photo = load_rgb(sorted((PEOPLE / folder).iterdir())[index], 10**8)
        original = search_faces(encoder, np.asarray(photo))
        burnt = np.asarray(ImageEnhance.Brightness(photo).enhance(factor))
        assert search.upright_search(encoder, burnt, upscale=True).best_score < 0.3, folder
        found = search_faces(encoder, burnt, upscale=True)
        assert found.relit and found.best_score >= 0.5 and found.searched is burnt, folder
        embeddings = [encoder.embed([encoder.align(pick.searched, max(pick.faces, key=lambda f: f.area))])[0]
                      for pick in (original, found)]
        assert float(embeddings[0] @ embeddings[1]) > 0.89, folder


def test_a_light_upside_down_photo_is_turned_not_taken_from_its_darkened_copy(encoder):
    """Vladimir_Putin_0003 (LFW, a light photo: median grey above 192 upside down) turned 180 degrees: its darkened
    copy shows a weak upside-down "face" (0.36, cosine 0.87 to the photo's face, measured), above
    ROTATION_MIN_SCORE; the turned searches still run and the turn back wins (cosine 1.0)."""
    from dtback.data.images import load_rgb
    from helpers import PEOPLE

    if not PEOPLE.is_dir():
        pytest.skip(f"real photos not present at {PEOPLE}")
    photo = np.asarray(load_rgb(PEOPLE / "krasserm_lfw" / "Vladimir_Putin" / "Vladimir_Putin_0003.jpg", 10**8))
    upside_down = np.ascontiguousarray(np.rot90(photo, 2))
    weak = encoder.detect(relit(upside_down))
    assert weak and search.ROTATION_MIN_SCORE < max(face.score for face in weak) < 0.5
    found = search_faces(encoder, upside_down, upscale=True)
    assert found.rotation == 180 and not found.relit and found.best_score > 1
