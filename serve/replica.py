"""One stored model version as a Ray Serve replica: it rebuilds the model through its plugin
(``kiln.models.load``: only weights are read), calls every inference method once with example
inputs to warm up, and only then reports ready. Until then the ingress answers 503.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from kiln.plugin import KilnError, Scalar, Tensor
from kiln.serve import metrics
from kiln.serve.codecs import ProtocolError
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




# what a method raises on arguments it cannot use (a 401-digit integer, 990 nested lists, a lone
# surrogate): the request's fault, a 400, not the model's
BAD_ARGUMENTS = (OverflowError, RecursionError, UnicodeError)


def _bad_arguments(method: str, e: Exception) -> KilnError:
    return KilnError(f"{method}: the arguments cannot be used ({type(e).__name__}: {e})")


def _failure(method: str, e: Exception) -> ProtocolError:
    """One request's failure: its own input's fault (400) or the method's (500, logged)."""
    if isinstance(e, KilnError):
        return ProtocolError(400, str(e))
    if isinstance(e, BAD_ARGUMENTS):
        return ProtocolError(400, str(_bad_arguments(method, e)))
    import logging

    logging.getLogger("ray.serve").exception("kiln: %s failed", method)
    return ProtocolError(500, f"{method} failed inside the model server ({type(e).__name__}: {e})")


