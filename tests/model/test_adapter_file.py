"""The one adapter reader: a damaged, edited, foreign or hostile adapter file is refused in one whole line naming the
file and the key, in every layout, and torch says nothing of its own on the way."""

from __future__ import annotations

import errno
import io
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtback.errors import AdapterMismatchError
from dtback.model import adapter_file, identity_flux
from dtback.model.adapter_file import read_adapter, write_adapter
from flux_helpers import make_model, randomise_outputs


@pytest.fixture(scope="module")
def payload(tmp_path_factory, tiny_flux_dir):
    """What a tensors-only ``.pt`` adapter holds: ``{"config": JSON text, "state_dict": tensors}``."""
    from diffusers import FluxTransformer2DModel

    model = make_model(FluxTransformer2DModel.from_pretrained(tiny_flux_dir))
    randomise_outputs(model)
    path = model.save_pretrained(tmp_path_factory.mktemp("adapter") / "best_model.pt")
    return torch.load(path, weights_only=True)


def refusal(path) -> str:
    """The reader's message for ``path``, checked to be one line and free of torch's own words and warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AdapterMismatchError) as err:
            read_adapter(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path)), message  # the file, or the folder's file
    assert "weights_only" not in message and "miniz" not in message, message  # no advice to unpickle anyway
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    return message


def edited(payload, folder: Path, name: str, config=None, state=None) -> Path:
    path = folder / name
    torch.save({"config": json.dumps(config) if config is not None else payload["config"],
                "state_dict": state if state is not None else payload["state_dict"]}, path)
    return path


def test_identity_flux_reads_through_the_same_vetted_reader():
    assert identity_flux.read_adapter is adapter_file.read_adapter  # training's resume imports it from there


@pytest.mark.parametrize("name", ["adapter_dir", "adapter.safetensors", "best_model.pt"])
def test_every_layout_reads_back_what_was_written(payload, tmp_path, name):
    path = write_adapter(tmp_path / name, payload["config"], payload["state_dict"])
    spec, state = read_adapter(path)
    assert spec.to_json() == payload["config"]
    assert state.keys() == payload["state_dict"].keys()
    assert all(torch.equal(state[key], value) for key, value in payload["state_dict"].items())


def test_a_safetensors_adapter_cut_short_or_of_junk_is_named(payload, tmp_path):
    whole = write_adapter(tmp_path / "adapter.safetensors", payload["config"], payload["state_dict"])
    data = whole.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    assert refusal(cut) == f"{cut}: truncated: {len(data) // 2} of its {len(data)} bytes; not a whole adapter " \
                           "(copy it again)"
    junk = tmp_path / "junk.safetensors"
    junk.write_text("hello world")
    assert refusal(junk).startswith(f"{junk}: truncated or not a safetensors file: a header of")
    folder = write_adapter(tmp_path / "adapter", payload["config"], payload["state_dict"])
    (folder / "adapter.safetensors").write_bytes(data[:100])
    assert refusal(folder).startswith(f"{folder / 'adapter.safetensors'}: truncated or not a safetensors file")


def test_an_adapter_folder_whose_config_is_not_utf8_is_named(tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(b"\xff\xfe{}")
    save_file({"a": torch.ones(1)}, folder / "adapter.safetensors")
    assert refusal(folder) == f"{folder}: the adapter config is not UTF-8 text (invalid start byte at byte 0); " \
                              "not a dtback adapter"


def test_a_pt_state_dict_of_lists_or_nan_is_refused_naming_the_key(payload, tmp_path):
    first = next(iter(payload["state_dict"]))
    lists = edited(payload, tmp_path, "lists.pt", state={key: [1, 2] for key in payload["state_dict"]})
    assert refusal(lists) == f"{lists}: state_dict key {first!r} holds a list, not a tensor; not a dtback adapter"
    state = dict(payload["state_dict"])
    state[first] = torch.full_like(state[first], float("nan"))
    last = sorted(state)[-1]
    state[last] = torch.full_like(state[last], float("inf"))
    nan = edited(payload, tmp_path, "nan.pt", state=state)
    assert refusal(nan) == f"{nan}: key {first} holds NaN or infinite values (and 1 more keys): a damaged adapter " \
                           "makes every image NaN; use an earlier checkpoint or an undamaged copy"


def test_blocks_or_shapes_the_config_does_not_make_are_refused(payload, tmp_path):
    config = json.loads(payload["config"])
    blocks = edited(payload, tmp_path, "blocks.pt", config={**config, "double_blocks": [0, 5]})
    assert refusal(blocks).startswith(f"{blocks}: adapter config double_blocks [0, 5] names blocks [5] that its base "
                                      "(num_layers 2) does not have")
    wider = {**config, "resampler": {**config["resampler"], "dim": 32}}  # an adapter of another size
    other = edited(payload, tmp_path, "wider.pt", config=wider)
    assert refusal(other).startswith(f"{other}: weights of another shape than the adapter config: resampler.face."
                                     "latents (3, 16) (the config makes (3, 32))")
    fewer = dict(payload["state_dict"])
    dropped = sorted(fewer)[0]
    del fewer[dropped]
    missing = edited(payload, tmp_path, "fewer.pt", state=fewer)
    assert refusal(missing) == f"{missing}: weights do not match the adapter config (missing [{dropped!r}], " \
                               "unexpected [])"
    nothing = edited(payload, tmp_path, "negative_heads.pt", config={**config, "heads": -1})
    assert refusal(nothing) == f"{nothing}: the adapter config makes no model (RuntimeError: Trying to create tensor " \
                               "with negative dimension -8: [-8, 16]); not a whole adapter"


class Hostile:
    """A pickle that would create a file if it were unpickled as Python objects."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def torch_file(obj, legacy: bool = False) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer, _use_new_zipfile_serialization=not legacy)
    return buffer.getvalue()


