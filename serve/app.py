"""The Ray Serve application: one FastAPI ingress, and the model versions either in deployments
of their own (the default) or in one shared deployment (``--shared-replicas``).

Why a deployment per model by default: Kiln's models differ in everything Serve schedules by (a
CNN answers in a millisecond, an LSTM generates for a second, a GAN wants a GPU), so each gets its
own replicas, resources, ``max_ongoing_requests`` and autoscaling, and a slow model never queues
behind a fast one. The price is a TensorFlow process per version (BENCHMARKS.md, "Many models in
one replica"): with many small models, ``--shared-replicas`` puts them in one deployment
(``kiln.serve.replica.ModelPool``, Serve's model multiplexing), where each costs only its own
weights and traced graphs, and ``--own-replicas NAME`` keeps a hot model apart.

With ``--colocate`` there is no model deployment: the ingress's replicas hold every version
(``kiln.serve.replica.Colocated``), which spares each request the hop between processes and
gives up the isolation above (docs/design.md, "Where a lone request's time goes").

The replicas are ``kiln.serve.replica.ModelServer`` (or ``ModelPool``), the HTTP API
``kiln.serve.ingress.KilnIngress``, the Ray underneath ``kiln.serve.runtime``.
"""

from __future__ import annotations

import json
import secrets
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from ray import serve

from kiln import settings
from kiln.plugin import KilnError
from kiln.serve.options import ServeOptions
from kiln.serve.replica import INGRESS, POOL, ModelPool, ModelServer
from kiln.serve.routing import name_of, version_of
from kiln.store import Ref
from kiln.serve.runtime import SERVE_HOOK, init_ray, quiet_serve_process


