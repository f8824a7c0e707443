"""Identity world figures: generation speed, VAE PSNR, encoder AUC and reader accuracy on held-out characters.

    python benchmarks/world.py [--repeats 3] [--sheet docs/world_contact_sheet.png]

Generation: ``write_world`` (render + PNG + caption + metadata) at 128 px in one process, median of repeats, and the
render alone. Components: the shipped ones (``dtback world-components`` builds them; their training times come from
``components.json``) measured again here on characters of a seed none of them was trained or recorded on.
Prints markdown rows for ``benchmarks/README.md``. Runs on one thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from dtback.config import WorldConfig
from dtback.viz.grid import make_grid
from dtback.world.encoders import load_world_body_encoder, load_world_face_encoder
from dtback.world.files import world_models_dir, write_world
from dtback.world.people import ATTRIBUTES, WorldSet, render_image, render_world_set, sample_characters
from dtback.world.reader import load_reader
from dtback.world.vae import load_world_vae, reconstruction_psnr, to_model_range, world_vae_folder
from dtback.world_build.encoders import (
    EncoderRecipe, evaluate_body_encoder, evaluate_face_encoder, training_characters,
)
from dtback.world_build.reader import ReaderRecipe, evaluate_reader
from dtback.world_build.vae import render_pixels

BENCH_SEED = 9001


def generation_speed(repeats: int, characters: int = 40, per_character: int = 10) -> tuple[float, float]:
    """(images/s written to disk, images/s rendered in memory) at 128 px, medians of ``repeats``."""
    cfg = WorldConfig(characters=characters, images_per_character=per_character, size=128, seed=BENCH_SEED)
    written = []
    for r in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            summary = write_world(Path(tmp) / f"w{r}", cfg, progress=False)
            written.append(summary.images_per_second)
    people = sample_characters(characters, BENCH_SEED)
    rendered = []
    for _ in range(repeats):
        start = time.perf_counter()
        for c in people:
            for j in range(per_character):
                render_image(c, j, 128, BENCH_SEED)
        rendered.append(characters * per_character / (time.perf_counter() - start))
    return statistics.median(written), statistics.median(rendered)


def contact_sheet(path: Path, characters: int = 8, per_character: int = 4) -> None:
    """``characters`` rows of ``per_character`` images each, labelled with the character's attributes."""
    people = sample_characters(characters, seed=0)
    rows, labels = [], []
    for c in people:
        rows.append([render_image(c, j, 128, 0).image for j in range(per_character)])
        f, b = c.face, c.body
        extras = "".join(f", {f[k]}" for k in ("beard", "glasses") if f[k] != "none")
        labels.append(f"{c.name}\n{f['skin_tone']} skin, {f['hair_colour']} {f['hair_style']} hair\n"
                      f"{f['eye_colour']} eyes, {f['face_shape']}{extras}\n"
                      f"{b['top_colour']} {b['top_pattern']} top\n{b['trouser_colour']} trousers, {b['build']}")
    grid = make_grid(rows, labels, [], cell=128, title="identity world: each row one character (seed 0, 128 px)")
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


@torch.no_grad()
def through_vae(world: WorldSet, vae) -> WorldSet:
    """``world`` with every image replaced by its VAE reconstruction (encode to the posterior mean, decode)."""
    out = []
    for start in range(0, len(world), 64):
        x = to_model_range(world.images[start : start + 64])
        recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
        out.append(((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return dataclasses.replace(world, images=torch.cat(out))


def component_figures() -> dict:
    """The shipped components measured on characters of :data:`BENCH_SEED`, on renders and on their VAE
    reconstructions (what the identity loss sees at best when it decodes latents)."""
    vae = load_world_vae(world_vae_folder())
    face_encoder = load_world_face_encoder()
    body_encoder = load_world_body_encoder()
    reader = load_reader()
    people = sample_characters(40, BENCH_SEED, exclude=training_characters(EncoderRecipe()))
    held = render_world_set(people, 6, 128, BENCH_SEED)
    reader_recipe = ReaderRecipe()
    seen = sample_characters(reader_recipe.characters, reader_recipe.seed)
    reader_held = render_world_set(sample_characters(100, BENCH_SEED, exclude=seen, exclude_bodies=False), 4, 128,
                                   BENCH_SEED)
    figures: dict = {"vae_psnr_db": round(reconstruction_psnr(vae, render_pixels(24, 4, 128, BENCH_SEED)), 2)}
    for name, encoders_set, reader_set in (("render", held, reader_held),
                                           ("vae", through_vae(held, vae), through_vae(reader_held, vae))):
        figures[name] = {"face": evaluate_face_encoder(face_encoder, encoders_set),
                         "body": evaluate_body_encoder(body_encoder, encoders_set),
                         "reader": evaluate_reader(reader, reader_set)}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sheet", type=Path, help="also write the contact sheet PNG here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sheet:
        contact_sheet(args.sheet)
        print(f"contact sheet: {args.sheet}")
    written, rendered = generation_speed(args.repeats)
    figures = component_figures()
    summary_path = world_models_dir() / "components.json"
    built = json.loads(summary_path.read_text()).get("components", {}) if summary_path.is_file() else {}
    print(f"machine: {platform.machine()}, {platform.python_version()}, torch {torch.__version__}, 1 thread")
    print(f"| generation, 128 px, 1 core | {written:.0f} images/s written (PNG + caption + metadata), "
          f"{rendered:.0f} images/s rendered |")
    print(f"| VAE PSNR, 96 held-out renders | {figures['vae_psnr_db']:.2f} dB (recorded at build: "
          f"{built.get('vae', {}).get('held_out_psnr_db')} dB) |")
    for name in ("render", "vae"):
        face, body, read = figures[name]["face"], figures[name]["body"], figures[name]["reader"]
        print(f"| {name}: face AUC {face['auc']:.4f} (detected {face['detection_rate']:.3f}, IoU "
              f"{face['mean_iou']:.3f}), body AUC {body['auc']:.4f} | reader " +
              ", ".join(f"{attr} {read[attr]:.3f}" for attr in ATTRIBUTES) + " |")
    for name, info in built.items():
        print(f"| build {name} | {info.get('wall_seconds')} s |")


if __name__ == "__main__":
    main()
