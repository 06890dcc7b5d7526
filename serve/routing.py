"""Which served version answers a request, as pure functions (no Ray, no HTTP): a route's model,
version or label resolved against what the server serves, a traffic split's weighted pick, and
the split as it answers while versions load. The ingress holds the state (what is served, the
labels, each version's health) and asks these; tests/test_routing.py tests them alone.

A served version is named by its ref, ``NAME:VERSION`` (``kiln.store.Ref``): the key of the
ingress's handles, of Serve's user_config and of every JSON answer.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from kiln.serve.codecs import ProtocolError
from kiln.store import Ref

# a traffic split's rows, as serve.app writes them: (entry, version now, weight, version before)
Row = tuple[str, Optional[str], int, Optional[str]]


def served(ref: str) -> Ref:
    """A served ref, ``NAME:VERSION``, as its parts (it was checked when the store resolved it)."""
    name, _, version = ref.partition(":")
    return Ref(name, int(version))


def name_of(ref: str) -> str:
    return served(ref).name


def version_of(ref: str) -> int:
    return served(ref).version  # type: ignore[return-value]


def versions(refs: Iterable[str], model: str) -> list[str]:
    """The served refs of ``model``, oldest version first."""
    return sorted((r for r in refs if name_of(r) == model), key=version_of)


def split_now(rows: list[Row], states: Mapping[str, str]) -> list[tuple[str, Optional[str], int]]:
    """A split as it answers now: (entry, the version answering, weight). An entry whose version
    moved answers with the one before until the new one is healthy; None while neither is."""
    out = []
    for entry, now, weight, before in rows:
        if now and states.get(now) == "HEALTHY":
            out.append((entry, now, weight))
        elif before and states.get(before) == "HEALTHY":
            out.append((entry, before, weight))
        else:
            out.append((entry, None, weight))
    return out


def pick(split: list[tuple[str, Optional[str], int]], turns: dict[str, int]) -> Optional[str]:
    """The next version of a split's traffic: smooth weighted round robin (nginx's), so 90/10 is
    exactly 9 of every 10 requests, interleaved, not a coin's luck. ``turns`` is the split's
    running state, kept by the caller between requests. An entry with no version answering gets
    no share until it has one."""
    live = [(e, ref, w) for e, ref, w in split if ref]
    if not live:
        return None
    for entry, _, weight in live:
        turns[entry] = turns.get(entry, 0) + weight
    entry, ref, _ = max(live, key=lambda e: turns[e[0]])
    turns[entry] -= sum(w for _, _, w in live)
    return ref


def by_label(model: str, version: Optional[str], label: str, labels: Mapping[str, int],
             refs: list[str]) -> str:
    """The version ``model@label`` names, as a route's version string; ProtocolError when the
    label is unknown, contradicts ``version``, or names a version not served."""
    if label not in labels:
        known = ", ".join(f"{k} ({model}:{v})" for k, v in sorted(labels.items())) or "none"
        raise ProtocolError(404, f"model '{model}' has no label '{label}' on this server; labels: "
                                 f"{known}; set one with `kiln models label {model}:VERSION {label}`")
    if version is not None and str(labels[label]) != str(version):
        raise ProtocolError(400, f"label '{label}' names version {labels[label]}, not {version}")
    if f"{model}:{labels[label]}" not in refs:
        raise ProtocolError(404, f"label '{label}' names {model}:{labels[label]}, which this server does "
                                 f"not serve; served versions: "
                                 f"{', '.join(str(version_of(r)) for r in refs) or 'none'}")
    return str(labels[label])


def resolve(model: str, version: Optional[str], refs: list[str], every: Iterable[str],
            failed: Mapping[str, str], states: Mapping[str, str], picked: Optional[str] = None) -> str:
    """The ref that answers ``model`` (version ``version``, a route's string, or None: the
    newest ready one, or ``picked`` by the model's traffic split). ``refs`` are the model's
    refs (``versions``), ``every`` all the server's; ProtocolError 404/503 saying what is served."""
    ref = f"{model}:{version}"
    if ref in failed:
        raise ProtocolError(503, f"{ref} cannot be served: {failed[ref]}")
    if not refs:
        raise ProtocolError(404, f"model '{model}' is not served; served models: "
                                 f"{', '.join(sorted({name_of(r) for r in every}))}")
    if version is None:
        if picked:
            return picked
        # the newest version that is ready: a new one takes over only once it answers
        ready = [r for r in refs if states.get(r) == "HEALTHY"]
        return (ready or refs)[-1]
    if ref not in refs:
        raise ProtocolError(404, f"model '{model}' has no served version {version!r}; served "
                                 f"versions: {', '.join(str(version_of(r)) for r in refs)}")
    return ref
