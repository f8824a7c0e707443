"""Purity and completeness of `dtback dataset build` with its defaults on photos grouped by identity.

    python benchmarks/build_purity.py [--people ../shared/data/people] [--bundles krasserm_lfw faceapi_bbt]
                                      [--subsets 10] [--fraction 0.7] [--set KEY=VALUE ...]

Flattens <people>/<bundle>/<identity>/<image> into one folder with shuffled numeric names (so neither the folder nor
the order tells the builder anything), runs the CLI's build into a temp folder, and scores the characters against
the identities: purity (share of placed photos that belong to their character's majority identity) and
completeness (share of all photos in their identity's largest character; a photo left out for any reason, e.g.
`ambiguous`/`unclustered`/`duplicate`, counts as a character of its own, so it lowers completeness, not purity).
With --subsets N it also builds N random subsets (--fraction of the photos each) from the same face cache and
reports the worst and mean. Prints one JSON line per build and a summary.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np

from dtback.cli import main as dtback
from dtback.curate.characters import read_characters
from dtback.curate.cluster import purity_completeness


def flatten(people: Path, bundles: list[str], target: Path, seed: int) -> dict[str, str]:
    files = sorted(p for bundle in bundles for p in (people / bundle).glob("*/*") if p.is_file())
    numbers = list(range(len(files)))
    random.Random(seed).shuffle(numbers)
    truth = {}
    target.mkdir(parents=True)
    for path, number in zip(files, numbers):
        name = f"{number:05d}{path.suffix.lower()}"
        shutil.copyfile(path, target / name)
        truth[name] = f"{path.parts[-3]}/{path.parent.name}"
    return truth


def score(out: Path, names: list[str], truth: dict[str, str]) -> dict[str, float]:
    placed = {Path(image.source).name: c.key for c in read_characters(out) for image in c.images}
    labels_true = np.array([truth[name] for name in names])
    labels_pred = np.array([placed.get(name, f"left-out/{name}") for name in names])
    purity, _ = purity_completeness(labels_true[[n in placed for n in names]], labels_pred[[n in placed for n in names]])
    _, completeness = purity_completeness(labels_true, labels_pred)
    report = json.loads((out / "build_report.json").read_text())
    return {"photos": len(names), "placed": len(placed), "characters": report["characters"],
            "identities": len(set(labels_true)), "purity": round(purity, 4), "completeness": round(completeness, 4),
            "skipped": report["skipped_by_reason"]}


def build(sources: Path, out: Path, cache: Path, overrides: list[str]) -> None:
    settings = [f"identity.cache_dir={json.dumps(str(cache))}"] + overrides
    args = ["dataset", "build", "--from", str(sources), "--out", str(out), "--no-progress"]
    code = dtback(args + [item for setting in settings for item in ("--set", setting)])
    if code not in (0, 2):
        raise SystemExit(f"dtback dataset build exited {code}")


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--people", type=Path, default=Path("../shared/data/people"))
    parser.add_argument("--bundles", nargs="+", default=["krasserm_lfw", "faceapi_bbt"])
    parser.add_argument("--subsets", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.7)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        truth = flatten(args.people, args.bundles, root / "all", seed=0)
        build(root / "all", root / "out", root / "cache", args.overrides)
        results = [score(root / "out", sorted(truth), truth)]
        print(json.dumps({"build": "all", **results[0]}))
        rng = random.Random(1)
        for number in range(args.subsets):
            names = sorted(rng.sample(sorted(truth), round(args.fraction * len(truth))))
            subset = root / f"subset{number}"
            subset.mkdir()
            for name in names:
                shutil.copyfile(root / "all" / name, subset / name)
            build(subset, root / f"out{number}", root / "cache", args.overrides)
            results.append(score(root / f"out{number}", names, truth))
            print(json.dumps({"build": f"subset {number}", **results[-1]}))
    subsets = results[1:] or results
    print(f"all: purity {results[0]['purity']:.3f} completeness {results[0]['completeness']:.3f}; "
          f"{len(subsets)} subsets: purity min {min(r['purity'] for r in subsets):.3f}, completeness min "
          f"{min(r['completeness'] for r in subsets):.3f} mean {np.mean([r['completeness'] for r in subsets]):.3f}")


if __name__ == "__main__":
    run()
