"""Finds plugins: entry points in the group ``kiln.plugins`` (built-in and third-party alike) and,
for development, plugin files named with ``--plugin-path``.

Plugins load lazily by name; a plugin that fails to import is reported as broken, never fatal.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
import traceback
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path

from kiln.plugin import KilnError, Plugin

GROUP = "kiln.plugins"


@dataclass
class Entry:
    """One registered plugin: where it comes from, and the class or the error loading it."""

    name: str
    source: str  # "module:Class (distribution)" or a file path
    cls: type[Plugin] | None = None
    error: str | None = None


_files: dict[str, Entry] = {}  # plugins loaded from --plugin-path files, by name


def load_file(path: str | Path) -> list[str]:
    """Register every Plugin subclass defined in a Python file; returns their names."""
    path = Path(path).resolve()
    if not path.is_file():
        raise KilnError(f"plugin file not found: {path}")
    modname = "kiln_local_" + path.stem
    spec = importlib.util.spec_from_file_location(modname, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken file is the user's to fix: say where
        raise KilnError(f"plugin file {path} failed to import: {type(e).__name__}: {e}") from None
    names = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Plugin) and obj.__module__ == modname and obj.name:
            other = _eps()[0].get(obj.name)
            if other is not None:
                raise KilnError(f"plugin name '{obj.name}' is claimed twice: by {path} and by entry "
                                f"point {_ep_source(other)}; rename one of them")
            _files[obj.name] = Entry(obj.name, str(path), cls=obj)
            names.append(obj.name)
    if not names:
        raise KilnError(f"{path} defines no Plugin subclass with a name")
    return names


def _ep_source(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value} ({dist.name if dist else 'unknown distribution'})"


def _eps() -> tuple[dict[str, EntryPoint], dict[str, str]]:
    """Entry points by name, and the names claimed by two different entry points (with why)."""
    found: dict[str, EntryPoint] = {}
    clashes: dict[str, str] = {}
    for ep in entry_points(group=GROUP):
        prev = found.get(ep.name)
        if prev is not None and prev.value != ep.value:
            clashes[ep.name] = (f"plugin name '{ep.name}' is claimed twice: by {_ep_source(prev)} and "
                                f"by {_ep_source(ep)}; uninstall or rename one of them")
        found.setdefault(ep.name, ep)
    return found, clashes


def _load_ep(ep: EntryPoint) -> Entry:
    entry = Entry(ep.name, _ep_source(ep))
    try:
        cls = ep.load()
        if not (inspect.isclass(cls) and issubclass(cls, Plugin)):
            raise TypeError(f"{ep.value} is not a kiln.Plugin subclass")
        if cls.name != ep.name:
            raise TypeError(f"entry point '{ep.name}' points at a plugin named '{cls.name}'; "
                            "name the entry point, the file and the plugin the same")
        entry.cls = cls
    except Exception as e:
        entry.error = f"{type(e).__name__}: {e}"
        entry.error_trace = traceback.format_exc()  # type: ignore[attr-defined]
    return entry


def entries() -> list[Entry]:
    """Every registered plugin, loaded (broken ones carry their error), sorted by name."""
    eps, clashes = _eps()
    out = {name: _load_ep(ep) for name, ep in eps.items()}
    for name, why in clashes.items():
        out[name] = Entry(name, "several distributions", error=why)
    out.update(_files)
    return [out[k] for k in sorted(out)]


def has(name: str) -> bool:
    """Whether a plugin is registered under ``name`` (without importing any plugin)."""
    return name in _files or name in _eps()[0]


def get(name: str) -> type[Plugin]:
    """The plugin class registered under ``name``; KilnError if unknown or broken."""
    if name in _files:
        return _files[name].cls  # type: ignore[return-value]
    eps, clashes = _eps()
    if name in clashes:
        raise KilnError(clashes[name])
    if name not in eps:
        known = ", ".join(sorted([*eps, *_files])) or "(none)"
        raise KilnError(f"unknown plugin '{name}'; registered plugins: {known} "
                        "(see `kiln plugins`, or load a file with --plugin-path)")
    entry = _load_ep(eps[name])
    if entry.cls is None:
        raise KilnError(f"plugin '{name}' is broken: {entry.error} (from {entry.source})")
    return entry.cls
