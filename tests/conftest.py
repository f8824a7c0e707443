"""Shared fixtures, and a test environment that does not depend on the user's.

The suite must be green whatever the shell holds: ``HF_HUB_OFFLINE`` set or not, a hub token or mirror, a populated
Hugging Face cache in ``HF_HOME``, or the folder pytest is started from. Before any test module imports
huggingface_hub (which reads them at import), hub variables are replaced: offline mode on (nothing in the suite may
reach a hub; ``tests/test_download.py`` talks to local stand-ins and turns it off for itself), the cache an empty
folder. Every test runs in its own temporary working folder.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from helpers import PEOPLE

HUB_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", "HF_TOKEN",
                 "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
                 "HF_HUB_DISABLE_TELEMETRY")
# A shell inside a torchrun job (or a cluster's) must not make every test a rank of a distributed run.
RANK_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
                  "TORCHELASTIC_RUN_ID")
for _name in HUB_VARIABLES + RANK_VARIABLES:
    os.environ.pop(_name, None)
_HF_HOME = tempfile.mkdtemp(prefix="dtback-tests-hf-home-")
os.environ["HF_HOME"] = _HF_HOME  # an empty cache: nothing of the user's downloads is found
os.environ["HF_HUB_OFFLINE"] = "1"
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def _own_working_folder(tmp_path, monkeypatch):
    """Relative paths a test forgets to anchor land in its temporary folder, never in the repository or the user's
    current folder."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)


@pytest.fixture
def people_dir() -> Path:
    if not PEOPLE.is_dir():
        pytest.skip(f"real photos not present at {PEOPLE}")
    return PEOPLE
