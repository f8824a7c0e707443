"""``dtback download`` / ``scripts/download_models.py``: FLUX, the InsightFace face pack and the body backbone into a
models folder, through ``huggingface_hub``.

Each target is one hub repository mirrored (the files dtback reads, by pattern) into ``<models_dir>/<folder>``:

| target | default repo | folder | config key to point at it |
|---|---|---|---|
| flux | ``black-forest-labs/FLUX.1-dev`` (or ``--flux schnell`` / a FLUX.2 choice) | ``FLUX.1-dev`` | ``model.pretrained_model`` |
| face | ``DIAMONIK7777/antelopev2`` (the pack PuLID fetches) | ``antelopev2`` | ``identity.face_model_dir`` |
| body | ``facebook/dinov2-small`` | ``dinov2-small`` | ``identity.body_model`` |

``huggingface_hub.snapshot_download`` does the transfer: it resumes a partial file (``.incomplete`` under
``<folder>/.cache/huggingface``) and skips files already complete. The hub's file list (sizes, and sha256 of the
large files) is fetched first with a short timeout — that call doubles as the connectivity probe, so a machine
without network fails in seconds — and kept as ``dtback_download.json`` in the folder, so ``--check`` can verify
sizes (and hashes with ``--sha256``) later without network.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from tqdm.auto import tqdm

from dtback.errors import DownloadError, GatedModelError
from dtback.io import write_json

logger = logging.getLogger(__name__)

MANIFEST = "dtback_download.json"
FLUX_REPOS = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell",
              "flux2-dev": "black-forest-labs/FLUX.2-dev",
              "flux2-klein-base-4b": "black-forest-labs/FLUX.2-klein-base-4B",
              "flux2-klein-4b": "black-forest-labs/FLUX.2-klein-4B",
              "flux2-klein-base-9b": "black-forest-labs/FLUX.2-klein-base-9B",
              "flux2-klein-9b": "black-forest-labs/FLUX.2-klein-9B"}
# Licences as their model pages state them (read from third-party mirrors here: the hub was not reachable); the
# undistilled "base" klein checkpoints are the ones to train adapters on.
FLUX_LICENCES = {"dev": "FLUX.1 [dev] non-commercial, gated", "schnell": "Apache-2.0",
                 "flux2-dev": "FLUX.2 [dev] non-commercial, gated", "flux2-klein-base-4b": "Apache-2.0",
                 "flux2-klein-4b": "Apache-2.0", "flux2-klein-base-9b": "FLUX non-commercial",
                 "flux2-klein-9b": "FLUX non-commercial"}
DEFAULT_FACE_REPO = "DIAMONIK7777/antelopev2"
DEFAULT_BODY_REPO = "facebook/dinov2-small"
TARGET_NAMES = ("flux", "face", "body")
# The diffusers layout only: the repos also hold the original single-file checkpoints (another 23+ GB).
FLUX_PATTERNS = ("model_index.json", "scheduler/*", "text_encoder/*", "text_encoder_2/*", "tokenizer/*",
                 "tokenizer_2/*", "transformer/*", "vae/*")
FLUX_REQUIRED = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                 "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer_2/spiece.model",
                 "transformer/config.json", "vae/config.json", "vae/diffusion_pytorch_model.safetensors")
# FLUX.2: one text encoder and its tokenizer (Mistral for [dev], Qwen3 for [klein]).
FLUX2_PATTERNS = ("model_index.json", "scheduler/*", "text_encoder/*", "tokenizer/*", "transformer/*", "vae/*")
FLUX2_REQUIRED = ("model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                  "transformer/config.json", "vae/config.json")
# dtback's InsightFace backend reads the SCRFD detector and the ArcFace recognizer of the pack.
FACE_REQUIRED = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")
BODY_PATTERNS = ("config.json", "preprocessor_config.json", "model.safetensors")
BODY_REQUIRED = ("config.json", "model.safetensors")  # safetensors only: nothing is unpickled


@dataclass(frozen=True)
class Target:
    """One hub repository and the folder it goes to."""

    name: str
    repo_id: str
    folder: str
    patterns: tuple[str, ...]
    required: tuple[str, ...]
    config_key: str
    also_set: tuple[str, ...] = ()


@dataclass
class TargetReport:
    """What a target's folder holds: files missing, of the wrong size or hash, and partial downloads."""

    target: Target
    path: Path
    files: int = 0
    missing: list[str] = field(default_factory=list)
    wrong_size: list[str] = field(default_factory=list)
    wrong_hash: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)
    verified: str = "required files"

    @property
    def complete(self) -> bool:
        return not (self.missing or self.wrong_size or self.wrong_hash or self.partial)

    def settings(self) -> list[str]:
        """The config overrides that make dtback use this folder."""
        return [*self.target.also_set, f"{self.target.config_key}={self.path}"]

    def problems(self) -> list[str]:
        return ([f"missing {p}" for p in self.missing] + [f"wrong size {p}" for p in self.wrong_size]
                + [f"wrong sha256 {p}" for p in self.wrong_hash] + [f"partial download {p}" for p in self.partial])


