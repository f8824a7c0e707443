"""The identity adapter file: its format, the one reader every command goes through, and the atomic writer.

An adapter is its config (:class:`AdapterSpec` as JSON, with the :class:`RunRecord` that rebuilds a run's setting)
and its tensors, in one of three layouts: a folder (``adapter_config.json`` + ``adapter.safetensors``), one
``.safetensors`` file (the config in its metadata) or a tensors-only ``.pt`` (the seed's file names; read with
``weights_only=True``, never unpickled beyond tensors).

:func:`read_adapter` vets what it reads, since a file damaged or edited since training ends otherwise in a
traceback or, worse, in images: a safetensors file cut short, a config that is not UTF-8, a ``.pt`` that torch cannot
read or that holds Python objects, a ``state_dict`` holding lists (``weights_only`` lets plain containers through),
NaN weights (every image black), blocks the recorded base does not have, or weights of shapes the config does not
make. Each is an :class:`AdapterMismatchError` of one line naming the file and the key, before any base is loaded.
"""

from __future__ import annotations

import json
import pickle
import re
import struct
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dtback.errors import AdapterMismatchError
from dtback.identity.resampler import IdentityResampler, ResamplerSpec
from dtback.io import atomic_path, safetensors_problem
from dtback.model.adapters import AdapterLayout, IdentityCrossAttention

FORMAT = "dtback-identity-adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
METADATA_KEY = "dtback_adapter_config"
LORA_NAME = "dtback_lora"
LORA_PREFIX = "lora."
PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
# The shape of a base the adapters fit; a checkpoint names these when it is loaded into another base.
BASE_KEYS = ("num_layers", "num_single_layers", "num_attention_heads", "attention_head_dim", "in_channels")
# What torch.load(weights_only=True) raises for an empty, torn, foreign or hostile file (found by cutting and
# flipping bytes of saved files, torch 2.x): UnpicklingError for what weights_only refuses (and broken pickles),
# RuntimeError for a damaged zip, EOFError for an empty file, OSError (EINVAL) for a zip cut inside its directory,
# UnicodeDecodeError/ValueError, KeyError, IndexError, struct.error and AssertionError for bytes that are no pickle.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError,
                     TypeError, AttributeError, struct.error, AssertionError)


