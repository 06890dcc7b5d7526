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
from dataclasses import asdict, dataclass, field
from typing import Any

from ray import serve

from kiln import settings
from kiln.plugin import KilnError
from kiln.serve.codecs import Limits
from kiln.serve.replica import INGRESS, POOL, ModelPool, ModelServer
from kiln.serve.runtime import SERVE_HOOK, init_ray, quiet_serve_process


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
    limits: Limits = field(default_factory=Limits)
    options: dict[str, ModelOptions] = field(default_factory=dict)
    token: str | None = None              # with a token, every route but health needs it
    access_log: bool = False              # Serve's log line per request (costs time per request)
    # versions found in the store that cannot be served, with why (GET /models lists them); keyed
    # by ref, with the folder's modification time so that a fixed folder is tried again
    failed: dict[str, tuple[float, str]] = field(default_factory=dict)
    # the store's labels of the served models (name -> label -> version), as last deployed
    labels: dict[str, dict[str, int]] = field(default_factory=dict)
    # a weighted split of a model's unversioned routes: name -> {"cnn:3" or "cnn@stable": weight}
    traffic: dict[str, dict[str, int]] = field(default_factory=dict)
    # each traffic entry's version as last deployed ("cnn@canary" -> "cnn:4"): while a moved
    # label's new version loads, its share still goes to this one
    routes: dict[str, str] = field(default_factory=dict)
    # what the ingress's POST /-/drain needs: only the process that started the server knows it
    drain_key: str | None = None
    # share replicas among models (Serve's multiplexing), except the models named in ``own``
    shared: bool = False
    own: list[str] = field(default_factory=list)
    models_per_replica: int = 0           # in a shared replica, at most this many loaded (0: all)
    # every version in the ingress's own replicas: no hop between processes per request
    colocate: bool = False

    def pooled(self, ref: str) -> bool:
        return self.shared and ref.split(":")[0] not in self.own

    def deployment_of(self, ref: str) -> str:
        if self.colocate:
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
    for name in sorted({r.split(":")[0] for r in refs}):
        try:
            out[name] = s.labels(name)
        except (KilnError, ValueError, OSError):
            out[name] = served.get(name, {})  # unreadable now: keep what was served
    return out


def deployment_name(ref: str) -> str:
    return "model-" + ref.replace(":", "-v")


