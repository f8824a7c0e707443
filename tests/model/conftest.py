"""Fixtures: a tiny FLUX transformer saved with ``save_pretrained`` and loaded through ``from_pretrained``."""

from __future__ import annotations

from pathlib import Path

import pytest
from diffusers import FluxTransformer2DModel

from flux_helpers import save_tiny_flux


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory) -> Path:
    return save_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture
def load_base(tiny_flux_dir):
    def load(**overrides) -> FluxTransformer2DModel:
        model = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, **overrides)
        return model.requires_grad_(False).eval()

    return load
