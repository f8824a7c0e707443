"""A user's LoRA is read before diffusers applies it: NaN/inf weights and lora_A/lora_B halves of different ranks
are refused in one line naming the file and the key (diffusers applies the first silently, and every image is NaN)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtback.cli import EXIT_BAD_INPUT, main
from dtback.errors import DtbackError
from dtback.inference.loras import check_lora_weights, lora_weights_file
from dtback.inference.pipeline import IdentityFluxPipeline

# A layer of the tiny FLUX LoRA (conftest.lora_file: rank 4 on the attention projections of a 128-wide base).
KEY_A = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
KEY_B = "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"


def corrupt(lora_file, target, **changes):
    """A copy of the tiny LoRA at ``target`` with the tensors in ``changes`` (key → function of the tensor)."""
    tensors = load_file(lora_file)
    assert tensors[KEY_A].shape == (4, 128) and tensors[KEY_B].shape == (128, 4)
    for key, change in changes.items():
        tensors[key] = change(tensors[key].clone()).contiguous()
    save_file(tensors, target)
    return target


def with_value(value, at=(0, 0)):
    def change(tensor):
        tensor[at] = value
        return tensor
    return change


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the base was loaded for a LoRA that should have been refused first")

    monkeypatch.setattr(IdentityFluxPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_lora_with_non_finite_weights_is_refused_naming_the_key(fresh, lora_file, tmp_path, value):
    bad = corrupt(lora_file, tmp_path / "bad.safetensors", **{KEY_B: with_value(value)})
    with pytest.raises(DtbackError) as err:
        fresh.load_lora_weights(bad)
    assert str(err.value).startswith(f"LoRA {bad}: key {KEY_B} holds 1 NaN/inf of 512 values: ")
    assert "\n" not in str(err.value)
    assert fresh.loras == {}
    assert "lora_A" not in dict(fresh.pipeline.transformer.transformer_blocks[0].attn.to_q.named_modules())
    assert check_lora_weights(lora_file) == lora_file  # the uncorrupted file passes


def test_every_non_finite_key_is_counted_and_the_first_named(lora_file, tmp_path):
    keys = sorted(key for key in load_file(lora_file) if ".lora_" in key)
    bad = corrupt(lora_file, tmp_path / "bad.safetensors",
                  **{key: (lambda t: torch.full_like(t, math.nan)) for key in keys[3:6]})
    with pytest.raises(DtbackError, match=rf"key {keys[3]} holds 512 NaN/inf of 512 values \(and 2 more keys\)"):
        check_lora_weights(bad)


@pytest.mark.parametrize(("rank_a", "rank_b"), [(2, 4), (4, 2)])
def test_lora_halves_of_different_ranks_are_refused_naming_both_keys(fresh, lora_file, tmp_path, rank_a, rank_b):
    bad = corrupt(lora_file, tmp_path / "ranks.safetensors",
                  **{KEY_A: lambda t: t[:rank_a], KEY_B: lambda t: t[:, :rank_b]})
    with pytest.raises(DtbackError) as err:
        fresh.load_lora_weights(bad)
    assert str(err.value).startswith(
        f"LoRA {bad}: key {KEY_A} has rank {rank_a} (shape [{rank_a}, 128]) but {KEY_B} has rank {rank_b} "
        f"(shape [128, {rank_b}]): ")
    assert fresh.loras == {}


def test_kohya_halves_float8_and_bf16_tensors_are_checked(tmp_path):
    layer = "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = f"{layer}.lora_down.weight", f"{layer}.lora_up.weight"
    kohya = tmp_path / "kohya.safetensors"
    save_file({down: torch.zeros(8, 64), up: torch.zeros(192, 16), f"{layer}.alpha": torch.tensor(8.0)}, kohya)
    with pytest.raises(DtbackError, match=rf"key {down} has rank 8 \(shape \[8, 64\]\) but {up} has rank 16"):
        check_lora_weights(kohya)
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        low = tmp_path / f"{str(dtype)[6:]}.safetensors"
        weights = torch.zeros(4, 64)
        weights[1, 2] = math.nan
        save_file({KEY_A: weights.to(dtype), KEY_B: torch.zeros(64, 4, dtype=dtype)}, low)
        with pytest.raises(DtbackError, match=rf"key {KEY_A} holds 1 NaN/inf of 256 values"):
            check_lora_weights(low)


def test_the_file_checked_is_the_file_diffusers_loads(lora_file, tmp_path):
    assert lora_weights_file(lora_file.parent) == lora_file  # diffusers' default name in a folder
    single = tmp_path / "single"
    single.mkdir()
    save_file({KEY_A: torch.zeros(4, 128)}, single / "style.safetensors")
    save_file({KEY_A: torch.zeros(1)}, single / "optimizer.safetensors")  # diffusers passes these over
    assert lora_weights_file(single) == single / "style.safetensors"
    save_file({KEY_A: torch.zeros(4, 128)}, single / "other.safetensors")
    with pytest.raises(DtbackError, match=rf"LoRA folder {single} holds 2 weight files \(other.safetensors, "
                                          r"style.safetensors\): pass the file to load"):
        lora_weights_file(single)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({KEY_A: torch.zeros(4, 128)}, pickled / "pytorch_lora_weights.bin")  # diffusers' name for pickles
    assert lora_weights_file(pickled) == pickled / "pytorch_lora_weights.bin"
    assert lora_weights_file(pickled / "pytorch_lora_weights.bin") == pickled / "pytorch_lora_weights.bin"


def test_a_pickled_lora_is_checked_too_and_never_unpickled_as_objects(lora_file, tmp_path):
    # A .bin LoRA went to diffusers unchecked: NaN weights gave black images, a pickle of objects a late error.
    nan = tmp_path / "style.bin"
    torch.save({KEY_A: torch.full((4, 128), math.nan)}, nan)
    with pytest.raises(DtbackError, match=rf"^LoRA {nan}: key {KEY_A} holds 512 NaN/inf of 512 values"):
        check_lora_weights(nan)
    good = tmp_path / "good.bin"
    torch.save(load_file(lora_file), good)
    assert check_lora_weights(good) == good
    marker = tmp_path / "ran"
    hostile = tmp_path / "hostile.bin"
    torch.save({KEY_A: Hostile(marker)}, hostile)
    with pytest.raises(DtbackError, match=rf"^LoRA {hostile}: not a tensors-only LoRA file \(damaged, or it holds "
                                          r"Python objects beyond tensors, which dtback never unpickles\)"):
        check_lora_weights(hostile)
    assert not marker.exists()
    torch.save({KEY_A: [1, 2]}, tmp_path / "lists.bin")
    with pytest.raises(DtbackError, match=f"key '{KEY_A}' holds a list, not a tensor"):
        check_lora_weights(tmp_path / "lists.bin")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DtbackError, match=r"empty.bin: not a tensors-only LoRA file \(EOFError"):
        check_lora_weights(tmp_path / "empty.bin")


def test_a_pickled_lora_cut_short_in_the_old_format_is_refused_in_one_line(tmp_path):
    """torch reads a legacy (pre-zip) pickle cut short with struct.error, which used to escape as a traceback."""
    buffer = io.BytesIO()
    torch.save({KEY_A: torch.zeros(4, 128)}, buffer, _use_new_zipfile_serialization=False)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(buffer.getvalue()[:18])
    with pytest.raises(DtbackError) as err:
        check_lora_weights(cut)
    assert str(err.value) == f"LoRA {cut}: not a tensors-only LoRA file (error: unpack requires a buffer of 2 bytes); " \
                             "a .safetensors file is safest"


def test_a_lora_folder_without_weights_or_a_safetensors_file_cut_short_is_refused(lora_file, tmp_path):
    with pytest.raises(DtbackError, match=rf"^LoRA folder {tmp_path} holds no LoRA weights \(no .safetensors file, "
                                          r"no pytorch_lora_weights.bin\): pass the LoRA file$"):
        check_lora_weights(tmp_path)
    unreadable = tmp_path / "notes.safetensors"
    unreadable.write_text("not a LoRA")
    with pytest.raises(DtbackError, match=rf"^LoRA {unreadable}: truncated or not a safetensors file"):
        check_lora_weights(unreadable)
    data = lora_file.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(DtbackError, match=rf"^LoRA {cut}: truncated: {len(data) - 10} of its {len(data)} bytes$"):
        check_lora_weights(cut)


class Hostile:
    """Unpickled as an object, it would write ``marker``: weights_only loading must refuse it instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickled_lora_loads_through_diffusers_like_its_safetensors(fresh, lora_file, tmp_path):
    pickled = tmp_path / "style.bin"
    torch.save(load_file(lora_file), pickled)
    name = fresh.load_lora_weights(pickled, scale=0.5)
    assert fresh.loras == {name: 0.5} and name == "style"


def test_generate_refuses_a_bad_lora_in_one_line_before_loading_the_base(run_dir, lora_file, tmp_path, capsys,
                                                                         no_model_loading):
    bad = corrupt(lora_file, tmp_path / "bad.safetensors", **{KEY_A: with_value(math.nan, at=(3, 127))})
    args = ["generate", "--model", str(run_dir / "best_model.pt"), "--reference", str(run_dir / "face.png"),
            "--prompt", "x", "--steps", "1", "--output", str(tmp_path / "out"), "--no-progress"]
    assert main([*args, "--lora", str(lora_file), "--lora", str(bad)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: LoRA {bad}: key {KEY_A} holds 1 NaN/inf of 512 values: a diverged "
                                        f"or damaged LoRA would make every image NaN; use an earlier or undamaged "
                                        f"file"]
    assert not (tmp_path / "out").exists()