class ModelServer:
    """One stored model version behind a Serve deployment.

    Batching: the ingress gathers requests for a method with a single array input (classify,
    reconstruct, ...) that arrive together and sends them in one ``infer_many`` call: one hop
    between the replicas per batch rather than per request. Here they are validated one by one,
    concatenated along the batch axis, run as one model call, and split back per request. A bad
    request fails alone, whatever it raises; the others in its batch succeed.
    """

    def __init__(self, store: str, ref: str, gpu_memory_mb: int = 0) -> None:
        from kiln import devices, models

        t0 = time.perf_counter()
        # before TensorFlow allocates: replicas that share a GPU must not each take all of it
        self.devices = devices.configure(gpus=True, gpu_memory_mb=gpu_memory_mb)
        self.plugin, self.model, self.version = models.load(ref, store)
        self.ref = self.version.ref
        loaded = time.perf_counter()
        # a stored version never changes: its pictures are listed once, not on every GET /models
        self.pictures = {p.name: p for p in self.version.artifacts() if p.suffix == ".png"}
        self.largest_batch = 0
        # methods whose only required input is one array with a leading batch axis
        self.batchable = {}
        for name, m in self.plugin.methods().items():
            arrays = [k for k, v in m.inputs.items() if isinstance(v, Tensor) and v.shape and v.shape[0] is None]
            if len(m.inputs) == 1 and len(arrays) == 1:
                self.batchable[name] = arrays[0]
        # trace every path before taking traffic; what each returns gives the outputs' datatypes
        # and shapes for the protocols' metadata (the batch axis, of size 1 here, as -1)
        self.output_specs: dict[str, dict[str, Any]] = {}
        for method in self.plugin.methods().values():
            args = example_args(method, self.plugin.info)
            if args is not None:
                try:
                    out = self.plugin.infer(self.model, method.name, args)
                    # and a batch of two: Keras' predict function, traced for one example, is
                    # traced again for the first batch of another size, under traffic unless
                    # here; from its second size on it takes any size
                    arg = self.batchable.get(method.name)
                    if arg is not None:
                        self.plugin.infer(self.model, method.name, {arg: np.concatenate([args[arg]] * 2)})
                except KilnError:
                    continue
                self.output_specs[method.name] = {k: _spec(v) for k, v in out.items()}
        self.load_seconds = time.perf_counter() - t0
        self.timings = (loaded - t0, time.perf_counter() - loaded)  # load, warm-up
        metrics.loaded(self)
        self.started = time.time()

    def check_health(self) -> None:
        """Serve's periodic health check: keeps the load and warm-up gauges in the scrapes."""
        metrics.refresh()

    def describe(self) -> dict[str, Any]:
        m = self.version.manifest
        return {"name": self.version.name, "version": self.version.version, "plugin": m["plugin"],
                "dataset": m["dataset"]["name"], "class_names": m["dataset"].get("class_names", []),
                "metrics": m.get("metrics", {}), "headline": m.get("headline"),
                "methods": m.get("methods", {}), "predict": m.get("predict"), "load_seconds": round(self.load_seconds, 3),
                "started": round(self.started, 3), "output_specs": self.output_specs,
                "batchable": sorted(self.batchable), "tensorflow": self.devices,
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

    # The model runs in a worker thread: on the replica's event loop, a long request (scoring a
    # long text) would hold up every other request and Serve's health check, and Serve would
    # kill the replica. TensorFlow releases the GIL while it computes.
    # ``max_values`` (the server's --max-response-mb) is checked before the outputs become lists:
    # for a large answer that conversion and its transfer cost more than the model call.
    async def infer(self, method: str, args: dict[str, Any], max_values: int | None = None) -> dict[str, Any]:
        try:
            out = await self._timed(method, 1, self.plugin.infer, self.model, method, args)
        except BAD_ARGUMENTS as e:
            metrics.model_error(self.ref, method, e)
            raise _bad_arguments(method, e) from None
        except Exception as e:
            metrics.model_error(self.ref, method, e)
            raise
        _check_size(out, max_values)
        return plain(out)

    async def infer_many(self, method: str, items: list[dict[str, Any]],
                         max_values: int | None = None) -> list[dict[str, Any] | ProtocolError]:
        """One batchable method on many requests' arguments, as one model call; each result is
        the method's outputs, or the ProtocolError of a request that failed."""
        arg = self.batchable.get(method)
        if arg is None or any(set(a) != {arg} for a in items):
            return [await self._one(method, a, max_values) for a in items]
        fn = self.plugin.methods()[method]
        schema = fn.inputs[arg]
        results: list[dict[str, Any] | ProtocolError] = [{} for _ in items]
        parts, owners = [], []
        for k, a in enumerate(items):
            try:
                parts.append(schema.validate(arg, a[arg], self.plugin.info))
                owners.append(k)
            except Exception as e:  # noqa: BLE001 - whatever one request holds, it fails alone
                metrics.model_error(self.ref, method, e)
                results[k] = _failure(method, e)
        if parts:
            sizes = [len(x) for x in parts]
            try:
                out = await self._timed(method, len(parts), fn.fn, self.plugin, self.model,
                                        **{arg: np.concatenate(parts)})
            except Exception:  # noqa: BLE001 - find the request at fault: each one alone
                for k in owners:
                    results[k] = await self._one(method, items[k], max_values)
            else:
                total, start = sum(sizes), 0
                for k, n in zip(owners, sizes):
                    mine = {name: v[start:start + n] if _rows(v, total) else v for name, v in out.items()}
                    try:
                        _check_size(mine, max_values)
                        results[k] = {name: plain(v) for name, v in mine.items()}
                    except KilnError as e:
                        results[k] = ProtocolError(400, str(e))
                    start += n
        self.largest_batch = max(self.largest_batch, len(items))
        return results

    async def _one(self, method: str, args: dict[str, Any], max_values: int | None) -> dict[str, Any] | ProtocolError:
        try:
            return await self.infer(method, args, max_values)
        except Exception as e:  # noqa: BLE001 - this request's failure, never its neighbours'
            return _failure(method, e)

    async def _timed(self, method: str, requests: int, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn`` in a worker thread, recording the wait for a thread and the call's time."""
        queued = time.perf_counter()
        began = [queued]

        def call() -> Any:
            began[0] = time.perf_counter()
            return fn(*args, **kwargs)

        out = await asyncio.to_thread(call)
        metrics.model_call(self.ref, method, requests, time.perf_counter() - began[0], began[0] - queued)
        return out


def _check_size(out: dict[str, Any], max_values: int | None) -> None:
    if max_values is None:
        return
    values = sum(np.size(v) for v in out.values() if isinstance(v, (np.ndarray, list)))
    if values > max_values:
        from kiln.serve.codecs import too_large

        raise KilnError(too_large(values, max_values * 4))


def _spec(value: Any) -> dict[str, Any]:
    from kiln.serve.codecs import v2_datatype

    arr = np.asarray(value)
    shape = list(arr.shape)
    return {"datatype": v2_datatype(arr), "shape": [-1, *shape[1:]] if shape[:1] == [1] else shape}


def _rows(value: Any, total: int) -> bool:
    return isinstance(value, (list, np.ndarray)) and len(value) == total


POOL = "model-pool"  # the shared replicas' deployment (kiln serve --shared-replicas)


class LoadError(KilnError):
    """A version in a shared replica did not load: the server's trouble (503), not the request's."""


class ModelPool:
    """Many model versions in one replica: Ray Serve's model multiplexing. The ingress names the
    version per call (``handle.options(multiplexed_model_id=ref)``); the replica loads it on its
    first call (in a thread: the event loop keeps answering), keeps up to ``models_per_replica``
    (0: all) and unloads the least recently used beyond that. Serve routes a version's calls to
    the replicas that hold it. One TensorFlow process then holds every small model, instead of a
    process per version (BENCHMARKS.md, "Many models in one replica")."""

    def __init__(self, store: str, models_per_replica: int = 0, gpu_memory_mb: int = 0) -> None:
        from ray import serve

        async def load(ref: str) -> ModelServer:
            return await asyncio.to_thread(ModelServer, store, ref, gpu_memory_mb)

        # decorated here so that the limit is a setting (Serve detects it on the instance)
        self._load = serve.multiplexed(max_num_models_per_replica=models_per_replica or -1)(load)

    async def _server(self) -> ModelServer:
        from ray import serve

        ref = serve.get_multiplexed_model_id()
        try:
            return await self._load(ref)
        except Exception as e:  # noqa: BLE001 - a version that does not load is no crash of the pool
            raise LoadError(f"{ref} failed to load in the shared replica ({type(e).__name__}: {e})") from None

    def check_health(self) -> None:
        metrics.refresh()  # every version loaded here (ModelServer.check_health)

    async def describe(self) -> dict[str, Any]:
        return (await self._server()).describe()

    async def artifact(self, name: str) -> bytes:
        return (await self._server()).artifact(name)

    async def infer(self, method: str, args: dict[str, Any], max_values: int | None = None) -> dict[str, Any]:
        return await (await self._server()).infer(method, args, max_values)

    async def infer_many(self, method: str, items: list[dict[str, Any]],
                         max_values: int | None = None) -> list[dict[str, Any]]:
        return await (await self._server()).infer_many(method, items, max_values)


INGRESS = "KilnIngress"  # the ingress deployment, which holds the models with ``kiln serve --colocate``


class Colocated:
    """One model version loaded in the ingress's own process (``kiln serve --colocate``), behind a
    deployment handle's interface (``.infer.remote(...)`` and the others are awaitables), so that
    the ingress calls it as it calls a model replica, without the hop between processes
    (docs/design.md, "Where a lone request's time goes"). It loads in a thread, begun at once: the
    ingress keeps answering, and reports the version LOADING until it is ready, FAILED if its load
    raised. A failed load is the version's trouble (503), never the ingress's."""

    deployment_name = INGRESS

    def __init__(self, store: str, ref: str, gpu_memory_mb: int = 0) -> None:
        self.ref = ref
        self.server: ModelServer | None = None
        self.error: str | None = None
        self.loading = asyncio.get_running_loop().create_task(self._load(store, gpu_memory_mb))
        for name in ("describe", "artifact", "infer", "infer_many"):
            setattr(self, name, _Method(self, name))

    async def _load(self, store: str, gpu_memory_mb: int) -> None:
        try:
            self.server = await asyncio.to_thread(ModelServer, store, self.ref, gpu_memory_mb)
        except Exception as e:  # noqa: BLE001 - whatever the load raised, the version alone fails
            import logging

            logging.getLogger("ray.serve").exception("kiln: %s failed to load", self.ref)
            self.error = f"{self.ref} failed to load ({type(e).__name__}: {e})"

    @property
    def state(self) -> str:
        """As Serve reports a deployment: HEALTHY once loaded, UPDATING while loading, UNHEALTHY."""
        return "HEALTHY" if self.server else "UNHEALTHY" if self.error else "UPDATING"

    async def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        await asyncio.shield(self.loading)  # a cancelled request must not cancel the load
        if self.server is None:
            raise LoadError(self.error or f"{self.ref} did not load")
        out = getattr(self.server, name)(*args, **kwargs)
        return await out if asyncio.iscoroutine(out) else out


class _Method:
    def __init__(self, owner: Colocated, name: str) -> None:
        self.owner, self.name = owner, name

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.owner.call(self.name, *args, **kwargs)
