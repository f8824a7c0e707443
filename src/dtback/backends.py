"""The one place where a config name becomes a part: face encoder, body encoder, base pipeline, VAE, world data.

The rooms below take parts, not names: the precomputer, the trainer, the builder and the inference pipeline are
handed encoders and a base built here. ``world`` is the folder of the identity world's trained components
(``data.world.components``; None: the folder shipped in the package) and reaches every world part from here.

=================  ==========================================  =============================================
setting            names                                       part
=================  ==========================================  =============================================
face_backend       ``world`` / ``dlib`` / ``insightface``      :func:`face_encoder`
body_model         ``world`` / folder or hub id / null         :func:`body_encoder`
simple_vae         ``world`` / AutoencoderKL folder / null     :func:`simple_vae`
simple_base        ``world`` / FluxPipeline folder / null      :func:`initial_simple_pipeline`
use_simple_model   the simple model or real FLUX               :func:`load_base`
data_dir           a photo dataset, or the world to generate   :func:`world_data`
=================  ==========================================  =============================================
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline

from dtback import devices
from dtback.config import Config, DataConfig, IdentityConfig, ModelConfig
from dtback.errors import ConfigError, MissingModelError
from dtback.identity.body import BodyEncoder
from dtback.identity.crops import BodyCropRule
from dtback.identity.face import DlibFaceEncoder, FaceEncoder
from dtback.identity.insightface import InsightFaceEncoder
from dtback.model import flux
from dtback.model.identity_flux import RunRecord
from dtback.world.base import load_world_base
from dtback.world.encoders import WorldBodyEncoder, load_world_body_encoder, load_world_face_encoder
from dtback.world.files import MANIFEST, ensure_world, read_manifest
from dtback.world.reader import IdentityReader, load_reader
from dtback.world.vae import load_world_vae, world_vae_folder

log = logging.getLogger(__name__)

WORLD = "world"


def world_folder(cfg: Config) -> Path | None:
    """The run's world components folder (``data.world.components``; None: the shipped one)."""
    return cfg.data.world.components


def face_encoder(identity: IdentityConfig, world: Path | None = None) -> FaceEncoder:
    """The face encoder of ``identity.face_backend`` on ``identity.device``."""
    device = devices.resolve_device(identity.device)
    if identity.face_backend == WORLD:
        return load_world_face_encoder(world, choice=identity.face_choice).to(device)
    if identity.face_backend == "insightface":
        return InsightFaceEncoder(identity.face_model_dir, det_size=identity.face_det_size, device=str(device),
                                  choice=identity.face_choice)
    return DlibFaceEncoder(detector=identity.face_detector, upsample=identity.face_upsample,
                           choice=identity.face_choice, recognizer=identity.face_recognizer, device=device)


def body_encoder(identity: IdentityConfig, world: Path | None = None) -> BodyEncoder | WorldBodyEncoder | None:
    """The body encoder of ``identity.body_model`` (None when that is null) on ``identity.device``."""
    if identity.body_model is None:
        return None
    device = devices.resolve_device(identity.device)
    if identity.body_model == WORLD:
        return load_world_body_encoder(world).to(device)
    from safetensors import SafetensorError  # noqa: PLC0415

    try:
        encoder = BodyEncoder.from_pretrained(identity.body_model, crop_rule=BodyCropRule.from_config(identity))
    except SafetensorError as err:  # weights cut short (an interrupted copy, a partial hub snapshot) or not safetensors
        raise MissingModelError(
            f"identity.body_model={identity.body_model}: its weights cannot be read ({_weights_problem(identity, err)}); "
            "they are damaged or cut short: download them again (dtback download --only body) and point "
            "identity.body_model at that folder"
        ) from err
    return encoder.to(device)


def _weights_problem(identity: IdentityConfig, err: Exception) -> str:
    """Which file of a local body model folder does not read whole and why (its byte count), else ``err``'s text."""
    folder = flux.local_base_folder(identity.body_model)
    damaged = flux.damaged_weights(folder) if folder is not None else None
    if damaged is None:
        return str(err)
    weights, problem = damaged
    return f"{weights.relative_to(folder).as_posix()}: {problem}"


def simple_vae(model: ModelConfig, world: Path | None = None) -> AutoencoderKL | None:
    """The simple model's VAE as ``model.simple_vae`` says: the world's, a diffusers folder, or None (random)."""
    if model.simple_vae == WORLD:
        return load_world_vae(world_vae_folder(world))
    return flux.folder_vae(model.simple_vae, model.base)


