"""The Ray Serve application: one FastAPI ingress and one deployment per served model version.

Why one deployment per model and not multiplexing: Kiln's models differ in everything Serve
schedules by (a CNN answers in a millisecond, an LSTM generates for a second, a GAN wants a GPU),
so each gets its own replicas, resources, ``max_ongoing_requests`` and autoscaling, and a slow
model never queues behind a fast one. Idle cost stays low because a replica is a small fraction of
a CPU by default and ``autoscaling_config`` may scale a model to zero replicas. Multiplexing fits
many models of one kind; that is not what a store of lecture models holds.

The replica is ``kiln.serve.replica.ModelServer``, the HTTP API ``kiln.serve.ingress.KilnIngress``,
the Ray underneath ``kiln.serve.runtime``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from kiln import settings
from kiln.logs import SETUP_HOOK
from kiln.plugin import KilnError
from kiln.serve.replica import ModelServer
from kiln.serve.runtime import init_ray

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


def plan(models: list[str] | None, *, store: str | None = None, host: str = "127.0.0.1", port: int = 8000,
         address: str | None = None, replicas: str = "1", target_ongoing_requests: float = 2.0,
         cpus_per_replica: float = 0.25, gpus_per_replica: float = 0.0, max_ongoing_requests: int = 16,
         batch_size: int = 32, batch_wait_ms: float = 2.0, max_body_mb: float = 16.0,
         poll_seconds: float = 10.0, access_log: bool = False) -> ServeSpec:
    """Validate a serving request and return its spec (as ``kiln.run.plan`` does for training);
    raises KilnError naming what is wrong, before Ray starts."""
    from kiln.spec import parse_span
    from kiln.store import resolve_root

    low, high = parse_span(replicas, "--replicas")
    autoscaling = {"min_replicas": low, "max_replicas": high,
                   "target_ongoing_requests": target_ongoing_requests} if "-" in str(replicas) else None
    if max_body_mb <= 0 or cpus_per_replica < 0 or gpus_per_replica < 0 or target_ongoing_requests <= 0:
        raise KilnError("--max-body-mb and --target-ongoing-requests must be positive, "
                        "--cpus/--gpus-per-replica >= 0")
    if not 0 < port < 65536:
        raise KilnError(f"--port must be 1-65535, got {port}")
    if batch_size < 0 or batch_wait_ms < 0 or poll_seconds < 0:
        raise KilnError("--batch-size, --batch-wait-ms and --poll-seconds must be >= 0")
    if address:
        from kiln.net import check_ray_address

        check_ray_address(address)
    root = resolve_root(store)
    refs = resolve_refs(root, models)
    opts = ModelOptions(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, num_replicas=low,
                        autoscaling_config=autoscaling, max_ongoing_requests=max_ongoing_requests,
                        batch_size=batch_size, batch_wait_ms=batch_wait_ms)
    return ServeSpec(store=root, refs=refs, host=host, port=port,
                     max_body_bytes=int(max_body_mb * 1024 * 1024), options={r: opts for r in refs},
                     token=settings.api_token(), access_log=access_log)


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
    ingress = KilnIngress.options(name=INGRESS, logging_config=logs)
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
