"""Perceiver resamplers: face and body features of one or more reference images -> identity tokens.

A character is given by ``R`` reference images. Each reference contributes

- a global vector (the face embedding, or the body encoder's pooled vector), expanded to ``tokens_per_embedding``
  tokens by a linear map (as IP-Adapter does), and
- optionally patch tokens (face patch features, body patch tokens), projected to the resampler width.

All tokens of all references are concatenated and a perceiver resampler (learned latents that cross-attend to the
tokens and to themselves, followed by a feed-forward, ``depth`` times) reads them into a fixed number of latents:
``num_face_latents`` / ``num_body_latents`` tokens in the transformer's width. Aggregation over references is
therefore attention, not averaging: the latents may weigh a sharp frontal face above a blurred profile.

A reference without a face is masked out of the keys; a sample whose references all lack a face gets
``face_valid = False`` and the adapters skip its face branch, so a missing face is never a zero vector pretending to
be one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class IdentityInputs:
    """Encoder features of ``R`` references per sample. Masks are bool, True where the reference has that part.

    ``face_embeds (B, R, Df)``, ``face_tokens (B, R, P, Dp)`` or None, ``face_mask (B, R)``;
    ``body_pooled (B, R, Db)``, ``body_tokens (B, R, N, Db)`` or None, ``body_mask (B, R)``.
    Either part may be None altogether (no face encoder / no body encoder).
    """

    face_embeds: torch.Tensor | None = None
    face_mask: torch.Tensor | None = None
    face_tokens: torch.Tensor | None = None
    body_pooled: torch.Tensor | None = None
    body_mask: torch.Tensor | None = None
    body_tokens: torch.Tensor | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "IdentityInputs":
        """A copy on ``device``; float tensors also cast to ``dtype`` when given (masks stay bool)."""

        def move(value: torch.Tensor | None) -> torch.Tensor | None:
            if value is None:
                return None
            if value.is_floating_point() and dtype is not None:
                return value.to(device=device, dtype=dtype)
            return value.to(device)

        return IdentityInputs(*(move(getattr(self, name)) for name in self.__dataclass_fields__))


@dataclass
class IdentityTokens:
    """Resampled identity: ``face (B, Nf, D)``, ``face_valid (B,)`` bool, ``body (B, Nb, D)``, ``body_valid (B,)``.

    A part is None when the model has no resampler for it.
    """

    face: torch.Tensor | None
    face_valid: torch.Tensor | None
    body: torch.Tensor | None
    body_valid: torch.Tensor | None

    @property
    def batch_size(self) -> int:
        reference = self.face if self.face is not None else self.body
        if reference is None:
            raise ValueError("IdentityTokens holds neither face nor body tokens")
        return reference.shape[0]


class FeedForward(nn.Sequential):
    """LayerNorm -> Linear(dim, mult*dim) -> GELU -> Linear(mult*dim, dim)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, dim * mult), nn.GELU(), nn.Linear(dim * mult, dim))