def make_targets(flux: str = "dev", face_repo: str = DEFAULT_FACE_REPO, body_repo: str = DEFAULT_BODY_REPO,
                 only: Iterable[str] = TARGET_NAMES) -> list[Target]:
    """The targets named in ``only`` (a subset of flux, face, body)."""
    only = list(only)
    unknown = sorted(set(only) - set(TARGET_NAMES))
    if unknown or not only:
        raise DownloadError(f"--only {','.join(only)}: choose from {','.join(TARGET_NAMES)}")
    if flux not in FLUX_REPOS:
        raise DownloadError(f"--flux {flux}: choose from {', '.join(FLUX_REPOS)}")
    flux_repo = FLUX_REPOS[flux]
    flux_target = Target("flux", flux_repo, flux_repo.split("/")[-1], FLUX_PATTERNS, FLUX_REQUIRED,
                         "model.pretrained_model")
    if flux.startswith("flux2"):
        base = "flux2" if flux == "flux2-dev" else "flux2_klein"
        flux_target = Target("flux", flux_repo, flux_repo.split("/")[-1], FLUX2_PATTERNS, FLUX2_REQUIRED,
                             "model.pretrained_model", (f"model.base={base}", "model.use_simple_model=false"))
    every = {
        "flux": flux_target,
        "face": Target("face", face_repo, face_repo.split("/")[-1], ("*.onnx",), FACE_REQUIRED,
                       "identity.face_model_dir", ("identity.face_backend=insightface",)),
        "body": Target("body", body_repo, body_repo.split("/")[-1], BODY_PATTERNS, BODY_REQUIRED,
                       "identity.body_model"),
    }
    return [every[name] for name in TARGET_NAMES if name in only]


# ------------------------------------------------------------------------------------------------ checking


