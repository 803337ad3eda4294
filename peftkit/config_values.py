"""Typed config values: a field's type hint is its check. `build_dataclass` builds a config dataclass from a mapping
(a recipe section, an adapter's recorded options, a bench profile), refusing unknown keys, wrong types, values out of
a `Range` and values outside a `Literal`, each in one line naming the field. (The dataclasses are in config.py.)
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from peftkit.errors import PeftkitError, unknown_choice


@dataclass(frozen=True)
class Range:
    """A numeric bound declared beside a field: `Annotated[int, Range(ge=1)]`. Checked when a config is read."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, value: float, where: str) -> None:
        for bound, ok, word in (
            (self.ge, lambda b: value >= b, "at least"),
            (self.gt, lambda b: value > b, "above"),
            (self.le, lambda b: value <= b, "at most"),
            (self.lt, lambda b: value < b, "below"),
        ):
            if bound is not None and not ok(bound):
                shown = f"{bound:,}" if isinstance(bound, int) else f"{bound:g}"
                raise PeftkitError(f"{where} must be {word} {shown}, got {value!r}")


Positive = Annotated[int, Range(ge=1)]
NonNegative = Annotated[float, Range(ge=0)]
Probability = Annotated[float, Range(ge=0, lt=1)]


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """Instantiate dataclass `cls` from `data`, rejecting unknown keys and values of the wrong type, out of
    range (`Annotated[..., Range(...)]`) or not among the allowed choices (`Literal[...]`)."""
    if not isinstance(data, dict):
        raise PeftkitError(f"config section {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        if key not in hints and not names:  # e.g. method full: naming 'Valid: ' and nothing after would not help
            raise PeftkitError(f"{where} has no keys to set, got {key!r}")
        if key not in hints:
            raise unknown_choice(f"key in {where}", str(key), names)
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    built = cls(**values)
    for name in names:  # a default written as 16 for a float field is 16.0, as it is once read back from YAML
        value = getattr(built, name)
        if name not in values and type(value) is int and _base_type(hints[name]) is float:
            setattr(built, name, float(value))
    return built


def _base_type(hint: Any) -> Any:
    """float for float, Annotated[float, ...] and float | None; the hint itself otherwise."""
    while typing.get_origin(hint) in (Annotated, typing.Union, types.UnionType):
        hint = [a for a in typing.get_args(hint) if a is not type(None)][0]
    return hint


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) one value against a type hint: int/float/bool/str, list[...], Optional,
    Literal (choices) and Annotated (ranges). Floats must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        value = _coerce(value, args[0], where)
        for extra in args[1:]:
            if isinstance(extra, Range) and value is not None:
                extra.check(value, where)
        return value
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise unknown_choice(where, str(value), [str(a) for a in args])
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        try:
            return _coerce(value, inner[0], where)
        except PeftkitError as e:
            if type(None) in args and " must be at least " in str(e):
                raise PeftkitError(f"{e} (use null to turn it off)") from None
            raise
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise PeftkitError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise PeftkitError(f"{where} must be a mapping, got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise PeftkitError(f"{where} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 2**63:  # no count, size or seed is this big; torch cannot hold it either
                raise PeftkitError(f"{where} is too large, got {value!r}")
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise PeftkitError(f"{where} must be an integer, got {value!r}")
    if hint is float:
        number = value
        if isinstance(value, str):  # YAML reads '5e-4' (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise PeftkitError(f"{where} must be a finite number, got {value!r}")
            return float(number)
        raise PeftkitError(f"{where} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, os.PathLike):  # a pathlib.Path given in code, where files and folders are named
            return os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise PeftkitError(f"{where} must be a string, got {value!r}")
    return value
