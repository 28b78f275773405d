"""Settings read from TOML, checked against the types they must have before any work starts.

TOML gives strings, integers, floats, booleans, arrays and tables; the annotation of the dataclass field a
value fills (``TrainConfig``, ``EvalSettings``) says which one it needs. :func:`check_values` checks every
value of a table at once and raises one :class:`ReflowError` line naming the file, the table and each bad
key, e.g. ``run.toml: [train] max_steps must be an integer, got 'abc'``.

Rules: ``bool`` is not an integer (TOML ``true`` is no step count); an integer is accepted where a float is
wanted and converted; ``X | None`` takes what X takes (TOML has no null; Python callers may pass None);
``list[int]`` takes an array of integers; ``dict[...]`` takes a table; ``Literal[...]`` one of its values (a
value not even of the choices' type is told the type: "must be a string"); ``Any`` (or an annotation not
listed here) takes anything. :func:`plain` turns choices into their type for callers that check the choice
themselves, with their own message.
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
# The Python types a TOML value may have where each scalar annotation is wanted.
_ACCEPTS: dict[Any, tuple[type, ...]] = {
    type(None): (type(None),),
    bool: (bool,),
    int: (int,),
    float: (int, float),
    str: (str,),
}


_UNSEEN = object()


class _Mismatch(Exception):
    pass


def describe(tp: Any, value: Any = _UNSEEN) -> str:
    """What a value of annotation ``tp`` must be, in words: ``int | None`` -> "an integer". Given the ``value``
    that did not fit, a ``Literal`` of one type names that type when the value is not even of it."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a, value) for a in args if a is not type(None)) or "none"
    if origin is Literal:
        kinds = {type(a) for a in args}
        if value is not _UNSEEN and len(kinds) == 1 and type(value) not in kinds:
            return describe(kinds.pop())  # ["none"] where a string is wanted: "a string", not the choices
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
        return _union(value, args)
    if origin is Literal:
        return _literal(value, args)
    if origin in (list, tuple) or tp in (list, tuple):
        return _list(value, args[0] if args else Any)
    if origin is dict or tp is dict:
        return _table(value)
    if tp in _ACCEPTS:
        return _scalar(value, tp)
    return value  # an annotation these rules do not cover: anything goes


def _union(value: Any, options: tuple[Any, ...]) -> Any:
    """The first of ``options`` that ``value`` fits."""
    for option in options:
        try:
            return coerce(value, option)
        except _Mismatch:
            pass
    raise _Mismatch


def _literal(value: Any, choices: tuple[Any, ...]) -> Any:
    """One of ``choices``, of the same type (``1`` is not ``True``)."""
    if any(type(value) is type(choice) and value == choice for choice in choices):
        return value
    raise _Mismatch


def _list(value: Any, item: Any) -> list[Any]:
    """An array, each element fitting ``item``."""
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    return [coerce(v, item) for v in value]


def _table(value: Any) -> Any:
    if not isinstance(value, dict):
        raise _Mismatch
    return value


def _scalar(value: Any, tp: type) -> Any:
    """A TOML scalar of type ``tp`` (a bool is never a number; an int is a float, converted)."""
    if not isinstance(value, _ACCEPTS[tp]) or (isinstance(value, bool) and tp is not bool):
        raise _Mismatch
    return float(value) if tp is float else value


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
            bad.append(f"{key} must be {describe(annotations[key], value)}, got {show(value)}")
    if bad:
        raise ReflowError(f"{where}: {f'[{table}] ' if table else ''}{'; '.join(bad)}")
    return out


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """The annotation of every field of dataclass ``cls`` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def plain(tp: Any, *, optional: bool = True) -> Any:
    """``tp`` with each ``Literal`` made the type of its choices, for a caller that checks the choice itself and
    names it in its own words; with ``optional=False``, ``X | None`` made X (TOML has no null)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        kinds = {type(a) for a in args}
        return kinds.pop() if len(kinds) == 1 else tp
    if origin in (Union, types.UnionType):
        kept = tuple(plain(a, optional=optional) for a in args if optional or a is not type(None))
        return Union[kept]  # noqa: UP007 (a union built from a tuple of annotations at run time)
    return tp


def check_values(
    cls: type, values: Mapping[str, Any], where: str, table: str = "", *, choices: bool = True
) -> dict[str, Any]:
    """Check ``values`` against the field annotations of dataclass ``cls`` (see :func:`check_types`). With
    ``choices=False`` a ``Literal`` field takes any value of its type: its owner's checks name the choices."""
    annotations = field_types(cls)
    if not choices:
        annotations = {name: plain(tp) for name, tp in annotations.items()}
    return check_types(values, annotations, where, table)