def plan(models: list[str] | None, *, store: str | None = None, host: str = "127.0.0.1", port: int = 8000,
         address: str | None = None, replicas: str = "1", target_ongoing_requests: float = 2.0,
         cpus_per_replica: float = 0.25, gpus_per_replica: float = 0.0, max_ongoing_requests: int = 16,
         batch_size: int = 32, batch_wait_ms: float = 2.0, max_body_mb: float = 16.0,
         max_items: int = 1024, max_chars: int = 100_000, max_response_mb: float = 64.0,
         body_timeout_s: float = 60.0, client_timeout_s: int = 60, max_connections: int = 4096,
         poll_seconds: float = 10.0, access_log: bool = False,
         traffic: list[str] | None = None, shared_replicas: bool = False,
         own_replicas: list[str] | None = None, models_per_replica: int = 0,
         colocate: bool = False) -> ServeSpec:
    """Validate a serving request and return its spec (as ``kiln.run.plan`` does for training);
    raises KilnError naming what is wrong, before Ray starts."""
    from kiln.spec import parse_span
    from kiln.store import check_name, resolve_root

    low, high = parse_span(replicas, "--replicas")
    autoscaling = {"min_replicas": low, "max_replicas": high,
                   "target_ongoing_requests": target_ongoing_requests} if "-" in str(replicas) else None
    if max_body_mb <= 0 or cpus_per_replica < 0 or gpus_per_replica < 0 or target_ongoing_requests <= 0:
        raise KilnError("--max-body-mb and --target-ongoing-requests must be positive, "
                        "--cpus/--gpus-per-replica >= 0")
    for flag, value in (("--max-items", max_items), ("--max-chars", max_chars),
                        ("--max-response-mb", max_response_mb), ("--body-timeout-s", body_timeout_s),
                        ("--client-timeout-s", client_timeout_s), ("--max-connections", max_connections)):
        if value <= 0:
            raise KilnError(f"{flag} must be positive, got {value:g}")
    if not 0 < port < 65536:
        raise KilnError(f"--port must be 1-65535, got {port}")
    if own_replicas and not shared_replicas:
        raise KilnError("--own-replicas names the models kept out of shared replicas: use it with "
                        "--shared-replicas")
    if colocate and (shared_replicas or models_per_replica):
        raise KilnError("--colocate loads every model in the ingress's replicas: it cannot be combined "
                        "with --shared-replicas or --models-per-replica")
    if models_per_replica < 0:
        raise KilnError(f"--models-per-replica must be >= 0 (0: no limit), got {models_per_replica}")
    if batch_size < 0 or batch_wait_ms < 0 or poll_seconds < 0:
        raise KilnError("--batch-size, --batch-wait-ms and --poll-seconds must be >= 0")
    if address:
        from kiln.net import check_ray_address

        check_ray_address(address)
    root = resolve_root(store)
    split = parse_traffic(traffic)
    failed: dict[str, tuple[float, str]] = {}  # serving every model's latest: skip a broken one
    refs = resolve_refs(root, wanted(root, models, split), None if models else failed)
    opts = ModelOptions(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica, num_replicas=low,
                        autoscaling_config=autoscaling, max_ongoing_requests=max_ongoing_requests,
                        batch_size=batch_size, batch_wait_ms=batch_wait_ms)
    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_items=max_items,
                    max_chars=max_chars, max_response_bytes=int(max_response_mb * 1024 * 1024),
                    body_timeout_s=body_timeout_s, client_timeout_s=client_timeout_s,
                    max_connections=max_connections)
    return ServeSpec(store=root, refs=refs, host=host, port=port, limits=limits,
                     options={**{r: opts for r in refs}, POOL: opts, INGRESS: opts},
                     token=settings.api_token(), access_log=access_log, failed=failed,
                     drain_key=secrets.token_urlsafe(24),
                     traffic=split, shared=shared_replicas,
                     own=[check_name(n) for n in own_replicas or []], models_per_replica=models_per_replica,
                     colocate=colocate)


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
    name, _, version = ref.partition(":")
    try:
        return max(p.stat().st_mtime for p in (store.root / name / version).iterdir())
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

    logs = logging_config(spec.access_log)
    models, batching = {}, {}
    pooled = [ref for ref in spec.refs if spec.pooled(ref)]
    if pooled:
        opts = spec.options.get(POOL) or ModelOptions()
        dep = serve.deployment(ModelPool, name=POOL, logging_config=logs, **opts.deployment_options())
        # its arguments never name a version: versions come and go without restarting it
        pinned = f"pool-{_digest(opts.deployment_options(), spec.models_per_replica)}"
        models[POOL] = dep.options(version=pinned, _internal=True).bind(spec.store, spec.models_per_replica)
    for ref in spec.refs:
        opts = spec.options.get(ref) or spec.options.get(ref.split(":")[0]) or ModelOptions()
        batching[ref] = (opts.batch_size, opts.batch_wait_ms)
        if ref in pooled or spec.colocate:
            continue
        dep = serve.deployment(ModelServer, name=deployment_name(ref), logging_config=logs,
                               **opts.deployment_options())
        # A stored version never changes: pinning the deployment's version to it (and to its
        # options) keeps its replicas running when the application is redeployed for another
        # model. Without one, Serve draws a random version per serve.run and restarted every model
        # (18.6 s without a cnn answer when cnn:2 was stored). Ray 2.60 takes it with _internal.
        pinned = f"{ref}-{_digest(opts.deployment_options())}"
        models[ref] = dep.options(version=pinned, _internal=True).bind(spec.store, ref)
    from kiln.store import Store

    store = Store(spec.store)  # each method's argument schema, for the OpenAPI document
    config = {"deployments": {ref: spec.deployment_of(ref) for ref in spec.refs},
              "batching": {ref: list(b) for ref, b in batching.items()},
              "methods": {ref: store.get(ref).manifest.get("methods", {}) for ref in spec.refs},
              "failed": {ref: reason for ref, (_, reason) in spec.failed.items()},
              "labels": labels_of(spec.store, spec.refs, spec.labels), "store": spec.store}
    spec.labels = config["labels"]
    config["traffic"] = _traffic_config(spec)
    # Pinned like the models: what changes as versions come and go reaches the running ingress
    # through user_config (reconfigure), without a new ingress replica.
    placed: dict[str, Any] = {}
    if spec.colocate:  # the ingress's replicas hold the models: they get the models' resources
        placed = (spec.options.get(INGRESS) or ModelOptions()).deployment_options()
        placed.pop("max_ongoing_requests")  # the ingress's own (256): it holds requests while they batch
    pinned = f"ingress-{_digest(asdict(spec.limits), spec.token, spec.access_log, spec.drain_key, placed)}"
    ingress = KilnIngress.options(name=INGRESS, logging_config=logs, user_config=config,
                                  version=pinned, _internal=True, **placed)
    return ingress.bind(models, asdict(spec.limits), spec.token, spec.drain_key)


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
            if "@" in entry:
                version = spec.labels.get(name, {}).get(entry.partition("@")[2])
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


