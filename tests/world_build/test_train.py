"""The world components' recipes (``dtback.world_build``) refuse values that cannot train or measure, naming the
recipe, the field and the value, when the recipe is made: before minutes of rendering (steps 0 gave NaN losses in
the recorded figures; one held-out character, an AUC that sklearn refuses at the end)."""

from __future__ import annotations

import math

import pytest

from dtback.world_build.base import BaseRecipe
from dtback.world_build.encoders import EncoderRecipe
from dtback.world_build.reader import ReaderRecipe
from dtback.world_build.train import training_history
from dtback.world_build.vae import VaeRecipe

BAD = [
    (VaeRecipe, {"steps": 0}, "VaeRecipe.steps=0: must be at least 1"),
    (VaeRecipe, {"batch": -2}, "VaeRecipe.batch=-2: must be at least 1"),
    (VaeRecipe, {"crop": 60}, "VaeRecipe.crop=60: must be a multiple of 8"),
    (VaeRecipe, {"lr": float("nan")}, "VaeRecipe.lr=nan: must be a finite number"),
    (VaeRecipe, {"lr": 0.0}, "VaeRecipe.lr=0.0: must be above 0"),
    (VaeRecipe, {"focus": 1.5}, "VaeRecipe.focus=1.5: must be between 0 and 1"),
    (VaeRecipe, {"steps": 2.5}, "VaeRecipe.steps=2.5: must be a whole number"),
    (EncoderRecipe, {"face_steps": 0}, "EncoderRecipe.face_steps=0: must be at least 1"),
    (EncoderRecipe, {"eval_characters": 1}, "EncoderRecipe.eval_characters=1: must be at least 2"),
    (EncoderRecipe, {"eval_images": 1}, "EncoderRecipe.eval_images=1: must be at least 2"),
    (EncoderRecipe, {"seed": -1}, "EncoderRecipe.seed=-1: must be at least 0"),
    (ReaderRecipe, {"steps": 0}, "ReaderRecipe.steps=0: must be at least 1"),
    (ReaderRecipe, {"detector_steps": -5}, "ReaderRecipe.detector_steps=-5: must be at least 1"),
    (ReaderRecipe, {"decoded_share": -0.1}, "ReaderRecipe.decoded_share=-0.1: must be between 0 and 1"),
    (BaseRecipe, {"steps": 0}, "BaseRecipe.steps=0: must be at least 1"),
    (BaseRecipe, {"width": 100}, "BaseRecipe.width=100: must be a multiple of 32"),
    (BaseRecipe, {"ema_decay": 1.0}, "BaseRecipe.ema_decay=1.0: must be below 1"),
    (BaseRecipe, {"images_per_character": 1}, "BaseRecipe.images_per_character=1: must be at least 2"),
]


@pytest.mark.parametrize(("recipe", "values", "message"), BAD, ids=[m.split(":")[0] for _, _, m in BAD])
def test_a_recipe_value_that_cannot_train_is_refused_naming_the_field(recipe, values, message):
    with pytest.raises(ValueError, match=f"^{message.replace('.', '[.]')}"):
        recipe(**values)


def test_the_shipped_and_the_tests_tiny_recipes_are_accepted():
    for recipe in (VaeRecipe(), EncoderRecipe(), ReaderRecipe(), BaseRecipe(),
                   VaeRecipe(characters=4, images_per_character=2, size=32, steps=2, batch=2, crop=32,
                             eval_characters=2, eval_images=1),
                   EncoderRecipe(characters=6, images_per_character=3, detector_steps=2, face_steps=2, body_steps=2,
                                 batch=8, eval_characters=3, eval_images=2),
                   ReaderRecipe(characters=8, detector_steps=2, steps=2, batch=4, eval_characters=3, eval_images=1,
                                size=64),
                   BaseRecipe(characters=12, images_per_character=3, steps=2, batch=4, warmup=1)):
        assert recipe == type(recipe)(**vars(recipe))


def test_training_history_is_finite_for_one_step():
    history = training_history([2.0], 0.0, 0.0, steps=1)
    assert history["loss_first"] == history["loss_last"] == 2.0 and math.isfinite(history["seconds"])
