"""A command's options, declared once: a dataclass whose fields are made with ``option()``. From
that one declaration come the command's flags (``add_flags``), the options from parsed flags
(``from_args``), their checks with a one-line error naming the flag (``check``), and the
options written to and read from a file (``to_dict``/``from_dict``: ``kiln serve
--build-config`` and the Serve config's builder). Adding an option is one field plus its use.
Plugins' hyperparameters are declared the same way with ``kiln.plugin.param``.
"""

from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, field, fields
from typing import Any

from kiln.plugin import KilnError


def option(default: Any, help: str = "", *, low: float | None = None, above: float | None = None,
           high: float | None = None, below: float | None = None, choices: tuple[str, ...] | None = None,
           metavar: str | None = None, flag: str | None = None, process: bool = False,
           const: str | None = None) -> Any:
    """A field of an options dataclass. ``low``/``high`` bound it inclusively, ``above``/``below``
    exclusively; ``flag`` names its flag where the field's name is not it (``--set`` for
    ``overrides``); ``process`` marks an option of the running command alone (how it reaches Ray,
    how long it waits), which a written config does not carry. A ``list[str]`` option is a
    repeatable flag, a ``dict[str, str]`` one a repeatable KEY=VALUE flag, a ``bool`` one a
    switch; ``const`` is the value of a flag given without one (``--register`` alone)."""
    meta = {"help": help, "low": low, "above": above, "high": high, "below": below, "choices": choices,
            "metavar": metavar, "flag": flag, "process": process, "const": const}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag(name: str, f: Any = None) -> str:
    """The flag of field ``name`` (``f``: the field, whose declaration may name another)."""
    named = f.metadata.get("flag") if f is not None else None
    return "--" + (named or name).replace("_", "-")


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _default(f: Any) -> Any:
    return f.default_factory() if f.default is MISSING else f.default


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls``."""
    hints = _types(cls)
    for f in fields(cls):
        meta, kind, default = f.metadata, hints[f.name], _default(f)
        help, name = meta["help"], flag(f.name, f)
        if not (default is None or default is False or default in ([], {})) and "default" not in help:
            help = f"{help} (default: {default})" if help else f"default: {default}"
        if kind is bool:
            parser.add_argument(name, dest=f.name, action="store_true", help=help)
        elif typing.get_origin(kind) in (list, dict):
            parser.add_argument(name, dest=f.name, action="append", default=None, metavar=meta["metavar"],
                                help=help)
        else:
            base = _scalar(kind)
            metavar = meta["metavar"] or ("N" if base in (int, float) else None)
            optional = {"nargs": "?", "const": meta["const"]} if meta["const"] is not None else {}
            parser.add_argument(name, dest=f.name, type=base, default=default, metavar=metavar,
                                choices=meta["choices"], help=help, **optional)


def _scalar(kind: Any) -> type:
    """``int``, ``float`` or ``str`` (also for ``str | None``)."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def from_args(cls: type, args: argparse.Namespace) -> Any:
    """``cls`` from the flags ``add_flags`` made, checked."""
    values = {f.name: getattr(args, f.name) for f in fields(cls)}
    hints = _types(cls)
    for f in fields(cls):
        origin = typing.get_origin(hints[f.name])
        if origin is list:
            values[f.name] = values[f.name] or []
        elif origin is dict:
            values[f.name] = pairs(values[f.name] or [], flag(f.name, f))
    return check(cls(**values))


def pairs(items: list[str], name: str) -> dict[str, str]:
    """Repeated ``name KEY=VALUE`` flags as a mapping; KilnError naming the one without ``=``."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise KilnError(f"{name} takes KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def check(opts: Any) -> Any:
    """``opts`` if every field is within its bounds; else KilnError naming the flag."""
    for f in fields(opts):
        value, meta, name = getattr(opts, f.name), f.metadata, flag(f.name, f)
        if meta["choices"] and value is not None and value not in meta["choices"]:
            raise KilnError(f"{name} takes {' or '.join(meta['choices'])}, got {value!r}")
        if value is None or isinstance(value, (str, list, dict, bool)):
            continue
        if meta["above"] is not None and not value > meta["above"]:
            raise KilnError(f"{name} must be greater than {meta['above']:g}, got {value:g}")
        if meta["low"] is not None and value < meta["low"]:
            raise KilnError(f"{name} must be at least {meta['low']:g}, got {value:g}")
        if meta["below"] is not None and not value < meta["below"]:
            raise KilnError(f"{name} must be below {meta['below']:g}, got {value:g}")
        if meta["high"] is not None and value > meta["high"]:
            raise KilnError(f"{name} must be at most {meta['high']:g}, got {value:g}")
    return opts


def to_dict(opts: Any) -> dict[str, Any]:
    """Every option a written config carries (not the ``process`` ones), in declaration order."""
    return {f.name: (type(v)(v) if isinstance(v := getattr(opts, f.name), (list, dict)) else v)
            for f in fields(opts) if not f.metadata["process"]}


def from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls`` from a config file's mapping (``to_dict``'s keys; missing ones keep their default),
    checked; KilnError naming ``where`` and the key for an unknown key or a value of the wrong type."""
    if not isinstance(values, dict):
        raise KilnError(f"{where} must be a mapping of options, got {values!r}")
    every = _types(cls)
    hints = {f.name: every[f.name] for f in fields(cls) if not f.metadata["process"]}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise KilnError(f"{where} has no option {', '.join(map(repr, unknown))}; it takes {', '.join(hints)}")
    out = {}
    for name, value in values.items():
        kind = hints[name]
        if typing.get_origin(kind) is list:
            ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        elif typing.get_origin(kind) is dict:
            ok = isinstance(value, dict)
        elif kind is bool:
            ok = isinstance(value, bool)
        elif value is None:
            ok = type(None) in typing.get_args(kind)
        else:
            base = _scalar(kind)
            ok = isinstance(value, base) and not isinstance(value, bool) or \
                (base is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            raise KilnError(f"{where}.{name} must be {_name(kind)}, got {value!r}")
        out[name] = float(value) if kind is float else value
    return check(cls(**out))


def _name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return "a list of strings"
    if typing.get_origin(kind) is dict:
        return "a mapping"
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}.get(
        _scalar(kind), str(kind))