class PerceiverAttention(nn.Module):
    """Latents attend to ``[inputs; latents]`` (Flamingo's perceiver), with a key mask for the inputs."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"resampler width {dim} is not divisible by its {heads} heads")
        self.heads = heads
        self.norm_inputs = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim, bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)

    def forward(self, inputs: torch.Tensor, latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``inputs (B, T, D)``, ``latents (B, L, D)``, ``mask (B, T)`` bool → ``(B, L, D)``."""
        batch, num_latents, dim = latents.shape
        latents_n = self.norm_latents(latents)
        context = torch.cat([self.norm_inputs(inputs), latents_n], dim=1)
        # Latents always see themselves, so no row of the attention is empty even when every input is masked.
        key_mask = torch.cat([mask, mask.new_ones(batch, num_latents)], dim=1)
        q = self.to_q(latents_n).view(batch, num_latents, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(context).view(batch, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        return self.to_out(out.transpose(1, 2).reshape(batch, num_latents, dim))


class PerceiverResampler(nn.Module):
    """Global vectors (+ optional patch tokens) of ``R`` references → ``num_latents`` tokens of ``output_dim``.

    ``forward(vectors (B, R, Din), mask (B, R), tokens (B, R, P, Dt) | None)`` → ``(latents (B, L, Dout),
    valid (B,))`` where ``valid`` says whether any reference of the sample was present.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_latents: int,
        dim: int,
        depth: int = 2,
        heads: int = 8,
        tokens_per_embedding: int = 4,
        token_dim: int | None = None,
    ):
        super().__init__()
        self.dim = dim
        self.tokens_per_embedding = tokens_per_embedding
        self.vector_proj = nn.Linear(input_dim, dim * tokens_per_embedding)
        self.token_proj = nn.Linear(token_dim, dim) if token_dim else None
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * dim**-0.5)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads), FeedForward(dim)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def forward(
        self, vectors: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch, refs, _ = vectors.shape
        mask = mask.to(device=vectors.device, dtype=torch.bool)
        inputs = self.vector_proj(vectors).view(batch, refs * self.tokens_per_embedding, self.dim)
        input_mask = mask.repeat_interleave(self.tokens_per_embedding, dim=1)
        if tokens is not None:
            if self.token_proj is None:
                raise ValueError("this resampler was built without patch tokens (token_dim=None) but got some")
            patches = tokens.shape[2]
            inputs = torch.cat([inputs, self.token_proj(tokens).reshape(batch, refs * patches, self.dim)], dim=1)
            input_mask = torch.cat([input_mask, mask.repeat_interleave(patches, dim=1)], dim=1)
        latents = self.latents.unsqueeze(0).expand(batch, -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(inputs, latents, input_mask)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(latents)), mask.any(dim=1)


@dataclass(frozen=True)
class ResamplerSpec:
    """Sizes of both resamplers; saved with the adapter so a checkpoint rebuilds itself. A ``*_dim`` of 0 means
    the part is absent (no face / no body identity)."""

    output_dim: int
    face_dim: int
    body_dim: int
    num_face_latents: int
    num_body_latents: int
    dim: int
    depth: int = 2
    heads: int = 8
    tokens_per_embedding: int = 4
    face_token_dim: int = 0
    body_token_dim: int = 0


class IdentityResampler(nn.Module):
    """Face and body perceiver resamplers: :class:`IdentityInputs` → :class:`IdentityTokens`."""

    def __init__(self, spec: ResamplerSpec):
        super().__init__()
        self.spec = spec
        self.face = self._part(spec.face_dim, spec.num_face_latents, spec.face_token_dim)
        self.body = self._part(spec.body_dim, spec.num_body_latents, spec.body_token_dim)

    def _part(self, input_dim: int, num_latents: int, token_dim: int) -> PerceiverResampler | None:
        if not input_dim:
            return None
        spec = self.spec
        return PerceiverResampler(
            input_dim, spec.output_dim, num_latents, spec.dim, spec.depth, spec.heads, spec.tokens_per_embedding,
            token_dim or None,
        )

    def forward(self, inputs: IdentityInputs) -> IdentityTokens:
        face = face_valid = body = body_valid = None
        if self.face is not None and inputs.face_embeds is not None:
            face, face_valid = self.face(inputs.face_embeds, _mask(inputs.face_mask, inputs.face_embeds, "face"),
                                         inputs.face_tokens)
        if self.body is not None and inputs.body_pooled is not None:
            body, body_valid = self.body(inputs.body_pooled, _mask(inputs.body_mask, inputs.body_pooled, "body"),
                                         inputs.body_tokens)
        return IdentityTokens(face, face_valid, body, body_valid)


def _mask(mask: torch.Tensor | None, vectors: torch.Tensor, part: str) -> torch.Tensor:
    if mask is None:
        return torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device)
    if mask.shape != vectors.shape[:2]:
        raise ValueError(f"{part}_mask has shape {tuple(mask.shape)}, expected {tuple(vectors.shape[:2])} (B, R)")
    return mask