@dataclass
class ServeSpec:
    """What to serve: a store, the model versions in it, limits and the HTTP address."""

    store: str
    refs: list[str]                       # resolved "name:version"
    opts: ServeOptions = field(default_factory=ServeOptions)
    token: str | None = None              # with a token, every route but health needs it
    # versions found in the store that cannot be served, with why (GET /models lists them); keyed
    # by ref, with the folder's modification time so that a fixed folder is tried again
    failed: dict[str, tuple[float, str]] = field(default_factory=dict)
    # the store's labels of the served models (name -> label -> version), as last deployed
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    # each traffic entry's version as last deployed ("cnn@canary" -> "cnn:4"): while a moved
    # label's new version loads, its share still goes to this one
    routes: dict[str, str] = field(default_factory=dict)
    # what the ingress's POST /-/drain needs: only the process that started the server knows it
    drain_key: str | None = None
    # opts.traffic as name -> {"cnn:3" or "cnn@stable": weight}: a weighted split of the model's
    # unversioned routes
    traffic: dict[str, dict[str, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.traffic = parse_traffic(self.opts.traffic)

    def pooled(self, ref: str) -> bool:
        return self.opts.shared_replicas and name_of(ref) not in self.opts.own_replicas

    def deployment_of(self, ref: str) -> str:
        if self.opts.colocate:
            return INGRESS
        return POOL if self.pooled(ref) else deployment_name(ref)


def parse_traffic(values: list[str] | None) -> dict[str, dict[str, int]]:
    """``--traffic cnn:3=90 --traffic cnn:4=10`` (or ``cnn@stable=90``) as name -> {entry: weight};
    KilnError naming the bad value."""
    from kiln.store import parse_ref

    out: dict[str, dict[str, int]] = {}
    for value in values or []:
        entry, eq, weight = value.rpartition("=")
        if not eq or not entry:
            raise KilnError(f"--traffic takes NAME:VERSION=WEIGHT or NAME@LABEL=WEIGHT (cnn:3=90), got {value!r}")
        name, version = parse_ref(entry)
        if version is None and "@" not in entry:
            raise KilnError(f"--traffic {value}: name a version or a label (cnn:3=90, cnn@stable=90), "
                            "not the bare model")
        if not weight.isdigit() or int(weight) < 1:
            raise KilnError(f"--traffic {value}: the weight must be a whole number >= 1, got {weight!r}")
        if entry in out.get(name, {}):
            raise KilnError(f"--traffic names {entry} twice")
        out.setdefault(name, {})[entry] = int(weight)
    return out


def wanted(store: str, names: list[str] | None, traffic: dict[str, dict[str, int]]) -> list[str] | None:
    """What to resolve: ``names`` (None: every model in the store), where a model with a traffic
    split is served as its split's entries instead of its latest version."""
    if not traffic:
        return names
    from kiln.store import Store, parse_ref

    base = names or Store(store).names()
    keep = [n for n in base if parse_ref(n)[0] not in traffic or parse_ref(n)[1] is not None or "@" in n]
    return keep + [e for entries in traffic.values() for e in entries if e not in keep]


def labels_of(store: str, refs: list[str], served: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The store's labels of the models of ``refs`` now (a label moved in the store moves with
    it); where the labels cannot be read now, those in ``served``."""
    from kiln.store import Store

    s = Store(store)
    out = {}
    for name in sorted({name_of(r) for r in refs}):
        try:
            out[name] = s.labels(name)
        except (KilnError, ValueError, OSError):
            out[name] = served.get(name, {})  # unreadable now: keep what was served
    return out


def deployment_name(ref: str) -> str:
    return "model-" + ref.replace(":", "-v")


def plan(models: list[str] | None, opts: ServeOptions | None = None, *, store: str | None = None) -> ServeSpec:
    """Validate a serving request and return its spec (as ``kiln.run.plan`` does for training);
    raises KilnError naming what is wrong, before Ray starts."""
    from kiln import options
    from kiln.store import check_name, resolve_root

    opts = options.check(opts or ServeOptions())
    opts.deployment_options()  # --replicas
    if opts.own_replicas and not opts.shared_replicas:
        raise KilnError("--own-replicas names the models kept out of shared replicas: use it with "
                        "--shared-replicas")
    if opts.colocate and (opts.shared_replicas or opts.models_per_replica):
        raise KilnError("--colocate loads every model in the ingress's replicas: it cannot be combined "
                        "with --shared-replicas or --models-per-replica")
    for name in opts.own_replicas:
        check_name(name)
    if opts.address:
        from kiln.net import check_ray_address

        check_ray_address(opts.address)
    root = resolve_root(store)
    split = parse_traffic(opts.traffic)
    failed: dict[str, tuple[float, str]] = {}  # serving every model's latest: skip a broken one
    refs = resolve_refs(root, wanted(root, models, split), None if models else failed)
    return ServeSpec(store=root, refs=refs, opts=opts, token=settings.api_token(), failed=failed,
                     drain_key=secrets.token_urlsafe(24))


def check_version(store: Any, ref: str) -> None:
    """KilnError unless ``ref`` can be served: its manifest reads and its weights file opens.
    Cheap (no TensorFlow), so a broken folder never reaches a replica; a version that still fails
    to load there is caught when it is deployed (``refresh``)."""
    version = store.get(ref)
    try:
        import h5py

        with h5py.File(version.weights, "r"):
            pass
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file alike
        raise KilnError(f"{ref}: its weights file {version.weights} does not open ({e})") from None


def _mtime(store: Any, ref: str) -> float:
    try:
        return max(p.stat().st_mtime for p in (store.root / name_of(ref) / str(version_of(ref))).iterdir())
    except (OSError, ValueError):
        return 0.0


def resolve_refs(store: str, names: list[str] | None,
                 failed: dict[str, tuple[float, str]] | None = None, served: tuple[str, ...] = ()) -> list[str]:
    """The versions to serve: the named ones (``cnn`` = latest, ``vae:2``), else every model's latest.

    With ``failed`` (the poll's memory), a version that cannot be served is recorded there and the
    one before it is served instead; a version already recorded is tried again only once its
    folder changed; a version in ``served`` is known good (a stored version never changes) and
    not checked again. Without ``failed``, a bad version is an error (one named on the command line)."""
    from kiln.store import Store, parse_ref

    s = Store(store)
    if not names:
        names = s.names()
        if not names:
            raise KilnError(f"store {s.spec} holds no models; train one first (`kiln train cnn`)")
    refs = []
    for n in names:
        name, pinned = parse_ref(n)
        if failed is None or pinned is not None or "@" in n:  # a label: the version it names now
            check = s.get(n)
            refs.append(check.ref)
            continue
        for v in reversed(s.versions(name)):
            ref = f"{name}:{v}"
            if ref in served:
                refs.append(ref)
                break
            seen, mtime = failed.get(ref), _mtime(s, ref)
            if seen and seen[0] == mtime:
                continue
            try:
                check_version(s, ref)
            except KilnError as e:
                failed[ref] = (mtime, str(e))
                continue
            failed.pop(ref, None)
            refs.append(ref)
            break
    if not refs:
        raise KilnError(f"nothing in store {s.spec} can be served: "
                        + "; ".join(reason for _, reason in (failed or {}).values()))
    return refs


def logging_config(access_log: bool) -> dict[str, Any]:
    """Serve's per-request access log lines cost time on every request (formatting, writing, and
    forwarding to the driver): off unless asked for; warnings and errors are always logged."""
    return {"enable_access_log": access_log, "log_level": "INFO" if access_log else "WARNING"}


def build_app(spec: ServeSpec) -> Any:
    """The Serve application: the ingress bound to one deployment per model version."""
    from kiln.serve.ingress import KilnIngress

    opts = spec.opts
    logs = logging_config(opts.access_log)
    deployment = opts.deployment_options()
    models = {}
    pooled = [ref for ref in spec.refs if spec.pooled(ref)]
    if pooled:
        dep = serve.deployment(ModelPool, name=POOL, logging_config=logs, **deployment)
        # its arguments never name a version: versions come and go without restarting it
        pinned = f"pool-{_digest(deployment, opts.models_per_replica, opts.gpu_memory_mb)}"
        models[POOL] = dep.options(version=pinned, _internal=True).bind(spec.store, opts.models_per_replica,
                                                                        opts.gpu_memory_mb)
    for ref in spec.refs:
        if ref in pooled or opts.colocate:
            continue
        dep = serve.deployment(ModelServer, name=deployment_name(ref), logging_config=logs, **deployment)
        # A stored version never changes: pinning the deployment's version to it (and to its
        # options) keeps its replicas running when the application is redeployed for another
        # model; without one, Serve draws a random version per serve.run and restarts every model.
        # Ray 2.60 takes it with _internal.
        pinned = f"{ref}-{_digest(deployment, opts.gpu_memory_mb)}"
        models[ref] = dep.options(version=pinned, _internal=True).bind(spec.store, ref, opts.gpu_memory_mb)
    from kiln.store import Store

    store = Store(spec.store)  # each method's argument schema, for the OpenAPI document
    config = {"deployments": {ref: spec.deployment_of(ref) for ref in spec.refs},
              "batching": {ref: [opts.batch_size, opts.batch_wait_ms] for ref in spec.refs},
              "methods": {ref: store.get(ref).manifest.get("methods", {}) for ref in spec.refs},
              "failed": {ref: reason for ref, (_, reason) in spec.failed.items()},
              "labels": labels_of(spec.store, spec.refs, spec.labels), "store": spec.store}
    spec.labels = config["labels"]
    config["traffic"] = _traffic_config(spec)
    # Pinned like the models: what changes as versions come and go reaches the running ingress
    # through user_config (reconfigure), without a new ingress replica.
    placed: dict[str, Any] = {}
    if opts.colocate:  # the ingress's replicas hold the models: they get the models' resources
        placed = {k: v for k, v in deployment.items() if k != "max_ongoing_requests"}  # the
        # ingress's own limit (256) holds: it holds requests while they batch
    from kiln import options

    written = options.to_dict(opts)  # what the ingress reads per request (codecs.Limits)
    pinned = f"ingress-{_digest(written, spec.token, spec.drain_key, placed)}"
    ingress = KilnIngress.options(name=INGRESS, logging_config=logs, user_config=config,
                                  version=pinned, _internal=True, **placed)
    return ingress.bind(models, written, spec.token, spec.drain_key)


def _digest(*parts: Any) -> str:
    """A short digest of options, the same for equal options whatever their dicts' key order (a
    Serve config read back from YAML has its keys sorted)."""
    return f"{zlib.crc32(json.dumps(parts, sort_keys=True, default=repr).encode()):08x}"


def _traffic_config(spec: ServeSpec) -> dict[str, list[list[Any]]]:
    """The split the ingress applies: name -> [[entry, version now, weight, version before]], where
    "version before" is the one a moved label named, kept while the new one loads."""
    out: dict[str, list[list[Any]]] = {}
    for name, entries in spec.traffic.items():
        rows = []
        for entry, weight in entries.items():
            label = Ref.parse(entry).label
            if label:
                version = spec.labels.get(name, {}).get(label)
                now = f"{name}:{version}" if f"{name}:{version}" in spec.refs else spec.routes.get(entry)
            else:
                now = entry
            before = spec.routes.get(entry)
            if before and before != now and before in spec.refs:
                rows.append([entry, now, weight, before])
            else:
                rows.append([entry, now, weight, None])
                spec.routes[entry] = now
        out[name] = rows
    return out


BUILD_ARGS = ("store", "models", "options")  # what serve_config writes


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for config files (``import_path: kiln.serve.app:app_builder``):
    ``args`` is what ``serve_config`` writes from a ``ServeSpec`` (``BUILD_ARGS``: the store, the
    versions, and every ``kiln serve`` option but those of the process), so that a deployed config
    builds the application `kiln serve` with the same flags builds. The token, if any, comes
    from the cluster's KILN_API_TOKEN environment variable, never from the file."""
    from kiln import options

    if not isinstance(args, dict) or set(args) - set(BUILD_ARGS):
        raise KilnError(f"the Serve config's args take {', '.join(BUILD_ARGS)}; got {args!r}")
    store = args.get("store")
    if not store:
        raise KilnError("the Serve config's args need 'store': the model store's path on the cluster")
    opts = options.from_dict(ServeOptions, args.get("options") or {}, "the Serve config's args.options")
    split = parse_traffic(opts.traffic)
    refs = resolve_refs(store, wanted(store, args.get("models") or None, split))
    return build_app(ServeSpec(store=store, refs=refs, opts=opts, token=settings.api_token()))


def serve_config(spec: ServeSpec, app_name: str = "kiln") -> dict[str, Any]:
    """A Ray Serve config (``serve deploy FILE``) serving ``spec`` on a remote cluster: every
    option of the spec travels in the builder's args (``app_builder``), and each deployment's
    options (replicas, resources, autoscaling) are listed as well, to be edited there."""
    from kiln import options

    args = {"store": spec.store, "models": list(spec.refs), "options": options.to_dict(spec.opts)}
    deployments = []
    for ref in spec.refs:
        name = spec.deployment_of(ref)
        if name in (d["name"] for d in deployments):
            continue
        dep = spec.opts.deployment_options()
        if name == INGRESS:  # the ingress's own limit holds (build_app): it holds requests while they batch
            dep.pop("max_ongoing_requests")
        deployments.append({"name": name, **dep})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.opts.host, "port": spec.opts.port},
        "applications": [{
            "name": app_name, "route_prefix": "/", "import_path": "kiln.serve.app:app_builder",
            "args": args,
            "runtime_env": {"worker_process_setup_hook": SERVE_HOOK},
            "deployments": deployments,
        }],
    }


