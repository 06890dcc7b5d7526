"""Kiln's HTTP API, one FastAPI ingress in front of the model deployments (kiln.serve.app).

Routes (docs/design.md, "Data flow"; the README lists them):

* Kiln: ``GET /models``; ``POST /models/{m}[/versions/{v}]/{method}`` with the method's arguments as
  a JSON object, answered with its outputs as a JSON object.
* TF Serving REST: ``POST /v1/models/{m}[/versions/{v}]:predict`` (row ``instances`` or column
  ``inputs``; ``{"b64": ...}`` for an encoded image), ``GET /v1/models/{m}[/versions/{v}]``,
  ``GET /v1/models/{m}/metadata``.
* Open Inference Protocol v2: ``GET /v2``, ``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/{m}[/versions/{v}]``, ``.../ready``, ``POST .../infer``.

``:predict`` and ``infer`` call the model's *predict method*: its first inference method, in the
order classify, reconstruct, encode, decode, with exactly one array input. Every error is a JSON
body ``{"error": "..."}``: 400 bad input, 401 no or wrong token, 404 unknown model, version or
method, 413 body too large, 415 not JSON, 503 model still loading.
"""

# No `from __future__ import annotations` here: FastAPI reads these route signatures' types at
# run time (a string annotation `Request` inside the Serve class view is not resolved).

import asyncio
import base64
import hmac
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from kiln.plugin import KilnError

PREDICT_ORDER = ("classify", "reconstruct", "encode", "decode")
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")
GALLERY = Path(__file__).resolve().parent / "gallery"   # the web page at /, static files only
GALLERY_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8"}

api = FastAPI(title="Kiln", description="Kiln model server: Kiln, TF Serving REST and Open "
              "Inference Protocol v2 routes for every stored model it serves.")


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@api.exception_handler(HTTPError)
async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


@api.exception_handler(KilnError)
async def _kiln_error(request: Request, exc: KilnError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=400)


@api.exception_handler(404)
async def _not_found(request: Request, exc: Any) -> JSONResponse:
    return JSONResponse({"error": f"no route {request.method} {request.url.path}; see GET /models "
                                  "and /docs"}, status_code=404)


@api.exception_handler(405)
async def _bad_method(request: Request, exc: Any) -> JSONResponse:
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path}"},
                        status_code=405)


