"""The ``dtback`` command line. The seed's scripts (``train/run_training.py``, ``inference/generate.py``,
``scripts/download_models.py``) are thin shims over :func:`main`.

Exit status: 0 done, 1 models missing (``dtback download``), 2 bad input (config, dataset, arguments; the message
says what and where), 130 interrupted by Ctrl-C (training saves a checkpoint first).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from dtback import __version__
from dtback.config import Config, describe_keys, load_config
from dtback.errors import DatasetError, DtbackError

log = logging.getLogger("dtback")
console = Console(stderr=True)

EXIT_MISSING = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtback", description="Train identity preservation (face and body) into FLUX.")
    parser.add_argument("--version", action="version", version=f"dtback {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="train identity adapters (the seed's train/run_training.py)",
        description="Train the identity adapters (and the simple model) as the config says. Without flags a run "
        "continues from the latest checkpoint in output_dir when there is one.",
    )
    _add_config_args(train, default_config="train/config.yaml")
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                        help="continue from CHECKPOINT (a checkpoints/checkpoint-* folder); alone: the latest")
    resume.add_argument("--no-resume", action="store_true", help="start at step 0 even when checkpoints exist")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")
    train.set_defaults(func=cmd_train)

    dataset = commands.add_parser("dataset", help="dataset tools").add_subparsers(dest="action", required=True)
    inspect = dataset.add_parser(
        "inspect",
        help="scan a dataset and report characters and images kept, dropped and skipped",
        description="Scan DATA_DIR/<bundle>/<character>/<image>, decode every image, apply min_images_per_char and "
        "max_chars_per_bundle, print a table per bundle and write the same as JSON.",
    )
    inspect.add_argument("data_dir", type=Path, help="dataset root (overrides data.data_dir)")
    _add_config_args(inspect, default_config=None)
    inspect.add_argument("--json", type=Path, default=None, help="also write the JSON report here (default: none)")
    inspect.add_argument("--no-progress", action="store_true", help="no progress bar")
    inspect.set_defaults(func=cmd_dataset_inspect)
    _add_build_parser(dataset)
    fix = dataset.add_parser(
        "fix",
        help="correct a built dataset: exclude a photo, split, merge or rename characters (kept by later builds)",
        description="Record a correction in DATA_DIR/corrections.yaml and apply it now; every later `dataset build` "
        "into DATA_DIR applies the file again. Photos are named by their path in the dataset "
        "(bundle/character/file), a source path or a sha256; characters as bundle/character. "
        "Examples: fix D exclude built_000/person_0001/a_1b2c3d4e.jpg; fix D split PHOTO... [--into built_000/bob]; "
        "fix D merge built_000/person_0004 built_000/person_0002; fix D rename built_000/person_0002 alice.",
    )
    fix.add_argument("data_dir", type=Path, help="the dataset folder (--out of dataset build)")
    fix.add_argument("operation", choices=["exclude", "split", "merge", "rename"],
                     help="exclude PHOTO...; split PHOTO... [--into]; merge FROM INTO; rename CHARACTER NEW_NAME")
    fix.add_argument("args", nargs="+", help="photos or characters, as the operation needs")
    fix.add_argument("--into", default=None, help="split: the character the photos form (default: a new one)")
    fix.set_defaults(func=cmd_dataset_fix)

    precompute = commands.add_parser(
        "precompute",
        help="fill the face/body embedding cache for every kept image (a no-op when all are cached)",
    )
    _add_config_args(precompute, default_config="train/config.yaml")
    precompute.add_argument("--no-progress", action="store_true", help="no progress bar")
    precompute.set_defaults(func=cmd_precompute)

    _add_world_parser(commands)
    _add_evaluate_parser(commands)

    config = commands.add_parser("config", help="configuration tools").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="validate a config (with overrides) and print the resolved YAML")
    _add_config_args(show, default_config=None)
    show.set_defaults(func=cmd_config_show)
    keys = config.add_parser("keys", help="list every config key with its default and meaning")
    keys.set_defaults(func=cmd_config_keys)

    generate = commands.add_parser(
        "generate", help="generate images of a character with a trained adapter (the seed's inference/generate.py)",
        description="References + prompts -> images in --output, with settings.json holding every setting "
        "(feed it back with --settings to make the same images).",
    )
    from dtback.inference.generate import add_arguments  # noqa: PLC0415  (argparse only, no torch)

    add_arguments(generate)
    generate.set_defaults(func=cmd_generate)
    download = commands.add_parser(
        "download", help="download FLUX, the face pack and the body backbone into a models folder",
        description="Fetch FLUX.1-dev or schnell (diffusers layout), the InsightFace antelopev2 pack and the body "
        "backbone through huggingface_hub into --models-dir, resuming partial files, then verify them against the "
        "hub's sizes. FLUX.1-dev is gated: accept its licence on the model page and log in (huggingface-cli login or "
        "HF_TOKEN). --check reports what is there without network. Exit 1 when something is missing.",
    )
    from dtback.download import add_arguments as add_download_arguments  # noqa: PLC0415  (no hub import yet)

    add_download_arguments(download)
    download.set_defaults(func=cmd_download)
    return parser


def _add_config_args(parser: argparse.ArgumentParser, default_config: str | None) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(default_config) if default_config else None,
        help=f"YAML config (default: {default_config or 'built-in defaults'})",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.learning_rate=1e-4 or --set learning_rate=1e-4 (repeatable)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    from dtback.training.trainer import train

    from dtback import backends

    cfg, note = backends.photo_backends(load_config(args.config, args.overrides))
    if note:
        _say(note, "yellow")
    resume = None if args.no_resume else (args.resume or "auto")
    result = train(cfg, resume=resume, progress_bar=not args.no_progress)
    if result.interrupted:
        _say(f"stopped at step {result.steps}; continue with --resume (checkpoint {result.last_checkpoint})", "yellow")
        return EXIT_INTERRUPTED
    if result.is_main:
        _say(f"trained {result.steps} steps -> {result.run_dir} (best model: {result.best_model}, "
             f"report: {result.run_dir / 'report.html'})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dtback.inference.generate import run_generate

    out = run_generate(args)
    _say(f"images and settings.json -> {out}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from dtback.download import run_download

    reports = run_download(args)
    table = Table("target", "repo", "folder", "files", "verified", "status")
    for report in reports:
        status = "complete" if report.complete else f"{len(report.problems())} problem(s)"
        table.add_row(report.target.name, escape(report.target.repo_id), escape(str(report.path)), str(report.files),
                      report.verified, status, style=None if report.complete else "red")
    console.print(table)
    for report in reports:
        for problem in report.problems():
            _say(f"{report.target.name}: {problem} (in {report.path})", "red")
    if not all(report.complete for report in reports):
        _say("something is missing: run `dtback download` (without --check) to fetch or resume it", "yellow")
        return EXIT_MISSING
    for report in reports:
        _say(f"{report.target.name}: " + " ".join(f"--set {setting}" for setting in report.settings()))
    return 0


def cmd_dataset_inspect(args: argparse.Namespace) -> int:
    from dtback.data.layout import scan_dataset
    from dtback.data.prepare import write_report

    from dtback.io import output_problem

    cfg = load_config(args.config, [*args.overrides, f"data.data_dir={json.dumps(str(args.data_dir))}"])
    problem = output_problem(args.json, "file") if args.json is not None else None
    if problem:
        raise DtbackError(f"--json {problem}")  # before the scan: nothing is written
    index = scan_dataset(cfg.data, cfg.seed, progress=not args.no_progress)
    report = index.report()
    _print_report(report)
    if args.json is not None:
        write_report(index, args.json)
        _say(f"report written to {args.json}")
    return 0


def _add_build_parser(dataset) -> None:
    build = dataset.add_parser(
        "build",
        help="build characters from folders of photos and videos by face clustering",
        description="Read every photo (folders recursively) and video (frames at data.build.video_fps) of the sources, "
        "detect and embed faces, drop unusable and near-duplicate pictures, cluster identities and write "
        "OUT/<bundle>/<character>/ with the images, character.json and contact_sheet.png. Running it again adds "
        "new sources without duplicating anything. Settings: data.build.*, identity.face_*.",
    )
    build.add_argument("--from", dest="sources", type=Path, action="append", required=True, metavar="SRC",
                       help="a folder of photos/videos or a single file (repeatable)")
    build.add_argument("--out", type=Path, required=True, help="dataset folder to create or extend (data.data_dir)")
    _add_config_args(build, default_config=None)
    build.add_argument("--report", type=Path, default=None,
                       help="also write the JSON report of this run here (with encoder runs, cache hits, images added)")
    build.add_argument("--rebuild", action="store_true",
                       help="the dataset was built with other settings: remove its built characters and group every "
                       "source again with these (the face cache and corrections.yaml are kept)")
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(func=cmd_dataset_build)


def cmd_dataset_build(args: argparse.Namespace) -> int:
    from dtback import backends
    from dtback.curate.build import REPORT_FILE, build_dataset, check_usable
    from dtback.curate.sources import check_sources

    cfg = load_config(args.config, [*args.overrides, f"data.data_dir={json.dumps(str(args.out))}"])
    from dtback.io import output_problem

    for flag, path, kind in (("--out", args.out, "folder"), ("--report", args.report, "file")):
        problem = output_problem(path, kind) if path is not None else None
        if problem:
            raise DtbackError(f"{flag} {problem}")
    check_sources(args.sources, args.out)  # before the face encoder loads
    identity, which = backends.builder_identity(cfg)
    _say(which)
    encoder = backends.face_encoder(identity, backends.world_folder(cfg))
    report = build_dataset(args.sources, cfg.data, identity, encoder, progress=not args.no_progress,
                           rebuild=args.rebuild)
    console.print(report.table())
    if args.report is not None:
        report.write(args.report)
    check_usable(report)  # no character: says why, exit 2
    _say(f"report written to {args.report or args.out / REPORT_FILE}; check each character's contact_sheet.png "
         f"and correct with `dtback dataset fix {args.out} ...`")
    return 0


def cmd_dataset_fix(args: argparse.Namespace) -> int:
    from dtback.curate.build_state import remembered_setting
    from dtback.curate.corrections import fix

    tiles = remembered_setting(args.data_dir, "data.build.contact_sheet_tiles", default=64)
    _say(fix(args.data_dir, args.operation, args.args, args.into, tiles))
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    from dtback import backends
    from dtback.data.layout import scan_dataset
    from dtback.identity.precompute import IdentityPrecomputer
    from dtback.io import write_json

    cfg, note = backends.photo_backends(load_config(args.config, args.overrides))
    if note:
        _say(note, "yellow")
    index = scan_dataset(cfg.data, cfg.seed, progress=not args.no_progress)
    cache_dir = cfg.cache_dir()
    world = backends.world_folder(cfg)
    precomputer = IdentityPrecomputer(backends.face_encoder(cfg.identity, world),
                                      backends.body_encoder(cfg.identity, world), cache_dir, cfg.data.max_image_pixels)
    report = precomputer.run(index, progress=not args.no_progress)
    out = write_json(cfg.output.output_dir / "precompute_report.json", report.to_json(), indent=2)
    _say(
        f"{report.images} images in {report.seconds:.1f} s ({report.images_per_second:.1f} img/s): "
        f"faces found {report.faces_found} (turned {len(report.turned)}, over-exposed {len(report.overexposed)}), "
        f"no face {len(report.no_face)} (body only), unreadable {len(report.unreadable)}; "
        f"encoder calls face {report.face_encoder_calls} body {report.body_encoder_calls}, "
        f"cache hits face {report.face_cache_hits} body {report.body_cache_hits}"
    )
    for rel in report.no_face[:20]:
        _say(f"no face: {rel}")
    _say(f"cache: {cache_dir}; report: {out}")
    return 0


def _add_world_parser(commands) -> None:
    from dtback.config import WorldConfig

    defaults = WorldConfig()
    world = commands.add_parser(
        "world",
        help="generate the identity world: characters with fixed face and body identities in varied scenes",
        description="Write OUT/<bundle>/<character>/<NNN>.png with caption (.txt) and metadata (.json) sidecars and "
        "OUT/world.json. The same seed gives the same bytes; an interrupted run is completed by running it again.",
    )
    world.add_argument("--out", type=Path, required=True, help="output folder (created)")
    world.add_argument("--characters", type=int, default=defaults.characters, help="number of characters")
    world.add_argument("--images-per-character", type=int, default=defaults.images_per_character)
    world.add_argument("--size", type=int, default=defaults.size,
                       help="side of the square images in pixels, 16 to 2048 (training resizes to data.input_size)")
    world.add_argument("--seed", type=int, default=defaults.seed)
    world.add_argument("--bundle", default=defaults.bundle, help="bundle folder name")
    world.add_argument("--no-progress", action="store_true", help="no progress bar")
    world.set_defaults(func=cmd_world)

    components = commands.add_parser(
        "world-components",
        help="(re)build the world's VAE, face/body encoders and identity reader (minutes on one CPU core) or its base",
        description="Train each component on world renders, measure it on held-out characters and save it into OUT "
        "(default: the folder shipped in the package; use another with data.world.components). Figures go to OUT/components.json.",
    )
    components.add_argument("--out", type=Path, default=None, help="components folder")
    components.add_argument("--only", default=",".join(("vae", "face", "body", "reader")),
                            help="comma-separated subset of vae,face,body,reader,base (base: the world base, "
                            "pretrained on the VAE; ~1 h 45 min on 2 threads)")
    components.add_argument("--threads", type=_positive_int, default=1, help="torch CPU threads (the figures use 1)")
    components.add_argument("--no-progress", action="store_true", help="no progress bar")
    components.set_defaults(func=cmd_world_components)


def cmd_world(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from dtback.config import WorldConfig
    from dtback.io import output_problem
    from dtback.world.files import write_world

    try:
        cfg = WorldConfig(characters=args.characters, images_per_character=args.images_per_character, size=args.size,
                          seed=args.seed, bundle=args.bundle)
    except ValidationError as err:
        problems = "; ".join(f"--{'-'.join(map(str, e['loc'])).replace('_', '-')}: "
                             f"{e['msg'].removeprefix('Value error, ')}"
                             for e in err.errors())
        raise DatasetError(f"dtback world: {problems}") from None
    problem = output_problem(args.out, "folder")
    if problem:
        raise DatasetError(f"dtback world --out {problem}")
    summary = write_world(args.out, cfg, progress=not args.no_progress)
    _say(
        f"identity world in {args.out}: {cfg.characters} characters x {cfg.images_per_character} images at {cfg.size} px "
        f"(seed {cfg.seed}); {summary.written} written ({summary.images_per_second:.0f} img/s"
        f"{f'; {summary.redrawn} of them redrawn over a damaged file' if summary.redrawn else ''}), "
        f"{summary.existing} already there"
    )
    return 0


def cmd_world_components(args: argparse.Namespace) -> int:
    import torch

    from dtback.world.files import world_models_dir
    from dtback.world_build.components import build_world_components

    torch.set_num_threads(args.threads)
    folder = world_models_dir(args.out)
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    summary = build_world_components(folder, only, progress=not args.no_progress)
    for name in only:
        _say(f"{name}: {json.dumps(summary['components'][name])}")
    _say(f"world components in {folder} (figures: {folder / 'components.json'})")
    return 0


def _add_evaluate_parser(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="measure a trained adapter on held-out characters: with / without / shuffled identity",
        description="For each held-out character x prompt, generate with its reference, without identity and with "
        "another held-out character's reference; score face identity with two recognizers, body identity, prompt "
        "adherence (CLIP) and a copy-paste score. Writes OUT/results.json, OUT/results.md, OUT/grid.png, OUT/images/.",
    )
    evaluate.add_argument("--model", type=Path, required=True, help="trained adapter, e.g. <run>/best_model.pt")
    evaluate.add_argument("--data-dir", type=Path, help="dataset folder (default: the run's config.yaml data_dir)")
    evaluate.add_argument("--config", type=Path, help="the run's config (default: config.yaml next to --model)")
    evaluate.add_argument("--characters", action="append", default=[], metavar="BUNDLE/CHARACTER",
                          help="held-out characters (repeatable; default: the run's split.json val characters); "
                          "characters the run trained on are refused unless --allow-trained")
    evaluate.add_argument("--allow-trained", action="store_true",
                          help="let --characters name characters the run trained on: scored and labelled as trained, "
                          "not as held-out")
    evaluate.add_argument("--num-characters", type=int, help="evaluate the first N held-out characters (default all)")
    evaluate.add_argument("--references", type=int, default=1,
                          help="reference images per character given to the adapter: the first N by name; the rest "
                               "is the gallery (default 1)")
    evaluate.add_argument("--prompts-file", type=Path, help="one prompt per line (default: a built-in set for the data)")
    evaluate.add_argument("--images-per-prompt", type=int, default=1)
    evaluate.add_argument("--steps", type=int, help="sampling steps (default: 28, or 20 for the simple model)")
    evaluate.add_argument("--guidance", type=float, default=3.5, help="guidance (distilled for FLUX.1-dev)")
    evaluate.add_argument("--true-cfg", type=float,
                          help="true CFG scale of the images with identity, against no identity (1 = off; default: "
                          "the run's training.val_true_cfg)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--clip-model", type=Path, help="local transformers CLIP folder for prompt adherence")
    evaluate.add_argument("--base", help="FLUX base folder or hub id (default: the one the adapter records)")
    evaluate.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    evaluate.add_argument("--out", type=Path, help="output folder (default: <run>/evaluation)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dtback.evaluation.benchmark import RESULTS_MD, EvaluateSettings, evaluate

    out = args.out or args.model.parent / "evaluation"
    evaluate(EvaluateSettings.create(
        model=args.model, out=out, data_dir=args.data_dir, config=args.config, characters=args.characters,
        allow_trained=args.allow_trained,
        num_characters=args.num_characters, references=args.references, prompts_file=args.prompts_file, images_per_prompt=args.images_per_prompt,
        steps=args.steps, guidance=args.guidance, true_cfg=args.true_cfg, seed=args.seed, clip_model=args.clip_model, base=args.base,
        device=args.device, progress=not args.no_progress,
    ))
    sys.stdout.write((out / RESULTS_MD).read_text(encoding="utf-8"))
    _say(f"results.json, results.md, grid.png and images/ -> {out}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(cfg.to_yaml())
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    table = Table("key", "default", "meaning")
    for key, default, description in describe_keys(Config):
        table.add_row(key, default, description)
    Console().print(table)
    return 0


def _rank_label() -> str:
    """`` (rank N of M)`` under torchrun with several ranks (each rank prints its own error, and they may differ:
    one rank's bad file), else empty."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""


def _positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse names the flag and exits 2 otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not at least 1")
    return value


def _say(text: str, style: str | None = None) -> None:
    """Print user data verbatim: no markup parsing (paths hold brackets), no hard wrapping (keeps lines greppable)."""
    console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)