def check_target(target: Target, models_dir: Path, sha256: bool = False) -> TargetReport:
    """Inspect ``models_dir/<folder>`` without network: required files, the shards that ``*.index.json`` files
    name, leftover partial downloads, and (after a download wrote the manifest) every file's size and sha256."""
    path = models_dir / target.folder
    report = TargetReport(target, path)
    expected: dict[str, dict] = {name: {} for name in target.required}
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            expected.update(json.loads(manifest.read_text(encoding="utf-8"))["files"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise DownloadError(f"{manifest}: unreadable download manifest ({err}); delete it and download again")
        report.verified = "sizes from the hub" + (" and sha256" if sha256 else "")
    for index in sorted(path.glob("**/*.index.json")) if path.is_dir() else []:
        rel = index.parent.relative_to(path)
        for shard in sorted(set(_read_index(index).values())):
            expected.setdefault((rel / shard).as_posix(), {})
    for name, meta in sorted(expected.items()):
        file = path / name
        if not file.is_file():
            report.missing.append(name)
            continue
        report.files += 1
        if meta.get("size") is not None and file.stat().st_size != meta["size"]:
            report.wrong_size.append(name)
        elif sha256 and meta.get("sha256") and _sha256(file) != meta["sha256"]:
            report.wrong_hash.append(name)
    partial_dir = path / ".cache" / "huggingface" / "download"
    if partial_dir.is_dir():
        report.partial = sorted(p.relative_to(partial_dir).as_posix() for p in partial_dir.glob("**/*.incomplete"))
    return report


def _read_index(index: Path) -> dict[str, str]:
    try:
        return json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DownloadError(f"{index}: not a readable shard index with a weight_map ({err}); download again")


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle, tqdm(total=file.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"sha256 {file.name}", leave=False) as bar:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- downloading


def download_target(target: Target, models_dir: Path, timeout: float = 10.0, sha256: bool = False,
                    endpoint: str | None = None) -> TargetReport:
    """Mirror ``target`` into ``models_dir/<folder>`` (resuming), write the manifest, and check the result."""
    from huggingface_hub import snapshot_download  # noqa: PLC0415  (network code only when downloading)

    revision, files = remote_files(target, timeout, endpoint)
    path = models_dir / target.folder
    path.mkdir(parents=True, exist_ok=True)
    _check_space(path, files)
    logger.info("%s: %s (%d files, %.2f GB) -> %s", target.name, target.repo_id, len(files),
                sum(m["size"] or 0 for m in files.values()) / 1e9, path)
    _hub_call(target, endpoint, timeout, lambda: snapshot_download(
        target.repo_id, revision=revision, local_dir=path, allow_patterns=list(target.patterns),
        etag_timeout=timeout, endpoint=endpoint))
    manifest = {"repo_id": target.repo_id, "revision": revision, "files": files}
    write_json(path / MANIFEST, manifest, indent=2)
    return check_target(target, models_dir, sha256=sha256)


def remote_files(target: Target, timeout: float, endpoint: str | None = None) -> tuple[str, dict[str, dict]]:
    """The repo's commit and ``{path: {"size", "sha256"}}`` of the files matching the target's patterns."""
    from huggingface_hub import HfApi  # noqa: PLC0415
    from huggingface_hub.utils import filter_repo_objects  # noqa: PLC0415

    info = _hub_call(target, endpoint, timeout,
                     lambda: HfApi(endpoint=endpoint).model_info(target.repo_id, files_metadata=True, timeout=timeout))
    siblings = list(filter_repo_objects(info.siblings or [], allow_patterns=list(target.patterns),
                                        key=lambda s: s.rfilename))
    files = {s.rfilename: {"size": s.size, "sha256": s.lfs.sha256 if s.lfs else None} for s in siblings}
    absent = [name for name in target.required if name not in files]
    if absent:
        raise DownloadError(f"{target.repo_id} (revision {info.sha}) has no {', '.join(absent)}: not a {target.name} "
                            f"repo dtback can use; pass another repo id")
    return info.sha, files


def _check_space(path: Path, files: dict[str, dict]) -> None:
    needed = sum((m["size"] or 0) for name, m in files.items()
                 if not ((path / name).is_file() and (path / name).stat().st_size == m["size"]))
    free = shutil.disk_usage(path).free
    if needed > free:
        raise DownloadError(f"{path}: {needed / 1e9:.1f} GB still to download but only {free / 1e9:.1f} GB free; "
                            "free space or choose another --models-dir")


def _hub_call(target: Target, endpoint: str | None, timeout: float, call):
    """Run a hub call, turning its failures into messages that say what to do."""
    from huggingface_hub import constants  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        GatedRepoError,
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    where = endpoint or constants.ENDPOINT
    try:
        return call()
    except GatedRepoError as err:
        raise GatedModelError(gated_message(target.repo_id, where)) from err
    except RepositoryNotFoundError as err:
        raise DownloadError(f"{target.repo_id}: no such repository on {where} (or a private one: log in with "
                            "`huggingface-cli login` or set HF_TOKEN)") from err
    except OfflineModeIsEnabled as err:
        raise DownloadError(f"{target.repo_id}: HF_HUB_OFFLINE is set, so nothing can be downloaded; unset it, or "
                            "copy the models into the models folder and run `dtback download --check`") from err
    except HfHubHTTPError as err:
        raise DownloadError(f"{target.repo_id}: the hub at {where} answered: {err}") from err
    except _transport_errors() as err:
        raise DownloadError(
            f"{target.repo_id}: cannot reach the Hugging Face hub at {where} within {timeout:g} s "
            f"({type(err).__name__}: {err}). Check the network (or HF_ENDPOINT / a proxy); a partial download resumes "
            "when you run the command again; `dtback download --check` lists what is already there") from err


def gated_message(repo_id: str, endpoint: str = "https://huggingface.co") -> str:
    return (f"{repo_id} is a gated model: the hub refused it without an accepted licence. 1) Log in at "
            f"{endpoint}/{repo_id} and accept the licence on the model page; 2) give this machine a token with read "
            "access: `huggingface-cli login` (or `hf auth login`), or HF_TOKEN=hf_... in the environment; 3) run the "
            "command again. FLUX.1-dev's and FLUX.2-dev's licences are non-commercial; `--flux schnell` (FLUX.1-schnell) "
            "and `--flux flux2-klein-base-4b` (FLUX.2 [klein] 4B) are Apache-2.0.")


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection and timeout errors: the HTTP client's that huggingface_hub runs on (httpx in 1.x, requests before)
    and its own "could not reach the hub" (not plain OSError: a full disk must not read as a network problem)."""
    from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: PLC0415

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, LocalEntryNotFoundError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue  # that client is not installed: huggingface_hub does not use it
    return tuple(errors)


# ------------------------------------------------------------------------------------------------ command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", type=Path, default=Path("models"),
                        help="where the models go (default: models/)")
    parser.add_argument("--only", default=",".join(TARGET_NAMES), help="comma-separated subset of flux,face,body")
    parser.add_argument("--flux", choices=sorted(FLUX_REPOS), default="dev",
                        help="which FLUX (default: dev = FLUX.1-dev): " + "; ".join(
                            f"{name}: {FLUX_REPOS[name].split('/')[1]} ({FLUX_LICENCES[name]})" for name in FLUX_REPOS))
    parser.add_argument("--face-repo", default=DEFAULT_FACE_REPO,
                        help=f"hub repo with the InsightFace antelopev2 ONNX pack (default: {DEFAULT_FACE_REPO})")
    parser.add_argument("--body-repo", default=DEFAULT_BODY_REPO,
                        help=f"hub repo of the body backbone (default: {DEFAULT_BODY_REPO})")
    parser.add_argument("--check", action="store_true", help="only report what is present or missing; no network")
    parser.add_argument("--sha256", action="store_true", help="also hash the large files against the hub's sha256")
    parser.add_argument("--timeout", type=_seconds, default=10.0,
                        help="seconds to wait for the hub before giving up (default: 10)")


def _seconds(text: str) -> float:
    """A finite number of seconds above 0 (argparse type)."""
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text}: a number of seconds above 0")
    return value


def check_models_dir(models_dir: Path) -> None:
    """Raise :class:`DownloadError` when ``models_dir`` (or the first of its parents that exists) is not a folder."""
    for path in (models_dir, *models_dir.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                what = "is" if path == models_dir else f"is inside {path}, which is"
                raise DownloadError(f"--models-dir {models_dir} {what} a file, not a folder: choose a folder "
                                    "(it is created when missing)")
            return


def run_download(args: argparse.Namespace) -> list[TargetReport]:
    """Check (``--check``) or download every target; returns one report per target."""
    targets = make_targets(args.flux, args.face_repo, args.body_repo,
                           [name.strip() for name in args.only.split(",") if name.strip()])
    check_models_dir(Path(args.models_dir))
    for target in targets:  # a folder left as a file: said now, before the hub is asked or files are listed missing
        folder = Path(args.models_dir) / target.folder
        if folder.exists() and not folder.is_dir():
            raise DownloadError(f"{target.name}: {folder} is a file, not a folder: move it away, or choose another "
                                "--models-dir")
    if args.check:
        return [check_target(target, args.models_dir, sha256=args.sha256) for target in targets]
    return [download_target(target, args.models_dir, timeout=args.timeout, sha256=args.sha256) for target in targets]