class RunRecord(BaseModel):
    """What inference and evaluation need to rebuild a run's setting from its adapter file alone (``spec.extra``):
    the base it was trained with (``"base"``: the simple model saved next to it; else a folder or hub id) and that
    base's content fingerprint (:func:`dtback.model.flux.base_content_id`; None when the base was no local folder),
    the identity settings (``IdentityConfig`` as JSON), training size, prompt length and the world components folder.
    Keys of other versions are kept as they are (``extra="allow"``)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    base_model: str | None = None
    base_content_id: str | None = None
    identity: dict[str, Any] = Field(default_factory=dict)
    input_size: int = 512
    max_sequence_length: int = 512
    world: str | None = None

    def update(self, **values: Any) -> "RunRecord":
        """Set several fields at once, each validated."""
        for key, value in values.items():
            setattr(self, key, value)
        return self


@dataclass(frozen=True)
class AdapterSpec:
    """Everything needed to rebuild the trainable part; saved as JSON next to the weights."""

    resampler: ResamplerSpec
    double_blocks: tuple[int, ...]
    single_blocks: tuple[int, ...]
    heads: int
    head_dim: int
    base: dict[str, int]
    face_scale: float = 1.0
    body_scale: float = 1.0
    lora: dict[str, Any] | None = None
    extra: RunRecord = field(default_factory=RunRecord)

    def to_json(self) -> str:
        payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **asdict(self),
                   "extra": self.extra.model_dump(mode="json")}
        return json.dumps(payload, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "AdapterSpec":
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as err:
            raise AdapterMismatchError(f"{source}: adapter config is not valid JSON ({err})") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise AdapterMismatchError(f"{source}: not a dtback identity adapter (format is not {FORMAT!r})")
        if payload.get("format_version") != FORMAT_VERSION:
            raise AdapterMismatchError(
                f"{source}: adapter format_version {payload.get('format_version')} (this dtback reads {FORMAT_VERSION})"
            )
        try:
            return cls(
                resampler=ResamplerSpec(**payload["resampler"]),
                double_blocks=tuple(payload["double_blocks"]),
                single_blocks=tuple(payload["single_blocks"]),
                heads=int(payload["heads"]),
                head_dim=int(payload["head_dim"]),
                base={"family": "flux1", **payload["base"]},  # adapters saved before FLUX.2: FLUX.1
                face_scale=float(payload.get("face_scale", 1.0)),
                body_scale=float(payload.get("body_scale", 1.0)),
                lora=payload.get("lora"),
                extra=RunRecord.model_validate(payload.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise AdapterMismatchError(f"{source}: adapter config key missing or malformed: {err}") from err


def build_parts(spec: AdapterSpec) -> nn.ModuleDict:
    """The modules a spec makes: ``resampler`` and one cross-attention per block under ``adapters``. The model
    (:class:`~dtback.model.identity_flux.IdentityPreservingFlux`) is built of these, and the reader builds them on
    the meta device to know the shapes the weights must have."""
    width = spec.base["num_attention_heads"] * spec.base["attention_head_dim"]
    layout = AdapterLayout(spec.double_blocks, spec.single_blocks)
    adapters = nn.ModuleDict(
        {name: IdentityCrossAttention(width, spec.heads, spec.head_dim, face=spec.resampler.face_dim > 0,
                                      body=spec.resampler.body_dim > 0) for name in layout.names()}
    )
    return nn.ModuleDict({"resampler": IdentityResampler(spec.resampler), "adapters": adapters})


# ------------------------------------------------------------------------------------------------------- reading

def read_adapter(path: str | Path) -> tuple[AdapterSpec, dict[str, torch.Tensor]]:
    """``(spec, state dict)`` from a folder, a ``.safetensors`` file or a tensors-only ``.pt`` file, vetted (see the
    module docstring); :class:`AdapterMismatchError` names the file and the key that is wrong, FileNotFoundError a
    path that is not there."""
    path = Path(path)
    spec, state = _read_layout(path)
    _check_tensors(path, state)
    _check_blocks(path, spec)
    _check_shapes(path, spec, state)
    return spec, state


def _read_layout(path: Path) -> tuple[AdapterSpec, dict[Any, Any]]:
    if path.is_dir():
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        for needed in (config_path, weights_path):
            if not needed.is_file():
                raise AdapterMismatchError(f"{path}: adapter folder has no {needed.name}")
        try:
            text = config_path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise AdapterMismatchError(f"{path}: the adapter config is not UTF-8 text ({err.reason} at byte "
                                       f"{err.start}); not a dtback adapter") from None
        spec = AdapterSpec.from_json(text, str(config_path))
        return spec, _safetensors(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        tensors = _safetensors(path)  # whole before its header's metadata is trusted
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if METADATA_KEY not in metadata:
            raise AdapterMismatchError(f"{path}: safetensors file has no {METADATA_KEY!r} metadata")
        return AdapterSpec.from_json(metadata[METADATA_KEY], str(path)), tensors
    payload = _torch_load(path)
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise AdapterMismatchError(f"{path}: expected keys 'config' and 'state_dict' in the checkpoint")
    if not isinstance(payload["config"], str) or not isinstance(payload["state_dict"], dict):
        raise AdapterMismatchError(
            f"{path}: 'config' must be the adapter config as JSON text and 'state_dict' a mapping of tensors (got "
            f"{type(payload['config']).__name__} and {type(payload['state_dict']).__name__}); not a dtback adapter")
    return AdapterSpec.from_json(payload["config"], str(path)), payload["state_dict"]


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    problem = safetensors_problem(path)
    if problem:
        raise AdapterMismatchError(f"{path}: {problem}; not a whole adapter (copy it again)")
    try:
        return load_file(path)
    except SafetensorError as err:  # a whole header and size, but tensors safetensors refuses (a dtype, offsets)
        raise AdapterMismatchError(f"{path}: safetensors cannot read it ({_first_sentence(str(err))}); "
                                   "not a dtback adapter") from None


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)``, or a one-line refusal saying why in words (not torch's page of advice)."""
    try:
        with warnings.catch_warnings():
            # A file of another pickle protocol (no torch.save file) makes torch warn before it refuses it below.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
            return torch.load(path, map_location="cpu", weights_only=True)
    except TORCH_LOAD_ERRORS as err:
        why = _load_failure(path, err)
    raise AdapterMismatchError(f"{path}: not a tensors-only dtback checkpoint ({why})")


def _load_failure(path: Path, err: BaseException) -> str:
    size = path.stat().st_size
    if size == 0:
        return "an empty file"
    with open(path, "rb") as handle:
        zipped = handle.read(4) == b"PK\x03\x04"  # torch.save's own format is a zip archive
    if zipped and not zipfile.is_zipfile(path):
        return f"cut short: a zip archive of {size} bytes whose directory at its end is missing; copy it again"
    if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
        detail = _refusal_reason(str(err))
        return "damaged, or it holds Python objects beyond tensors, which dtback never unpickles" + \
            (f": {detail}" if detail else "")
    if isinstance(err, EOFError):
        return f"its {size} bytes end before the checkpoint does: cut short; copy it again"
    return f"{type(err).__name__}: {_first_sentence(str(err))}".rstrip(": ")


def _refusal_reason(message: str) -> str:
    """The reason in torch's weights_only refusal ("Unsupported operand 110", "Unsupported global: GLOBAL getattr
    ..."), without the page of advice around it (to unpickle anyway, which dtback never does); "" when none."""
    _, marker, after = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in after.splitlines() if line.strip()] if marker else \
        [line.strip() for line in message.splitlines() if line.strip().lower().startswith(("trying to load", "unsupp"))]
    return _first_sentence(lines[0]) if lines else ""


