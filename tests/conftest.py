"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import PEOPLE


@pytest.fixture
def people_dir() -> Path:
    if not PEOPLE.is_dir():
        pytest.skip(f"real photos not present at {PEOPLE}")
    return PEOPLE
