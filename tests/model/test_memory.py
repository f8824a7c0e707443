"""Memory modes: int8 base, checkpointing every k-th block, 8-bit AdamW, encoders offloaded after the caches."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dtback.config import ModelConfig, TrainingConfig, load_config
from dtback.errors import ConfigError, DtbackError
from dtback.model.flux import build_simple_pipeline
from dtback.model.memory import (
    apply_checkpointing, enable_checkpointing, finish_caching, make_adamw, offload_encoders, place_for_caching,
    quantize_base, transformer_blocks, weight_bytes,
)
from dtback.training.checkpoint import _optimizer_state, _optimizer_tensors
from dtback.training.features import decode_latents
from flux_helpers import identity_inputs, make_model, randomise_outputs, transformer_inputs

needs_torchao = pytest.mark.skipif(importlib.util.find_spec("torchao") is None,
                                   reason="model.base_quantization=int8 needs torchao: pip install 'dtback[memory]'")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                               reason="training.optimizer=adamw8bit needs bitsandbytes: pip install 'dtback[memory]'")


def adapter_step(transformer, seed: int = 1):
    """One forward + backward of the identity model on ``transformer``: (output, {name: grad}) of the adapters."""
    model = make_model(transformer, seed=seed)
    randomise_outputs(model)
    model.attach(transformer)
    try:
        output = model(identity=identity_inputs(), **transformer_inputs())[0]
        output.square().mean().backward()
    finally:
        model.detach()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert len(grads) == sum(1 for _ in model.parameters())  # every resampler and adapter weight got a gradient
    return output.detach(), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


# ------------------------------------------------------------------------------------------------ int8 base


@needs_torchao
def test_int8_base_trains_the_adapters_only_and_stays_close_to_the_full_precision_base(load_base):
    reference, quantized = load_base(), load_base()
    linears = sum(isinstance(m, torch.nn.Linear) for _, block in transformer_blocks(reference) for m in block.modules())
    assert quantize_base(quantized, "int8") == linears > 0
    blocks = lambda t: sum(weight_bytes(block) for _, block in transformer_blocks(t))  # noqa: E731
    assert blocks(quantized) < 0.45 * blocks(reference)  # fp32 -> int8 + one fp32 scale per output channel

    out_ref, grads_ref = adapter_step(reference)
    out_q, grads_q = adapter_step(quantized)
    assert all(p.grad is None and not p.requires_grad for p in quantized.parameters())
    assert relative(out_q, out_ref) < 0.01
    for name, grad in grads_ref.items():
        assert grad.norm() > 0, name
        assert relative(grads_q[name], grad) < 0.05, name


@needs_torchao
def test_quantize_refuses_a_trainable_base_and_unknown_modes(load_base):
    assert quantize_base(load_base(), None) == 0
    with pytest.raises(ConfigError, match="model.base_quantization: unknown mode 'int4'"):
        quantize_base(load_base(), "int4")
    with pytest.raises(DtbackError, match="model.base_quantization=int8 needs a frozen base"):
        quantize_base(load_base().requires_grad_(True), "int8")


def test_base_quantization_keys_fail_early_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match="base_quantization=int8 needs a frozen base"):
        ModelConfig(base_quantization="int8")  # use_simple_model defaults to true
    with pytest.raises(ValueError, match="LoRA on a quantized base is not supported"):
        ModelConfig(use_simple_model=False, base_quantization="int8", lora_rank=4)
    with pytest.raises(ConfigError, match="training.gradient_checkpointing_every"):
        load_config(None, ["training.gradient_checkpointing_every=0"])
    cfg = load_config(None, ["model.use_simple_model=false", "model.base_quantization=int8",
                             "model.offload_after_cache=true", "training.optimizer=adamw8bit"])
    assert (cfg.model.base_quantization, cfg.model.offload_after_cache) == ("int8", True)
    with pytest.raises(ConfigError, match="training.compile=true with model.base_quantization=int8: torch.compile "
                                          "cannot compile a training step through torchao's quantized weights"):
        load_config(None, ["model.use_simple_model=false", "model.base_quantization=int8", "training.compile=true"])


@pytest.mark.slow
@needs_torchao
def test_compiled_blocks_still_cannot_train_through_int8_weights(load_base):
    """The reason the config refuses training.compile with model.base_quantization: the first compiled training
    step through torchao's int8 weights fails inside torch. When a torch/torchao release passes this test, lift the
    refusal (config.Config._compile_with_int8) and measure the compiled int8 rows on a GPU."""
    transformer = load_base()
    quantize_base(transformer, "int8")
    transformer.compile_repeated_blocks()
    inputs = transformer_inputs()
    latents = inputs["hidden_states"].clone().requires_grad_(True)
    from torch._dynamo.exc import BackendCompilerFailed  # noqa: PLC0415

    with pytest.raises(BackendCompilerFailed, match="alias") as caught:
        transformer(**{**inputs, "hidden_states": latents})[0].square().mean().backward()
    assert "subclass" in str(caught.value)


# -------------------------------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("every", [1, 2, 4])
def test_checkpointing_every_kth_block_gives_the_grads_of_none(load_base, every):
    transformer = load_base()
    out_plain, grads_plain = adapter_step(transformer)

    calls: dict[str, int] = {}
    handles = [block.register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
               for name, block in transformer_blocks(transformer)]
    names = enable_checkpointing(transformer, every)
    out_ckpt, grads_ckpt = adapter_step(transformer)
    for handle in handles:
        handle.remove()

    blocks = [name for name, _ in transformer_blocks(transformer)]  # 2 double + 4 single
    assert names == blocks[::every]
    # A checkpointed block runs again in backward; the others run once.
    assert calls == {name: 2 if name in names else 1 for name in blocks}
    torch.testing.assert_close(out_ckpt, out_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)


def test_apply_checkpointing_follows_the_config(load_base):
    transformer = load_base()
    assert apply_checkpointing(transformer, TrainingConfig()) == [] and not transformer.gradient_checkpointing
    names = apply_checkpointing(transformer, TrainingConfig(gradient_checkpointing=True, gradient_checkpointing_every=3))
    assert names == ["transformer_blocks.0", "single_transformer_blocks.1"] and transformer.gradient_checkpointing
    assert apply_checkpointing(transformer, TrainingConfig()) == [] and not transformer.gradient_checkpointing
    with pytest.raises(ConfigError, match="training.gradient_checkpointing_every must be >= 1"):
        enable_checkpointing(transformer, 0)


# ------------------------------------------------------------------------------------------------- AdamW


def test_adamw_uses_torchs_fused_kernel_on_the_cpu_and_steps_as_the_loop_does():
    torch.manual_seed(0)
    starts = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(s) for s in starts] for _ in range(5)]
    fused = [torch.nn.Parameter(s.clone()) for s in starts]
    loop = [torch.nn.Parameter(s.clone()) for s in starts]
    opt = make_adamw([{"params": fused, "lr": 1e-2}], TrainingConfig())
    reference = torch.optim.AdamW(loop, lr=1e-2, betas=(0.9, 0.999), weight_decay=0.01, foreach=False)
    assert opt.defaults["fused"] is True
    for step in grads:
        for params, optimizer in ((fused, opt), (loop, reference)):
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
    for a, b, start in zip(fused, loop, starts):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(a.detach(), start)


def test_torchao_and_bitsandbytes_are_imported_only_by_the_memory_modes_that_use_them():
    """Their imports print kernel warnings and take seconds; the modes that are off must not pay for them."""
    code = ("import sys, torch\n"
            "from dtback.config import TrainingConfig\n"
            "from dtback.model.memory import make_adamw, quantize_base\n"
            "assert quantize_base(torch.nn.Linear(2, 2), None) == 0\n"
            "make_adamw([{'params': [torch.nn.Parameter(torch.ones(2))], 'lr': 0.1}], TrainingConfig())\n"
            "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torchao', 'bitsandbytes')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------------- 8-bit AdamW


@needs_bnb
def test_adamw8bit_keeps_8bit_moments_that_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    start = torch.randn(64, 128)
    cfg8, cfg32 = TrainingConfig(optimizer="adamw8bit"), TrainingConfig()
    p8, p32 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt8, opt32 = make_adamw([{"params": [p8], "lr": 1e-2}], cfg8), make_adamw([{"params": [p32], "lr": 1e-2}], cfg32)
    grads = [torch.randn(64, 128) for _ in range(6)]
    for grad in grads[:3]:
        for p, opt in ((p8, opt8), (p32, opt32)):
            p.grad = grad.clone()
            opt.step()
    moments = {k: v for k, v in opt8.state[p8].items() if isinstance(v, torch.Tensor) and v.numel() == start.numel()}
    assert moments and all(v.dtype == torch.uint8 for v in moments.values())  # 1 byte per moment, not 4
    assert relative(p8.detach(), p32.detach()) < 0.01

    # The trainer's checkpoint format (tensors in safetensors + scalars in JSON) holds the 8-bit state, which
    # bitsandbytes nests in a dict of its own.
    tensors, meta = _optimizer_tensors(opt8.state_dict())
    assert sum(v.dtype == torch.uint8 for v in tensors.values()) == 2
    save_file(tensors, tmp_path / "optimizer.safetensors")
    meta = json.loads(json.dumps(meta))
    resumed = torch.nn.Parameter(p8.detach().clone())
    opt_resumed = make_adamw([{"params": [resumed], "lr": 1e-2}], cfg8)
    opt_resumed.load_state_dict(_optimizer_state(load_file(tmp_path / "optimizer.safetensors"), meta))
    for grad in grads[3:]:
        for p, opt in ((p8, opt8), (resumed, opt_resumed)):
            p.grad = grad.clone()
            opt.step()
    torch.testing.assert_close(resumed.detach(), p8.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------- offloading


@pytest.fixture(scope="module")
def pipeline():
    return build_simple_pipeline(seed=0)


def parameter_devices(module) -> set[str]:
    return {p.device.type for p in module.parameters()}


def test_offload_moves_the_text_encoders_and_vae_encoder_off_the_device_and_keeps_the_decoder(pipeline):
    # The CPU is this machine's only device; the meta device stands for "elsewhere" (nothing is copied there).
    latents = torch.randn(1, pipeline.vae.config.latent_channels, 4, 4)
    decoded = decode_latents(pipeline.vae, latents)
    moved = offload_encoders(pipeline, to="meta")
    assert moved == ["text_encoder", "text_encoder_2", "vae.encoder"]  # this VAE has no quant_conv (FLUX's has none)
    for module in (pipeline.text_encoder, pipeline.text_encoder_2, pipeline.vae.encoder):
        assert parameter_devices(module) == {"meta"}
    for module in (pipeline.transformer, pipeline.vae.decoder):
        assert parameter_devices(module) == {"cpu"}
    # What training still needs after the caches: decoding the x0 prediction (identity loss, validation).
    torch.testing.assert_close(decode_latents(pipeline.vae, latents), decoded)


def test_with_offload_the_transformer_reaches_the_device_after_the_caches(pipeline, monkeypatch):
    placed: list[tuple[str, str]] = []
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        module = getattr(pipeline, name)
        monkeypatch.setattr(module, "to", lambda *args, name=name, **kw: placed.append((name, str(args[0]))))
    monkeypatch.setattr(pipeline.vae.encoder, "to", lambda *args, **kw: placed.append(("vae.encoder", str(args[0]))))

    cfg = ModelConfig(offload_after_cache=True)
    place_for_caching(pipeline, "cuda:0", cfg)
    assert placed == [("text_encoder", "cuda:0"), ("text_encoder_2", "cuda:0"), ("vae", "cuda:0")]
    placed.clear()
    assert finish_caching(pipeline, "cuda:0", cfg) == ["text_encoder", "text_encoder_2", "vae.encoder"]
    assert placed == [("text_encoder", "cpu"), ("text_encoder_2", "cpu"), ("vae.encoder", "cpu"),
                      ("transformer", "cuda:0")]

    placed.clear()
    assert finish_caching(pipeline, "cuda:0", ModelConfig()) == []  # without the key nothing leaves the device
    assert placed == [("transformer", "cuda:0")]
