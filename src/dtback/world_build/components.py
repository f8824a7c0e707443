"""Build every component of the identity world in one command: ``dtback world-components [--out DIR]``.

Components (each trained by the project's own code on world renders, each a few minutes on one CPU core):

=========  ==========================================  ================================================
name       files in the folder                         used by
=========  ==========================================  ================================================
vae        ``vae/`` (diffusers) + ``vae/world_vae.json`` the simple model's latents (``dtback.world.vae``)
face       ``face_detector.*``, ``face_encoder.*``     ``identity.face_backend: world`` (``dtback.world.encoders``)
body       ``body_encoder.*``                          ``identity.body_model: world``
reader     ``reader.*``                                evaluation only (``dtback.world.reader``)
base       ``base/`` (diffusers, no VAE)               ``model.simple_base: world`` (``dtback.world.base``)
=========  ==========================================  ================================================

Encoders and reader are trained on renders and on their VAE round trips (half each), because the identity loss and
the evaluation of generated images see decoded latents: rebuild them after the VAE. The base (the simple model
pretrained on world images without identity, by the project's trainer) trains on the VAE's latents and is scored
with the face encoder and the reader: rebuild it last. The folder defaults to the one
shipped in the package (``src/dtback/assets/world``); ``components.json`` there records what each build measured
(seconds, held-out PSNR / AUC / accuracy, on renders and on their VAE round trips).
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from dtback.errors import DtbackError
from dtback.io import move_aside, output_problem, remove_stale_temporaries, write_json
from dtback.world.base import BASE_FOLDER
from dtback.world.people import WORLD_VERSION
from dtback.world.vae import VAE_FOLDER, load_world_vae, round_trip, world_vae_folder
from dtback.world_build.base import build_world_base
from dtback.world_build.encoders import build_body_component, build_face_components
from dtback.world_build.reader import build_reader
from dtback.world_build.vae import build_world_vae

log = logging.getLogger(__name__)

COMPONENTS = ("vae", "face", "body", "reader", "base")
SUMMARY = "components.json"


def _builders() -> dict[str, Callable[[Path, bool], dict[str, Any]]]:
    made: dict[Path, Callable[[torch.Tensor], torch.Tensor]] = {}

    def through_vae(folder: Path, progress: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        # Encoders and reader also train on VAE round trips: the identity loss and the evaluation of generated
        # images see decoded latents. Built after the VAE, so they follow the VAE of this folder. One callable per
        # folder, so the face and body builds share their (cached) training sets.
        if folder not in made:
            vae = load_world_vae(world_vae_folder(folder))
            made[folder] = lambda images: round_trip(vae, images)
        return made[folder]

    return {
        "vae": lambda folder, progress: build_world_vae(folder / VAE_FOLDER, progress=progress),
        "face": lambda folder, progress: build_face_components(folder, progress=progress,
                                                               round_trip=through_vae(folder, progress)),
        "body": lambda folder, progress: build_body_component(folder, progress=progress,
                                                              round_trip=through_vae(folder, progress)),
        "reader": lambda folder, progress: build_reader(folder, progress=progress,
                                                        round_trip=through_vae(folder, progress)),
        "base": lambda folder, progress: build_world_base(folder / BASE_FOLDER, progress=progress),
    }


def _read_summary(path: Path) -> dict[str, Any]:
    """The figures of earlier builds; ``{}`` when there are none. One that does not read (cut short by a kill,
    edited by hand) is kept beside as ``<name>.damaged`` with a warning, and a new summary starts."""
    if not path.is_file():
        return {}
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(summary, dict) and isinstance(summary.get("components", {}), dict):
            return summary
        problem = "not a JSON object with a components table"
    except (OSError, UnicodeError, ValueError) as err:
        problem = str(err)
    aside = move_aside(path)
    log.warning("%s is unreadable (%s): kept as %s; a new summary holds the figures of this build", path, problem,
                aside.name)
    return {}


def build_world_components(folder: Path, only: Sequence[str] = COMPONENTS, progress: bool = True) -> dict[str, Any]:
    """Train, evaluate and save the components named in ``only`` into ``folder``; update ``components.json``."""
    unknown = sorted(set(only) - set(COMPONENTS))
    if unknown:
        raise DtbackError(f"--only: unknown world components {unknown}; choose from {list(COMPONENTS)}")
    if not only:
        raise DtbackError(f"--only names no component; choose from {list(COMPONENTS)}")
    folder = Path(folder)
    problem = output_problem(folder, "folder")
    if problem is not None:  # before minutes of training, not when the first component is saved
        raise DtbackError(f"--out: {problem}")
    folder.mkdir(parents=True, exist_ok=True)
    # A build killed while saving leaves its hidden temporary (a VAE or base folder, a weights file) beside the
    # component it would have replaced, which is whole: clear those an hour old (a live build's are newer).
    removed = remove_stale_temporaries(folder)
    if removed:
        log.info("removed %d temporary files or folders left in %s by an interrupted build", removed, folder)
    summary = _read_summary(folder / SUMMARY)
    summary_path = folder / SUMMARY
    if summary.get("world_version") != WORLD_VERSION:
        summary = {}
    builders = _builders()
    for name in COMPONENTS:
        if name not in only:
            continue
        start = time.perf_counter()
        figures = builders[name](folder, progress)
        figures["wall_seconds"] = round(time.perf_counter() - start, 1)
        # Each component's own: a later build of another part (--only) may run with other threads.
        figures["machine"] = f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
        summary.setdefault("components", {})[name] = figures
        summary.pop("machine", None)  # older summaries: one machine line for all parts
        summary.update({
            "world_version": WORLD_VERSION,
            "command": "dtback world-components --out <folder>",
        })
        write_json(summary_path, summary)
        log.info("world component %s built in %.0f s", name, figures["wall_seconds"])
    return summary