def initial_simple_pipeline(model: ModelConfig, seed: int, world: Path | None = None) -> FluxPipeline:
    """The simple model a run starts from, as ``model.simple_base`` says: the world base (pretrained on the world
    without identity), a diffusers folder, or random weights by ``seed``."""
    if model.simple_base == WORLD:
        log.info("starting the simple FLUX model from the world base (pretrained without identity)")
        return load_world_base(world)
    return flux.initial_simple_pipeline(model, seed, simple_vae(model, world))


def load_base(model: ModelConfig, output_dir: Path, seed: int = 0, device: str | torch.device = "cpu",
              world: Path | None = None, local_files_only: bool = True) -> FluxPipeline:
    """The FLUX base of a run (:func:`dtback.model.flux.load_base`), the simple model made as ``model`` says."""
    return flux.load_base(model, output_dir, seed=seed, device=device, local_files_only=local_files_only,
                          initial=lambda: initial_simple_pipeline(model, seed, world))


def world_data(data: DataConfig, progress: bool = True) -> Path:
    """``data.data_dir``, with the identity world generated there first when it is missing and
    ``data.world.generate_if_missing`` is on (:func:`dtback.world.files.ensure_world`)."""
    return ensure_world(data, progress=progress)


def photo_backends(cfg: Config) -> tuple[Config, str | None]:
    """``cfg`` with encoders that fit its ``data.data_dir``, and a line saying what was changed (None: nothing).

    The identity world's encoders know only drawn characters: on a photo folder (one without the world's
    ``world.json``) they would give meaningless embeddings without a word. There ``identity.face_backend=world``
    becomes ``dlib`` (offline, licence-clean), and ``identity.body_model=world`` stops with a
    :class:`ConfigError` naming the keys to set (there is no body model that is always on hand). A missing
    ``data_dir`` is left alone: the world is generated there (:func:`world_data`).
    """
    root = Path(cfg.data.data_dir)
    identity = cfg.identity
    if not root.is_dir() or read_manifest(root) is not None or WORLD not in (identity.face_backend, identity.body_model):
        return cfg, None
    if identity.body_model == WORLD:
        raise ConfigError(
            f"data.data_dir={root} holds photos, not an identity world (no {MANIFEST}), but identity.body_model=world "
            "would run the world's body encoder on them. Set identity.body_model to a DINOv2 folder or hub id "
            "(`dtback download --only body` fetches facebook/dinov2-small and prints the --set), or to null to train "
            "without body identity; and identity.face_backend to dlib (offline) or insightface."
        )
    changed = identity.model_copy(update={"face_backend": "dlib"})
    note = (f"data.data_dir={root} holds photos, not an identity world: identity.face_backend world -> dlib "
            "(set identity.face_backend=insightface for ArcFace)")
    log.info(note)
    return cfg.model_copy(update={"identity": changed}), note


def builder_identity(cfg: Config) -> tuple[IdentityConfig, str]:
    """The identity settings the dataset builder runs with, and a line saying which face backend groups the photos:
    ``data.build.face_backend``, else ``identity.face_backend`` unless that is ``world`` (drawn characters only),
    then dlib (offline, licence-clean)."""
    chosen = cfg.data.build.face_backend
    if chosen is not None:
        why = "data.build.face_backend"
    elif cfg.identity.face_backend != WORLD:
        chosen, why = cfg.identity.face_backend, "identity.face_backend"
    else:
        chosen, why = "dlib", ("identity.face_backend is world, whose encoder knows only drawn characters; choose "
                               "another with data.build.face_backend")
    return cfg.identity.model_copy(update={"face_backend": chosen}), f"grouping faces with {chosen} ({why})"


def reader(world: Path | None = None) -> IdentityReader:
    """The identity world's attribute reader (evaluation only)."""
    return load_reader(world)


def identity_from_adapter(extra: RunRecord, device: str) -> tuple[IdentityConfig, Path | None]:
    """The identity settings and world folder a trained adapter recorded (``spec.extra``), for inference and
    evaluation. Adapters written before the world setting moved keep it as ``identity.world_models_dir``."""
    identity = dict(extra.identity)
    old_world = identity.pop("world_models_dir", None)
    world = extra.world if extra.world is not None else old_world
    return IdentityConfig(**{**identity, "device": device}), Path(world) if world is not None else None
