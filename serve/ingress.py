"""Kiln's HTTP API: one FastAPI ingress deployment in front of the model deployments (with
``kiln serve --colocate``, holding the models itself).

Routes (docs/serving.md's table lists them; docs/design.md, "Data flow"):

* Kiln: ``GET /models``; ``POST /models/{m}[/versions/{v}]/{method}`` with the method's arguments as
  a JSON object, answered with its outputs as a JSON object.
* TF Serving REST: ``POST /v1/models/{m}[/versions/{v}]:predict`` (row ``instances`` or column
  ``inputs``; ``{"b64": ...}`` for an encoded image), ``GET /v1/models/{m}[/versions/{v}]``,
  ``GET /v1/models/{m}/metadata``.
* Open Inference Protocol v2: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{m}[/versions/{v}]``, ``.../ready``, ``POST .../infer``.

Each handler serves the latest and the versioned path (``version`` is None for the latest). The
wire formats are pure functions in ``kiln.serve.codecs``. Every error is a JSON body
``{"error": "..."}``: 400 bad input, 401 no or wrong token, 404 unknown model, version or method,
413 body too large, 415 not JSON, 499 the client hung up mid-body, 503 model still loading
(or the server stopping: ``Drain``).
"""

# No `from __future__ import annotations` here: FastAPI reads these route signatures' types at
# run time (a string annotation `Request` inside the Serve class view is not resolved).

import asyncio
import hmac
import json
import pickle
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from starlette.requests import ClientDisconnect
from ray import serve

from kiln.plugin import KilnError
from kiln.values import not_a_number, plain
from kiln.serve import codecs, metrics, routing
from kiln.serve.codecs import ProtocolError
from kiln.serve.options import ServeOptions
from kiln.serve.replica import INGRESS, POOL, Colocated, LoadError

RETRIES = 3          # sends of a request whose replica died under it, after the first
RETRY_AFTER_S = 2    # what a 503 tells the client to wait
CLIENT_CLOSED = 499  # nginx's status for a request whose client hung up: no answer reaches it
VERSION_HEADER = "Kiln-Version"  # on every inference answer: the version that answered (cnn:3)

# Public with a token set: health probes, and the gallery's static files (no model data; the page
# asks for the token and sends it with every call). Everything else needs the token, /openapi.json
# and /docs included: they list every served model and argument.
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/")
GALLERY = Path(__file__).resolve().parent / "gallery"   # the web page at /, static files only
GALLERY_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}

# FastAPI's own /openapi.json and /docs are replaced by the ingress's, which check the token
api = FastAPI(title="Kiln", description="Kiln model server: Kiln, TF Serving REST and Open "
              "Inference Protocol v2 routes for every stored model it serves.",
              openapi_url=None, docs_url=None, redoc_url=None)


class Drain:
    """ASGI middleware: the requests this replica is answering, and its stop. Once the server is
    stopping (``KilnIngress.drain``), a new request gets a JSON 503 with Retry-After (readiness
    included, so a load balancer stops sending; liveness stays 200) while those already in flight
    are answered: before, stopping `kiln serve` closed their connections without an answer."""

    active = 0          # requests in flight in this process (one ingress replica per process)
    stopping = False

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if Drain.stopping and not scope.get("path", "").endswith("/v2/health/live"):
            answer = JSONResponse({"error": "the server is stopping; retry shortly"}, status_code=503,
                                  headers={"Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
            await answer(scope, receive, send)
            return
        Drain.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            Drain.active -= 1


class Auth:
    """ASGI middleware: ``Authorization: Bearer <KILN_API_TOKEN>`` on every request but the
    public ones (``_public``) when the ingress has a token, checked before routing, so that no
    route can forget it (a test sends every route of the app without one). The scheme name is
    case-insensitive (RFC 7235)."""

    token: Optional[str] = None  # the ingress's, set when it starts (one ingress replica per process)

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and Auth.token is not None and not _public(scope):
            headers = dict(scope.get("headers") or [])
            scheme, _, given = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), Auth.token.encode()):
                answer = JSONResponse({"error": "missing or wrong token: send the header "
                                                "'Authorization: Bearer <KILN_API_TOKEN>'"},
                                      status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await answer(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(Auth)
api.add_middleware(Drain)   # a stopping server says so before it asks for a token
api.add_middleware(metrics.Measure)  # outermost: it counts the 503s of a stopping server too


@api.exception_handler(ProtocolError)
async def _protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


@api.exception_handler(KilnError)
async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


@api.exception_handler(404)
async def _not_found(request: Request, exc: Any) -> JSONResponse:
    return JSONResponse({"error": f"no route {request.method} {request.url.path}; see GET /models "
                                  "and /docs"}, status_code=404)


@api.exception_handler(405)
async def _bad_method(request: Request, exc: Any) -> JSONResponse:
    """HTTP's 405 names the methods the path takes in ``Allow`` (RFC 9110, 15.5.6)."""
    from starlette.routing import Match

    allowed = sorted({m for route in request.app.router.routes if route.matches(request.scope)[0] != Match.NONE
                      for m in getattr(route, "methods", None) or ()})
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}; it takes "
                                  f"{', '.join(allowed)}"}, status_code=405, headers={"Allow": ", ".join(allowed)})


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    """Anything else is Kiln's fault, not the client's: a JSON 500 that names the request, and
    the traceback in the server's log under the same id."""
    import logging
    import uuid

    rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
    logging.getLogger("ray.serve").error("kiln: request %s %s %s failed", rid, request.method,
                                         request.url.path, exc_info=exc)
    return JSONResponse({"error": f"internal error ({type(exc).__name__}) answering request {rid}; "
                                  "the server's log has the details", "request_id": rid}, status_code=500)