def test_torch_load_failures_are_named_in_one_whole_line(payload, tmp_path):
    """Found by cutting and flipping bytes: torch raises EOFError, RuntimeError, OSError, UnpicklingError, struct.error,
    AssertionError... and warns of a pickle protocol; each is one line here, its first sentence whole."""
    whole = edited(payload, tmp_path, "whole.pt").read_bytes()
    marker = tmp_path / "pwned"
    junk_zip = io.BytesIO()
    with zipfile.ZipFile(junk_zip, "w") as archive:
        archive.writestr("archive/data.pkl", b"junkjunk")
    cases = {
        "empty.pt": (b"", "an empty file"),
        "text.pt": (b"not a checkpoint", "damaged, or it holds Python objects beyond tensors, which dtback never "
                                         "unpickles: Unsupported operand 110"),
        "cut_early.pt": (whole[: len(whole) // 10], "cut short: a zip archive of"),  # torch: RuntimeError (miniz)
        "cut_late.pt": (whole[: len(whole) * 9 // 10], "cut short: a zip archive of"),  # torch: OSError EINVAL
        "junk_zip.pt": (junk_zip.getvalue(), "RuntimeError: Expected hasRecord(\"version\") to be true, but got "
                                             "false)"),
        "hostile.pt": (torch_file({"config": Hostile(marker)}),
                       "never unpickles: Unsupported global: GLOBAL getattr was not an allowed global by default)"),
        "hostile_protocol_4.pt": (pickle.dumps(Hostile(marker), protocol=4),  # torch warns of the protocol
                                  "never unpickles: Unsupported operand 149)"),
        "legacy_cut.pt": (torch_file(payload, legacy=True)[:18], "error: unpack requires a buffer of 2 bytes)"),
    }
    for name, (data, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        message = refusal(path)
        assert message.startswith(f"{path}: not a tensors-only dtback checkpoint ("), message
        assert expected in message, message
        assert message.endswith(")") and len(message) < len(str(path)) + 250, message
    assert not marker.exists()


def test_a_full_disk_under_a_pt_adapter_is_an_oserror_naming_no_space(monkeypatch, tmp_path):
    """A writer on a full disk (faked: no real device is filled) fails with ENOSPC, not torch's RuntimeError
    ("unexpected pos ..."), and leaves nothing behind."""
    class FullDisk(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(adapter_file, "open", lambda name, mode: io.BufferedWriter(FullDisk()), raising=False)
    with pytest.raises(OSError) as err:
        write_adapter(tmp_path / "out" / "best_model.pt", "{}", {"w": torch.ones(100_000)})
    assert err.value.errno == errno.ENOSPC
    assert list((tmp_path / "out").iterdir()) == []
