"""Saving and loading a world network (``dtback.world.nets``): a build killed while saving leaves the old component,
and a pair of files that do not belong together (weights of one build, description of another; a file cut short;
another architecture's weights) is refused in one line naming the file and the command that rebuilds it."""

from __future__ import annotations

import json

import pytest
import torch

from dtback.errors import MissingModelError
from dtback.io import TMP_MARK
from dtback.world.nets import Embedder, EmbedderConfig, load_net, save_net
from helpers import kill_when_half_done

CONFIG = EmbedderConfig(size=16, widths=(4, 8), dim=8)

# save_net of a new build in a child process that stops inside the weights' writer, half a file written; the child
# says so and waits to be killed.
KILLED_SAVE = """
import sys
import torch
from dtback.world import nets
def half(state, path, metadata=None):
    open(path, "wb").write(b"\\x10" + b"\\0" * 20)
    print("half", flush=True)
    sys.stdin.read()
nets.save_file = half
torch.manual_seed(1)
nets.save_net(nets.Embedder(nets.EmbedderConfig(size=16, widths=(4, 8), dim=8)), sys.argv[1], "tiny", {"build": 2})
"""


def tiny(seed):
    torch.manual_seed(seed)
    return Embedder(CONFIG).eval()


def test_a_kill_while_saving_leaves_the_old_component_and_a_rerun_saves_the_new(tmp_path):
    old = tiny(0)
    save_net(old, tmp_path, "tiny", {"note": "old"})
    kill_when_half_done(KILLED_SAVE, str(tmp_path))
    loaded, meta = load_net(tmp_path, "tiny", Embedder)
    x = torch.rand(2, 3, 16, 16)
    assert meta["note"] == "old" and torch.equal(loaded(x), old(x))
    assert [p.name for p in tmp_path.iterdir() if TMP_MARK in p.name][0].startswith(".tiny.safetensors" + TMP_MARK)
    new = tiny(1)
    save_net(new, tmp_path, "tiny", {"note": "new"})
    loaded, meta = load_net(tmp_path, "tiny", Embedder)
    assert meta["note"] == "new" and torch.equal(loaded(x), new(x))


def test_weights_and_description_of_different_builds_are_refused(tmp_path):
    """What a kill between the two renames of one save leaves (or a copy of half a folder): the description of
    one build beside the weights of another, same architecture. It loaded silently with the other build's figures."""
    save_net(tiny(0), tmp_path / "a", "tiny", {"note": "a"})
    save_net(tiny(1), tmp_path / "b", "tiny", {"note": "b"})
    (tmp_path / "b" / "tiny.json").replace(tmp_path / "a" / "tiny.json")
    with pytest.raises(MissingModelError, match=rf"{tmp_path / 'a' / 'tiny.safetensors'} and tiny.json are of "
                                                r"different builds .*`dtback world-components --out "):
        load_net(tmp_path / "a", "tiny", Embedder)


def test_a_weights_file_cut_short_or_of_another_architecture_is_refused(tmp_path):
    save_net(tiny(0), tmp_path, "tiny", {})
    weights = tmp_path / "tiny.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MissingModelError, match=rf"{weights}: truncated: {len(whole) // 2} of its {len(whole)} bytes"):
        load_net(tmp_path, "tiny", Embedder)
    weights.write_bytes(whole)
    meta = json.loads((tmp_path / "tiny.json").read_text())
    (tmp_path / "tiny.json").write_text(json.dumps({**meta, "config": {**meta["config"], "dim": 16}}))
    with pytest.raises(MissingModelError, match=rf"{weights}: its tensors do not fit the Embedder of tiny.json "
                                                r"\(size mismatch for to_tokens.weight: .*; and 7 more\); rebuild"):
        load_net(tmp_path, "tiny", Embedder)