def json_answer(content: Any, ref: str) -> Response:
    """A model's answer as JSON, with the version that gave it. orjson writes it: a route that
    returns a dict goes through FastAPI's jsonable_encoder and the standard library's json, tens
    of times slower for a batch's answer (BENCHMARKS.md, bench/json_answers.py)."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), media_type="application/json",
                    headers={VERSION_HEADER: ref})


def _public(scope: dict[str, Any]) -> bool:
    """Whether a request needs no token: health, the gallery's files, and the drain route (which
    checks a key of its own)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    rel = path[len(root):] if root and path.startswith(root) else path
    return rel in OPEN_PATHS or rel in ("", "/-/drain") or rel.startswith("/gallery/")


def _replica_gone(e: BaseException) -> bool:
    """Whether a call failed because its replica died or became unreachable, not because of the
    request: Ray's actor errors, also wrapped in a task error, and gRPC's UNAVAILABLE (the
    ingress calls model replicas over gRPC)."""
    from ray.exceptions import RayActorError

    if isinstance(e, RayActorError) or isinstance(getattr(e, "cause", None), RayActorError):
        return True
    try:
        import grpc

        return isinstance(e, grpc.aio.AioRpcError) and e.code() in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED)
    except ImportError:
        return False


def _cause(e: BaseException) -> str:
    """The message of the exception a replica raised (Ray wraps it; its ``cause`` is the original)."""
    return str(getattr(e, "cause", None) or e)


def openapi(methods: dict[str, dict[str, Any]], max_items: int) -> dict[str, Any]:
    """The OpenAPI document (kiln.serve.openapi), built once per set of served models."""
    if api.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        from kiln.serve.openapi import document

        base = get_openapi(title=api.title, version=api.version, description=api.description,
                           routes=api.routes, servers=api.servers or None)
        api.openapi_schema = document(base, methods, max_items, token=Auth.token is not None)
    return api.openapi_schema