def start(spec: ServeSpec, *, address: str | None = None, app_name: str = "kiln",
          route_prefix: str = "/") -> None:
    """Start (or join) Ray, start Serve's HTTP proxy on spec.host:port, deploy the application."""
    import ray

    from kiln import net

    quiet_serve_process()
    host, port = spec.opts.host, spec.opts.port
    if not ray.is_initialized():
        if address is None:  # the listener will be on this machine: say so before starting Ray
            net.check_port_free(host, port)
        init_ray(address, spec.opts)
    try:
        serve.start(http_options={"host": host, "port": port})
    except Exception as e:  # a joined cluster's node, or a process that bound it meanwhile
        if "Address already in use" in str(e):  # HAProxy's or Serve's proxy's failed bind
            raise KilnError(net.port_taken(host, port)) from None
        raise
    serve.run(build_app(spec), name=app_name, route_prefix=route_prefix, blocking=False)


DRAIN_S = 25.0  # how long a stopping server answers requests in flight (Kubernetes kills at 30 s)


def drain(spec: ServeSpec, prefix: str = "", timeout_s: float = DRAIN_S) -> int | None:
    """Before ``stop``: the ingress refuses new requests (JSON 503) and answers those in flight,
    for at most ``timeout_s``. Returns how many were left unanswered (None: it could not be asked)."""
    import urllib.request

    from kiln.net import local_host

    if not spec.drain_key:
        return None
    req = urllib.request.Request(f"http://{local_host(spec.opts.host)}:{spec.opts.port}{prefix}/-/drain?timeout_s={timeout_s:g}",
                                 data=b"", method="POST", headers={"Kiln-Drain-Key": spec.drain_key})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s + 10) as r:
            return int(json.loads(r.read())["unanswered"])
    except Exception:  # noqa: BLE001 - not answering (never started, Ray gone): stop anyway
        return None


