"""The checks every config field goes through: one error type and strict scalar parsers.

``SpecError.field`` is the dotted path of the culprit (``"steer[0].scale"``), so the
server can answer 400 naming it. JSON does not tell 1 from 1.0, so an integral float is
an int; NaN/inf are refused wherever a number is expected.
"""

from __future__ import annotations

import math
from typing import Any

MAX_ABS_SCALE = 1e4
MAX_GAIN = 100.0  # gamma (neurons) and beta (boost) lie in (0, MAX_GAIN]


class SpecError(ValueError):
    """A malformed or unservable request config; ``field`` is its dotted path."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


def obj(value: Any, field: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    if not isinstance(value, dict):
        raise SpecError(field or "spec", f"must be an object, got {type_name(value)}")
    for key in value:
        if key not in allowed:
            where = f"{field}.{key}" if field else str(key)
            raise SpecError(where, f"unknown key {key!r}; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise SpecError(f"{field}.{key}" if field else key, "is required")
    return value


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def integer(value: Any, field: str) -> int:
    # JSON (and its schema) does not tell 1 from 1.0, so an integral float is an int
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(field, f"must be an integer, got {type_name(value)} {value!r}")
    if value < 0:
        raise SpecError(field, f"must be >= 0, got {value}")
    return value


def number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(field, f"must be a number, got {type_name(value)} {value!r}")
    value = float(value) + 0.0  # -0.0 -> 0.0, so equal configs print alike
    if not math.isfinite(value):
        raise SpecError(field, f"must be finite, got {value}")
    return value


def scale(value: Any, field: str) -> float:
    value = number(value, field)
    if abs(value) > MAX_ABS_SCALE:
        raise SpecError(field, f"|scale| must be <= {MAX_ABS_SCALE:g}, got {value:g}")
    return value


def gain(value: Any, field: str) -> float:
    value = number(value, field)
    if not 0.0 < value <= MAX_GAIN:
        raise SpecError(field, f"must be in (0, {MAX_GAIN:g}], got {value:g}")
    return value


def name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise SpecError(field, f"must be a non-empty vector name, got {value!r}")
    return value


def choice(value: Any, field: str, choices: tuple[str, ...]) -> str:
    if value not in choices or not isinstance(value, str):
        raise SpecError(field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def layers(value: Any, field: str, allow_all: bool = True) -> tuple[int, ...] | None:
    """int | [int, ...] | "all" -> sorted tuple, or None for "all"."""
    if value == "all" and allow_all:
        return None
    if isinstance(value, list):
        if not value:
            raise SpecError(field, "must not be an empty list")
        out = [integer(v, f"{field}[{i}]") for i, v in enumerate(value)]
        if len(set(out)) != len(out):
            raise SpecError(field, f"lists a layer twice: {value}")
        return tuple(sorted(out))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (integer(value, field),)
    raise SpecError(field, f'must be an integer, a list of integers or "all", got {value!r}')

