"""Plain JSON values: the one converter for everything Kiln writes as JSON (manifests, method
outputs, client request bodies)."""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars, tuples, sets and paths turned into JSON values,
    recursively; anything else that JSON cannot hold raises TypeError naming its type."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tf tensors' .numpy() results
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def not_a_number(value: Any) -> Any:
    """The first leaf of a JSON array (nested to any depth) that is no number, else None. numpy
    reads true and "1" as numbers; a JSON schema's number does not. A numeric numpy array among
    the items (a decoded picture) counts as numbers."""
    level = [value]
    while level:
        # a level of plain numbers and lists is checked at C speed; only another kind is looked at
        if not set(map(type, level)) <= {int, float, list}:
            bad = next((x for x in level if not isinstance(x, list) and not _number(x)), None)
            if bad is not None:
                return bad
        level = list(chain.from_iterable(x for x in level if isinstance(x, list)))
    return None


def _number(x: Any) -> bool:
    if hasattr(x, "dtype"):  # numpy arrays and scalars
        return x.dtype.kind in "iuf"
    return isinstance(x, (int, float)) and not isinstance(x, bool)
