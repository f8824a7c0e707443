"""IdentityFluxPipeline: reference image(s) + prompt(s) → images, with a trained dtback adapter on a FLUX base.

A thin layer over diffusers' ``FluxPipeline``: the adapter is attached to its transformer with hooks, and a forward
pre-hook on the transformer sets the identity tokens before every transformer call: on for the
``identity_start``..``identity_end`` fraction of the steps, and off for the negative branch of true CFG. Everything
else — schedulers, offloading, LoRAs loaded through diffusers — is the FluxPipeline's own:

* :meth:`IdentityFluxPipeline.enable_offload` (``"model"`` or ``"sequential"``) calls diffusers' CPU offload for the
  FLUX components and keeps the small identity model (resampler + adapters) on the GPU, where the transformer's
  blocks run, so the block hooks see it on the hidden states' device.
* :meth:`IdentityFluxPipeline.load_lora_weights` loads a diffusers FLUX LoRA (peft wraps the transformer's Linear
  layers; the identity hooks sit on the blocks, so they are untouched) and sets its scale.

True CFG (``true_cfg_scale > 1``): FluxPipeline calls the transformer twice per step, the prompt first and the
negative prompt second, and mixes ``neg + scale · (pos − neg)``. The negative branch here runs without identity, so
the guidance pushes towards the identity as well as away from the negative prompt (the positive prompt itself when
no negative prompt is given: then the guidance is on identity alone).

The checkpoint records the identity encoders it was trained with (face backend, body model), the base it was
trained on (a relative ``base`` folder for the simple model, else a hub id or folder) and the prompt length, so
``from_pretrained(adapter)`` alone rebuilds the setting.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, Flux2KleinPipeline, FluxPipeline
from PIL import Image

from dtback import backends, devices
from dtback.errors import AdapterMismatchError, DtbackError, MissingModelError, NoFaceError
from dtback.identity.resampler import IdentityInputs
from dtback.inference.loras import check_lora_weights
from dtback.model.adapter_file import LORA_NAME, RunRecord, read_adapter
from dtback.model.flux import DTYPE_KWARG, base_content_id, damaged_weights, local_base_folder
from dtback.model.identity_flux import IdentityPreservingFlux

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("none", "model", "sequential")


@dataclass
class ReferenceReport:
    """What the encoders found in the references: faces per image (0 = none) and which images were used."""

    paths: list[str]
    faces: list[int]
    warnings: list[str] = field(default_factory=list)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # organisation/name, as the hub spells repositories


def resolve_base(adapter: Path, recorded: str | None, override: str | None) -> str:
    """The base to load: ``override`` (as given), else the recorded one: a relative folder is next to the checkpoint
    (never in the current folder, where another run's ``base/`` may be), an absolute one as it is, a hub id from the
    local Hugging Face cache. Raises :class:`MissingModelError` naming what was looked for, without a hub lookup."""
    if override:
        given = Path(override).expanduser()
        if given.exists() and not given.is_dir():
            raise MissingModelError(f"--base {override} is a file: pass a FLUX folder (diffusers layout) or a hub id")
        if not given.exists() and (given.is_absolute() or not HUB_ID.fullmatch(override)):
            raise MissingModelError(f"--base {override}: no such folder (and not an organisation/name hub id)")
        return override
    if not recorded:
        raise MissingModelError(f"{adapter} does not record its base model: pass --base (a FLUX folder or hub id)")
    home = adapter.parent if adapter.is_file() else adapter
    folder = home / Path(recorded).expanduser()  # an absolute recorded path stays as it is
    if folder.is_dir():
        return str(folder)
    if Path(recorded).is_absolute() or not HUB_ID.fullmatch(recorded):
        raise MissingModelError(
            f"{adapter} was trained on the base folder {recorded!r}, expected at {folder}, which does not exist: "
            "copy the run's base folder there with the adapter, or pass --base FOLDER")
    cached = local_base_folder(recorded)
    if cached is not None:
        return str(cached)
    if Path(recorded).is_dir():  # older runs recorded a folder relative to where training ran
        logger.warning("%s: base %r is not next to the adapter nor in the hub cache; using ./%s of the current "
                       "folder", adapter, recorded, recorded)
        return str(Path(recorded).resolve())
    raise MissingModelError(
        f"{adapter} was trained on {recorded!r}: neither a folder next to it ({folder}) nor a hub id in the local "
        f"Hugging Face cache; download it (dtback download) or pass --base FOLDER")


def check_base_content(adapter: Path, record: RunRecord, source: str, chosen: bool) -> None:
    """Refuse a base whose content fingerprint (:func:`~dtback.model.flux.base_content_id`) is not the one the
    adapter records, naming both; a base the user ``chosen`` with ``--base`` is only warned about. Adapters without
    a recorded fingerprint (older runs) and bases that are not local folders are not checked. A base whose
    weights file is cut short (a full disk, an interrupted copy) is named as damaged, chosen or not."""
    expected = getattr(record, "base_content_id", None)
    folder = local_base_folder(source)
    if not expected or folder is None:
        return
    found = base_content_id(folder)
    if found == expected:
        return
    damaged = damaged_weights(folder / "transformer")  # a copy cut short differs too: say so, not "another base"
    if damaged is not None:
        raise DtbackError(f"{damaged[0]} is damaged ({damaged[1]}): the base {folder} that {adapter} was trained on "
                          "is not whole; copy it again")
    message = (f"{adapter} was trained on a base with content fingerprint {expected[:16]}, but {folder} has "
               f"{found[:16]}: another base (another run's, or one written after this adapter)")
    if chosen:
        logger.warning("%s; used anyway because --base names it", message)
        return
    raise AdapterMismatchError(f"{message}; pass --base with the base this adapter was trained on")


def offload_device(mode: str, device: str | torch.device | None = None) -> torch.device:
    """The accelerator that CPU offload ``mode`` moves the FLUX components onto (None: the one this machine has).

    Raises :class:`DtbackError` for an unknown mode and when there is no accelerator: offloading to the CPU from the
    CPU saves nothing, and diffusers refuses it.
    """
    if mode not in OFFLOAD_MODES[1:]:
        raise DtbackError(f"offload mode {mode!r} is not one of {', '.join(OFFLOAD_MODES[1:])}")
    available = _accelerator()
    target = torch.device(device) if device is not None else available
    if target is None or target.type == "cpu":
        why = "this machine has none" if available is None else "the device is cpu"
        raise DtbackError(f"offload {mode!r} needs a GPU: it keeps the FLUX weights in CPU memory and moves them to "
                          f"the GPU when they run, and {why} (run without offload on the CPU)")
    if available is None or available.type != target.type:
        raise DtbackError(f"offload {mode!r} onto {target}: no such device here (found {available or 'no GPU'})")
    return target


def _accelerator() -> torch.device | None:
    return devices.accelerator()


def _adapter_name(path: Path, taken: set[str]) -> str:
    """A peft-safe adapter name from the file name (peft names may not hold dots), unique among ``taken``."""
    stem = re.sub(r"\W", "_", path.stem) or "lora"
    name, i = stem, 1
    while name in taken:
        i += 1
        name = f"{stem}_{i}"
    return name


SIMPLE_BASE_STEPS, FLUX_STEPS = 20, 28


def default_steps(spec_extra: RunRecord) -> int:
    """Sampling steps when none are given, from the adapter's ``spec.extra``: 20 for the small simple base trained
    with the adapter (``base_model == "base"``), 28 for a real FLUX base. ``dtback generate`` and ``dtback
    evaluate`` both use it."""
    return SIMPLE_BASE_STEPS if spec_extra.base_model == "base" else FLUX_STEPS


class IdentityFluxPipeline:
    """See the module docstring. Build with :meth:`from_pretrained`; call like a diffusers pipeline."""

    def __init__(self, pipeline: FluxPipeline, model: IdentityPreservingFlux, face_encoder, body_encoder,
                 max_sequence_length: int):
        self.pipeline = pipeline
        self.model = model
        self.face_encoder = face_encoder
        self.body_encoder = body_encoder
        self.max_sequence_length = max_sequence_length
        self.offload = "none"
        self._offload_device: torch.device | None = None
        self.loras: dict[str, float] = {}  # LoRAs loaded through diffusers: adapter name → scale

    @classmethod
    def from_pretrained(cls, adapter: str | Path, base: str | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None, local_files_only: bool = True,
                        offload: str = "none") -> "IdentityFluxPipeline":
        """Load the adapter and its base onto ``device`` (None: the CPU). ``offload`` ``"model"``/``"sequential"``
        keeps the FLUX weights in CPU memory and moves them onto ``device`` (None: this machine's GPU) as they run
        (:meth:`enable_offload`)."""
        adapter = Path(adapter)
        device = str(offload_device(offload, device)) if offload != "none" else (device or "cpu")
        spec, state = read_adapter(adapter)  # a damaged or edited file named before its base is loaded
        source = resolve_base(adapter, spec.extra.base_model, base)
        check_base_content(adapter, spec.extra, source, chosen=bool(base))
        dtype = dtype or devices.resolve_dtype("auto", device)
        # FLUX.1 adapters on a FluxPipeline; FLUX.2 ones on the pipeline the base folder names (Flux2Pipeline for
        # [dev], Flux2KleinPipeline for [klein]); attaching checks the transformer is of the adapter's family.
        loader = FluxPipeline if spec.base["family"] == "flux1" else DiffusionPipeline
        try:
            pipeline = loader.from_pretrained(source, **{DTYPE_KWARG: dtype}, local_files_only=local_files_only)
        except (OSError, ValueError) as err:  # ValueError: a folder of another pipeline (a FLUX.2 base for FLUX.1)
            raise MissingModelError(f"FLUX base {source!r} (for {adapter}) could not be loaded as a "
                                    f"{loader.__name__}: {err}") from err
        model = IdentityPreservingFlux.from_adapter(spec, state, str(adapter), pipeline.transformer)
        identity, world = backends.identity_from_adapter(spec.extra, device)
        face = backends.face_encoder(identity, world) if spec.resampler.face_dim else None
        body = backends.body_encoder(identity, world) if spec.resampler.body_dim else None
        model.eval()
        pipe = cls(pipeline, model, face, body, spec.extra.max_sequence_length)
        if offload == "none":
            pipeline.to(device)
            model.to(device=device)
        else:
            pipe.enable_offload(offload, device)
        return pipe

    @property
    def supports_true_cfg(self) -> bool:
        """FLUX.1 and FLUX.2 [klein] sample with true CFG; FLUX.2 [dev] is guidance-distilled and has none."""
        return isinstance(self.pipeline, (FluxPipeline, Flux2KleinPipeline))

    def enable_offload(self, mode: str, device: str | torch.device | None = None) -> None:
        """diffusers' CPU offload of the FLUX components onto the GPU ``device`` (None: this machine's).

        ``"model"``: one whole component (text encoders, transformer, VAE) on the GPU at a time, little slower;
        ``"sequential"``: one layer at a time, least GPU memory, much slower. The identity model stays on the GPU,
        since its hooks run inside the transformer's blocks. LoRAs can be loaded before or after.
        """
        self._offload_to(mode, offload_device(mode, device))

    def _offload_to(self, mode: str, device: torch.device) -> None:
        # Split from enable_offload so the tests can run the offload wiring with the CPU as the execution device.
        if mode == "model":
            self.pipeline.enable_model_cpu_offload(device=device)
        else:
            self.pipeline.enable_sequential_cpu_offload(device=device)
        self.model.to(device=device)
        self.offload, self._offload_device = mode, device

    def load_lora_weights(self, path: str | Path, adapter_name: str | None = None, scale: float = 1.0) -> str:
        """Load a diffusers/kohya FLUX LoRA file or folder through ``FluxPipeline.load_lora_weights``; returns its
        adapter name (default: from the file name). All loaded LoRAs stay active, each with its scale; a LoRA the
        dtback adapter was trained with stays at 1. A LoRA with NaN/inf weights or A/B halves of different ranks is
        refused before diffusers sees it (:func:`~dtback.inference.loras.check_lora_weights`)."""
        path = Path(path)
        if not path.exists():
            raise DtbackError(f"LoRA {path} does not exist")
        name = adapter_name or _adapter_name(path, set(self.loras))
        if name in self.loras or name == LORA_NAME:
            raise DtbackError(f"LoRA {path}: adapter name {name!r} is already in use; pass another adapter_name")
        file = check_lora_weights(path)  # the file diffusers is given: what was checked is what is loaded
        # diffusers would take the offload hooks off and put them back onto its default device; doing it here keeps
        # the device this pipeline was offloaded to.
        offloaded = self.offload
        if offloaded != "none":
            self.pipeline.remove_all_hooks()  # accelerate puts sequentially offloaded weights back in place
        try:
            try:
                self.pipeline.load_lora_weights(str(file), adapter_name=name)
            except (OSError, ValueError, KeyError, TypeError, RuntimeError, IndexError) as err:
                raise DtbackError(f"LoRA {path}: not a FLUX LoRA that diffusers can load "
                                  f"({err.__class__.__name__}: {err})") from err
            if not any(name in names for names in self.pipeline.get_list_adapters().values()):
                raise DtbackError(f"LoRA {path}: none of its weights fit this FLUX base's transformer or text encoders")
            self.loras[name] = float(scale)
            self.set_lora_scales()
        finally:
            if offloaded != "none":
                self._offload_to(offloaded, self._offload_device)
        return name

    def set_lora_scales(self, **scales: float) -> None:
        """Change the scales of loaded LoRAs by adapter name (0 switches one off) and apply them."""
        unknown = sorted(set(scales) - set(self.loras))
        if unknown:
            loaded = ", ".join(self.loras) or "none"
            raise DtbackError(f"no LoRA named {', '.join(unknown)} is loaded (loaded: {loaded})")
        self.loras.update({name: float(value) for name, value in scales.items()})
        names, weights = list(self.loras), list(self.loras.values())
        if self.model.spec.lora:  # diffusers' set_adapters switches off every adapter it is not given
            names, weights = [*names, LORA_NAME], [*weights, 1.0]
        self.pipeline.set_adapters(names, weights)

    def encode_references(self, images: Sequence[Image.Image], paths: Sequence[str] | None = None,
                          require_face: bool = False) -> tuple[IdentityInputs, ReferenceReport]:
        """Face and body features of the references (one character) → resampler inputs with ``B = 1``."""
        paths = list(paths or [f"reference {i}" for i in range(len(images))])
        report = ReferenceReport(paths=paths, faces=[])
        face_vectors, face_mask, body_pooled, body_tokens = [], [], [], []
        for image, path in zip(images, paths):
            image = image.convert("RGB")
            result = self.face_encoder.encode(np.asarray(image)) if self.face_encoder is not None else None
            report.faces.append(0 if result is None else result.num_faces)
            if self.face_encoder is not None:
                if result is None:
                    message = f"{path}: no face detected; it adds body identity only"
                    if require_face:
                        raise NoFaceError(f"{path}: no face detected (--require-face)")
                    report.warnings.append(message)
                    logger.warning(message)
                dim = self.model.spec.resampler.face_dim
                face_vectors.append(torch.from_numpy(result.embedding).float() if result is not None else torch.zeros(dim))
                face_mask.append(result is not None)
            if self.body_encoder is not None:
                features = self.body_encoder.encode(image, result.face.box if result is not None else None)
                body_pooled.append(features.pooled[0].float().cpu())
                body_tokens.append(features.tokens[0].float().cpu())
        inputs = IdentityInputs(
            face_embeds=torch.stack(face_vectors)[None] if face_vectors else None,
            face_mask=torch.tensor([face_mask]) if face_vectors else None,
            body_pooled=torch.stack(body_pooled)[None] if body_pooled else None,
            body_tokens=torch.stack(body_tokens)[None] if body_tokens else None,
            body_mask=torch.ones(1, len(body_pooled), dtype=torch.bool) if body_pooled else None,
        )
        return inputs, report

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        references: IdentityInputs | None,
        face_scale: float | None = None,
        body_scale: float | None = None,
        identity_start: float = 0.0,
        identity_end: float = 1.0,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        height: int = 512,
        width: int = 512,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        true_cfg_scale: float = 1.0,
        negative_prompt: str | list[str] | None = None,
        **pipeline_kwargs: Any,
    ) -> list[Image.Image]:
        """Images for ``prompt`` (one or several) with the identity of ``references`` (None: the plain base).

        ``true_cfg_scale > 1`` adds a negative branch without identity, with ``negative_prompt`` (default: the
        prompt itself); it costs a second transformer call per step.
        """
        if not 0.0 <= identity_start <= identity_end <= 1.0:
            raise ValueError(f"need 0 <= identity_start <= identity_end <= 1, got {identity_start}, {identity_end}")
        if true_cfg_scale < 1.0:
            raise ValueError(f"true_cfg_scale must be >= 1 (1 = off), got {true_cfg_scale}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("the prompt list is empty")
        batch = len(prompts) * num_images_per_prompt
        tokens = None
        if references is not None:
            single = self.model.encode_identity(references)
            tokens = type(single)(*(None if t is None else t.expand(batch, *t.shape[1:]) for t in
                                    (single.face, single.face_valid, single.body, single.body_valid)))
        face = self.model.spec.face_scale if face_scale is None else face_scale
        body = self.model.spec.body_scale if body_scale is None else body_scale
        true_cfg = true_cfg_scale > 1.0
        if isinstance(self.pipeline, Flux2KleinPipeline):
            # [klein]: no distilled guidance; its guidance_scale is true CFG against negative prompt embeddings.
            guidance_scale = true_cfg_scale
            if true_cfg:
                negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else \
                    list(negative_prompt or prompts)
                pipeline_kwargs["negative_prompt_embeds"] = self.pipeline.encode_prompt(
                    negative, max_sequence_length=self.max_sequence_length)[0]
        elif true_cfg and not self.supports_true_cfg:
            raise DtbackError(f"true CFG (true_cfg_scale={true_cfg_scale}) needs FLUX.1 or FLUX.2 [klein]; "
                              f"{type(self.pipeline).__name__} is guidance-distilled: use guidance_scale")
        elif true_cfg:
            pipeline_kwargs.update(true_cfg_scale=true_cfg_scale,
                                   negative_prompt=prompts if negative_prompt is None else negative_prompt)
        branches = 2 if true_cfg else 1
        with self.model.identity_per_call(tokens, num_inference_steps, branches, face, body, identity_start,
                                          identity_end):
            output = self.pipeline(
                prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                height=height, width=width, num_images_per_prompt=num_images_per_prompt,
                generator=torch.Generator().manual_seed(seed), max_sequence_length=self.max_sequence_length,
                output_type="pil", **pipeline_kwargs,
            )
        return output.images