def _print_report(report: dict) -> None:
    from dtback.data.images import shown

    table = Table(title=escape(f"dataset {shown(report['data_dir'])}"))
    rows = list(report["bundles"].items()) + [("TOTAL", report["totals"])]
    widest = max(len(shown(name)) for name, _ in rows)
    table.add_column("bundle", justify="left", no_wrap=True, min_width=widest)  # a bundle name is never cut
    for column in ("chars", "kept", "dropped", "images", "kept", "skipped"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("skip reasons", justify="left", overflow="fold")
    for name, row in rows:
        reasons = ", ".join(f"{k}: {v}" for k, v in row["skipped_by_reason"].items()) or "-"
        table.add_row(
            escape(shown(name)),
            str(row["characters_found"]),
            str(row["characters_kept"]),
            str(row["characters_dropped"]),
            str(row["images_decoded"]),
            str(row["images_kept"]),
            str(row["files_skipped"]),
            escape(reasons),
            end_section=name == rows[-2][0] if len(rows) > 1 else False,
        )
    console.print(table)
    for drop in report["dropped_characters"]:
        _say(f"dropped {shown(drop['character'])}: {drop['reason']} ({shown(drop['detail'])})")
    if report["ignored_files"]:
        _say(f"ignored (not images, outside character folders): {', '.join(map(shown, report['ignored_files']))}")
    skipped = report["skipped_files"]
    for skip in skipped[:20]:
        _say(f"skipped {shown(skip['path'])}: {skip['reason']} ({shown(skip['detail'])})")
    if len(skipped) > 20:
        _say(f"... and {len(skipped) - 20} more skipped files (all listed in the JSON report)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "any_args", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=console, show_path=False)],
    )
    try:
        return args.func(args)
    except DtbackError as err:
        _say(f"error{_rank_label()}: {err}", "red")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        # Ctrl-C outside training's own handling (which checkpoints first): every writer is atomic, so what was
        # finished stays and a rerun goes on from it; no traceback for a stop the user asked for.
        _say("interrupted: finished files are kept; run the command again to go on", "yellow")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
