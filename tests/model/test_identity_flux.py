"""IdentityPreservingFlux on a tiny diffusers FluxTransformer2DModel loaded through from_pretrained."""

from __future__ import annotations

import pytest
import torch

from dtback.errors import ConfigError
from dtback.identity.resampler import IdentityInputs
from dtback.model.identity_flux import AdapterMismatchError, IdentityPreservingFlux
from flux_helpers import identity_inputs, make_model, randomise_outputs, save_tiny_flux, transformer_inputs


def run(model, base, identity=None, **kwargs):
    with torch.no_grad():
        if model is None:
            return base(**transformer_inputs())[0]
        return model(identity=identity, **kwargs, **transformer_inputs())[0]


def test_layout_follows_pulid_rule_and_explicit_indices(load_base):
    base = load_base()
    assert list(make_model(base).adapters) == ["double_0", "single_0"]
    dense = make_model(base, adapter_double_interval=1, adapter_single_interval=2)
    assert list(dense.adapters) == ["double_0", "double_1", "single_0", "single_2"]
    explicit = make_model(base, adapter_double_blocks=[1], adapter_single_blocks=[3, 1])
    assert list(explicit.adapters) == ["double_1", "single_1", "single_3"]
    with pytest.raises(ConfigError, match=r"model.adapter_single_blocks=\[7\]: \[7\] out of range, the transformer has 4"):
        make_model(base, adapter_single_blocks=[7])


def test_fresh_adapters_equal_the_base_exactly(load_base):
    base = load_base()
    reference = run(None, base)
    model = make_model(base, adapter_double_interval=1, adapter_single_interval=1).attach(base)
    assert torch.equal(run(model, base, identity_inputs()), reference)


def test_scale_zero_equals_base_and_nonzero_does_not(load_base):
    base = load_base()
    reference = run(None, base)
    model = make_model(base, adapter_double_interval=1, adapter_single_interval=1).attach(base)
    randomise_outputs(model)
    assert torch.equal(run(model, base, identity_inputs(), face_scale=0.0, body_scale=0.0), reference)
    assert torch.equal(run(model, base, None), reference)
    face_only = run(model, base, identity_inputs(), body_scale=0.0)
    body_only = run(model, base, identity_inputs(), face_scale=0.0)
    both = run(model, base, identity_inputs())
    for output in (face_only, body_only, both):
        assert (output - reference).abs().max() > 1e-4
    assert not torch.allclose(face_only, body_only)


def test_per_sample_scales_and_missing_face(load_base):
    base = load_base()
    reference = run(None, base)
    model = make_model(base).attach(base)
    randomise_outputs(model)
    body_only = run(model, base, identity_inputs(), face_scale=0.0)
    # Sample 0 has no face in any reference: its face branch is skipped, sample 1 is untouched.
    inputs = identity_inputs()
    inputs.face_mask[0] = False
    masked = run(model, base, inputs)
    full = run(model, base, identity_inputs())
    assert torch.allclose(masked[0], body_only[0], atol=1e-6)
    assert torch.equal(masked[1], full[1])
    # Per-sample scales: sample 1 switched off entirely.
    off = run(model, base, identity_inputs(), face_scale=torch.tensor([1.0, 0.0]), body_scale=torch.tensor([1.0, 0.0]))
    assert torch.equal(off[1], reference[1]) and torch.equal(off[0], full[0])


def test_timestep_range_gates_injection(load_base):
    base = load_base()
    reference = run(None, base)
    model = make_model(base).attach(base)
    randomise_outputs(model)
    timestep = transformer_inputs()["timestep"]
    low, high = sorted(timestep.tolist())
    gated = run(model, base, identity_inputs(), active_timesteps=(low - 1e-3, (low + high) / 2))
    full = run(model, base, identity_inputs())
    first = int(timestep.argmin())
    assert torch.equal(gated[first], full[first])
    assert torch.equal(gated[1 - first], reference[1 - first])


def test_gradients_reach_only_adapters_and_resamplers(load_base):
    base = load_base()
    model = make_model(base, adapter_double_interval=1, adapter_single_interval=1).attach(base)
    randomise_outputs(model)
    model(identity=identity_inputs(), **transformer_inputs())[0].square().mean().backward()
    assert all(p.grad is None for p in base.parameters())
    names = [n for n, _ in model.named_parameters()]
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Only the face patch projection is unused (these inputs carry no face patch tokens, so it is not built).
    assert names and not no_grad
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters()}


