"""The Ray Serve application: one FastAPI ingress and one deployment per served model version.

Why one deployment per model and not multiplexing: Kiln's models differ in everything Serve
schedules by (a CNN answers in a millisecond, an LSTM generates for a second, a GAN wants a GPU),
so each gets its own replicas, resources, ``max_ongoing_requests`` and autoscaling, and a slow
model never queues behind a fast one. Idle cost stays low because a replica is a small fraction of
a CPU by default and ``autoscaling_config`` may scale a model to zero replicas. Multiplexing fits
many models of one kind; that is not what a store of lecture models holds.

A model replica loads weights from the store by path (``kiln.models.load``: the registry rebuilds the
architecture, only weights are read), calls every inference method once with example inputs to
warm up, and only then reports ready. Until then the ingress answers 503.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from kiln import settings
from kiln.logs import SETUP_HOOK
from kiln.serve.runtime import init_ray
from kiln.plugin import KilnError, Scalar, Tensor

INGRESS = "KilnIngress"


@dataclass
class ModelOptions:
    """How one model version is served (CLI flags or the Serve config file set these)."""

    num_cpus: float = 0.25
    num_gpus: float = 0.0
    num_replicas: int = 1
    max_ongoing_requests: int = 16
    autoscaling_config: dict[str, Any] | None = None
    batch_size: int = 32          # requests merged into one model call (0 or 1: no batching)
    batch_wait_ms: float = 2.0    # how long a batch waits to fill

    def deployment_options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
                               "max_ongoing_requests": self.max_ongoing_requests}
        if self.autoscaling_config:
            out["autoscaling_config"] = self.autoscaling_config
        else:
            out["num_replicas"] = self.num_replicas
        return out


@dataclass
class ServeSpec:
    """What to serve: a store, the model versions in it, limits and the HTTP address."""

    store: str
    refs: list[str]                       # resolved "name:version"
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 16 * 1024 * 1024
    options: dict[str, ModelOptions] = field(default_factory=dict)
    token: str | None = None              # with a token, every route but health needs it
    access_log: bool = False              # Serve's log line per request (costs time per request)


def deployment_name(ref: str) -> str:
    return "model-" + ref.replace(":", "-v")


def jsonable(value: Any) -> Any:
    """Method outputs as plain JSON values (arrays become nested lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


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
        return jsonable(self.plugin.infer(self.model, method, args))

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
                    results[k] = {name: jsonable(v[start:start + n]) if _rows(v, total) else jsonable(v)
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


def resolve_refs(store: str, names: list[str] | None) -> list[str]:
    """The versions to serve: the named ones (``cnn`` = latest, ``vae:2``), else every model's latest."""
    from kiln.store import Store

    s = Store(store)
    if not names:
        names = s.names()
        if not names:
            raise KilnError(f"store {s.spec} holds no models; train one first (`kiln train cnn`)")
    refs = []
    for n in names:
        v = s.get(n)
        refs.append(v.ref)
    return refs


def logging_config(access_log: bool) -> dict[str, Any]:
    """Serve's per-request access log lines cost time on every request (formatting, writing, and
    forwarding to the driver): off unless asked for; warnings and errors are always logged."""
    return {"enable_access_log": access_log, "log_level": "INFO" if access_log else "WARNING"}


def build_app(spec: ServeSpec) -> Any:
    """The Serve application: the ingress bound to one deployment per model version."""
    from kiln.serve.ingress import KilnIngress

    logs = logging_config(spec.access_log)
    models, batching = {}, {}
    for ref in spec.refs:
        opts = spec.options.get(ref) or spec.options.get(ref.split(":")[0]) or ModelOptions()
        dep = serve.deployment(ModelServer, name=deployment_name(ref), logging_config=logs,
                               **opts.deployment_options())
        models[ref] = dep.bind(spec.store, ref)
        batching[ref] = (opts.batch_size, opts.batch_wait_ms)
    ingress = serve.deployment(KilnIngress, name=INGRESS, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=256, logging_config=logs)
    from kiln.store import Store

    store = Store(spec.store)  # each method's argument schema, for the OpenAPI document
    methods = {ref: store.get(ref).manifest.get("methods", {}) for ref in spec.refs}
    return ingress.bind(models, spec.max_body_bytes, spec.token, methods, batching)


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for config files (``import_path: kiln.serve.app:app_builder``):
    ``args`` holds ``store``, optional ``models`` and ``max_body_mb``. The token, if any, comes from
    the cluster's KILN_API_TOKEN environment variable, never from the file."""

    store = args.get("store")
    if not store:
        raise KilnError("the Serve config's args need 'store': the model store's path on the cluster")
    refs = resolve_refs(store, args.get("models") or None)
    return build_app(ServeSpec(store=store, refs=refs,
                               max_body_bytes=int(float(args.get("max_body_mb", 16)) * 1024 * 1024),
                               token=settings.api_token()))


def serve_config(spec: ServeSpec, app_name: str = "kiln") -> dict[str, Any]:
    """A Ray Serve config (``serve deploy FILE``) serving ``spec`` on a remote cluster. Per-model
    deployment options (replicas, resources, autoscaling) are listed so they can be edited there."""
    deployments = []
    for ref in spec.refs:
        opts = spec.options.get(ref) or ModelOptions()
        d = {"name": deployment_name(ref), **opts.deployment_options()}
        deployments.append(d)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.host, "port": spec.port},
        "applications": [{
            "name": app_name, "route_prefix": "/", "import_path": "kiln.serve.app:app_builder",
            "args": {"store": spec.store, "models": list(spec.refs),
                     "max_body_mb": spec.max_body_bytes / (1024 * 1024)},
            "runtime_env": {"worker_process_setup_hook": SETUP_HOOK},
            "deployments": deployments,
        }],
    }


def start(spec: ServeSpec, *, address: str | None = None, app_name: str = "kiln",
          route_prefix: str = "/") -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on spec.host:port, deploy the application."""
    import ray

    if not ray.is_initialized():
        init_ray(address)
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build_app(spec), name=app_name, route_prefix=route_prefix, blocking=False)


def refresh(spec: ServeSpec, names: list[str] | None, *, app_name: str = "kiln",
            route_prefix: str = "/") -> list[str]:
    """Serve what ``names`` resolve to now (a version stored since the start becomes the latest):
    redeploys the application when that changed and returns the refs that were added. Serve keeps
    unchanged model deployments running and replaces the ingress only once the new one is up."""
    from ray import serve

    refs = resolve_refs(spec.store, names)
    if refs == spec.refs:
        return []
    added = sorted(set(refs) - set(spec.refs))
    spec.refs = refs
    serve.run(build_app(spec), name=app_name, route_prefix=route_prefix, blocking=False)
    return added


def wait_ready(host: str, port: int, timeout: float = 300, prefix: str = "",
               token: str | None = None) -> dict[str, Any]:
    """Poll /v2/health/ready until every model is loaded; returns GET /models."""
    import urllib.request

    base = f"http://{host}:{port}{prefix}"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    deadline = time.time() + timeout
    last = ""
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/v2/health/ready", timeout=5) as r:
                if r.status == 200:
                    req = urllib.request.Request(f"{base}/models", headers=headers)
                    with urllib.request.urlopen(req, timeout=5) as m:
                        return json.loads(m.read())
        except Exception as e:  # noqa: BLE001 - not up yet: keep polling, report the last reason
            last = str(e)
        time.sleep(0.5)
    raise KilnError(f"the server on {host}:{port} was not ready after {timeout:.0f} s ({last})")
