"""Prometheus metrics of a Kiln server: the instruments, and ``GET /metrics``.

Instruments are Ray Serve's (``ray.serve.metrics``): every replica records into its own, Ray
tags each series with the deployment and replica, and each node's metrics agent exports them.
``GET /metrics`` (the ingress) reads every live node's export and returns Kiln's and Serve's
families in Prometheus text, so one scrape covers every replica on every node, not only the
process that answered it. Ray reports to its agent every few seconds (``metrics_report_interval_ms``,
10 s by default): a scrape shows what was recorded up to then. The agent drops a gauge a replica
has not re-exported within two such intervals: every replica records its load and warm-up gauges
again at each of Serve's health checks (``refresh``); one too busy to export in time can miss them
in a scrape until its next export.

What is recorded (all counters are per replica; Prometheus sums them):

* ingress: ``kiln_requests_total`` and ``kiln_request_ms`` (inference routes: model, version,
  method, protocol, status), ``kiln_errors_total`` (the same, with the error's class),
  ``kiln_queue_ms{where="batcher"}`` (time a request waits for its batch to go);
* model replicas: ``kiln_batch_size`` (requests per model call), ``kiln_model_ms`` (the model
  call), ``kiln_queue_ms{where="replica"}`` (waiting for a free model thread),
  ``kiln_model_errors_total`` (by exception class), ``kiln_model_load_seconds`` and
  ``kiln_model_warmup_seconds``.
"""

from __future__ import annotations

import http
import time
import weakref
from typing import Any

MS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
FAMILIES = ("ray_kiln_", "ray_serve_")  # what GET /metrics passes on from Ray's export
REQUEST = ("model", "version", "method", "protocol", "status")
PROTOCOLS = {"models": "kiln", "v1": "tfserving", "v2": "v2"}

_made: dict[str, Any] = {}


def _instruments() -> dict[str, Any]:
    """This process's instruments, made once (in the replica: Serve adds its tags then)."""
    if not _made:
        from ray.serve.metrics import Counter, Gauge, Histogram

        _made.update(
            requests=Counter("kiln_requests_total", description="inference requests answered",
                             tag_keys=REQUEST),
            request_ms=Histogram("kiln_request_ms", description="time to answer an inference request (ms)",
                                 boundaries=MS, tag_keys=REQUEST),
            errors=Counter("kiln_errors_total", description="inference requests answered with an error",
                           tag_keys=(*REQUEST, "class")),
            queue_ms=Histogram("kiln_queue_ms", description="time a request waits before its model call (ms)",
                               boundaries=MS, tag_keys=("model", "version", "where")),
            batch=Histogram("kiln_batch_size", description="requests in one model call",
                            boundaries=SIZES, tag_keys=("model", "version", "method")),
            model_ms=Histogram("kiln_model_ms", description="time in the model call (ms)",
                               boundaries=MS, tag_keys=("model", "version", "method")),
            model_errors=Counter("kiln_model_errors_total", description="model calls that raised",
                                 tag_keys=("model", "version", "method", "class")),
            load=Gauge("kiln_model_load_seconds", description="time to rebuild the model from the store",
                       tag_keys=("model", "version")),
            warmup=Gauge("kiln_model_warmup_seconds", description="time to warm up every method",
                         tag_keys=("model", "version")))
    return _made


def _split(ref: str) -> tuple[str, str]:
    """A ref as the metrics' model and version tags; "" and "" for a request that reached no
    served model (a 404 is counted too)."""
    name, _, version = ref.partition(":")
    return name, version


# The model versions loaded in this process (``kiln.serve.replica.ModelServer``), held weakly: a
# version the pool unloads leaves with its last reference.
_loaded: weakref.WeakSet = weakref.WeakSet()


def loaded(server: Any) -> None:
    """Record ``server``'s load and warm-up times (its ``ref`` and ``timings``)."""
    _loaded.add(server)
    _record(server)


def refresh() -> None:
    """Record every loaded version's load and warm-up gauges again. A gauge set once is dropped
    by Ray's metrics agent two report intervals later; each replica's health check (every 10 s)
    calls this, so a scrape at any time finds them."""
    for server in list(_loaded):
        _record(server)


