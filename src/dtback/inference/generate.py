"""``dtback generate`` / ``inference/generate.py``: references + prompts → images and a JSON of every setting.

The JSON (``settings.json`` in the output folder) holds everything needed to make the same images again:
``dtback generate --settings out/settings.json --output again/`` reproduces them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from dtback.data.images import ImageSkip, load_rgb
from dtback.errors import DtbackError

logger = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"
MAX_REFERENCE_PIXELS = 50_000_000
DEFAULTS: dict[str, Any] = {
    "base": None, "reference": [], "prompt": [], "prompts_file": None, "seed": 0, "face_scale": None,
    "body_scale": None, "identity_start": 0.0, "identity_end": 1.0, "steps": None, "guidance": 3.5, "height": None,
    "width": None, "num_images": 1, "require_face": False, "no_identity": False, "device": "auto", "true_cfg": 1.0,
    "negative_prompt": None, "offload": "none", "lora": [], "lora_scale": [],
}
OFFLOAD_CHOICES = ("none", "model", "sequential")  # dtback.inference.pipeline.OFFLOAD_MODES, without importing torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="trained adapter: best_model.pt, a .safetensors file or a folder")
    parser.add_argument("--base", help="FLUX base folder or hub id (default: the one the adapter records)")
    parser.add_argument("--reference", action="append", type=Path, help="reference image of the character (repeatable)")
    parser.add_argument("--prompt", action="append", help="prompt (repeatable)")
    parser.add_argument("--prompts-file", type=Path, help="a text file with one prompt per line")
    parser.add_argument("--output", type=Path, default=Path("out"), help="output folder (default: out/)")
    parser.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--face-scale", type=float, help="face identity strength (default: the adapter's)")
    parser.add_argument("--body-scale", type=float, help="body identity strength (default: the adapter's)")
    parser.add_argument("--identity-start", type=float, help="fraction of the steps before identity starts (0)")
    parser.add_argument("--identity-end", type=float, help="fraction of the steps after which identity stops (1)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: 28, or 20 for the simple model)")
    parser.add_argument("--guidance", type=float, help="guidance (distilled for FLUX.1-dev)")
    parser.add_argument("--true-cfg", type=float,
                        help="true classifier-free guidance scale; > 1 adds a negative branch without identity and "
                        "doubles the transformer calls (default 1: off)")
    parser.add_argument("--negative-prompt",
                        help="prompt of the true-CFG negative branch (default: the prompt itself, so the guidance is "
                        "on identity alone)")
    parser.add_argument("--height", type=int, help="pixels, multiple of 16 (default: the training size)")
    parser.add_argument("--width", type=int, help="pixels, multiple of 16 (default: the training size)")
    parser.add_argument("--num-images", type=int, help="images per prompt")
    parser.add_argument("--require-face", action="store_true", default=None,
                        help="refuse references without a detectable face (default: warn and use the body only)")
    parser.add_argument("--no-identity", action="store_true", default=None, help="the plain base, for comparison")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument("--offload", choices=OFFLOAD_CHOICES,
                        help="diffusers' CPU offload for small GPUs: model (one component on the GPU at a time) or "
                        "sequential (one layer at a time: least memory, slowest); needs a GPU (default: none)")
    parser.add_argument("--lora", action="append", type=Path,
                        help="a diffusers/kohya FLUX LoRA file or folder to load on the base (repeatable)")
    parser.add_argument("--lora-scale", action="append", type=float,
                        help="strength of the LoRAs: once for all, or once per --lora in the same order (default 1)")
    parser.add_argument("--settings", type=Path, help="reuse a settings.json written by an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Defaults < ``--settings`` file < command-line flags; validated, prompts read, paths made strings."""
    settings = dict(DEFAULTS, model=None)
    if args.settings is not None:
        try:
            settings.update(json.loads(args.settings.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as err:
            raise DtbackError(f"--settings {args.settings}: unreadable ({err})") from err
    for key in ("model", "base", "seed", "face_scale", "body_scale", "identity_start", "identity_end", "steps",
                "guidance", "height", "width", "num_images", "require_face", "no_identity", "device", "true_cfg",
                "negative_prompt", "offload"):
        value = getattr(args, key)
        if value is not None:
            settings[key] = str(value) if isinstance(value, Path) else value
    if args.reference:
        settings["reference"] = [str(p) for p in args.reference]
    if args.lora:
        settings["lora"] = [str(p) for p in args.lora]
    if args.lora_scale:
        settings["lora_scale"] = list(args.lora_scale)
    prompts = list(args.prompt or []) or list(settings.get("prompt") or [])
    if args.prompts_file is not None:
        try:
            lines = args.prompts_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as err:
            raise DtbackError(f"--prompts-file {args.prompts_file}: unreadable ({err})") from err
        prompts += [line.strip() for line in lines if line.strip()]
    settings["prompt"] = prompts
    _check(settings)
    return settings


def _check(settings: dict[str, Any]) -> None:
    if not settings.get("model"):
        raise DtbackError("--model is required (e.g. checkpoints/identity_preserving/best_model.pt)")
    if not Path(settings["model"]).exists():
        raise DtbackError(f"--model {settings['model']} does not exist")
    if not settings["prompt"]:
        raise DtbackError("no prompt: give --prompt TEXT (repeatable) or a non-empty --prompts-file")
    if not settings["reference"] and not settings["no_identity"]:
        raise DtbackError("no reference image: give --reference IMAGE (repeatable), or --no-identity")
    if settings["true_cfg"] < 1:
        raise DtbackError(f"--true-cfg {settings['true_cfg']} must be >= 1 (1 = off)")
    if settings["offload"] not in OFFLOAD_CHOICES:
        raise DtbackError(f"--offload {settings['offload']!r} is not one of {', '.join(OFFLOAD_CHOICES)}")
    _check_loras(settings)
    for side in ("height", "width"):
        if settings[side] is not None and (settings[side] <= 0 or settings[side] % 16):
            raise DtbackError(f"--{side} {settings[side]} must be a positive multiple of 16")


def _check_loras(settings: dict[str, Any]) -> None:
    """Every --lora exists; --lora-scale becomes one scale per LoRA (none given: 1, one given: for all)."""
    loras, scales = settings["lora"], list(settings["lora_scale"])
    for path in loras:
        if not Path(path).exists():
            raise DtbackError(f"--lora {path} does not exist")
    if len(scales) > 1 and len(scales) != len(loras):
        raise DtbackError(f"--lora-scale given {len(scales)} times for {len(loras)} --lora: give it once for all "
                          f"LoRAs or once per LoRA")
    settings["lora_scale"] = scales if len(scales) == len(loras) else [scales[0] if scales else 1.0] * len(loras)


def load_references(paths: list[str]):
    images = []
    for path in paths:
        try:
            images.append(load_rgb(Path(path), MAX_REFERENCE_PIXELS))
        except ImageSkip as skip:
            raise DtbackError(f"--reference {path}: {skip.reason.value} ({skip.detail})") from None
    return images


def run_generate(args: argparse.Namespace) -> Path:
    """Generate and write ``<output>/<prompt index>_<image index>.png`` plus ``settings.json``; returns the folder."""
    import torch  # noqa: PLC0415  (heavy imports only when generating)

    from dtback.inference.pipeline import IdentityFluxPipeline  # noqa: PLC0415

    settings = resolve_settings(args)
    device = settings["device"]
    if device == "auto":  # with offload: the GPU the pipeline finds
        device = None if settings["offload"] != "none" else "cuda" if torch.cuda.is_available() else "cpu"
    pipe = IdentityFluxPipeline.from_pretrained(settings["model"], base=settings["base"], device=device,
                                                offload=settings["offload"])
    for path, scale in zip(settings["lora"], settings["lora_scale"]):
        pipe.load_lora_weights(path, scale=scale)
    extra = pipe.model.spec.extra
    size = int(extra.get("input_size", 512))
    settings["height"] = settings["height"] or size
    settings["width"] = settings["width"] or size
    settings["steps"] = settings["steps"] or (20 if extra.get("base_model") == "base" else 28)
    references = None
    if not settings["no_identity"]:
        inputs, report = pipe.encode_references(load_references(settings["reference"]), settings["reference"],
                                                require_face=settings["require_face"])
        settings["reference_faces"] = report.faces
        references = inputs
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for p, prompt in enumerate(tqdm(settings["prompt"], desc="prompts", disable=args.no_progress)):
        images = pipe(prompt, references, face_scale=settings["face_scale"], body_scale=settings["body_scale"],
                      identity_start=settings["identity_start"], identity_end=settings["identity_end"],
                      num_inference_steps=settings["steps"], guidance_scale=settings["guidance"],
                      height=settings["height"], width=settings["width"],
                      num_images_per_prompt=settings["num_images"], seed=settings["seed"] + p,
                      true_cfg_scale=settings["true_cfg"], negative_prompt=settings["negative_prompt"])
        for i, image in enumerate(images):
            path = out / f"{p:03d}_{i:02d}.png"
            image.save(path)
            written.append(path.name)
    settings["images"] = written
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    return out