def _ingress_class() -> Any:
    from ray import serve

    @serve.ingress(api)
    class KilnIngress:
        def __init__(self, models: dict[str, Any], max_body_bytes: int, token: str | None,
                     methods: dict[str, dict[str, Any]] | None = None,
                     batching: dict[str, tuple[int, float]] | None = None) -> None:
            self.handles = models                       # "name:version" -> DeploymentHandle
            # "name:version" -> (most requests in one model call, ms a batch waits to fill)
            self.batching = {r: b for r, b in (batching or {}).items() if b[0] > 1}
            self.batchers: dict[str, Any] = {}
            self.max_body = max_body_bytes
            self.token = token
            self.described: dict[str, dict[str, Any]] = {}
            self._status: tuple[float, dict[str, str]] = (0.0, {})
            self._status_lock = asyncio.Lock()
            self.app_name = serve.get_replica_context().app_name
            # /openapi.json and /docs list every served method with its own argument schema
            api.openapi_schema = None
            api.openapi = lambda: openapi(methods or {})  # type: ignore[method-assign]

        # -- plumbing ---------------------------------------------------------------------
        def _check_auth(self, request: Request) -> None:
            if self.token is None or request.url.path.endswith(OPEN_PATHS):
                return
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                raise HTTPError(401, "missing or wrong token: send the header "
                                     "'Authorization: Bearer <KILN_API_TOKEN>'")

        async def _states(self) -> dict[str, str]:
            """Deployment status by model ref, refreshed at most every half second.

            The controller is asked in a thread, one call at a time, so that health probes never
            stall the requests in flight. Not ``serve.status()``: it builds pydantic models of the
            whole Serve instance, 28 ms of this process's CPU per call, during which this event
            loop answered nothing; the controller's plain answer takes 6 ms, mostly waiting."""
            if time.monotonic() - self._status[0] > 0.5:
                async with self._status_lock:  # probes arriving together share one call
                    if time.monotonic() - self._status[0] > 0.5:
                        details = await asyncio.to_thread(_serve_details)
                        deps = details.get("applications", {}).get(self.app_name, {}).get("deployments", {})
                        states = {}
                        for ref, handle in self.handles.items():
                            d = deps.get(handle.deployment_name, {"status": "UNKNOWN"})
                            states[ref] = str(getattr(d["status"], "value", d["status"]))
                        self._status = (time.monotonic(), states)
            return self._status[1]

        def _ref(self, model: str, version: str | None) -> str:
            served = sorted((r for r in self.handles if r.split(":")[0] == model),
                            key=lambda r: int(r.split(":")[1]))
            if not served:
                raise HTTPError(404, f"model '{model}' is not served; served models: "
                                     f"{', '.join(sorted({r.split(':')[0] for r in self.handles}))}")
            if version is None:
                return served[-1]
            ref = f"{model}:{version}"
            if ref not in served:
                raise HTTPError(404, f"model '{model}' has no served version {version!r}; served "
                                     f"versions: {', '.join(r.split(':')[1] for r in served)}")
            return ref

        async def _ready(self, ref: str) -> None:
            state = (await self._states()).get(ref)
            if state != "HEALTHY":
                raise HTTPError(503, f"model {ref} is loading ({state}); retry in a few seconds")

        async def _describe(self, ref: str) -> dict[str, Any]:
            if ref not in self.described:
                await self._ready(ref)
                self.described[ref] = await self.handles[ref].describe.remote()
            return self.described[ref]

        async def _json(self, request: Request) -> Any:
            self._check_auth(request)
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() != "application/json":
                raise HTTPError(415, f"send JSON with 'Content-Type: application/json' (got "
                                     f"{ctype or 'no content type'!r})")
            size = request.headers.get("content-length")
            if size is not None and size.isdigit() and int(size) > self.max_body:
                raise HTTPError(413, f"request body of {size} bytes is over the limit of "
                                     f"{self.max_body} bytes (kiln serve --max-body-mb)")
            body = await request.body()
            if len(body) > self.max_body:
                raise HTTPError(413, f"request body is over the limit of {self.max_body} bytes "
                                     "(kiln serve --max-body-mb)")
            try:  # orjson: 7x faster than json on a 256-image body (BENCHMARKS.md)
                return orjson.loads(body)
            except orjson.JSONDecodeError:
                pass
            # what orjson refuses, the standard parser either words clearly (NaN, a missing comma,
            # nesting too deep) or reads (integers over 64 bits)
            try:
                return json.loads(body, parse_constant=_no_constant)
            except (ValueError, RecursionError) as e:
                raise HTTPError(400, f"malformed JSON: {e}") from None

        async def _call(self, ref: str, method: str, args: dict[str, Any]) -> dict[str, Any]:
            info = await self._describe(ref)
            if method not in info["methods"]:
                raise HTTPError(404, f"model {ref} has no method '{method}'; methods: "
                                     f"{', '.join(sorted(info['methods']))}")
            # numeric arrays travel to the replica as numpy (Ray pickles them cheaply; 2x faster on a
            # 256-image request than lists); anything else is left for the replica to reject clearly
            for k, schema in info["methods"][method]["inputs"].items():
                if schema.get("type") == "array" and isinstance(args.get(k), list):
                    try:
                        args[k] = np.asarray(args[k], dtype="float32")
                    except (TypeError, ValueError):
                        pass
            try:
                if ref in self.batching and method in info["batchable"] and len(args) == 1:
                    out = await self._batcher(ref)((method, args))
                    if "__kiln_error__" in out:
                        raise KilnError(out["__kiln_error__"])
                    return out
                return await self.handles[ref].infer.remote(method, args)
            except KilnError as e:
                raise HTTPError(400, str(e).splitlines()[-1].split("KilnError: ")[-1]) from None

        def _batcher(self, ref: str) -> Any:
            """Requests for ``ref`` that arrive together (up to its batch size, within its wait)
            go to its replica as one ``infer_many`` call per method."""
            if ref not in self.batchers:
                size, wait_ms = self.batching[ref]
                handle = self.handles[ref]

                @serve.batch(max_batch_size=size, batch_wait_timeout_s=wait_ms / 1000.0,
                             max_concurrent_batches=4)  # the next batch goes while one runs
                async def run(items: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
                    # one call per method in the batch, all in flight at once
                    groups = {m: [k for k, (m2, _) in enumerate(items) if m2 == m] for m, _ in items}
                    done = await asyncio.gather(*(handle.infer_many.remote(m, [items[k][1] for k in ks])
                                                  for m, ks in groups.items()))
                    out: list[dict[str, Any]] = [{} for _ in items]
                    for ks, results in zip(groups.values(), done):
                        for k, result in zip(ks, results):
                            out[k] = result
                    return out

                self.batchers[ref] = run
            return self.batchers[ref]

        def _predict_method(self, info: dict[str, Any]) -> tuple[str, str]:
            for name in PREDICT_ORDER:
                m = info["methods"].get(name)
                if m:
                    arrays = [k for k, s in m["inputs"].items() if s["type"] == "array" and not s.get("x-optional")]
                    if len(arrays) == 1:
                        return name, arrays[0]
            raise HTTPError(404, f"model {info['name']}:{info['version']} has no predict method "
                                 f"(one of {', '.join(PREDICT_ORDER)}); use POST /models/{info['name']}/<method>")

        # -- the gallery (public: the page asks for the token and sends it with each call) ---
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
                raise HTTPError(404, f"no gallery file '{name}'")
            return Response(path.read_bytes(), media_type=GALLERY_TYPES[path.suffix],
                            headers={"Cache-Control": "no-cache"})

        # -- Kiln routes ------------------------------------------------------------------
        @api.get("/models")
        async def models(self, request: Request) -> dict[str, Any]:
            """Served models: versions, plugin, dataset, metrics, methods and input schemas."""
            self._check_auth(request)
            states = await self._states()
            out = []
            for ref in sorted(self.handles):
                entry = {"ref": ref, "state": "READY" if states.get(ref) == "HEALTHY" else "LOADING"}
                if entry["state"] == "READY":  # fresh: it carries live counters
                    entry.update(await self.handles[ref].describe.remote())
                    if ref not in self.batching:
                        entry["batchable"] = []
                out.append(entry)
            return {"models": out}

        @api.get("/models/{model}/artifacts/{name}", response_class=Response,
                 responses={200: {"content": {"image/png": {}}}})
        async def artifact_latest(self, model: str, name: str, request: Request) -> Response:
            """A stored picture of the latest served version (names: GET /models, 'artifacts')."""
            return await self._artifact(request, model, None, name)

        @api.get("/models/{model}/versions/{version}/artifacts/{name}", response_class=Response,
                 responses={200: {"content": {"image/png": {}}}})
        async def artifact_version(self, model: str, version: str, name: str, request: Request) -> Response:
            """A stored picture of one served version (sample grids, reconstructions, curves...)."""
            return await self._artifact(request, model, version, name)

        async def _artifact(self, request: Request, model: str, version: str | None, name: str) -> Response:
            self._check_auth(request)
            ref = self._ref(model, version)
            await self._ready(ref)
            try:
                data = await self.handles[ref].artifact.remote(name)
            except KilnError as e:
                raise HTTPError(404, str(e).splitlines()[-1].split("KilnError: ")[-1]) from None
            return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

        @api.post("/models/{model}/{method}")
        async def call_latest(self, model: str, method: str, request: Request) -> Any:
            return await self._kiln_call(request, model, None, method)

        @api.post("/models/{model}/versions/{version}/{method}")
        async def call_version(self, model: str, version: str, method: str, request: Request) -> Any:
            return await self._kiln_call(request, model, version, method)

        async def _kiln_call(self, request: Request, model: str, version: str | None, method: str) -> Any:
            body = await self._json(request)
            ref = self._ref(model, version)
            if not isinstance(body, dict):
                raise HTTPError(400, "the body must be a JSON object of the method's arguments")
            fmt = body.pop("format", None)
            if fmt not in (None, "json", "png"):
                raise HTTPError(400, f"'format' must be 'json' or 'png', got {fmt!r}")
            png = fmt == "png" or "image/png" in request.headers.get("accept", "")
            out = await self._call(ref, method, body)
            if not png:
                return out
            if "images" not in out:
                raise HTTPError(406, f"{ref} '{method}' returns no images ({', '.join(out)}); ask for JSON")
            from kiln.images import png_grid

            return Response(png_grid(np.asarray(out["images"])), media_type="image/png")

        # -- TF Serving REST --------------------------------------------------------------
        @api.post("/v1/models/{model}:predict")
        async def tf_predict(self, model: str, request: Request) -> Any:
            return await self._tf_predict(request, model, None)

        @api.post("/v1/models/{model}/versions/{version}:predict")
        async def tf_predict_version(self, model: str, version: str, request: Request) -> Any:
            return await self._tf_predict(request, model, version)

        async def _tf_predict(self, request: Request, model: str, version: str | None) -> Any:
            body = await self._json(request)
            ref = self._ref(model, version)
            info = await self._describe(ref)
            method, arg = self._predict_method(info)
            if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
                raise HTTPError(400, "send exactly one of 'instances' (row format) or 'inputs' "
                                     "(column format)")
            rows = "instances" in body
            data = body["instances"] if rows else body["inputs"]
            if isinstance(data, dict):
                if set(data) != {arg}:
                    raise HTTPError(400, f"named inputs must be exactly {{'{arg}'}}; got {sorted(data)}")
                data = data[arg]
            # {"images": ...} rows are named inputs; a bare {"b64": ...} row is the value itself
            rows_as_list = data if rows and isinstance(data, list) else []
            if any(isinstance(r, dict) and set(r) != {"b64"} for r in rows_as_list):
                if any(set(r) != {arg} for r in data if isinstance(r, dict)):
                    raise HTTPError(400, f"each instance must have exactly the key '{arg}'")
                data = [r[arg] if isinstance(r, dict) else r for r in data]
            data = _decode_b64(data, info)
            out = await self._call(ref, method, {arg: data})
            if not rows:
                return {"outputs": out}
            n = len(data) if isinstance(data, list) else 1
            per_row = {k: v for k, v in out.items() if isinstance(v, list) and len(v) == n}
            return {"predictions": [{k: v[i] for k, v in per_row.items()} for i in range(n)]}

        @api.get("/v1/models/{model}")
        async def tf_status(self, model: str, request: Request) -> Any:
            return await self._tf_status(request, model, None)

        @api.get("/v1/models/{model}/versions/{version}")
        async def tf_status_version(self, model: str, version: str, request: Request) -> Any:
            return await self._tf_status(request, model, version)

        async def _tf_status(self, request: Request, model: str, version: str | None) -> Any:
            self._check_auth(request)
            refs = [self._ref(model, version)] if version else \
                [r for r in self.handles if r.split(":")[0] == model] or [self._ref(model, None)]
            states = await self._states()
            return {"model_version_status": [
                {"version": r.split(":")[1], "state": "AVAILABLE" if states.get(r) == "HEALTHY" else "LOADING",
                 "status": {"error_code": "OK", "error_message": ""}} for r in sorted(refs)]}

        @api.get("/v1/models/{model}/metadata")
        async def tf_metadata(self, model: str, request: Request) -> Any:
            self._check_auth(request)
            ref = self._ref(model, None)
            info = await self._describe(ref)
            method, arg = self._predict_method(info)
            m = info["methods"][method]
            return {"model_spec": {"name": model, "version": ref.split(":")[1], "signature_name": method},
                    "metadata": {"signature_def": {"signature_def": {"serving_default": {
                        "method_name": method, "inputs": m["inputs"], "outputs": m["outputs"]}}}}}

        # -- Open Inference Protocol v2 ---------------------------------------------------
        @api.get("/v2")
        async def v2_server(self, request: Request) -> Any:
            self._check_auth(request)
            from kiln import __version__

            return {"name": "kiln", "version": __version__, "extensions": ["kiln-methods"]}

        @api.get("/v2/health/live")
        async def v2_live(self) -> Any:
            return {"live": True}

        @api.get("/v2/health/ready")
        async def v2_ready(self) -> Any:
            states = await self._states()
            loading = sorted(r for r, s in states.items() if s != "HEALTHY")
            if loading:
                return JSONResponse({"ready": False, "error": f"loading: {', '.join(loading)}"},
                                    status_code=503)
            return {"ready": True}

        @api.get("/v2/models/{model}")
        async def v2_model(self, model: str, request: Request) -> Any:
            return await self._v2_model(request, model, None)

        @api.get("/v2/models/{model}/versions/{version}")
        async def v2_model_version(self, model: str, version: str, request: Request) -> Any:
            return await self._v2_model(request, model, version)

        async def _v2_model(self, request: Request, model: str, version: str | None) -> Any:
            self._check_auth(request)
            ref = self._ref(model, version)
            info = await self._describe(ref)
            method, arg = self._predict_method(info)
            schema = info["methods"][method]["inputs"][arg]
            return {"name": model, "versions": [r.split(":")[1] for r in sorted(self.handles)
                                                if r.split(":")[0] == model],
                    "platform": f"kiln-{info['plugin']}",
                    "inputs": [{"name": arg, "datatype": "FP32",
                                "shape": [-1 if s is None else s for s in schema["x-shape"]]}],
                    "outputs": [{"name": k} for k in info["methods"][method]["outputs"]]}

        @api.get("/v2/models/{model}/ready")
        async def v2_model_ready(self, model: str, request: Request) -> Any:
            return await self._v2_ready(request, model, None)

        @api.get("/v2/models/{model}/versions/{version}/ready")
        async def v2_model_version_ready(self, model: str, version: str, request: Request) -> Any:
            return await self._v2_ready(request, model, version)

        async def _v2_ready(self, request: Request, model: str, version: str | None) -> Any:
            self._check_auth(request)
            ref = self._ref(model, version)
            ready = (await self._states()).get(ref) == "HEALTHY"
            return JSONResponse({"name": model, "ready": ready}, status_code=200 if ready else 503)

        @api.post("/v2/models/{model}/infer")
        async def v2_infer(self, model: str, request: Request) -> Any:
            return await self._v2_infer(request, model, None)

        @api.post("/v2/models/{model}/versions/{version}/infer")
        async def v2_infer_version(self, model: str, version: str, request: Request) -> Any:
            return await self._v2_infer(request, model, version)

        async def _v2_infer(self, request: Request, model: str, version: str | None) -> Any:
            body = await self._json(request)
            ref = self._ref(model, version)
            info = await self._describe(ref)
            method, arg = self._predict_method(info)
            inputs = body.get("inputs") if isinstance(body, dict) else None
            if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
                raise HTTPError(400, f"'inputs' must be a list of one tensor "
                                     f"{{'name': '{arg}', 'shape': [...], 'datatype': 'FP32', 'data': [...]}}")
            t = inputs[0]
            if t.get("name") not in (arg, None):
                raise HTTPError(400, f"input is named {t.get('name')!r}; this model's input is '{arg}'")
            shape, flat = t.get("shape"), t.get("data")
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                raise HTTPError(400, "'shape' must be a list of non-negative integers")
            try:
                array = np.asarray(flat, dtype="float64").reshape(shape)
            except (TypeError, ValueError) as e:
                raise HTTPError(400, f"'data' does not fill shape {shape}: {e}") from None
            out = await self._call(ref, method, {arg: array.astype("float32")})
            outputs = []
            for name, value in out.items():
                arr = np.asarray(value)
                kind = "BYTES" if arr.dtype.kind in "USO" else ("INT64" if arr.dtype.kind in "iu" else "FP32")
                outputs.append({"name": name, "shape": list(arr.shape), "datatype": kind,
                                "data": arr.ravel().tolist()})
            return {"model_name": model, "model_version": ref.split(":")[1],
                    "id": body.get("id"), "outputs": outputs}

    return KilnIngress


def openapi(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """FastAPI's OpenAPI document plus one operation per served model method (latest and each
    version), with the method's arguments as the request body's JSON schema."""
    if api.openapi_schema is not None:
        return api.openapi_schema
    from fastapi.openapi.utils import get_openapi

    schema = get_openapi(title=api.title, version=api.version, description=api.description,
                         routes=api.routes, servers=api.servers or None)
    latest: dict[str, int] = {}
    for ref in methods:
        name, version = ref.split(":")
        latest[name] = max(latest.get(name, 0), int(version))
    for ref, ms in sorted(methods.items()):
        name, version = ref.split(":")
        for method, d in sorted(ms.items()):
            op = _operation(name, version, method, d)
            schema["paths"][f"/models/{name}/versions/{version}/{method}"] = {"post": op}
            if int(version) == latest[name]:
                schema["paths"][f"/models/{name}/{method}"] = {
                    "post": {**op, "operationId": f"{name}_{method}",
                             "summary": f"{op['summary']} (latest version, {version})"}}
    api.openapi_schema = schema
    return schema


def _operation(name: str, version: str, method: str, d: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for arg, s in d.get("inputs", {}).items():
        if s.get("type") == "array":  # JSON Schema bounds are for numbers: keep them as x- keys
            prop = {"type": "array", "items": {}, "description": s.get("description") or "",
                    "x-shape": s.get("x-shape"), "x-dtype": s.get("x-dtype"),
                    "x-minimum": s.get("minimum"), "x-maximum": s.get("maximum")}
        else:
            prop = dict(s)
        props[arg] = {k: v for k, v in prop.items() if v is not None}
    required = [a for a, s in d.get("inputs", {}).items() if s.get("default") is None and not s.get("x-optional")]
    outputs = d.get("outputs", {})
    if "images" in outputs:
        props["format"] = {"type": "string", "enum": ["json", "png"], "default": "json",
                           "description": "png: the images output as one PNG grid"}
    content: dict[str, Any] = {"application/json": {"schema": {
        "type": "object", "properties": {k: {"description": v} for k, v in outputs.items()}}}}
    if "images" in outputs:
        content["image/png"] = {}
    error = {"content": {"application/json": {"schema": {
        "type": "object", "properties": {"error": {"type": "string"}}}}}}
    return {
        "tags": [name], "summary": f"{name} v{version} {method}: {d.get('doc', '')}",
        "operationId": f"{name}_v{version}_{method}",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": props, "required": required, "additionalProperties": False}}}},
        "responses": {"200": {"description": "; ".join(f"{k}: {v}" for k, v in outputs.items()),
                              "content": content},
                      "400": {"description": "bad arguments", **error},
                      "404": {"description": "unknown model, version or method", **error},
                      "503": {"description": "the model is still loading", **error}},
    }


def _serve_details() -> dict[str, Any]:
    """The Serve controller's description of every application, as plain dicts (the call under
    ``serve.status()``, without its pydantic models; Ray is pinned to 2.60 in pyproject.toml)."""
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (send finite numbers)")


def _decode_b64(data: Any, info: dict[str, Any]) -> Any:
    """Replace ``{"b64": "<PNG or JPEG>"}`` items with pixel arrays shaped like the model's input."""
    def one(item: Any) -> Any:
        if isinstance(item, dict) and set(item) == {"b64"}:
            from PIL import Image

            try:
                img = Image.open(io.BytesIO(base64.b64decode(item["b64"], validate=True)))
                img.load()
            except Exception as e:  # noqa: BLE001 - any decoding failure is the client's input
                raise HTTPError(400, f"'b64' is not a base64-encoded PNG or JPEG image: {e}") from None
            return np.asarray(img.convert("L"), dtype="float32")[..., None].tolist()
        return item

    if isinstance(data, list):
        return [one(d) for d in data]
    return one(data)


KilnIngress = _ingress_class()
