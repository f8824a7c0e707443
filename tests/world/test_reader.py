"""The identity reader reads every face and body attribute of held-out characters from whole images."""

from __future__ import annotations

import numpy as np
import pytest

from dtback.world.people import ATTRIBUTES, BODY_ATTRIBUTES, FACE_ATTRIBUTES, render_image, render_world_set, sample_characters
from dtback.world.reader import (
    IdentityReader, attribute_accuracy, attribute_labels, load_reader, truth_problem, validation_scorer,
)
from dtback.world_build.reader import ReaderRecipe, evaluate_reader

HELD_OUT_SEED = 778  # neither the reader's training seed nor its recorded evaluation seed


@pytest.fixture(scope="module")
def reader() -> IdentityReader:
    return load_reader()


def test_reader_reads_every_attribute_of_held_out_characters(reader):
    recipe = ReaderRecipe()
    seen = sample_characters(recipe.characters, recipe.seed)
    held = sample_characters(60, HELD_OUT_SEED, exclude=seen, exclude_bodies=False)
    assert not {c.face_key for c in held} & {c.face_key for c in seen}
    accuracy = evaluate_reader(reader, render_world_set(held, 3, 128, HELD_OUT_SEED))
    assert set(accuracy) == set(ATTRIBUTES)
    low = {name: value for name, value in accuracy.items() if value < 0.95}
    assert not low, accuracy


def test_read_returns_value_names(reader):
    character = sample_characters(1, HELD_OUT_SEED + 1)[0]
    image = np.asarray(render_image(character, 0, 128, 5).image)
    values = reader.read([image, image])
    assert len(values) == 2 and values[0] == values[1]
    assert all(values[0][name] in ATTRIBUTES[name] for name in ATTRIBUTES)


def test_labels_follow_the_attribute_tables():
    world = render_world_set(sample_characters(3, 1), 2, 32, 1)
    labels = attribute_labels(world)
    assert labels.shape == (6, len(ATTRIBUTES))
    first = world.characters[0].attributes
    assert [ATTRIBUTES[n][int(i)] for n, i in zip(ATTRIBUTES, labels[0])] == [first[n] for n in ATTRIBUTES]


def test_attribute_accuracy_counts_face_and_body_separately():
    truth = {"face": {name: values[0] for name, values in FACE_ATTRIBUTES.items()},
             "body": {name: values[0] for name, values in BODY_ATTRIBUTES.items()}}
    read = {**truth["face"], **truth["body"], "hair_colour": FACE_ATTRIBUTES["hair_colour"][1],
            "build": BODY_ATTRIBUTES["build"][1], "top_colour": BODY_ATTRIBUTES["top_colour"][2]}
    face, body = attribute_accuracy(read, truth)
    assert face == pytest.approx(6 / 7) and body == pytest.approx(2 / 4)


def test_true_attributes_that_are_not_a_whole_set_are_named():
    truth = {"face": {name: values[0] for name, values in FACE_ATTRIBUTES.items()},
             "body": {name: values[0] for name, values in BODY_ATTRIBUTES.items()}}
    assert truth_problem(truth) is None
    assert truth_problem([]) == "expected an object with 'face' and 'body', got list"
    assert truth_problem({**truth, "body": "slim"}) == "'body' is not an object of attributes"
    face = {k: v for k, v in truth["face"].items() if k not in ("glasses", "beard")}
    assert truth_problem({**truth, "face": face}) == "'face' lacks beard, glasses"


def test_validation_scores_the_characters_whose_roster_entry_reads_and_names_the_others(tmp_path, caplog):
    """A world.json edited by hand (a roster entry without an attribute) stopped training's validation with a
    KeyError; its character is left out of the reader's figures, with a warning naming the file and character."""
    import json

    from dtback.config import WorldConfig
    from dtback.world.files import MANIFEST, write_world

    root = write_world(tmp_path / "w", WorldConfig(characters=2, images_per_character=2, size=128, seed=9),
                       progress=False).root
    manifest = json.loads((root / MANIFEST).read_text())
    del manifest["roster"]["c0001"]["body"]["build"]
    (root / MANIFEST).write_text(json.dumps(manifest))
    score = validation_scorer(root, None, ["world/c0000", "world/c0001"])
    image = render_image(sample_characters(1, 9)[0], 0, 128, 9).image
    figures = score([image, image], [0, 1])
    alone = score([image], [0])
    assert figures == alone and 0 <= figures["reader_face"] <= 1
    assert f"{root / MANIFEST}: roster entry c0001: 'body' lacks build; left out of the reader's figures" in caplog.text