def _first_sentence(message: str) -> str:
    """The first sentence of an exception's first line, whole, without a C++ ``[enforce fail at ...]`` location."""
    line = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", (message.strip().splitlines() or [""])[0])
    return re.split(r"(?<=[^.\s])\.\s", line, maxsplit=1)[0].strip().rstrip(".")


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many NaN/inf values ``tensor`` holds (0 for integer tensors)."""
    if not tensor.is_floating_point():
        return 0
    if tensor.element_size() == 1:  # torch has no isfinite for float8
        tensor = tensor.float()
    return int((~torch.isfinite(tensor)).sum())


def _check_tensors(path: Path, state: dict[Any, Any]) -> None:
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterMismatchError(f"{path}: state_dict key {key!r} holds a {type(value).__name__}, not a tensor; "
                                       "not a dtback adapter")
    bad = [key for key, value in state.items() if non_finite_count(value)]
    if bad:
        more = f" (and {len(bad) - 1} more keys)" if len(bad) > 1 else ""
        raise AdapterMismatchError(f"{path}: key {bad[0]} holds NaN or infinite values{more}: a damaged adapter makes "
                                   "every image NaN; use an earlier checkpoint or an undamaged copy")


def _check_blocks(path: Path, spec: AdapterSpec) -> None:
    # attach() indexes the transformer's blocks with these; the base it records is compared with the real one later.
    for key, count_key, blocks in (("double_blocks", "num_layers", spec.double_blocks),
                                   ("single_blocks", "num_single_layers", spec.single_blocks)):
        count = spec.base.get(count_key)
        outside = [index for index in blocks if not isinstance(index, int) or count is None or not 0 <= index < count]
        if outside:
            raise AdapterMismatchError(f"{path}: adapter config {key} {list(blocks)} names blocks {outside} that its "
                                       f"base ({count_key} {count}) does not have; not a whole adapter")


def _check_shapes(path: Path, spec: AdapterSpec, state: dict[str, torch.Tensor]) -> None:
    """The weights against the modules their config builds, on the meta device (no memory, no base): loading would
    find the same mismatch only after the base is loaded, minutes for FLUX."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")  # sizes of 0: refused below
            expected = build_parts(spec).state_dict()
    except (KeyError, TypeError, ValueError, RuntimeError, ZeroDivisionError) as err:
        raise AdapterMismatchError(f"{path}: the adapter config makes no model ({type(err).__name__}: "
                                   f"{_first_sentence(str(err))}); not a whole adapter") from None
    own = {key: value for key, value in state.items() if not key.startswith(LORA_PREFIX)}
    wrong = [f"{key} {tuple(value.shape)} (the config makes {tuple(expected[key].shape)})"
             for key, value in own.items() if key in expected and value.shape != expected[key].shape]
    if wrong:
        raise AdapterMismatchError(f"{path}: weights of another shape than the adapter config: {'; '.join(wrong[:3])}"
                                   f"{' ...' if len(wrong) > 3 else ''}")
    missing, unexpected = sorted(set(expected) - set(own)), sorted(set(own) - set(expected))
    if missing or unexpected:
        raise AdapterMismatchError(f"{path}: weights do not match the adapter config (missing {missing[:5]}, "
                                   f"unexpected {unexpected[:5]})")


# ------------------------------------------------------------------------------------------------------- writing

def write_adapter(path: str | Path, config: str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` (:meth:`AdapterSpec.to_json`) and ``state`` atomically in the layout ``path`` names: a
    ``.safetensors`` file, a tensors-only ``.pt``/``.pth``/``.bin``, else a folder."""
    path = Path(path)
    if path.suffix == ".safetensors":
        _atomic(path, lambda tmp: save_file(state, tmp, metadata={METADATA_KEY: config}))
    elif path.suffix in PICKLE_SUFFIXES:
        _atomic(path, lambda tmp: _torch_save({"config": config, "state_dict": state}, tmp))
    else:
        path.mkdir(parents=True, exist_ok=True)
        _atomic(path / WEIGHTS_FILE, lambda tmp: save_file(state, tmp))
        _atomic(path / CONFIG_FILE, lambda tmp: Path(tmp).write_text(config, encoding="utf-8"))
    return path


def _torch_save(payload: dict, name: str) -> None:
    """``torch.save`` through a Python file: a full disk is then an OSError (ENOSPC) the caller can name, where
    torch's own writer raises a RuntimeError ("unexpected pos ...") that says nothing of the disk."""
    with open(name, "wb") as handle:
        torch.save(payload, handle)


def _atomic(path: Path, write) -> None:
    """``write(temporary file name)``, then the file replaces ``path`` whole (:func:`dtback.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        write(str(tmp))
