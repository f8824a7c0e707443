"""Loading: YAML file + ``--set`` overrides -> a validated :class:`Config`; the seed's flat keys, renamed and
removed keys, error messages that name the source and key, and the key reference (``describe_keys``)."""

from __future__ import annotations

import difflib
import reprlib
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from dtback.config.section import _Section
from dtback.config.tree import Config
from dtback.config.yaml_core import DuplicateKeyError, _UniqueKeyLoader, _yaml_problem
from dtback.errors import ConfigError

SEED_KEYS = (
    "data_dir",
    "max_chars_per_bundle",
    "min_images_per_char",
    "use_simple_model",
    "input_size",
    "num_face_latents",
    "num_body_latents",
    "batch_size",
    "num_epochs",
    "learning_rate",
    "weight_decay",
    "face_weight",
    "body_weight",
    "content_weight",
    "output_dir",
)


def _section_of(key: str) -> str:
    for section, info in Config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section) and key in annotation.model_fields:
            return section
    raise KeyError(key)


SEED_KEY_PATHS: dict[str, str] = {key: f"{_section_of(key)}.{key}" for key in SEED_KEYS}

# Keys of earlier versions: still accepted (config files and the config.yaml of old runs), with a deprecation note.
RENAMED_KEYS: dict[str, str] = {"identity.world_models_dir": "data.world.components"}
REMOVED_KEYS: dict[str, str] = {
    "data.num_workers": "features are precomputed in memory; no DataLoader workers run",
    "data.build.duplicate_hash_bits": "near-duplicates are decided from the face crop (data.build.duplicate_face_"
                                      "correlation), not a whole-image hash",
}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML; None means all defaults), apply ``--set`` overrides, validate the whole tree."""
    source = str(path) if path is not None else "<defaults>"
    raw = _read_yaml(Path(path)) if path is not None else {}
    sources: dict[str, str] = {}
    raw = _lift_seed_keys(raw, source)
    raw = _renamed_keys(raw, source)
    for override in overrides:
        key, value = _parse_override(override)
        if key is None:
            continue
        _set_path(raw, key, value, f"--set {override}")
        sources[key] = f"--set {override}"
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, raw, source, sources)) from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        problem = "a folder, not a config file" if path.is_dir() else \
            "not a regular file (a pipe or a device): give a YAML file" if path.exists() else "config file not found"
        raise ConfigError(f"{path}: {problem}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(err)}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text: {err}") from None
    except OSError as err:  # no read permission, a disk error: one line, not a traceback
        raise ConfigError(f"{path}: unreadable ({err.strerror or err})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def _lift_seed_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Move the seed's flat top-level keys into their sections (``learning_rate`` -> ``training.learning_rate``)."""
    raw = dict(raw)
    for key, dotted in SEED_KEY_PATHS.items():
        if key not in raw:
            continue
        section = dotted.split(".")[0]
        block = raw.get(section)
        if block is None:
            block = {}
        if not isinstance(block, dict):
            continue  # the validator reports the malformed section with its path
        if key in block:
            raise ConfigError(f"{source}: {key} is given both at the top level and as {dotted}; keep one")
        raw[section] = {**block, key: raw.pop(key)}
    return raw


