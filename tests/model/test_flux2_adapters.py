"""Identity adapters on FLUX.2's transformer (``Flux2Transformer2DModel``, the [dev] and [klein] bases): a tiny random
one saved with ``save_pretrained`` and loaded through ``from_pretrained``. Its single blocks return text and image
tokens as one tensor (FLUX.1's return them apart), which the hooks split at each call's text length."""

from __future__ import annotations

import pytest
import torch
from diffusers import Flux2Transformer2DModel

from dtback.model.adapters import make_hook
from dtback.model.identity_flux import AdapterMismatchError, IdentityPreservingFlux, base_family
from flux_helpers import BATCH, IMG_TOKENS, TXT_TOKENS, identity_inputs, make_model, randomise_outputs, \
    save_tiny_flux

TINY_FLUX2 = dict(in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8, num_attention_heads=2,
                  joint_attention_dim=12, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 2, 2),
                  guidance_embeds=False)


@pytest.fixture(scope="module")
def flux2_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_flux2")
    Flux2Transformer2DModel(**TINY_FLUX2).save_pretrained(folder)
    return folder


@pytest.fixture
def base(flux2_dir):
    return Flux2Transformer2DModel.from_pretrained(flux2_dir).requires_grad_(False).eval()


def inputs(seed: int = 4) -> dict:
    """FLUX.2's inputs: no pooled text embedding; positions on 4 axes (t, h, w, l), text along l."""
    generator = torch.Generator().manual_seed(seed)
    side = int(IMG_TOKENS**0.5)
    one, grid, text = torch.arange(1), torch.arange(side), torch.arange(TXT_TOKENS)
    return dict(
        hidden_states=torch.randn(BATCH, IMG_TOKENS, TINY_FLUX2["in_channels"], generator=generator),
        encoder_hidden_states=torch.randn(BATCH, TXT_TOKENS, TINY_FLUX2["joint_attention_dim"], generator=generator),
        timestep=torch.rand(BATCH, generator=generator),
        img_ids=torch.cartesian_prod(one, grid, grid, one), txt_ids=torch.cartesian_prod(one, one, one, text),
        return_dict=False,
    )


def run(model, base, identity=None, **kwargs):
    with torch.no_grad():
        if model is None:
            return base(**inputs())[0]
        return model(identity=identity, **kwargs, **inputs())[0]


def every_block(base):
    return make_model(base, adapter_double_interval=1, adapter_single_interval=1)


def test_the_family_is_told_by_the_config(base, tmp_path):
    assert base_family(base.config) == "flux2"
    from diffusers import FluxTransformer2DModel

    assert base_family(FluxTransformer2DModel.from_pretrained(save_tiny_flux(tmp_path / "f1")).config) == "flux1"
    with pytest.raises(AdapterMismatchError, match="not a FLUX transformer config"):
        base_family({"num_layers": 2})


def test_fresh_adapters_on_flux2_equal_the_base_exactly(base):
    reference = run(None, base)
    model = every_block(base).attach(base)
    assert list(model.adapters) == ["double_0", "double_1", "single_0", "single_1", "single_2"]
    assert torch.equal(run(model, base, identity_inputs()), reference)


def test_scale_zero_equals_the_base_and_trained_adapters_move_the_image(base):
    reference = run(None, base)
    model = every_block(base).attach(base)
    randomise_outputs(model)
    assert torch.equal(run(model, base, identity_inputs(), face_scale=0.0, body_scale=0.0), reference)
    assert torch.equal(run(model, base, None), reference)
    assert (run(model, base, identity_inputs()) - reference).abs().max() > 1e-4
    model.detach()
    assert torch.equal(run(None, base), reference)


def test_the_single_block_hook_changes_image_tokens_only():
    """The joint output is split at the text length: text rows pass through untouched, image rows get the update."""
    torch.manual_seed(0)
    dim, text = 16, TXT_TOKENS
    from dtback.model.adapters import IdentityCrossAttention, InjectionState

    adapter = IdentityCrossAttention(dim, heads=2, head_dim=8, face=True, body=False)
    torch.nn.init.normal_(adapter.to_out.weight)
    identity = type("Tokens", (), {"face": torch.randn(BATCH, 3, dim), "body": None})()
    state = InjectionState(identity, torch.ones(BATCH), torch.zeros(BATCH))
    joint = torch.randn(BATCH, text + IMG_TOKENS, dim)
    out = make_hook(adapter, lambda: state, lambda: text)(None, (), joint)
    assert out.shape == joint.shape
    assert torch.equal(out[:, :text], joint[:, :text])
    expected = joint[:, text:] + adapter(joint[:, text:], identity, state.face_scale, state.body_scale)
    assert torch.allclose(out[:, text:], expected)
    with pytest.raises(TypeError, match="attach\\(\\) it as a FLUX.2 base"):
        make_hook(adapter, lambda: state)(torch.nn.Identity(), (), joint)


