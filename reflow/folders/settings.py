"""Settings read from TOML, checked against the types they must have before any work starts.

TOML gives strings, integers, floats, booleans, arrays and tables; the annotation of the dataclass field a
value fills (``TrainConfig``, ``EvalSettings``) says which one it needs. :func:`check_values` checks every
value of a table at once and raises one :class:`ReflowError` line naming the file, the table and each bad
key, e.g. ``run.toml: [train] max_steps must be an integer, got 'abc'``.

Rules: ``bool`` is not an integer (TOML ``true`` is no step count); an integer is accepted where a float is
wanted and converted; ``X | None`` takes what X takes (TOML has no null; Python callers may pass None);
``list[int]`` takes an array of integers; ``dict[...]`` takes a table; ``Literal[...]`` one of its values;
``Any`` (or an annotation not listed here) takes anything.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from reflow.errors import ReflowError

_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "none"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}


class _Mismatch(Exception):
    pass


def describe(tp: Any) -> str:
    """What a value of annotation ``tp`` must be, in words: ``int | None`` -> "an integer"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None)) or "none"
    if origin is Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if origin in (list, tuple):
        return f"a list of {_PLURALS.get(args[0], 'values')}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    return _NAMES.get(tp, "a value")


def show(value: Any) -> str:
    """A value as the user wrote it, short: strings quoted, booleans as TOML spells them."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def coerce(value: Any, tp: Any) -> Any:
    """``value`` if it fits annotation ``tp`` (an int converted where a float is wanted); raises _Mismatch."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg)
            except _Mismatch:
                pass
        raise _Mismatch
    if origin is Literal:
        if any(type(value) is type(a) and value == a for a in args):
            return value
        raise _Mismatch
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        item = args[0] if args else Any
        return [coerce(v, item) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return value
    if tp is type(None):
        if value is None:
            return value
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    return value  # an annotation these rules do not cover: anything goes


def check_types(
    values: Mapping[str, Any], annotations: Mapping[str, Any], where: str, table: str = ""
) -> dict[str, Any]:
    """Check each of ``values`` whose key has an annotation; returns the values (ints made floats where a
    float is wanted). Keys without an annotation pass unchanged: unknown names are the caller's to refuse.

    Raises one ReflowError line for all bad values: ``{where}: [{table}] {key} must be ..., got ...``.
    """
    out, bad = {}, []
    for key, value in values.items():
        if key not in annotations:
            out[key] = value
            continue
        try:
            out[key] = coerce(value, annotations[key])
        except _Mismatch:
            bad.append(f"{key} must be {describe(annotations[key])}, got {show(value)}")
    if bad:
        raise ReflowError(f"{where}: {f'[{table}] ' if table else ''}{'; '.join(bad)}")
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The annotation of every field of dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_values(cls: type, values: Mapping[str, Any], where: str, table: str = "") -> dict[str, Any]:
    """Check ``values`` against the field annotations of dataclass ``cls`` (see :func:`check_types`)."""
    return check_types(values, field_types(cls), where, table)