def test_lora_gets_gradients_too_and_detach_removes_it(load_base):
    base = load_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = make_model(base, lora_rank=2).attach(base)
    randomise_outputs(model)
    lora = dict(model.lora_parameters())
    assert lora and all(p.requires_grad for p in lora.values())
    model(identity=identity_inputs(), **transformer_inputs())[0].square().mean().backward()
    # LoRA starts with B = 0, so A's gradient is zero at step 0 while B's is not.
    assert all(p.grad is not None for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    frozen = [n for n, p in base.named_parameters() if p.grad is not None and n not in lora]
    assert frozen == []
    model.detach()
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_attach_detach_restores_the_base(load_base):
    base = load_base()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    reference = run(None, base)
    model = make_model(base, adapter_double_interval=1, adapter_single_interval=1).attach(base)
    randomise_outputs(model)
    model.set_identity(model.encode_identity(identity_inputs()))
    assert not torch.equal(run(None, base), reference)  # hooks active through the plain transformer call
    assert model.detach() is base
    after = base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(run(None, base), reference)
    with pytest.raises(RuntimeError, match="not attached"):
        model.detach()


@pytest.mark.parametrize("name", ["adapter_dir", "adapter.safetensors", "best_model.pt"])
def test_save_load_into_a_fresh_base_is_identical(load_base, tmp_path, name):
    base = load_base()
    model = make_model(base, lora_rank=2, adapter_double_interval=1).attach(base)
    randomise_outputs(model)
    with torch.no_grad():
        for _, param in model.lora_parameters():
            param.add_(torch.randn_like(param) * 0.05)
    expected = run(model, base, identity_inputs())
    path = model.save_pretrained(tmp_path / name)
    assert not list(tmp_path.rglob("*.tmp-*"))
    fresh = load_base()
    loaded = IdentityPreservingFlux.from_pretrained(path, transformer=fresh)
    assert loaded.spec == model.spec
    assert torch.equal(run(loaded, fresh, identity_inputs()), expected)


def test_loading_into_another_base_names_both_shapes(load_base, tmp_path):
    base = load_base()
    path = make_model(base).save_pretrained(tmp_path / "adapter")
    other = save_tiny_flux(tmp_path / "other", num_single_layers=2)
    from diffusers import FluxTransformer2DModel

    with pytest.raises(AdapterMismatchError, match=r"num_single_layers: 4 vs 2"):
        IdentityPreservingFlux.from_pretrained(path, transformer=FluxTransformer2DModel.from_pretrained(other))


def test_foreign_or_broken_checkpoints_get_clear_errors(tmp_path, load_base):
    torch.save({"weights": torch.ones(2)}, tmp_path / "foreign.pt")
    with pytest.raises(AdapterMismatchError, match="expected keys 'config' and 'state_dict'"):
        IdentityPreservingFlux.from_pretrained(tmp_path / "foreign.pt")
    (tmp_path / "torn.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(AdapterMismatchError, match="torn.pt: not a tensors-only dtback checkpoint") as caught:
        IdentityPreservingFlux.from_pretrained(tmp_path / "torn.pt")
    assert "weights_only" not in str(caught.value) and len(str(caught.value)) < 300  # not torch's page of advice
    assert str(caught.value).endswith("(damaged, or it holds Python objects beyond tensors, which dtback never "
                                      "unpickles: Unsupported operand 110)")
    folder = make_model(load_base()).save_pretrained(tmp_path / "adapter")
    (folder / "adapter_config.json").write_text('{"format": "something-else"}')
    with pytest.raises(AdapterMismatchError, match="not a dtback identity adapter"):
        IdentityPreservingFlux.from_pretrained(folder)
    reshaped = make_model(load_base()).save_pretrained(tmp_path / "reshaped")
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    tensors = load_file(reshaped / "adapter.safetensors")
    name = next(key for key in sorted(tensors) if key.endswith(".bias"))
    tensors[name] = torch.zeros(7)
    save_file(tensors, reshaped / "adapter.safetensors")
    with pytest.raises(AdapterMismatchError, match=f"weights of another shape than the adapter config: {name} \\(7,\\)"):
        IdentityPreservingFlux.from_pretrained(reshaped)


@pytest.mark.parametrize("name", ["best_model.pt", "adapter.safetensors", "adapter_dir"])
def test_a_nan_or_cut_short_adapter_is_refused_in_one_line(load_base, tmp_path, name):
    """from_pretrained reads through the vetted reader: NaN weights used to load (every image NaN), a cut-short file
    ended in safetensors' or torch's own error."""
    model = make_model(load_base())
    state = model.adapter_state_dict()
    key = sorted(state)[0]
    state[key] = torch.full_like(state[key], float("nan"))
    nan = model.save_pretrained(tmp_path / "nan" / name, state=state)
    with pytest.raises(AdapterMismatchError) as err:
        IdentityPreservingFlux.from_pretrained(nan, transformer=load_base())
    assert str(err.value) == f"{nan}: key {key} holds NaN or infinite values: a damaged adapter makes every image " \
                             "NaN; use an earlier checkpoint or an undamaged copy"
    whole = model.save_pretrained(tmp_path / "whole" / name)
    weights = whole / "adapter.safetensors" if whole.is_dir() else whole
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) * 9 // 10])
    with pytest.raises(AdapterMismatchError) as err:
        IdentityPreservingFlux.from_pretrained(whole)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{weights}: ")
    assert message.endswith(f"truncated: {len(data) * 9 // 10} of its {len(data)} bytes; not a whole adapter (copy "
                            "it again)" if weights.suffix == ".safetensors" else
                            f"not a tensors-only dtback checkpoint (cut short: a zip archive of {len(data) * 9 // 10} "
                            "bytes whose directory at its end is missing; copy it again)")


def test_gradient_checkpointing_gives_the_same_gradients(load_base):
    grads = []
    for checkpointing in (False, True):
        base = load_base()
        if checkpointing:
            base.enable_gradient_checkpointing()
        base.train()
        model = make_model(base, adapter_double_interval=1, adapter_single_interval=1).attach(base)
        randomise_outputs(model)
        model(identity=identity_inputs(), **transformer_inputs())[0].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7, msg=name)