def _serve_details() -> dict[str, Any]:
    """The Serve controller's description of every application, as plain dicts (the call under
    ``serve.status()``, without its pydantic models; Ray is pinned to 2.60 in pyproject.toml)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


# Last in the module: the name KilnIngress is bound to the Deployment, so the class travels to its
# replica by value, pickled when it is decorated; the helpers it calls must exist by then.
@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
@serve.ingress(api)
class KilnIngress:
    def __init__(self, models: dict[str, Any], opts: dict[str, Any], token: Optional[str],
                 drain_key: Optional[str] = None) -> None:
        # ``models`` (bound deployments) makes serve.run deploy them; which ones this ingress
        # serves comes from reconfigure(), so that a new version or a failed one changes the
        # running ingress in place instead of replacing it (a replaced ingress dropped requests)
        self.handles: dict[str, Any] = {}           # "name:version" -> DeploymentHandle
        self.failed: dict[str, str] = {}            # "name:version" -> why it cannot be served
        self.batching: dict[str, tuple[int, float]] = {}
        self.batchers: dict[str, Any] = {}
        self.methods: dict[str, dict[str, Any]] = {}
        self.options = ServeOptions(**opts)
        self.limits = codecs.Limits(self.options)
        Auth.token = token
        self.drain_key = drain_key                  # what POST /-/drain needs (kiln.serve.app.drain)
        self.described: dict[str, dict[str, Any]] = {}
        self.inflight: dict[str, int] = {}          # requests in flight per model ref
        self._status: tuple[float, dict[str, str]] = (0.0, {})
        self._status_lock = asyncio.Lock()
        self._warming: set[Any] = set()
        self.app_name = serve.get_replica_context().app_name

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's ``user_config`` at start and whenever it
        changes: the served versions (ref -> deployment name), each one's batching and method
        schemas, and the versions that cannot be served."""
        served = config.get("deployments", {})
        # a version in the shared pool is the pool's deployment, with the version named per call;
        # one served by the ingress itself (--colocate) is loaded here, beside those serving
        def handle(ref: str, name: str) -> Any:
            if name == INGRESS:
                return Colocated(config["store"], ref, self.options.gpu_memory_mb)
            h = serve.get_deployment_handle(name, self.app_name)
            return h.options(multiplexed_model_id=ref) if name == POOL else h

        first = not hasattr(self, "_configured")
        self._configured = True
        self.handles = {ref: self.handles.get(ref) or handle(ref, name) for ref, name in served.items()}
        if first:  # a starting replica (the first, a replacement, autoscaling's) takes requests only
            # once the versions it holds itself are loaded: Serve routes to it when this returns;
            # later versions load while the ones they replace answer
            await asyncio.gather(*(h.loading for h in self.handles.values() if isinstance(h, Colocated)))
        # async, so that it runs on the replica's event loop: a handle's options() needs one
        for ref, name in served.items():  # load new pooled versions now, not on their first request
            if name == POOL and ref not in self.described:
                task = asyncio.get_running_loop().create_task(self._warm(ref))
                self._warming.add(task)  # the loop keeps only a weak reference to a task
                task.add_done_callback(self._warming.discard)
        # (most requests in one model call, ms a batch waits to fill), for refs that batch
        self.batching = {r: (int(b[0]), float(b[1])) for r, b in config.get("batching", {}).items() if b[0] > 1}
        self.batchers = {r: b for r, b in self.batchers.items() if r in self.batching}
        self.described = {r: d for r, d in self.described.items() if r in self.handles}
        self.methods = config.get("methods", {})
        self.failed = config.get("failed", {})
        self.labels: dict[str, dict[str, int]] = config.get("labels", {})
        # name -> [[entry, version now, weight, version before]] (kiln.serve.app._traffic_config)
        self.traffic: dict[str, list[list[Any]]] = config.get("traffic", {})
        self._turns: dict[str, dict[str, int]] = {}  # smooth weighted round robin's running scores
        self._status = (0.0, {})
        api.openapi_schema = None

    def check_health(self) -> None:
        metrics.refresh()  # the versions loaded here with --colocate (ModelServer.check_health)

    def _failed(self) -> dict[str, str]:
        """The versions that cannot be served, with why: those the server's poll found, and (with
        --colocate) those whose load failed here, until the next poll lists them too."""
        here = {r: h.error for r, h in self.handles.items() if isinstance(h, Colocated) and h.error}
        return {**self.failed, **here} if here else self.failed

    async def colocated_states(self) -> dict[str, str]:
        """With --colocate, for the server's store poll (``kiln.serve.app.refresh``): each version
        this replica loads, HEALTHY, UPDATING while loading, or "FAILED: why"."""
        return {ref: f"FAILED: {h.error}" if h.error else h.state
                for ref, h in self.handles.items() if isinstance(h, Colocated)}

    async def _warm(self, ref: str) -> None:
        try:
            await self.handles[ref].describe.remote()
        except Exception:  # noqa: BLE001 - its first request will say what is wrong
            pass

    # -- plumbing -------------------------------------------------------------------------
    async def _states(self) -> dict[str, str]:
        """Deployment status by model ref, refreshed at most every half second.

        The controller is asked in a thread, one call at a time, so that health probes never
        stall the requests in flight. Not ``serve.status()``: it builds pydantic models of the
        whole Serve instance in this process, holding its event loop; the controller's plain
        answer is mostly waiting, which a thread does without the loop."""
        if all(isinstance(h, Colocated) for h in self.handles.values()):  # --colocate: all or none
            return {ref: h.state for ref, h in self.handles.items()}  # no controller to ask
        if time.monotonic() - self._status[0] > 0.5:
            async with self._status_lock:  # probes arriving together share one call
                if time.monotonic() - self._status[0] > 0.5:
                    details = await asyncio.to_thread(_serve_details)
                    deps = details.get("applications", {}).get(self.app_name, {}).get("deployments", {})
                    states = {}
                    for ref, handle in self.handles.items():
                        d = deps.get(handle.deployment_name, {"status": "UNKNOWN"})
                        status = str(getattr(d["status"], "value", d["status"]))
                        # a redeployed application marks its deployments UPDATING for a while, even
                        # one whose replicas keep running unchanged: a running replica answers
                        running = any(str(getattr(r.get("state"), "value", r.get("state"))) == "RUNNING"
                                      for r in d.get("replicas") or [])
                        states[ref] = "HEALTHY" if running and status != "UNHEALTHY" else status
                    self._status = (time.monotonic(), states)
        return self._status[1]

    def _versions(self, model: str) -> list[str]:
        return routing.versions(self.handles, model)

    async def _split(self, model: str) -> list[tuple[str, Optional[str], int]]:
        return routing.split_now(self.traffic.get(model, []), await self._states())

    async def _ref(self, model: str, version: Optional[str], label: Optional[str] = None,
                   split: bool = False) -> str:
        """The ref answering a route (``split``: an inference route, which a traffic split picks
        for when it names no version); routing.py decides, from the ingress's state."""
        if "@" in model and label is None:  # cnn@stable, as the store names it
            model, _, label = model.partition("@")
        refs = self._versions(model)
        if label is not None:
            version = routing.by_label(model, version, label, self.labels.get(model, {}), refs)
        states, picked = {}, None
        if version is None:
            states = await self._states()
            if split and model in self.traffic:
                picked = routing.pick(routing.split_now(self.traffic[model], states),
                                      self._turns.setdefault(model, {}))
        return routing.resolve(model, version, refs, self.handles, self._failed(), states, picked)

    async def _ready(self, ref: str) -> None:
        handle = self.handles.get(ref)
        if isinstance(handle, Colocated) and handle.state == "UPDATING":
            # --colocate: the store poll moves every replica to a new version once one replica
            # has loaded it; a request here waits for this replica's load of the same files
            # (as Colocated.call does) rather than failing while its neighbour already answers
            await asyncio.shield(handle.loading)
        state = (await self._states()).get(ref)
        if state != "HEALTHY":
            raise ProtocolError(503, f"model {ref} is loading ({state}); retry in a few seconds")

    async def _describe(self, ref: str) -> dict[str, Any]:
        if ref not in self.described:
            await self._ready(ref)
            self.described[ref] = await self.handles[ref].describe.remote()
        return self.described[ref]

    async def _json(self, request: Request) -> Any:
        return codecs.parse_json(await self._body(request), request.headers.get("content-type", ""))

    async def _body(self, request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise ProtocolError(413, f"request body of {declared} bytes is over the limit of "
                                     f"{self.limits.max_body_bytes} bytes (kiln serve --max-body-mb)")
        # read as it arrives: a chunked body (no Content-Length) is refused at the limit, not
        # after the ingress has held all of it; a body trickled in is refused at the deadline
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.limits.max_body_bytes:
                    raise ProtocolError(413, f"request body is over the limit of {self.limits.max_body_bytes} "
                                             "bytes (kiln serve --max-body-mb)")
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except ClientDisconnect:  # the client's doing, not a failure of Kiln's: nginx's 499
            raise ProtocolError(CLIENT_CLOSED, f"the client closed the connection after {size} bytes "
                                               "of its body") from None
        except asyncio.TimeoutError:
            raise ProtocolError(408, f"the request body did not arrive within "
                                     f"{self.limits.body_timeout_s:g} s ({size} bytes came; kiln "
                                     "serve --body-timeout-s)") from None
        return b"".join(chunks)

    async def _call(self, ref: str, method: str, args: dict[str, Any]) -> dict[str, Any]:
        info = await self._describe(ref)
        if method not in info["methods"]:
            raise ProtocolError(404, f"model {ref} has no method '{method}'; methods: "
                                     f"{', '.join(sorted(info['methods']))}")
        self.limits.check(args, info["methods"][method]["inputs"])
        # numeric arrays travel to the replica as numpy (Ray pickles them far more cheaply than
        # lists); a list that is no numeric array is refused here, before it can join a batch
        for k, schema in info["methods"][method]["inputs"].items():
            if schema.get("type") == "array" and isinstance(args.get(k), list):
                bad = not_a_number(args[k])  # numpy would read true and "1" as numbers
                if bad is None:
                    try:
                        args[k] = np.asarray(args[k], dtype="float32")
                        continue
                    except (TypeError, ValueError, OverflowError, RecursionError):
                        pass
                found = "" if bad is None else f"; found {json.dumps(plain(bad))[:40]}"
                raise ProtocolError(400, f"argument '{k}' must be a numeric array of shape "
                                         f"{schema.get('x-shape')}{found}")
        # A request alone in flight for its model goes straight to the replica: waiting for a
        # batch to fill would only add --batch-wait-ms to every call of a lone client.
        batch = (ref in self.batching and method in info["batchable"] and len(args) == 1
                 and self.inflight.get(ref, 0) > 0)
        self.inflight[ref] = self.inflight.get(ref, 0) + 1
        try:
            deadline = self.limits.request_timeout_s or None
            return await asyncio.wait_for(self._send(ref, method, args, batch), deadline)
        except asyncio.TimeoutError:
            raise ProtocolError(504, f"{ref} did not answer {method} within {deadline:g} s (kiln serve "
                                     "--request-timeout-s); ask for less, or retry later") from None
        finally:
            self.inflight[ref] -= 1

    async def _send(self, ref: str, method: str, args: dict[str, Any], batch: bool) -> dict[str, Any]:
        # A replica that dies under a request (killed, out of memory, its node lost) fails the
        # requests it holds; Serve routes the next call to a live replica, so the ingress sends
        # the request again: with two replicas a death costs no request. Inference has no side
        # effects, so a retry is safe. Without a live replica left: 503 with Retry-After.
        for attempt in range(RETRIES + 1):
            try:
                if batch:
                    out = await self._batcher(ref)((method, args, time.perf_counter()))
                    if isinstance(out, ProtocolError):  # this request's failure in the batch
                        raise out
                    return out
                return await self.handles[ref].infer.remote(method, args, self.limits.max_values())
            except LoadError as e:
                raise ProtocolError(503, _cause(e), retry_after=RETRY_AFTER_S) from None
            except KilnError as e:
                raise ProtocolError(400, _cause(e)) from None
            except (pickle.PicklingError, RecursionError):  # 990 nested lists cannot travel
                raise ProtocolError(400, f"the arguments of {method} are nested too deeply to use") from None
            except Exception as e:  # noqa: BLE001 - only a replica's death is retried
                if not _replica_gone(e):
                    raise
                if attempt == RETRIES:
                    raise ProtocolError(503, f"the replica serving {ref} stopped while answering "
                                             f"({type(e).__name__}); Serve is starting another: "
                                             "retry shortly", retry_after=RETRY_AFTER_S) from None
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    def _batcher(self, ref: str) -> Any:
        """Requests for ``ref`` that arrive together (up to its batch size, within its wait)
        go to its replica as one ``infer_many`` call per method."""
        if ref not in self.batchers:
            size, wait_ms = self.batching[ref]
            handle = self.handles[ref]

            @serve.batch(max_batch_size=size, batch_wait_timeout_s=wait_ms / 1000.0,
                         max_concurrent_batches=4)  # the next batch goes while one runs
            async def run(items: list[tuple[str, dict[str, Any], float]]) -> list[dict[str, Any]]:
                now = time.perf_counter()
                for _, _, queued in items:
                    metrics.batch_wait(ref, now - queued)
                # one call per method in the batch, all in flight at once
                groups = {m: [k for k, (m2, _, _) in enumerate(items) if m2 == m] for m, _, _ in items}
                done = await asyncio.gather(*(handle.infer_many.remote(m, [items[k][1] for k in ks],
                                                                       self.limits.max_values())
                                              for m, ks in groups.items()))
                out: list[dict[str, Any]] = [{} for _ in items]
                for ks, results in zip(groups.values(), done):
                    for k, result in zip(ks, results):
                        out[k] = result
                return out

            self.batchers[ref] = run
        return self.batchers[ref]

    # -- stopping -----------------------------------------------------------------------------
    @api.post("/-/drain", include_in_schema=False)
    async def drain(self, request: Request) -> Any:
        """Stop taking requests (``Drain``) and wait, at most the query's ``timeout_s``
        (``kiln.serve.app.DRAIN_S``), for those in flight to be answered. The server that started this application calls it before Serve shuts
        down, with the key it gave this ingress; to anyone else the route does not exist. HTTP,
        not a Serve handle: a handle in the stopping process left a call to Serve's controller
        open, which Ray reported as a failed task once the controller stopped."""
        given = request.headers.get("kiln-drain-key", "")
        if not self.drain_key or not hmac.compare_digest(given.encode(), self.drain_key.encode()):
            raise ProtocolError(404, f"no route POST {request.url.path}; see GET /models and /docs")
        Drain.stopping = True
        deadline = time.monotonic() + float(request.query_params["timeout_s"])
        while Drain.active > 1 and time.monotonic() < deadline:  # this request is one of them
            await asyncio.sleep(0.05)
        return {"unanswered": Drain.active - 1}

    # -- the gallery (public: the page asks for the token and sends it with each call) -------
    @api.get("/", include_in_schema=False)
    async def gallery_page(self, request: Request) -> Response:
        if not request.url.path.endswith("/"):  # /secure -> /secure/: the page's links are relative
            return RedirectResponse(request.url.path + "/")
        return self._static("index.html")

    @api.get("/gallery/{name}", include_in_schema=False)
    async def gallery_file(self, name: str) -> Response:
        return self._static(name)

    def _static(self, name: str) -> Response:
        path = GALLERY / name
        if "/" in name or path.suffix not in GALLERY_TYPES or not path.is_file():
            raise ProtocolError(404, f"no gallery file '{name}'")
        return Response(path.read_bytes(), media_type=GALLERY_TYPES[path.suffix],
                        headers={"Cache-Control": "no-cache"})

    # -- the API's description: every served method with its own argument schema ------------
    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_document(self, request: Request) -> Any:
        return openapi(self.methods, self.limits.max_items)

    @api.get("/docs", include_in_schema=False)
    async def docs_page(self, request: Request) -> Response:
        """Swagger UI; its script and style come from FastAPI's default CDN (jsdelivr), which an
        offline site cannot reach: /openapi.json is the same description as plain JSON."""
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="openapi.json", title="Kiln API")

    @api.get("/metrics", include_in_schema=False)
    async def prometheus(self, request: Request) -> Response:
        """Prometheus metrics of every replica on every node (kiln.serve.metrics); needs the
        token when one is set (the series name every served model)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await asyncio.to_thread(metrics.gather), media_type=CONTENT_TYPE_LATEST)

    # -- Kiln routes ------------------------------------------------------------------------
    @api.get("/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """Served models: versions, plugin, dataset, metrics, methods and input schemas."""
        states = await self._states()
        failed = self._failed()
        out = []
        for ref in sorted(r for r in self.handles if r not in failed):
            entry = {"ref": ref, "state": "READY" if states.get(ref) == "HEALTHY" else "LOADING",
                     "shared": self.handles[ref].deployment_name == POOL}
            if entry["state"] == "READY":  # fresh: it carries live counters
                entry.update(await self.handles[ref].describe.remote())
                if ref not in self.batching:
                    entry["batchable"] = []
            out.append(entry)
        out += [{"ref": ref, "name": routing.name_of(ref), "version": routing.version_of(ref), "state": "FAILED",
                 "error": why} for ref, why in sorted(failed.items())]
        traffic = {}
        for name in sorted(self.traffic):
            rows = await self._split(name)
            total = sum(w for _, ref, w in rows if ref) or 1
            traffic[name] = [{"to": e, "answering": ref, "weight": w,
                              "percent": round(100.0 * w / total, 2) if ref else 0.0} for e, ref, w in rows]
        return {"models": out, "traffic": traffic}

    @api.get("/models/{model}/artifacts/{name}", response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    @api.get("/models/{model}/versions/{version}/artifacts/{name}", response_class=Response,
             responses={200: {"content": {"image/png": {}}}})
    async def artifact(self, model: str, name: str, request: Request, version: Optional[str] = None) -> Response:
        """A stored picture of a served version (sample grids, reconstructions, curves...; names:
        GET /models, 'artifacts'); the latest version without /versions/{version}."""
        ref = await self._ref(model, version)
        await self._ready(ref)
        try:
            data = await self.handles[ref].artifact.remote(name)
        except KilnError as e:
            raise ProtocolError(404, _cause(e)) from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    # not in /openapi.json: it lists each served method as a path of its own, with its arguments
    @api.post("/models/{model}/{method}", include_in_schema=False)
    @api.post("/models/{model}/versions/{version}/{method}", include_in_schema=False)
    async def call(self, model: str, method: str, request: Request, response: Response,
                   version: Optional[str] = None) -> Any:
        body = await self._json(request)
        ref = await self._ref(model, version, split=True)
        # for the metrics (kiln.serve.metrics.Measure); a made-up method name is no series of its own
        request.scope["kiln"] = (ref, method if method in self.methods.get(ref, {}) else "")
        response.headers[VERSION_HEADER] = ref  # which version answered (a label, the split or the latest)
        if not isinstance(body, dict):
            raise ProtocolError(400, "the body must be a JSON object of the method's arguments")
        fmt = body.pop("format", None)
        if fmt not in (None, "json", "png"):
            raise ProtocolError(400, f"'format' must be 'json' or 'png', got {fmt!r}")
        png = fmt == "png" or "image/png" in request.headers.get("accept", "")
        out = await self._call(ref, method, body)
        if not png:
            return json_answer(out, ref)
        if "images" not in out:
            raise ProtocolError(406, f"{ref} '{method}' returns no images ({', '.join(out)}); ask for JSON")
        from kiln.images import png_grid

        return Response(png_grid(np.asarray(out["images"])), media_type="image/png", headers={VERSION_HEADER: ref})

    # -- TF Serving REST --------------------------------------------------------------------
    @api.post("/v1/models/{model}:predict")
    @api.post("/v1/models/{model}/versions/{version}:predict")
    @api.post("/v1/models/{model}/labels/{label}:predict")
    async def tf_predict(self, model: str, request: Request, response: Response, version: Optional[str] = None,
                         label: Optional[str] = None) -> Any:
        body = await self._json(request)
        ref = await self._ref(model, version, label, split=True)
        response.headers[VERSION_HEADER] = ref
        info = await self._describe(ref)
        method, arg = codecs.tf_signature(body, info)
        request.scope["kiln"] = (ref, method)
        schema = info["methods"][method]["inputs"][arg]
        sent = body.get("instances", body.get("inputs")) if isinstance(body, dict) else None
        # before any {"b64": ...} picture is decoded
        self.limits.check({arg: sent.get(arg) if isinstance(sent, dict) else sent}, {arg: schema})
        data, rows = codecs.tf_predict_request(body, arg, schema["x-shape"])
        out = await self._call(ref, method, {arg: data})
        return json_answer(codecs.tf_predict_response(out, rows, len(data) if isinstance(data, list) else 1), ref)

    @api.post("/v1/models/{model}:{verb}")
    @api.post("/v1/models/{model}/versions/{version}:{verb}")
    @api.post("/v1/models/{model}/labels/{label}:{verb}")
    async def tf_examples(self, model: str, verb: str, request: Request, response: Response,
                          version: Optional[str] = None, label: Optional[str] = None) -> Any:
        """TF Serving's :classify and :regress, on tf.Example-style JSON features."""
        if verb not in ("classify", "regress"):  # TF Serving has no such API: no such route
            raise ProtocolError(404, f"TF Serving's REST API has :predict, :classify and :regress, "
                                     f"not :{verb}; use POST .../{model}:predict")
        body = await self._json(request)
        ref = await self._ref(model, version, label, split=True)
        response.headers[VERSION_HEADER] = ref
        info = await self._describe(ref)
        method, arg = codecs.predict_method(info)
        if verb == "regress" or method != "classify" or not info.get("class_names"):
            # TF Serving answers a signature of the wrong kind with 400 too
            kind = "regression" if verb == "regress" else "classification"
            raise ProtocolError(400, f"{ref} offers no {kind} signature; use POST .../{model}:predict")
        request.scope["kiln"] = (ref, method)
        schema = info["methods"][method]["inputs"][arg]
        # counted before any {"b64": ...} picture is decoded
        self.limits.check({arg: body.get("examples") if isinstance(body, dict) else None}, {arg: schema})
        out = await self._call(ref, method, {arg: codecs.tf_examples(body, arg, schema["x-shape"])})
        return json_answer(codecs.tf_classify_response(out, info["class_names"]), ref)

    @api.get("/v1/models/{model}")
    @api.get("/v1/models/{model}/versions/{version}")
    @api.get("/v1/models/{model}/labels/{label}")
    async def tf_status(self, model: str, request: Request, version: Optional[str] = None,
                        label: Optional[str] = None) -> Any:
        if ":" in model or ":" in (label or ""):  # GET .../m:predict
            verb = (label or model).partition(":")[2]
            raise ProtocolError(405, f"{verb!r} takes POST with a JSON body, not GET")
        if label is not None:
            version = str(routing.version_of(await self._ref(model, None, label)))
        refs = [await self._ref(model, version)] if version else (self._versions(model) or [await self._ref(model, None)])
        states = await self._states()
        return codecs.tf_status([(str(routing.version_of(r)), states.get(r) == "HEALTHY") for r in refs])

    @api.get("/v1/models/{model}/metadata")
    @api.get("/v1/models/{model}/versions/{version}/metadata")
    @api.get("/v1/models/{model}/labels/{label}/metadata")
    async def tf_metadata(self, model: str, request: Request, version: Optional[str] = None,
                          label: Optional[str] = None) -> Any:
        ref = await self._ref(model, version, label)
        return codecs.tf_metadata(model, str(routing.version_of(ref)), await self._describe(ref))

    # -- Open Inference Protocol v2 ---------------------------------------------------------
    @api.get("/v2")
    async def v2_server(self, request: Request) -> Any:
        from kiln import __version__

        return {"name": "kiln", "version": __version__, "extensions": ["kiln-methods"]}

    @api.get("/v2/health/live")
    async def v2_live(self) -> Any:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def v2_ready(self) -> Any:
        states = await self._states()
        # a version that failed to load is no version still loading: it must not hold the server's
        # readiness back (the default layout's are outside ``handles``; --colocate's, until a poll)
        failed = self._failed()
        loading = sorted(r for r, s in states.items() if s != "HEALTHY" and r not in failed)
        if loading:
            return JSONResponse({"ready": False, "error": f"loading: {', '.join(loading)}"},
                                status_code=503)
        return {"ready": True}

    @api.get("/v2/models/{model}")
    @api.get("/v2/models/{model}/versions/{version}")
    async def v2_model(self, model: str, request: Request, version: Optional[str] = None) -> Any:
        ref = await self._ref(model, version)
        return codecs.v2_model_metadata(model, [str(routing.version_of(r)) for r in self._versions(model)],
                                        await self._describe(ref))

    @api.get("/v2/models/{model}/ready")
    @api.get("/v2/models/{model}/versions/{version}/ready")
    async def v2_model_ready(self, model: str, request: Request, version: Optional[str] = None) -> Any:
        ref = await self._ref(model, version)
        ready = (await self._states()).get(ref) == "HEALTHY"
        return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 503)

    @api.post("/v2/models/{model}/infer")
    @api.post("/v2/models/{model}/versions/{version}/infer")
    async def v2_infer(self, model: str, request: Request, response: Response,
                       version: Optional[str] = None) -> Any:
        raw = await self._body(request)
        header, binary = codecs.v2_split(raw, request.headers.get(codecs.HEADER_LENGTH))
        body = codecs.parse_json(header, "application/json" if binary else request.headers.get("content-type", ""))
        ref = await self._ref(model, version, split=True)
        response.headers[VERSION_HEADER] = ref
        info = await self._describe(ref)
        method, arg = codecs.predict_method(info)
        request.scope["kiln"] = (ref, method)
        data = codecs.v2_infer_request(body, codecs.v2_input(info), binary)
        chosen = codecs.v2_outputs(body, list(info["methods"][method]["outputs"]))
        out = await self._call(ref, method, {arg: data})
        content, tail = codecs.v2_infer_response(out, model, str(routing.version_of(ref)), body.get("id"), chosen)
        if not tail:
            return json_answer(content, ref)
        head = orjson.dumps(content)
        return Response(head + tail, media_type="application/octet-stream",
                        headers={codecs.HEADER_LENGTH: str(len(head)), VERSION_HEADER: ref})