def stop(timeout_s: float = 60.0) -> None:
    """Shut Serve down as ``serve.shutdown()`` does (applications deleted, requests in flight
    answered, Serve's actors and HAProxy stopped), without its alarming last line.

    ``serve.shutdown()`` waits on a controller call that never returns: the controller kills
    itself, and the raylet reports that call as "Task ServeController.graceful_shutdown failed
    ... killed by `ray.kill`" in the server's terminal on every stop. Asked not to wait, the
    controller does the same shutdown; its disappearance is what is waited for here."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE
    from ray.serve.context import _disconnect, _get_global_client

    try:
        client = _get_global_client()
    except Exception:  # noqa: BLE001 - no Serve running (or no Ray): nothing to stop
        return
    client.shutdown_cached_handles()
    try:
        ray.get(client._controller.graceful_shutdown.remote(False), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - a controller already gone: nothing to wait for
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # gone: Serve has shut down
            break
        time.sleep(0.2)
    client._shutdown = True  # what serve.shutdown() leaves behind: this process forgets Serve
    _disconnect()


def refresh(spec: ServeSpec, names: list[str] | None, *, app_name: str = "kiln",
            route_prefix: str = "/") -> tuple[list[str], list[str]]:
    """Serve what ``names`` resolve to now (a version stored since the start becomes the latest);
    returns (refs added, lines reporting versions that cannot be served). Never raises for what
    is in the store: a version whose folder is unreadable, or whose replica fails to load, is
    reported once (again only when its folder changes) and the version before it keeps serving.
    Unchanged model deployments keep running (pinned versions); the ingress is replaced once
    the new one is up, and switches to a new version only once it is ready."""
    from kiln.store import Store

    before_failed = dict(spec.failed)
    states = _colocated_states(app_name) if spec.opts.colocate else {}
    for ref, state in states.items():  # loaded by the ingress: a failed load is known only there
        if state.startswith("FAILED") and ref in spec.refs:
            spec.failed[ref] = (_mtime(Store(spec.store), ref), state.partition(": ")[2])
            spec.refs.remove(ref)
    before_refs = list(spec.refs)
    try:
        refs = resolve_refs(spec.store, wanted(spec.store, names, spec.traffic), spec.failed,
                            served=tuple(before_refs))
    except KilnError as e:
        return [], [f"store poll: {e}"]
    # a version being replaced keeps serving until its successors (the new latest, or the version a
    # moved label names) are ready
    new = [r for r in refs if r not in before_refs]
    refs += [old for old in before_refs if old not in refs
             and any(not (states.get(r) == "HEALTHY" if spec.opts.colocate else
                          _healthy(app_name, spec.deployment_of(r)))
                     for r in new if name_of(r) == name_of(old))]
    news = [f"cannot serve {ref}: {reason}" for ref, (_, reason) in spec.failed.items()
            if before_failed.get(ref, (None,))[0] != spec.failed[ref][0]]
    if sorted(refs) == sorted(before_refs) and spec.failed.keys() == before_failed.keys() \
            and labels_of(spec.store, refs, spec.labels) == spec.labels:
        return [], news
    before_labels, spec.refs = spec.labels, refs
    try:
        serve.run(build_app(spec), name=app_name, route_prefix=route_prefix, blocking=False)
    except RuntimeError as e:  # a new version's replica failed to load: back to what served
        added = sorted(set(refs) - set(before_refs))
        for ref in added:
            spec.failed[ref] = (_mtime(Store(spec.store), ref), f"{ref} failed to load: {str(e).splitlines()[0]}")
        spec.refs, spec.labels = before_refs, before_labels
        news += [f"cannot serve {ref}: {spec.failed[ref][1]}" for ref in added]
        serve.run(build_app(spec), name=app_name, route_prefix=route_prefix, blocking=False)
        return [], news
    return sorted(set(refs) - set(before_refs)), news


def _colocated_states(app_name: str) -> dict[str, str]:
    """With --colocate: each served version's state in an ingress replica (HEALTHY, UPDATING while
    it loads, "FAILED: why"). One replica answers; the others load the same files alike, and a
    request reaching one still loading waits for its load rather than failing."""
    try:
        handle = serve.get_deployment_handle(INGRESS, app_name)
        return handle.colocated_states.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - no answer now (the ingress restarting): ask again next poll
        return {}


def _healthy(app_name: str, deployment: str) -> bool:
    app = serve.status().applications.get(app_name)
    dep = app.deployments.get(deployment) if app else None
    return bool(dep) and str(getattr(dep.status, "value", dep.status)) == "HEALTHY"


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
