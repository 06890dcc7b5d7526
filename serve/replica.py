"""One stored model version as a Ray Serve replica: it rebuilds the model through its plugin
(``kiln.models.load``: only weights are read), calls every inference method once with example
inputs to warm up, and only then reports ready. Until then the ingress answers 503.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from kiln.plugin import KilnError, Scalar, Tensor
from kiln.values import plain


def example_args(method: Any, info: Any) -> dict[str, Any] | None:
    """Small valid arguments for a warm-up call, or None when they cannot be made up."""
    args: dict[str, Any] = {}
    for name, schema in method.inputs.items():
        if isinstance(schema, Tensor):
            if schema.optional:
                continue
            shape = [1 if s is None else s for s in schema.resolve(info)]
            low = schema.min if schema.min is not None else 0.0
            args[name] = np.full(shape, low, dtype=schema.dtype)
        elif isinstance(schema, Scalar) and schema.default is None:
            if schema.type is str and info.class_names:
                args[name] = info.class_names[0]
            elif schema.type is int and schema.min is not None:
                args[name] = int(schema.min)
            else:
                return None
    return args


def _split_error(message: str) -> dict[str, Any]:
    return {"__kiln_error__": message}


class ModelServer:
    """One stored model version behind a Serve deployment.

    Batching: the ingress gathers requests for a method with a single array input (classify,
    reconstruct, ...) that arrive together and sends them in one ``infer_many`` call: one hop
    between the replicas per batch rather than per request. Here they are validated one by one,
    concatenated along the batch axis, run as one model call, and split back per request. A bad
    request fails alone; the others in its batch succeed.
    """

    def __init__(self, store: str, ref: str) -> None:
        from kiln import models

        t0 = time.perf_counter()
        self.plugin, self.model, self.version = models.load(ref, store)
        self.ref = self.version.ref
        # a stored version never changes: its pictures are listed once, not on every GET /models
        self.pictures = {p.name: p for p in self.version.artifacts() if p.suffix == ".png"}
        self.largest_batch = 0
        # methods whose only required input is one array with a leading batch axis
        self.batchable = {}
        for name, m in self.plugin.methods().items():
            arrays = [k for k, v in m.inputs.items() if isinstance(v, Tensor) and v.shape and v.shape[0] is None]
            if len(m.inputs) == 1 and len(arrays) == 1:
                self.batchable[name] = arrays[0]
        for method in self.plugin.methods().values():  # trace every path before taking traffic
            args = example_args(method, self.plugin.info)
            if args is not None:
                try:
                    self.plugin.infer(self.model, method.name, args)
                except KilnError:
                    pass
        self.load_seconds = time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        m = self.version.manifest
        return {"name": self.version.name, "version": self.version.version, "plugin": m["plugin"],
                "dataset": m["dataset"]["name"], "class_names": m["dataset"].get("class_names", []),
                "metrics": m.get("metrics", {}), "headline": m.get("headline"),
                "methods": m.get("methods", {}), "load_seconds": round(self.load_seconds, 3),
                "batchable": sorted(self.batchable),
                "largest_batch": self.largest_batch,
                "history": [{k: v for k, v in h.items() if isinstance(v, (int, float))}
                            for h in m.get("history", [])],
                "artifacts": sorted(self.pictures)}

    def artifact(self, name: str) -> bytes:
        """A stored picture of this version (one of describe()'s ``artifacts``)."""
        if name not in self.pictures:
            raise KilnError(f"{self.ref} has no picture '{name}'; pictures: "
                            f"{', '.join(sorted(self.pictures)) or 'none'}")
        return self.pictures[name].read_bytes()

    # async: Serve runs these on the replica's event loop, not through a thread pool
    async def infer(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        return plain(self.plugin.infer(self.model, method, args))

    async def infer_many(self, method: str, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One batchable method on many requests' arguments, as one model call; each result is
        the method's outputs or ``{"__kiln_error__": message}`` for a request that was bad."""
        arg = self.batchable.get(method)
        if arg is None or any(set(a) != {arg} for a in items):
            return [await self._one(method, a) for a in items]
        fn = self.plugin.methods()[method]
        schema = fn.inputs[arg]
        results: list[dict[str, Any]] = [{} for _ in items]
        parts, owners = [], []
        for k, a in enumerate(items):
            try:
                parts.append(schema.validate(arg, a[arg], self.plugin.info))
                owners.append(k)
            except KilnError as e:
                results[k] = _split_error(str(e))
        if parts:
            sizes = [len(x) for x in parts]
            try:
                out = fn.fn(self.plugin, self.model, **{arg: np.concatenate(parts)})
            except KilnError as e:
                for k in owners:
                    results[k] = _split_error(str(e))
            else:
                total, start = sum(sizes), 0
                for k, n in zip(owners, sizes):
                    results[k] = {name: plain(v[start:start + n]) if _rows(v, total) else plain(v)
                                  for name, v in out.items()}
                    start += n
        self.largest_batch = max(self.largest_batch, len(items))
        return results

    async def _one(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self.infer(method, args)
        except KilnError as e:
            return _split_error(str(e))


def _rows(value: Any, total: int) -> bool:
    return isinstance(value, (list, np.ndarray)) and len(value) == total
