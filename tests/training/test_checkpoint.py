"""The checkpoint's optimiser file: torch's optimiser state as flat safetensors tensors plus JSON, and back."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import dtback.training
from dtback.training.checkpoint import flatten_optimizer_state, unflatten_optimizer_state


def test_the_optimizer_state_survives_the_flat_form_a_checkpoint_stores(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    tensors, meta = flatten_optimizer_state(optimizer.state_dict())
    assert sorted(tensors) == ["0.exp_avg", "0.exp_avg_sq", "0.step", "1.exp_avg", "1.exp_avg_sq", "1.step"]
    save_file(tensors, tmp_path / "optimizer.safetensors")
    state = unflatten_optimizer_state(load_file(tmp_path / "optimizer.safetensors"), meta)
    again = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)
    again.load_state_dict(state)
    for index, values in optimizer.state_dict()["state"].items():
        assert all(torch.equal(values[name], again.state_dict()["state"][index][name]) for name in values)
    # Nested state (bitsandbytes' 8-bit AdamW keeps its quantized moments in a dict) takes "outer/inner" paths.
    nested = {"state": {0: {"qmap": {"a": torch.ones(2)}, "step": 3}}, "param_groups": []}
    tensors, meta = flatten_optimizer_state(nested)
    assert list(tensors) == ["0.qmap/a"] and meta["scalars"] == {"0.step": 3}
    assert unflatten_optimizer_state(tensors, meta)["state"][0]["qmap"]["a"].tolist() == [1.0, 1.0]


def test_training_modules_import_no_private_name_of_one_another():
    """A name another module needs is public (named for what it does), not reached for through its underscore."""
    room = Path(dtback.training.__file__).parent
    reached = []
    for source in sorted(room.glob("*.py")):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dtback."):
                reached += [f"{source.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert reached == []