BUILD_ARGS = ("store", "models", "limits", "options", "traffic", "access_log", "shared_replicas",
              "own_replicas", "models_per_replica", "colocate")  # what serve_config writes


def app_builder(args: dict[str, Any]) -> Any:
    """Serve application builder for config files (``import_path: kiln.serve.app:app_builder``):
    ``args`` is what ``serve_config`` writes from a ``ServeSpec`` (``BUILD_ARGS``), so that a
    deployed config builds the application `kiln serve` with the same flags builds. The token,
    if any, comes from the cluster's KILN_API_TOKEN environment variable, never from the file."""
    unknown = set(args) - set(BUILD_ARGS)
    if unknown:
        raise KilnError(f"the Serve config's args take {', '.join(BUILD_ARGS)}; got {', '.join(sorted(unknown))}")
    store = args.get("store")
    if not store:
        raise KilnError("the Serve config's args need 'store': the model store's path on the cluster")
    limits = args.get("limits") or {}
    known = set(Limits.__dataclass_fields__)
    if not isinstance(limits, dict) or set(limits) - known:
        raise KilnError(f"the Serve config's args.limits takes {', '.join(sorted(known))}; got {limits!r}")
    fields = set(ModelOptions.__dataclass_fields__)
    options = args.get("options") or {}
    if not isinstance(options, dict) or any(not isinstance(o, dict) or set(o) - fields for o in options.values()):
        raise KilnError(f"the Serve config's args.options maps a deployment or model to "
                        f"{', '.join(sorted(fields))}; got {options!r}")
    traffic = args.get("traffic") or {}
    if not isinstance(traffic, dict) or not all(isinstance(e, dict) for e in traffic.values()):
        raise KilnError(f"the Serve config's args.traffic maps a model to {{entry: weight}}; got {traffic!r}")
    split = parse_traffic([f"{e}={w}" for entries in traffic.values() for e, w in entries.items()])
    return build_app(ServeSpec(
        store=store, refs=resolve_refs(store, wanted(store, args.get("models") or None, split)),
        limits=Limits(**limits), options={k: ModelOptions(**o) for k, o in options.items()},
        token=settings.api_token(), access_log=bool(args.get("access_log")), traffic=split,
        shared=bool(args.get("shared_replicas")), own=list(args.get("own_replicas") or []),
        models_per_replica=int(args.get("models_per_replica") or 0), colocate=bool(args.get("colocate"))))


def serve_config(spec: ServeSpec, app_name: str = "kiln") -> dict[str, Any]:
    """A Ray Serve config (``serve deploy FILE``) serving ``spec`` on a remote cluster: every
    option of the spec travels in the builder's args (``app_builder``), and each deployment's
    options (replicas, resources, autoscaling) are listed as well, to be edited there."""
    args = {"store": spec.store, "models": list(spec.refs), "limits": asdict(spec.limits),
            "options": {k: asdict(o) for k, o in spec.options.items()}, "traffic": spec.traffic,
            "access_log": spec.access_log, "shared_replicas": spec.shared, "own_replicas": spec.own,
            "models_per_replica": spec.models_per_replica, "colocate": spec.colocate}
    deployments = []
    for ref in spec.refs:
        name = spec.deployment_of(ref)
        if name in (d["name"] for d in deployments):
            continue
        opts = spec.options.get(ref if name not in (POOL, INGRESS) else name) or ModelOptions()
        options = opts.deployment_options()
        if name == INGRESS:  # the ingress's own limit holds (build_app): it holds requests while they batch
            options.pop("max_ongoing_requests")
        deployments.append({"name": name, **options})
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": spec.host, "port": spec.port},
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
    if not ray.is_initialized():
        if address is None:  # the listener will be on this machine: say so before starting Ray
            net.check_port_free(spec.host, spec.port)
        init_ray(address, client_timeout_s=spec.limits.client_timeout_s,
                 max_connections=spec.limits.max_connections)
    try:
        serve.start(http_options={"host": spec.host, "port": spec.port})
    except Exception as e:  # a joined cluster's node, or a process that bound it meanwhile
        if "Address already in use" in str(e):  # HAProxy's or Serve's proxy's failed bind
            raise KilnError(net.port_taken(spec.host, spec.port)) from None
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
    req = urllib.request.Request(f"http://{local_host(spec.host)}:{spec.port}{prefix}/-/drain?timeout_s={timeout_s:g}",
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
    states = _colocated_states(app_name) if spec.colocate else {}
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
             and any(not (states.get(r) == "HEALTHY" if spec.colocate else
                          _healthy(app_name, spec.deployment_of(r)))
                     for r in new if r.split(":")[0] == old.split(":")[0])]
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
