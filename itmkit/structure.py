"""Structure plain TOML values into attrs classes, collecting every problem with its key path."""

from __future__ import annotations

import math
import types
import typing
from typing import Any

import attrs

from itmkit.errors import did_you_mean
from itmkit.stage import ParamInfo, stage_params


@attrs.frozen
class Problem:
    """One thing wrong with a recipe: where (dotted key path) and what."""

    path: str
    message: str

    def render(self) -> str:
        return f"{self.message} @ {self.path}" if self.path else self.message


# An int parameter that declares no bound of its own is kept within +-MAX_INT. Every size and count a
# recipe sets (dims, layers, steps, batch sizes, epochs) is far below it, and a typo of a few extra
# digits is refused before a model asks for terabytes or a seed overflows torch and numpy. A field
# with a wider natural range says so with its own ``le=`` (train.seed: numpy's 2**32 - 1).
MAX_INT = 2**14


class _Mismatch(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` (int -> float allowed) or raise _Mismatch."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        for member in typing.get_args(tp):
            try:
                return coerce(value, member)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        (item,) = [a for a in typing.get_args(tp) if a is not Ellipsis][:1] or [Any]
        items = [coerce(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)  # OverflowError past 1e308: check_param reports it
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def show_number(value: int | float) -> str:
    """A number as a message shows it; an integer of many digits by its size, not 4,000 digits."""
    if isinstance(value, int) and abs(value) >= 10**24:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    return repr(value)


def describe_value(value: Any) -> str:
    kind = type(value).__name__
    return f"{kind} {value!r}" if not isinstance(value, dict) else "a table"


def check_param(info: ParamInfo, value: Any, path: str) -> tuple[Any, list[Problem]]:
    """Type- and range-check one parameter value; returns the coerced value and problems."""
    if info.choices is not None and isinstance(value, str) and value not in info.choices:
        return value, [Problem(path, f"expected one of {', '.join(map(repr, info.choices))}, got {value!r}"
                               + did_you_mean(value, map(str, info.choices)))]
    try:
        value = coerce(value, info.type)
    except _Mismatch:
        expected = info.type_name()
        return value, [Problem(path, f"expected {expected}, got {describe_value(value)}")]
    except OverflowError:  # an integer no float can hold, where a float is expected
        return value, [Problem(path, f"expected a finite number, got {show_number(value)}")]
    bad = _bad_value(value, info)
    if bad:
        return value, [Problem(path, bad)]
    problems = []
    if info.choices is not None and value not in info.choices:
        problems.append(
            Problem(path, f"expected one of {', '.join(map(repr, info.choices))}, got {value!r}"
                    + did_you_mean(str(value), map(str, info.choices)))
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for ok, text in (
            (info.ge is None or value >= info.ge, f">= {info.ge}"),
            (info.gt is None or value > info.gt, f"> {info.gt}"),
            (info.le is None or value <= info.le, f"<= {info.le}"),
        ):
            if not ok:
                problems.append(Problem(path, f"out of range: expected a value {text}, got {show_number(value)}"))
    return value, problems


def _bad_value(value: Any, info: ParamInfo) -> str | None:
    """What makes a well-typed value unusable anyway: NaN or infinity, an int past MAX_INT, unprintable text."""
    if isinstance(value, (list, tuple)):
        return next((bad for bad in (_bad_value(v, info) for v in value) if bad), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"expected a finite number, got {value!r}"
    if isinstance(value, int) and not isinstance(value, bool):
        if info.le is None and value > MAX_INT:
            return f"out of range: expected a value <= {MAX_INT} (the bound of int parameters), got {show_number(value)}"
        if info.ge is None and info.gt is None and value < -MAX_INT:
            return f"out of range: expected a value >= {-MAX_INT} (the bound of int parameters), got {show_number(value)}"
    if isinstance(value, str):
        if "\x00" in value:
            return f"expected text without NUL characters, got {value!r}"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: bytes that were not UTF-8 on the command line
            return f"expected UTF-8 text, got {value!r}"
    return None


def structure(cls: type, table: Any, path: str, what: str, skip: tuple[str, ...] = ()) -> tuple[Any, list[Problem]]:
    """Build an instance of attrs class ``cls`` from ``table``; ``what`` names it in messages."""
    if not isinstance(table, dict):
        return None, [Problem(path, f"expected a table for {what}, got {describe_value(table)}")]
    params = {p.name: p for p in stage_params(cls)}
    problems: list[Problem] = []
    for key in table:
        if key not in params and key not in skip:
            problems.append(
                Problem(_join(path, key), f"unknown parameter {key!r} of {what}" + did_you_mean(key, params))
            )
    kwargs = {}
    for name, info in params.items():
        key_path = _join(path, name)
        if name not in table:
            if info.required:
                problems.append(Problem(key_path, f"missing required parameter {name!r} ({info.type_name()}) of {what}"))
            continue
        value, found = check_param(info, table[name], key_path)
        problems.extend(found)
        kwargs[name] = value
    if problems:
        return None, problems
    try:
        return cls(**kwargs), []
    except (TypeError, ValueError) as exc:
        return None, [Problem(path, f"invalid {what}: {exc}")]


def unstructure(instance: Any) -> dict[str, Any]:
    """The instance's parameters as a plain dict (None values dropped: TOML has no null)."""
    out = {}
    for f in attrs.fields(type(instance)):
        value = getattr(instance, f.name)
        if value is None:
            continue
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