def _record(server: Any) -> None:
    name, version = _split(server.ref)
    made = _instruments()
    load_s, warmup_s = server.timings
    made["load"].set(load_s, tags={"model": name, "version": version})
    made["warmup"].set(warmup_s, tags={"model": name, "version": version})


def model_call(ref: str, method: str, requests: int, seconds: float, queued_s: float) -> None:
    name, version = _split(ref)
    made = _instruments()
    made["batch"].observe(requests, tags={"model": name, "version": version, "method": method})
    made["model_ms"].observe(seconds * 1000, tags={"model": name, "version": version, "method": method})
    made["queue_ms"].observe(queued_s * 1000, tags={"model": name, "version": version, "where": "replica"})


def model_error(ref: str, method: str, error: BaseException) -> None:
    name, version = _split(ref)
    _instruments()["model_errors"].inc(tags={"model": name, "version": version, "method": method,
                                             "class": type(error).__name__})


def batch_wait(ref: str, seconds: float) -> None:
    name, version = _split(ref)
    _instruments()["queue_ms"].observe(seconds * 1000, tags={"model": name, "version": version, "where": "batcher"})


class Measure:
    """ASGI middleware of the ingress: counts and times every inference request (a POST under
    /models, /v1 or /v2) by model, version, method, protocol and status. The route names what
    it resolved in ``scope["kiln"]`` (model, ref, method); a request for a model that is not
    served counts under model "" so that made-up names cannot grow the series without bound."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [500]

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            _request(scope, status[0], time.perf_counter() - t0)


def _request(scope: dict[str, Any], status: int, seconds: float) -> None:
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    rel = path[len(root):] if root and path.startswith(root) else path
    protocol = PROTOCOLS.get(rel.strip("/").split("/")[0])
    if protocol is None:
        return
    ref, method = scope.get("kiln", ("", ""))
    name, version = _split(ref)
    tags = {"model": name, "version": version, "method": method, "protocol": protocol, "status": str(status)}
    made = _instruments()
    made["requests"].inc(tags=tags)
    made["request_ms"].observe(seconds * 1000, tags=tags)
    if status >= 400:
        try:
            kind = http.HTTPStatus(status).name.lower()
        except ValueError:
            kind = str(status)
        made["errors"].inc(tags={**tags, "class": kind})


def gather(timeout_s: float = 5.0) -> bytes:
    """Kiln's and Serve's metrics from every live node's Ray metrics export, merged, as
    Prometheus text (``prometheus_client`` parses and writes it; nothing is formatted by hand)."""
    import urllib.request

    import ray
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Any] = {}
    for node in ray.nodes():
        port = node.get("MetricsExportPort")
        if not node.get("Alive") or not port:
            continue
        url = f"http://{node['NodeManagerAddress']}:{port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as r:
                text = r.read().decode()
        except OSError:
            continue  # a node going away: the others still count
        for family in text_string_to_metric_families(text):
            if not family.name.startswith(FAMILIES):
                continue
            if family.name in families:
                families[family.name].samples.extend(family.samples)
            else:
                families[family.name] = family

    refused = _refused_connections(timeout_s)
    if refused is not None:
        from prometheus_client.core import CounterMetricFamily

        families["kiln_connections_refused"] = CounterMetricFamily(
            "kiln_connections_refused", "connections HAProxy refused as they were accepted "
            "(kiln serve --max-per-source), on this node", value=refused)

    class Relay:
        def collect(self) -> Any:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Relay())
    return generate_latest(registry)


def _refused_connections(timeout_s: float) -> float | None:
    """The API frontend's denied connections from this node's HAProxy's own Prometheus exporter
    (its port is in the environment Kiln starts Ray with); None without one."""
    import os
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = os.environ.get("RAY_SERVE_HAPROXY_METRICS_PORT")
    if not port:
        return None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "haproxy_frontend_denied_connections":
            return sum(s.value for s in family.samples if s.labels.get("proxy") == "http_frontend")
    return None