def test_inputs_move_to_the_adapter_dtype(load_base):
    base = load_base()
    model = make_model(base).attach(base).to(torch.float64)
    tokens = model.encode_identity(identity_inputs())
    assert tokens.face.dtype == torch.float64 and tokens.face_valid.dtype == torch.bool
    assert isinstance(identity_inputs().to("cpu", torch.float16), IdentityInputs)


def test_a_call_leaves_no_identity_behind_without_checkpointing(load_base):
    base = load_base()
    reference = run(None, base)
    model = make_model(base).attach(base)
    randomise_outputs(model)
    model(identity=identity_inputs(), **transformer_inputs())[0].sum().backward()
    assert torch.equal(run(None, base), reference)
    base.enable_gradient_checkpointing()
    model(identity=identity_inputs(), **transformer_inputs())[0].sum().backward()
    assert model._state is not None  # kept for the recomputation in backward
    model.clear_identity()
    assert torch.equal(run(None, base), reference)


def test_run_record_is_typed_and_reads_adapters_of_earlier_versions(tmp_path):
    """``spec.extra`` (what inference rebuilds a run from) is validated, keeps keys it does not know, and an adapter
    written before the world setting moved (``identity.world_models_dir``) still gives its world folder."""
    import json

    from pydantic import ValidationError

    from dtback.backends import identity_from_adapter
    from dtback.model.adapter_file import AdapterSpec, RunRecord

    record = RunRecord().update(base_model="base", input_size=128)
    with pytest.raises(ValidationError):
        record.update(input_size="large")
    spec_json = json.loads(AdapterSpec(resampler=None, double_blocks=(), single_blocks=(), heads=1, head_dim=8,
                                       base={}, extra=record).to_json())
    assert spec_json["extra"]["base_model"] == "base" and spec_json["extra"]["input_size"] == 128
    old = RunRecord.model_validate({"base_model": "base", "identity": {"face_backend": "world", "world_models_dir":
                                    str(tmp_path)}, "input_size": 64, "future_key": 1})
    identity, world = identity_from_adapter(old, "cpu")
    assert world == tmp_path and identity.face_backend == "world" and old.future_key == 1
