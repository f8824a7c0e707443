"""Train/val split by character: no identity on both sides, deterministic, explicit lists honoured."""

from __future__ import annotations

import json

import pytest

from dtback.config import DataConfig
from dtback.data.layout import scan_dataset
from dtback.data.prepare import prepare_dataset
from dtback.data.split import read_split, split_characters, write_split
from dtback.errors import DatasetError
from helpers import make_dataset


@pytest.fixture
def index(tmp_path):
    layout = {"b1": {f"a{i}": 3 for i in range(10)}, "b2": {f"z{i}": 3 for i in range(10)}}
    root = make_dataset(tmp_path / "d", layout, size=(16, 16))
    return scan_dataset(DataConfig(data_dir=root), seed=0, progress=False)


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 0.95])  # 0: refused by the config
def test_no_character_on_both_sides(index, fraction):
    split = split_characters(index, DataConfig(data_dir=index.root, val_fraction=fraction), seed=3)
    assert not set(split.train) & set(split.val)
    assert sorted(split.train + split.val) == sorted(c.key for c in index.characters)
    expected_val = min(19, -(-20 * fraction // 1))  # ceil, leaving one character to train on
    assert len(split.val) == expected_val
    assert split.train  # something is always left to train on
    train_images = {e.path for c in split.characters(index, "train") for e in c.images}
    val_images = {e.path for c in split.characters(index, "val") for e in c.images}
    assert train_images and not train_images & val_images


def test_split_is_deterministic_and_seed_dependent(index):
    data = DataConfig(data_dir=index.root, val_fraction=0.2)
    assert split_characters(index, data, seed=1) == split_characters(index, data, seed=1)
    assert len({split_characters(index, data, seed=s).val for s in range(5)}) > 1


def test_split_does_not_depend_on_listing_order(index):
    data = DataConfig(data_dir=index.root, val_fraction=0.2)
    before = split_characters(index, data, seed=7)
    index.characters.reverse()
    assert split_characters(index, data, seed=7) == before


def test_explicit_val_characters(index):
    data = DataConfig(data_dir=index.root, val_characters=["b1/a3", "b2/z0"])
    split = split_characters(index, data, seed=0)
    assert split.val == ("b1/a3", "b2/z0")
    assert "b1/a3" not in split.train and len(split.train) == 18
    assert split.method == "explicit"


def test_unknown_val_character_is_an_error(index):
    data = DataConfig(data_dir=index.root, val_characters=["b1/nobody"])
    with pytest.raises(DatasetError, match=r"val_characters .*\['b1/nobody'\]"):
        split_characters(index, data, seed=0)


def test_holding_out_everything_is_an_error(index):
    data = DataConfig(data_dir=index.root, val_characters=[c.key for c in index.characters])
    with pytest.raises(DatasetError, match="nothing left to train on"):
        split_characters(index, data, seed=0)


def test_split_file_round_trip_and_overlap_check(index, tmp_path):
    split = split_characters(index, DataConfig(data_dir=index.root, val_fraction=0.3), seed=0)
    path = write_split(split, tmp_path / "run")
    assert read_split(path) == split
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "x", "train": ["b/a", "b/c"], "val": ["b/a"]}))
    with pytest.raises(DatasetError, match=r"both train and val: \['b/a'\]"):
        read_split(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DatasetError, match="broken.json: not a readable split file"):
        read_split(broken)


def test_prepare_writes_split_and_report_and_refuses_a_changed_split(index, tmp_path):
    run = tmp_path / "run"
    data = DataConfig(data_dir=index.root, val_fraction=0.2)
    prepared = prepare_dataset(data, seed=0, run_dir=run, progress=False)
    saved = json.loads((run / "split.json").read_text())
    assert saved["val"] == list(prepared.split.val) and len(saved["val"]) == 4
    assert json.loads((run / "dataset_report.json").read_text())["totals"]["characters_kept"] == 20
    prepare_dataset(data, seed=0, run_dir=run, progress=False)  # a resumed run: same split, accepted
    with pytest.raises(DatasetError, match="split.json was written for a different split"):
        prepare_dataset(data, seed=1, run_dir=run, progress=False)
    with pytest.raises(DatasetError) as other_rank:  # a rank after the main one: its own view of the files differs
        prepare_dataset(data, seed=1, run_dir=run, progress=False, after_main=True)
    assert str(other_rank.value).startswith(f"this rank splits {index.root} otherwise than the main rank did into "
                                            f"{run / 'split.json'} (train +[")
    assert "the ranks see other files" in str(other_rank.value) and "delete the split file" not in str(other_rank.value)
