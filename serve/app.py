"""The Ray Serve application: one FastAPI ingress and one deployment per served model version.

Why one deployment per model and not multiplexing: Kiln's models differ in everything Serve
schedules by (a CNN answers in a millisecond, an LSTM generates for a second, a GAN wants a GPU),
so each gets its own replicas, resources, ``max_ongoing_requests`` and autoscaling, and a slow
model never queues behind a fast one. Idle cost stays low because a replica is a small fraction of
a CPU by default and ``autoscaling_config`` may scale a model to zero replicas. Multiplexing fits
many models of one kind; that is not what a store of lecture models holds.

A model replica loads weights from the store by path (``kiln.run.load``: the registry rebuilds the
architecture, only weights are read), calls every inference method once with example inputs to
warm up, and only then reports ready. Until then the ingress answers 503.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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


class ModelServer:
    """One stored model version behind a Serve deployment."""

    def __init__(self, store: str, ref: str) -> None:
        from kiln import run

        t0 = time.perf_counter()
        self.plugin, self.model, self.version = run.load(ref, store)
        self.ref = self.version.ref
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
                "methods": m.get("methods", {}), "load_seconds": round(self.load_seconds, 3)}

    def infer(self, method: str, args: dict[str, Any]) -> dict[str, Any]:
        return jsonable(self.plugin.infer(self.model, method, args))


def resolve_refs(store: str, names: list[str] | None) -> list[str]:
    """The versions to serve: the named ones (``cnn`` = latest, ``vae:2``), else every model's latest."""
    from kiln.store import Store

    s = Store(store)
    if not names:
        names = s.names()
        if not names:
            raise KilnError(f"store {s.root} holds no models; train one first (`kiln train cnn`)")
    refs = []
    for n in names:
        v = s.get(n)
        refs.append(v.ref)
    return refs


def build_app(spec: ServeSpec) -> Any:
    """The Serve application: the ingress bound to one deployment per model version."""
    from ray import serve

    from kiln.serve.ingress import KilnIngress

    models = {}
    for ref in spec.refs:
        opts = spec.options.get(ref) or spec.options.get(ref.split(":")[0]) or ModelOptions()
        dep = serve.deployment(ModelServer, name=deployment_name(ref), **opts.deployment_options())
        models[ref] = dep.bind(spec.store, ref)
    ingress = serve.deployment(KilnIngress, name=INGRESS, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=256)
    return ingress.bind(models, spec.max_body_bytes, spec.token)


def start(spec: ServeSpec, *, address: str | None = None, app_name: str = "kiln",
          route_prefix: str = "/") -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on spec.host:port, deploy the application."""
    import logging

    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.ERROR, include_dashboard=False,
                 runtime_env=_runtime_env())
    serve.start(http_options={"host": spec.host, "port": spec.port})
    serve.run(build_app(spec), name=app_name, route_prefix=route_prefix, blocking=False)


def _runtime_env() -> dict[str, Any]:
    import os

    keep = {k: os.environ[k] for k in ("KILN_DATA_DIR", "KILN_TFDS_DIR") if k in os.environ}
    return {"env_vars": keep} if keep else {}


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


def store_path(store: str | Path | None) -> str:
    from kiln.store import Store

    return str(Store(store).root.resolve())
