"""IdentityPreservingFlux: the trainable part of dtback — resamplers, adapters and optional LoRA — for any FLUX base.

It owns the :class:`~dtback.identity.resampler.IdentityResampler` and one
:class:`~dtback.model.adapters.IdentityCrossAttention` per chosen block, attaches them to a diffusers
``FluxTransformer2DModel`` with forward hooks (the transformer's own modules and state dict are untouched) and
detaches them again. It saves and loads itself as safetensors + JSON (a folder, one ``.safetensors`` file with the
config in its metadata, or a tensors-only ``.pt`` read with ``weights_only=True``; the format, its vetted reader and
its writer are :mod:`dtback.model.adapter_file`) and can be loaded into a base it did not create, after checking that
the base has the shape it was trained on.

Calling it runs the transformer with identity::

    model = IdentityPreservingFlux.from_config(cfg.model, cfg.identity, transformer.config, face_dim=128, body_dim=384)
    model.attach(transformer)
    out = model(identity=inputs, face_scale=1.0, hidden_states=..., timestep=..., ...)  # transformer kwargs

A call drops its identity when it returns, except with gradient checkpointing and gradients enabled: checkpointing
runs the blocks (and their hooks) again during ``backward``, so the identity stays until the next call or
:meth:`clear_identity`. :meth:`set_identity` sets an identity for plain transformer calls (a diffusers pipeline)
until it is cleared.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from dtback.config import IdentityConfig, ModelConfig
from dtback.errors import AdapterMismatchError
from dtback.identity.resampler import IdentityInputs, IdentityTokens, ResamplerSpec
from dtback.model.adapter_file import (
    BASE_KEYS, LORA_NAME, LORA_PREFIX, AdapterSpec, RunRecord, build_parts, read_adapter, write_adapter,
)
from dtback.model.adapters import AdapterLayout, InjectionState, check_model_fits_base, make_hook

logger = logging.getLogger(__name__)

# read_adapter and RunRecord stay importable from here for training/resume.py and backends.py until their imports
# move to dtback.model.adapter_file; read_adapter is the vetted reader itself, not a second one.
__all__ = ["IdentityPreservingFlux", "spec_from_config", "base_family", "base_fingerprint", "read_adapter",
           "AdapterSpec", "RunRecord", "LORA_NAME"]

FLUX1_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # model.lora_targets' default
FAMILIES = {"flux1": "FLUX.1 (FluxTransformer2DModel)", "flux2": "FLUX.2 (Flux2Transformer2DModel)"}


def base_family(transformer_config: Any) -> str:
    """``flux1`` or ``flux2``: which FLUX transformer class a config belongs to, told by the keys only one has
    (FLUX.1 takes a pooled text embedding; FLUX.2 embeds timestep and guidance in ``timestep_guidance_channels``)."""
    if "pooled_projection_dim" in transformer_config:
        return "flux1"
    if "timestep_guidance_channels" in transformer_config:
        return "flux2"
    raise AdapterMismatchError(f"not a FLUX transformer config (keys {sorted(transformer_config)})")


def base_fingerprint(transformer_config: Any) -> dict[str, int | str]:
    """The family (:func:`base_family`) and :data:`BASE_KEYS` of a FLUX transformer config."""
    return {"family": base_family(transformer_config), **{key: int(transformer_config[key]) for key in BASE_KEYS}}


def spec_from_config(
    model_cfg: ModelConfig,
    identity_cfg: IdentityConfig,
    transformer_config: Any,
    face_dim: int,
    body_dim: int,
    face_token_dim: int = 0,
    body_token_dim: int = 0,
) -> AdapterSpec:
    """Build the spec from the config sections and the base's config; ``*_dim`` of 0 leaves that part out.
    Raises :class:`ConfigError` naming the ``model.*`` key that does not fit the base."""
    check_model_fits_base(model_cfg, transformer_config)
    base = base_fingerprint(transformer_config)
    width = base["num_attention_heads"] * base["attention_head_dim"]
    layout = AdapterLayout.every(
        base["num_layers"], base["num_single_layers"], model_cfg.adapter_double_interval,
        model_cfg.adapter_single_interval, model_cfg.adapter_double_blocks, model_cfg.adapter_single_blocks,
    )
    inner = model_cfg.adapter_dim or min(width, 1024)
    heads = model_cfg.adapter_heads or max(1, inner // base["attention_head_dim"])
    if inner % heads:
        raise ValueError(f"model.adapter_heads={heads} does not divide model.adapter_dim={inner}")
    resampler = ResamplerSpec(
        output_dim=width, face_dim=face_dim, body_dim=body_dim,
        num_face_latents=identity_cfg.num_face_latents, num_body_latents=identity_cfg.num_body_latents,
        dim=model_cfg.resampler_dim or min(width, 1024), depth=model_cfg.resampler_depth,
        heads=model_cfg.resampler_heads, tokens_per_embedding=model_cfg.tokens_per_embedding,
        face_token_dim=face_token_dim, body_token_dim=body_token_dim,
    )
    lora = None
    if model_cfg.lora_rank > 0:
        targets = list(model_cfg.lora_targets)
        if base["family"] == "flux2" and targets == FLUX1_LORA_TARGETS:
            # FLUX.2's single blocks project q, k, v and the MLP input in one fused layer: without it LoRA would
            # reach the double blocks only.
            targets.append("to_qkv_mlp_proj")
        lora = {"rank": model_cfg.lora_rank, "alpha": model_cfg.lora_alpha or float(model_cfg.lora_rank),
                "targets": targets}
    return AdapterSpec(resampler, layout.double, layout.single, heads, inner // heads, base,
                       model_cfg.face_scale, model_cfg.body_scale, lora)


class IdentityPreservingFlux(nn.Module):
    """Resamplers + adapters (+ LoRA when the spec has one) for a FLUX transformer; see the module docstring."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        parts = build_parts(spec)  # the reader builds the same on the meta device to check a file's shapes
        self.resampler = parts["resampler"]
        self.adapters = parts["adapters"]
        self._handles: list[Any] = []
        self._transformer: list[nn.Module] = []  # a list, so the base is not registered as a submodule
        self._state: InjectionState | None = None
        self._text_length = 0  # FLUX.2: text tokens of the current transformer call (see attach)

    @classmethod
    def from_config(cls, model_cfg: ModelConfig, identity_cfg: IdentityConfig, transformer_config: Any,
                    **dims: int) -> "IdentityPreservingFlux":
        return cls(spec_from_config(model_cfg, identity_cfg, transformer_config, **dims))

    # ------------------------------------------------------------------------------------------ attach / detach

    @property
    def transformer(self) -> nn.Module | None:
        return self._transformer[0] if self._transformer else None

    def attach(self, transformer: nn.Module) -> "IdentityPreservingFlux":
        """Hook the adapters into ``transformer`` (and add the LoRA layers when the spec has LoRA)."""
        if self._transformer:
            raise RuntimeError("adapters are already attached; detach() first")
        self.check_base(transformer.config, source="the adapter")
        text_length = None
        if self.spec.base["family"] == "flux2":
            # FLUX.2's single blocks return text and image tokens in one tensor: the hooks split it at the prompt's
            # length, which each transformer call states.
            self._handles.append(transformer.register_forward_pre_hook(self._note_text_length, with_kwargs=True))
            text_length = self._current_text_length
        for name, adapter in self.adapters.items():
            kind, index = name.split("_")
            blocks = transformer.transformer_blocks if kind == "double" else transformer.single_transformer_blocks
            hook = make_hook(adapter, self._current_state, text_length)
            self._handles.append(blocks[int(index)].register_forward_hook(hook))
        if self.spec.lora:
            self._add_lora(transformer)
        self._transformer.append(transformer)
        return self

    def detach(self) -> nn.Module:
        """Remove hooks (and LoRA layers); the transformer's modules and state dict are as before :meth:`attach`."""
        if not self._transformer:
            raise RuntimeError("adapters are not attached")
        transformer = self._transformer.pop()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self.spec.lora:
            transformer.unload_lora()
        self._state = None
        return transformer

    def check_base(self, transformer_config: Any, source: str) -> None:
        """Raise :class:`AdapterMismatchError` naming both shapes when the base is not the one trained on."""
        found = base_fingerprint(transformer_config)
        if found != self.spec.base:
            diff = {k: (self.spec.base.get(k), found[k]) for k in found if self.spec.base.get(k) != found[k]}
            trained, given = FAMILIES[str(self.spec.base["family"])], FAMILIES[str(found["family"])]
            raise AdapterMismatchError(
                f"{source} was trained on a {trained} transformer with {self.spec.base}, but the base is a {given} "
                f"transformer with {found} (differs in {', '.join(f'{k}: {a} vs {b}' for k, (a, b) in diff.items())})"
            )

    def _add_lora(self, transformer: nn.Module) -> None:
        from peft import LoraConfig  # noqa: PLC0415  (optional feature: peft only needed with LoRA)

        lora = self.spec.lora
        transformer.add_adapter(
            LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=lora["targets"],
                       init_lora_weights=True),
            adapter_name=LORA_NAME,
        )

    # ------------------------------------------------------------------------------------------------ running

    def _note_text_length(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
        self._text_length = int(text.shape[1])

    def _current_text_length(self) -> int:
        return self._text_length

    def _current_state(self) -> InjectionState | None:
        return self._state

    def encode_identity(self, inputs: IdentityInputs) -> IdentityTokens:
        """Resample encoder features into identity tokens (in the adapters' dtype and device)."""
        param = next(self.resampler.parameters())
        return self.resampler(inputs.to(param.device, param.dtype))

    def set_identity(
        self,
        identity: IdentityTokens | None,
        face_scale: float | torch.Tensor | None = None,
        body_scale: float | torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        active_timesteps: tuple[float, float] | None = None,
    ) -> None:
        """Set what the next transformer calls inject.

        Scales are floats or per-sample ``(B,)`` tensors (None: the spec's defaults). A sample's face (body) scale
        becomes 0 when it has no valid face (body) tokens, and both become 0 when ``timestep (B,)`` (FLUX's sigma,
        1 = pure noise) lies outside ``active_timesteps = (low, high)``.
        """
        if identity is None:
            self._state = None
            return
        batch = identity.batch_size
        device = (identity.face if identity.face is not None else identity.body).device
        face = _per_sample(self.spec.face_scale if face_scale is None else face_scale, batch, device)
        body = _per_sample(self.spec.body_scale if body_scale is None else body_scale, batch, device)
        if identity.face_valid is not None:
            face = face * identity.face_valid.to(face.dtype)
        if identity.body_valid is not None:
            body = body * identity.body_valid.to(body.dtype)
        if timestep is not None and active_timesteps is not None:
            low, high = active_timesteps
            t = timestep.reshape(-1).to(device=device, dtype=face.dtype).expand(batch)
            gate = ((t >= low) & (t <= high)).to(face.dtype)
            face, body = face * gate, body * gate
        self._state = InjectionState(identity, face, body)

    def clear_identity(self) -> None:
        self._state = None

    @contextlib.contextmanager
    def identity_per_call(self, identity: IdentityTokens | None, steps: int, branches: int = 1,
                          face_scale: float | None = None, body_scale: float | None = None,
                          start: float = 0.0, end: float = 1.0) -> Iterator[None]:
        """Inside, each call of the attached transformer gets its identity by its place in a sampling loop of
        ``steps`` steps x ``branches`` calls per step (FluxPipeline's order: the prompt's call, then with true CFG
        the negative's): ``identity`` for the first branch while ``start <= step / steps < end``, none otherwise,
        so the negative branch of true CFG runs without identity. Raises if the loop made another number of calls.
        """
        if not self._transformer:
            raise RuntimeError("attach() the identity model to a transformer first")
        calls = 0

        def before_transformer(module, args, kwargs):
            nonlocal calls
            step, branch = divmod(calls, branches)
            calls += 1
            active = identity is not None and branch == 0 and start <= step / steps < end
            self.set_identity(identity if active else None, face_scale, body_scale)

        handle = self._transformer[0].register_forward_pre_hook(before_transformer, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self.clear_identity()
        if calls != branches * steps:
            # The schedule counts transformer calls: a pipeline that calls it otherwise would be misread.
            raise RuntimeError(f"expected {branches * steps} transformer calls ({steps} steps x {branches} "
                               f"branches), the pipeline made {calls}")

    def forward(
        self,
        identity: IdentityInputs | IdentityTokens | None = None,
        face_scale: float | torch.Tensor | None = None,
        body_scale: float | torch.Tensor | None = None,
        active_timesteps: tuple[float, float] | None = None,
        **transformer_kwargs: Any,
    ):
        """Run the attached transformer with ``transformer_kwargs`` and this identity (None: the plain base)."""
        if not self._transformer:
            raise RuntimeError("attach(transformer) before calling the model")
        tokens = self.encode_identity(identity) if isinstance(identity, IdentityInputs) else identity
        self.set_identity(tokens, face_scale, body_scale, transformer_kwargs.get("timestep"), active_timesteps)
        try:
            return self.transformer(**transformer_kwargs)
        finally:
            # Gradient checkpointing re-runs the blocks (and their hooks) in backward: keep the identity for it.
            if not (torch.is_grad_enabled() and getattr(self.transformer, "gradient_checkpointing", False)):
                self._state = None

    # --------------------------------------------------------------------------------------------- parameters

    def lora_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        if self._transformer and self.spec.lora:
            for name, param in self.transformer.named_parameters():
                if f".{LORA_NAME}." in name or name.endswith(f".{LORA_NAME}"):
                    yield name, param

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Resampler and adapter parameters, plus the LoRA parameters when LoRA is attached."""
        return [*self.parameters(), *(param for _, param in self.lora_parameters())]

    def adapter_state_dict(self, own: dict[str, torch.Tensor] | None = None,
                           transformer_state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Own weights, and the LoRA weights under ``lora.`` (peft's adapter-name-free keys). ``own`` and
        ``transformer_state`` replace this module's and the transformer's live state dicts (the full tensors
        gathered from FSDP shards, :func:`dtback.training.checkpoint.take_snapshot`)."""
        state = {k: v.detach().contiguous() for k, v in (self.state_dict() if own is None else own).items()}
        if self.spec.lora and self._transformer:
            from peft import get_peft_model_state_dict  # noqa: PLC0415

            lora = get_peft_model_state_dict(self.transformer, state_dict=transformer_state, adapter_name=LORA_NAME)
            state.update({LORA_PREFIX + k: v.detach().contiguous() for k, v in lora.items()})
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(LORA_PREFIX)}
        lora = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
        expected = self.state_dict()
        shapes = [f"{k} {tuple(v.shape)} (the config makes {tuple(expected[k].shape)})" for k, v in own.items()
                  if k in expected and v.shape != expected[k].shape]
        if shapes:  # load_state_dict would raise its own multi-line RuntimeError
            raise AdapterMismatchError(f"{source}: weights of another shape than the adapter config: "
                                       f"{'; '.join(shapes[:3])}{' ...' if len(shapes) > 3 else ''}")
        result = self.load_state_dict(own, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise AdapterMismatchError(
                f"{source}: weights do not match the adapter config (missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]})"
            )
        if self.spec.lora:
            if not self._transformer:
                raise RuntimeError("attach(transformer) before loading LoRA weights")
            from peft import set_peft_model_state_dict  # noqa: PLC0415

            outcome = set_peft_model_state_dict(self.transformer, lora, adapter_name=LORA_NAME)
            unexpected = getattr(outcome, "unexpected_keys", [])
            if not lora or unexpected:
                raise AdapterMismatchError(f"{source}: LoRA weights missing or not matching ({unexpected[:5]})")

    # ----------------------------------------------------------------------------------------- save and load

    def save_pretrained(self, path: str | Path, state: dict[str, torch.Tensor] | None = None) -> Path:
        """Write the adapter atomically: a folder (``adapter_config.json`` + ``adapter.safetensors``), or one
        ``.safetensors`` file (config in its metadata), or a tensors-only ``.pt`` (for the seed's file names).
        ``state``: the :meth:`adapter_state_dict` to write (default: this module's live one)."""
        state = self.adapter_state_dict() if state is None else state
        return write_adapter(path, self.spec.to_json(), state)

    @classmethod
    def from_pretrained(cls, path: str | Path, transformer: nn.Module | None = None) -> "IdentityPreservingFlux":
        """Load what :meth:`save_pretrained` wrote, through the vetted :func:`~dtback.model.adapter_file.read_adapter`
        (a damaged or edited file is an :class:`AdapterMismatchError` of one line); with ``transformer`` also check
        the base and attach to it."""
        spec, state = read_adapter(path)
        return cls.from_adapter(spec, state, str(path), transformer)

    @classmethod
    def from_adapter(cls, spec: AdapterSpec, state: dict[str, torch.Tensor], source: str,
                     transformer: nn.Module | None = None) -> "IdentityPreservingFlux":
        """The model of an adapter :func:`~dtback.model.adapter_file.read_adapter` read from ``source`` (for a caller
        that read it already, to check it before loading a base); ``transformer`` as in :meth:`from_pretrained`."""
        model = cls(spec)
        if transformer is not None:
            model.check_base(transformer.config, source=source)
            model.attach(transformer)
        elif spec.lora:
            raise ValueError(f"{source} holds LoRA weights: pass the base transformer to load them into")
        model.load_adapter_state_dict(state, source)
        return model


def _per_sample(scale: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    tensor = torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(-1)
    if tensor.numel() not in (1, batch):
        raise ValueError(f"scale has {tensor.numel()} values for a batch of {batch}")
    return tensor.expand(batch).clone()