def test_gradients_reach_only_the_adapters_and_resampler(base):
    model = every_block(base).attach(base)
    randomise_outputs(model)
    out = model(identity=identity_inputs(), **inputs())[0]
    out.square().mean().backward()
    assert all(p.grad is None for p in base.parameters())
    for name, adapter in model.adapters.items():
        assert adapter.to_out.weight.grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.resampler.parameters())


def test_adapters_never_cross_families(base, tmp_path):
    from diffusers import FluxTransformer2DModel

    flux1 = FluxTransformer2DModel.from_pretrained(save_tiny_flux(tmp_path / "flux1"))
    saved = make_model(flux1).save_pretrained(tmp_path / "adapter1")
    with pytest.raises(AdapterMismatchError, match=r"trained on a FLUX\.1 \(FluxTransformer2DModel\) transformer.*"
                                                   r"but the base is a FLUX\.2 \(Flux2Transformer2DModel\)"):
        IdentityPreservingFlux.from_pretrained(saved, transformer=base)
    saved = every_block(base).save_pretrained(tmp_path / "adapter2")
    with pytest.raises(AdapterMismatchError, match=r"family: flux2 vs flux1"):
        IdentityPreservingFlux.from_pretrained(saved, transformer=flux1)
    loaded = IdentityPreservingFlux.from_pretrained(saved, transformer=base)  # its own family: fine
    assert torch.equal(run(loaded, base, identity_inputs()), run(None, base))


def test_an_adapter_saved_before_families_reads_as_flux1(tmp_path):
    import json

    from diffusers import FluxTransformer2DModel

    from dtback.model.adapter_file import CONFIG_FILE

    flux1 = FluxTransformer2DModel.from_pretrained(save_tiny_flux(tmp_path / "flux1"))
    saved = make_model(flux1).save_pretrained(tmp_path / "old")
    config = json.loads((saved / CONFIG_FILE).read_text())
    del config["base"]["family"]  # as written by dtback before FLUX.2
    (saved / CONFIG_FILE).write_text(json.dumps(config))
    assert IdentityPreservingFlux.from_pretrained(saved, transformer=flux1).spec.base["family"] == "flux1"


@pytest.mark.parametrize("family", ["flux1", "flux2"])
def test_a_few_steps_reduce_the_loss_and_move_only_the_adapters(base, tmp_path, family):
    """The same adapters on either family learn (a fixed target, Adam) while the base stays as it was."""
    if family == "flux1":
        from diffusers import FluxTransformer2DModel

        from flux_helpers import transformer_inputs

        base = FluxTransformer2DModel.from_pretrained(save_tiny_flux(tmp_path / "f1")).requires_grad_(False)
        step_inputs = transformer_inputs()
    else:
        step_inputs = inputs()
    frozen = {name: tensor.clone() for name, tensor in base.state_dict().items()}
    model = every_block(base).attach(base)
    target = torch.randn(base(**step_inputs)[0].shape, generator=torch.Generator().manual_seed(9))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (model(identity=identity_inputs(), **step_inputs)[0] - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(torch.equal(tensor, frozen[name]) for name, tensor in base.state_dict().items())


def test_lora_on_flux2_reaches_the_single_blocks_and_detaches(base):
    reference = run(None, base)
    model = make_model(base, lora_rank=2)
    assert model.spec.lora["targets"] == ["to_q", "to_k", "to_v", "to_out.0", "to_qkv_mlp_proj"]
    model.attach(base)
    wrapped = {name for name, module in base.named_modules() if hasattr(module, "lora_A")}
    assert any(name.startswith("single_transformer_blocks.") for name in wrapped)
    assert any(name.startswith("transformer_blocks.") for name in wrapped)
    model(identity=identity_inputs(), **inputs())[0].square().mean().backward()
    assert any(p.grad is not None for name, p in base.named_parameters() if "lora_B" in name and "single" in name)
    model.detach()
    assert torch.equal(run(None, base), reference)
