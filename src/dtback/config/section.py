"""The rules every section of the config tree shares (:class:`_Section`), and the limits several sections use."""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

# Pixels per latent patch of FLUX: VAE downsamples by 8, the transformer packs 2x2 latents.
FLUX_PIXEL_MULTIPLE = 16
# Seeds feed torch, numpy and random; every one of them takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1


class _Section(BaseModel):
    """Rules for every key of the tree: no unknown keys, no infinite or NaN floats, and numbers given as numbers
    (a YAML ``true`` is not 1, ``4.0`` or ``"4"`` is not an int; a float key also takes a quoted number, ``"1e-4"``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _numbers_are_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        problem = _number_problem(cls.model_fields[info.field_name].annotation, value)
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("*", mode="after")
    @classmethod
    def _home_in_paths(cls, value: Any) -> Any:
        # `data_dir: ~/photos` means the home folder, as in a shell; left alone it would name a folder "~" here.
        return value.expanduser() if isinstance(value, Path) else value


def _number_kinds(annotation: Any) -> set[type]:
    """The scalar types an annotation allows (``int | None`` -> {int, NoneType}); containers are not unpacked."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_number_kinds(arg) for arg in get_args(annotation)))
    return {annotation}


def _number_problem(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is not a number of ``annotation``'s kind (None when it is, or when it is no number key)."""
    origin = get_origin(annotation)
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = [arg for arg in get_args(annotation) if arg is not Ellipsis]
        for i, item in enumerate(value):
            problem = _number_problem(args[min(i, len(args) - 1)], item) if args else None
            if problem:
                return f"item {i}: {problem}"
        return None
    if origin in (Union, types.UnionType):
        for arg in get_args(annotation):
            if get_origin(arg) in (list, tuple) and isinstance(value, (list, tuple)):
                return _number_problem(arg, value)
    kinds = _number_kinds(annotation)
    if isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
        return f"Input should be a number, not the boolean {str(value).lower()}"
    if int in kinds and not kinds & {float, str, bool} and value is not None and not isinstance(value, int):
        return "Input should be a valid integer (a whole number, written without quotes or a decimal point)"
    return None