def _renamed_keys(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """Move renamed keys to their new place and drop removed ones, each with a deprecation warning."""
    for old, new in (*RENAMED_KEYS.items(), *((old, None) for old in REMOVED_KEYS)):
        *parents, key = old.split(".")
        node: Any = raw
        for part in parents:  # copy the dicts on the way down: the caller's mapping is left as it was
            child = node.get(part) if isinstance(node, dict) else None
            if not isinstance(child, dict):
                node = None
                break
            node[part] = node = dict(child)
        if not isinstance(node, dict) or key not in node:
            continue
        value = node.pop(key)
        if new is None:
            warnings.warn(f"{source}: {old} is no longer used ({REMOVED_KEYS[old]}); remove it", FutureWarning,
                          stacklevel=3)
            continue
        warnings.warn(f"{source}: {old} is renamed {new}; the old name still works for now", FutureWarning,
                      stacklevel=3)
        if _get_path(raw, new) is not None and value is not None:
            raise ConfigError(f"{source}: both {old} (old name) and {new} are set; keep {new}")
        if value is not None:
            _set_path(raw, new, value, source)
    return raw


def _get_path(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _parse_override(override: str) -> tuple[str | None, Any]:
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {override}: expected key=value, e.g. --set training.learning_rate=1e-4")
    key = SEED_KEY_PATHS.get(key, key)
    if key in RENAMED_KEYS:
        warnings.warn(f"--set {override}: {key} is renamed {RENAMED_KEYS[key]}", FutureWarning, stacklevel=3)
        key = RENAMED_KEYS[key]
    if key in REMOVED_KEYS:
        warnings.warn(f"--set {override}: {key} is no longer used ({REMOVED_KEYS[key]})", FutureWarning,
                      stacklevel=3)
        return None, None
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        # `{character} in a park` is a broken YAML mapping, not the caption template the user typed
        hint = "; text that starts with '{' must be in quotes" if text.lstrip().startswith("{") else ""
        raise ConfigError(f"--set {override}: value is not valid YAML: {_yaml_problem(err)}{hint}") from None
    _check_key_path(key, override)
    return key, value


def _check_key_path(dotted: str, override: str) -> None:
    """Refuse ``--set a.b.c=...`` where ``a.b`` is a value of the tree, not a section (the validator would say only
    that ``a.b`` is not a number); unknown names are left to the validator, which suggests the close ones."""
    model: type[BaseModel] = Config
    parts = dotted.split(".")
    for depth, part in enumerate(parts[:-1]):
        info = model.model_fields.get(part)
        if info is None:
            return
        annotation = info.annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"--set {override}: {where} is a value, not a section, so {dotted} cannot be set "
                              f"(set {where}=...)")
        model = annotation


def _set_path(raw: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"{source}: {where} is a value, not a section, so {dotted} cannot be set")
        node = child
    node[parts[-1]] = value


def _format_errors(err: ValidationError, raw: dict[str, Any], source: str, sources: dict[str, str]) -> str:
    lines = []
    for item in err.errors():
        loc = [str(part) for part in item["loc"]]
        key = ".".join(loc) if loc else "(top level)"
        origin = _origin(key, source, sources)
        if not loc:  # a rule across sections: name the overrides its message mentions
            origin = ", ".join([source, *(where for overridden, where in sources.items()
                                          if overridden.split(".")[-1] in item["msg"])])
        if item["type"] == "extra_forbidden":
            lines.append(f"{origin}: {key}: unknown key{_suggestion(loc)}")
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "string_type" and isinstance(item.get("input"), (dict, list)):
            # `{character} in a park` or `a: b` unquoted is a YAML mapping (and `[x]` a list), not the text typed
            kind = "mapping" if isinstance(item["input"], dict) else "list"
            message += f"; YAML read the value as a {kind}: put it in quotes"
        got = f" (got {_short_repr(item['input'])})" if "input" in item and not isinstance(item["input"], dict) else ""
        lines.append(f"{origin}: {key}: {message}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _short_repr(value: Any, limit: int = 200) -> str:
    """``repr(value)``, cut at ``limit`` characters: a YAML alias bomb expands to millions of elements."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 3, 8, 8, limit, limit
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _origin(key: str, source: str, sources: dict[str, str]) -> str:
    for overridden, where in sources.items():
        if key == overridden or key.startswith(overridden + ".") or overridden.startswith(key + "."):
            return where
    return source


def _suggestion(loc: list[str]) -> str:
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    valid = list(model.model_fields)
    close = difflib.get_close_matches(loc[-1], valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    where = ".".join(loc[:-1]) or "the top level"
    return f"{hint} (valid keys in {where}: {', '.join(valid)})"


def describe_keys(model: type[BaseModel] = Config, prefix: str = "") -> Iterable[tuple[str, str, str]]:
    """Yield (dotted key, default, description) for every leaf key, for CLI help and docs."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from describe_keys(annotation, f"{prefix}{name}.")
        else:
            default = info.get_default(call_default_factory=True)
            yield f"{prefix}{name}", repr(default if not isinstance(default, Path) else str(default)), info.description or ""
