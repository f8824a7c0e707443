"""YAML as the config reads and writes it: YAML 1.2 core scalars, no key given twice, look-alike strings quoted,
and PyYAML's errors on one line."""

from __future__ import annotations

import re
from typing import Any

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping in the YAML file gives the same key twice (PyYAML would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping, naming it and both lines."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults`: merged keys may be overridden, that is what merging is for
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:
                continue  # an unhashable key: construct_mapping below reports it
            if first != line:
                raise DuplicateKeyError(f"key {key!r} is given twice in one mapping (lines {first} and {line}); "
                                        "YAML would silently keep the last one: keep one")
        return super().construct_mapping(node, deep=deep)


# Scalars are read as YAML 1.2's core schema reads them, not as PyYAML's YAML 1.1: a person writing `010` means ten
# (1.1: octal 8), `1:30` is no number (1.1: sexagesimal 90), `no`, `off`, `yes` and `on` are words (1.1: booleans;
# a caption template "no" or a bundle "off" stays a string, while a boolean key still takes them, through pydantic),
# `1e-4` is a float (1.1: a string) and `2024-05-01` is a folder name, not a date. Kept from 1.1 because nobody
# means anything else by them: `_` between digits (`1_000`) and the 0x / 0o / 0b prefixes.
_CORE_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_CORE_INT = re.compile(r"^[-+]?(?:0x[0-9a-fA-F_]+|0o[0-7_]+|0b[01_]+|[0-9][0-9_]*)$")
_CORE_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                         r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_YAML_11_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("bool", "int", "float", "timestamp")}
_CORE_RESOLVERS = [("tag:yaml.org,2002:bool", _CORE_BOOL, "tTfF"), ("tag:yaml.org,2002:int", _CORE_INT, "-+0123456789"),
                   ("tag:yaml.org,2002:float", _CORE_FLOAT, "-+.0123456789")]
_BASES = {"0x": 16, "0o": 8, "0b": 2}


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    try:
        return sign * int(digits[2:], _BASES[digits[:2].lower()]) if digits[:2].lower() in _BASES \
            else sign * int(digits, 10)
    except ValueError:  # an explicit `!!int abc`: a YAML error naming the line, not a traceback
        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not an integer", node.start_mark) from None


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    try:
        return yaml.SafeLoader.construct_yaml_float(loader, node)
    except ValueError:  # an explicit `!!float abc`
        raise yaml.constructor.ConstructorError(None, None, f"{loader.construct_scalar(node)!r} is not a float",
                                                node.start_mark) from None


_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_11_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _tag, _regexp, _first in _CORE_RESOLVERS:
    _UniqueKeyLoader.add_implicit_resolver(_tag, _regexp, list(_first))
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _QuotingDumper(yaml.SafeDumper):
    """``yaml.safe_dump`` that quotes every string either schema would read as something else (``"1e5"`` for the
    core schema, ``"no"`` for YAML 1.1): the run's ``config.yaml`` reads back the same here and in any YAML tool."""


for _tag, _regexp, _first in _CORE_RESOLVERS:
    _QuotingDumper.add_implicit_resolver(_tag, _regexp, list(_first))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line (its own text spans five, with the source quoted under a caret)."""
    problem = getattr(err, "problem", None) or (str(err).strip().splitlines() or [type(err).__name__])[0]
    context = getattr(err, "context", None)
    mark = getattr(err, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return f"{context}: {problem}{where}" if context else f"{problem}{where}"
