"""Identity cross-attention adapters and where they sit in diffusers' ``FluxTransformer2DModel``.

After a chosen block, the image tokens read the identity tokens:

    img += face_scale · W_o · Attn(q(norm(img)), k_f(face), v_f(face))
         + body_scale · W_o · Attn(q(norm(img)), k_b(body), v_b(body))

``W_o`` starts at zero, so a freshly attached adapter adds exactly nothing. FLUX.1's blocks (double and single) and
FLUX.2's double blocks return ``(encoder_hidden_states, hidden_states)`` with the image tokens already split from the
text tokens; FLUX.2's single blocks return one ``(B, text + image, dim)`` tensor, text first, which the hook splits at
the call's text length. One forward hook per block either way, and text tokens are never touched. The adapters live in
the :class:`~dtback.model.identity_flux.IdentityPreservingFlux` that owns them, never inside the transformer, so
the transformer's state dict is unchanged by attaching and detaching. Hooks run inside the transformer's gradient
checkpointing, so they are recomputed with the block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dtback.config import ModelConfig, head_choices
from dtback.errors import ConfigError
from dtback.identity.resampler import IdentityTokens

# Widths taken from the transformer (resampler_dim / adapter_dim null) are capped here.
MAX_DEFAULT_WIDTH = 1024


def check_model_fits_base(cfg: ModelConfig, transformer_config: Any) -> None:
    """Raise :class:`ConfigError` naming each ``model.*`` key that the loaded transformer cannot take: block indices
    beyond its block counts, head counts that do not divide a width taken from it. What the config alone can tell
    is checked when it is loaded; this runs as soon as the transformer's config is known."""
    counts = {"double": int(transformer_config["num_layers"]), "single": int(transformer_config["num_single_layers"])}
    head_dim = int(transformer_config["attention_head_dim"])
    width = int(transformer_config["num_attention_heads"]) * head_dim
    problems = []
    for kind, count in counts.items():
        key = f"adapter_{kind}_blocks"
        blocks = getattr(cfg, key) or []
        bad = [i for i in blocks if not 0 <= i < count]
        if bad:
            problems.append(f"model.{key}={list(blocks)}: {bad} out of range, the transformer has {count} {kind} "
                            f"blocks (indices 0..{count - 1})")
    widths = (("resampler", cfg.resampler_dim, cfg.resampler_heads),
              ("adapter", cfg.adapter_dim, cfg.adapter_heads))
    for name, dim, heads in widths:
        inner = dim or min(width, MAX_DEFAULT_WIDTH)
        heads = heads or max(1, inner // head_dim)  # only adapter_heads may be null
        if inner % heads:
            origin = f"model.{name}_dim={dim}" if dim else \
                f"model.{name}_dim null: the transformer width {width}, at most {MAX_DEFAULT_WIDTH}"
            problems.append(f"model.{name}_heads={heads} does not divide the {name} width {inner} ({origin}); "
                            f"choose one of {head_choices(inner)}")
    if problems:
        raise ConfigError("the model settings do not fit the base transformer "
                          f"({counts['double']} double + {counts['single']} single blocks, width {width}): "
                          + "; ".join(problems))


@dataclass(frozen=True)
class AdapterLayout:
    """Which blocks get an adapter: indices into ``transformer_blocks`` (double) and ``single_transformer_blocks``."""

    double: tuple[int, ...]
    single: tuple[int, ...]

    @classmethod
    def every(
        cls,
        num_double: int,
        num_single: int,
        double_interval: int,
        single_interval: int,
        double_blocks: Sequence[int] | None = None,
        single_blocks: Sequence[int] | None = None,
    ) -> "AdapterLayout":
        """Every ``interval``-th block starting at block 0 (PuLID's rule), unless explicit indices are given."""

        def pick(count: int, interval: int, explicit: Sequence[int] | None, kind: str) -> tuple[int, ...]:
            if explicit is not None:
                bad = [i for i in explicit if not 0 <= i < count]
                if bad:
                    raise ValueError(f"adapter_{kind}_blocks {bad} out of range: the transformer has {count} {kind} blocks")
                return tuple(sorted(explicit))
            return tuple(range(0, count, interval)) if interval > 0 else ()

        return cls(
            pick(num_double, double_interval, double_blocks, "double"),
            pick(num_single, single_interval, single_blocks, "single"),
        )

    def names(self) -> list[str]:
        """Adapter names in forward order: ``double_0, double_2, ..., single_0, ...``."""
        return [f"double_{i}" for i in self.double] + [f"single_{i}" for i in self.single]


class IdentityCrossAttention(nn.Module):
    """Image tokens ``(B, L, dim)`` attend to face and body tokens ``(B, N, dim)``; returns the residual update.

    Query projection and output projection are shared by both branches; each branch has its own keys and values, so
    the face and the body strength can be set independently. Queries and keys are RMS-normalised per head, as in
    FLUX's own attention, which keeps bf16 training stable.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, face: bool = True, body: bool = True):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.to_q = nn.Linear(dim, inner)
        # A part the model has no encoder for gets no projection (DDP would find it unused at every step).
        self.to_kv_face = nn.Linear(dim, 2 * inner) if face else None
        self.to_kv_body = nn.Linear(dim, 2 * inner) if body else None
        self.norm_q = nn.RMSNorm(head_dim, eps=1e-6)
        self.norm_k = nn.RMSNorm(head_dim, eps=1e-6)
        self.to_out = nn.Linear(inner, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def _branch(self, q: torch.Tensor, kv_proj: nn.Linear, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape[:2]
        k, v = kv_proj(tokens).view(batch, length, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, self.norm_k(k), v)

    def forward(self, hidden: torch.Tensor, identity: IdentityTokens, face_scale: torch.Tensor,
                body_scale: torch.Tensor) -> torch.Tensor:
        """``hidden (B, L, dim)``; scales ``(B,)`` already zero where a part is invalid → update ``(B, L, dim)``.
        A sample whose every present branch has scale 0 gets an update of exactly zero (the output bias too)."""
        batch, length, _ = hidden.shape
        q = self.to_q(self.norm(hidden)).view(batch, length, self.heads, -1).transpose(1, 2)
        q = self.norm_q(q)
        mixed, used = None, torch.zeros(batch, dtype=torch.bool, device=hidden.device)
        for tokens, kv_proj, scale in ((identity.face, self.to_kv_face, face_scale),
                                       (identity.body, self.to_kv_body, body_scale)):
            if tokens is None or kv_proj is None:
                continue
            out = self._branch(q, kv_proj, tokens) * scale.view(batch, 1, 1, 1).to(q.dtype)
            mixed = out if mixed is None else mixed + out
            used = used | (scale.to(used.device) != 0)
        if mixed is None:
            return torch.zeros_like(hidden)
        update = F.linear(mixed.transpose(1, 2).reshape(batch, length, -1), self.to_out.weight)
        return update + self.to_out.bias * used.view(batch, 1, 1).to(update.dtype)


@dataclass
class InjectionState:
    """What the hooks inject during one transformer call: tokens and per-sample scales ``(B,)``."""

    identity: IdentityTokens
    face_scale: torch.Tensor
    body_scale: torch.Tensor
    active: bool = field(init=False)

    def __post_init__(self) -> None:
        # Decided once per call, not once per hooked block: all-zero scales skip the adapters entirely.
        # Meta tensors (FLOP counting without weights) have no values to read: count the adapters as active.
        self.active = self.face_scale.is_meta or bool((self.face_scale != 0).any() or (self.body_scale != 0).any())


def make_hook(adapter: IdentityCrossAttention, state: Callable[[], InjectionState | None],
              text_length: Callable[[], int] | None = None):
    """A forward hook for a FLUX block that adds ``adapter``'s update to the image tokens of its output; a block
    that returns one joint tensor (FLUX.2 single blocks) is split after ``text_length()`` tokens."""

    def hook(module: nn.Module, args, output):
        current = state()
        if current is None or not current.active:
            return None  # exactly the base block
        joint = isinstance(output, torch.Tensor)
        if joint and text_length is None:
            raise TypeError(f"{type(module).__name__} returned one tensor: attach() it as a FLUX.2 base")
        encoder_hidden_states, hidden_states = (output[:, :text_length()], output[:, text_length():]) if joint \
            else output
        weight = adapter.to_out.weight
        # The adapter runs where its weights (and the identity tokens, made by the same model) are; under CPU offload
        # or a device map that is the block's device, and otherwise the update is computed there and moved back.
        update = adapter(hidden_states.to(weight.device, weight.dtype), current.identity, current.face_scale,
                         current.body_scale)
        hidden_states = hidden_states + update.to(hidden_states.device, hidden_states.dtype)
        if joint:
            return torch.cat([encoder_hidden_states, hidden_states], dim=1)
        return encoder_hidden_states, hidden_states

    return hook
