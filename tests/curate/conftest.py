"""The real photos, built once per test session (tests that need them skip when they are absent)."""

from __future__ import annotations

import random
import shutil

import pytest

from curate_helpers import PEOPLE_BUNDLES, build


@pytest.fixture(scope="session")
def photos(tmp_path_factory):
    """LFW + TV stills + full-body crops flattened into one folder with shuffled names, built once (the embedding
    cache is shared by the other tests of this session, so they never run the encoder on these photos again)."""
    from helpers import PEOPLE

    if not PEOPLE.is_dir():
        pytest.skip(f"real photos not present at {PEOPLE}")
    root = tmp_path_factory.mktemp("photos")
    files = sorted(p for bundle in (*PEOPLE_BUNDLES, "reid_market") for p in (PEOPLE / bundle).glob("*/*"))
    names = list(range(len(files)))
    random.Random(0).shuffle(names)
    truth = {}
    for path, number in zip(files, names):
        target = root / "flat" / f"{number:04d}{path.suffix}"
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(path, target)
        truth[target.name] = (path.parts[-3], path.parent.name)
    cache = root / "cache"
    out = root / "dataset"
    report = build([root / "flat"], out, cache)
    return {"root": root, "flat": root / "flat", "truth": truth, "cache": cache, "out": out, "report": report}
