"""Perceiver resamplers: shapes, aggregation over references, masks."""

from __future__ import annotations

import pytest
import torch

from dtback.identity.resampler import IdentityInputs, IdentityResampler, PerceiverResampler, ResamplerSpec


def resampler(**overrides) -> IdentityResampler:
    torch.manual_seed(0)
    spec = dict(output_dim=24, face_dim=6, body_dim=5, num_face_latents=4, num_body_latents=3, dim=16, depth=2,
                heads=4, tokens_per_embedding=2, body_token_dim=5)
    return IdentityResampler(ResamplerSpec(**{**spec, **overrides})).eval()


def inputs(refs: int = 3, seed: int = 0) -> IdentityInputs:
    g = torch.Generator().manual_seed(seed)
    return IdentityInputs(
        face_embeds=torch.randn(2, refs, 6, generator=g), face_mask=torch.ones(2, refs, dtype=torch.bool),
        body_pooled=torch.randn(2, refs, 5, generator=g), body_tokens=torch.randn(2, refs, 7, 5, generator=g),
        body_mask=torch.ones(2, refs, dtype=torch.bool),
    )


def test_shapes_and_validity():
    tokens = resampler()(inputs())
    assert tokens.face.shape == (2, 4, 24) and tokens.body.shape == (2, 3, 24)
    assert tokens.face_valid.tolist() == [True, True] and tokens.batch_size == 2


def test_reference_order_does_not_matter():
    model, x = resampler(), inputs()
    order = torch.tensor([2, 0, 1])
    shuffled = IdentityInputs(x.face_embeds[:, order], x.face_mask[:, order], None, x.body_pooled[:, order],
                              x.body_mask[:, order], x.body_tokens[:, order])
    with torch.no_grad():
        a, b = model(x), model(shuffled)
    torch.testing.assert_close(a.face, b.face, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.body, b.body, atol=1e-5, rtol=1e-5)


def test_masked_reference_is_ignored_and_all_masked_is_invalid():
    model, x = resampler(), inputs(refs=2)
    extra = inputs(refs=3, seed=5)
    extra.face_embeds[:, :2], extra.body_pooled[:, :2], extra.body_tokens[:, :2] = (
        x.face_embeds, x.body_pooled, x.body_tokens)
    extra.face_mask[:, 2] = False
    extra.body_mask[:, 2] = False
    with torch.no_grad():
        a, b = model(x), model(extra)
    torch.testing.assert_close(a.face, b.face, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.body, b.body, atol=1e-5, rtol=1e-5)
    extra.face_mask[0] = False
    assert model(extra).face_valid.tolist() == [False, True]
    assert torch.isfinite(model(extra).face).all()


def test_missing_parts_and_bad_masks():
    model = resampler(body_dim=0, body_token_dim=0)
    tokens = model(inputs())
    assert model.body is None and tokens.body is None and tokens.face is not None
    with pytest.raises(ValueError, match=r"face_mask has shape \(2, 2\), expected \(2, 3\)"):
        bad = inputs()
        bad.face_mask = torch.ones(2, 2, dtype=torch.bool)
        model(bad)
    with pytest.raises(ValueError, match="without patch tokens"):
        PerceiverResampler(4, 8, 2, 8, heads=2)(torch.randn(1, 1, 4), torch.ones(1, 1), torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match="not divisible"):
        PerceiverResampler(4, 8, 2, 10, heads=4)
