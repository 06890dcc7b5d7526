"""Kiln's OpenAPI document: FastAPI's description of the ingress's routes, completed with what
FastAPI cannot know (every status a route answers, with the JSON error object; the protocols'
request bodies) and one operation per served model method, typed from the plugin's ``@inference``
schemas and the server's limits. Pure functions: the ingress builds the document once per set of
served models; tests/test_serve.py has schemathesis check the server against it."""

from __future__ import annotations

from typing import Any

from kiln.serve import routing

ERROR = {"$ref": "#/components/schemas/Error"}
ERROR_SCHEMA = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"],
                "description": "what was wrong, and how to fix it"}

# what each kind of route can answer besides 200, and why
ALWAYS = {"503": "the server is stopping, or the model is still loading (see Retry-After)"}
MODEL = {"404": "no such model, version, label, method or picture on this server"}
BODY = {"400": "the body breaks the method's arguments or the server's limits",
        "408": "the body did not arrive within the server's time (kiln serve --body-timeout-s)",
        "413": "the body is over the server's size limit (kiln serve --max-body-mb)",
        "415": "the body is not JSON",
        "504": "the model did not answer in time (kiln serve --request-timeout-s)"}
TOKEN = {"401": "a token is set and the request lacks it: send 'Authorization: Bearer <token>'"}

TF_PREDICT = {"type": "object", "description": "TF Serving's predict request: the row form "
              "(instances) or the columnar form (inputs)", "properties": {
                  "signature_name": {"type": "string"},
                  "instances": {"type": "array", "minItems": 1, "items": {}},
                  "inputs": {}}}
V2_INFER = {"type": "object", "description": "the Open Inference Protocol's inference request",
            "required": ["inputs"], "properties": {
                "id": {"type": "string"}, "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": {
                    "type": "object", "required": ["name", "shape", "datatype", "data"], "properties": {
                        "name": {"type": "string"}, "datatype": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "parameters": {"type": "object"}, "data": {"type": "array", "items": {}}}}},
                "outputs": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}}}}}}
TF_EXAMPLES = {"type": "object", "description": "TF Serving's classify or regress request",
               "required": ["examples"], "properties": {
                   "signature_name": {"type": "string"}, "context": {"type": "object"},
                   "examples": {"type": "array", "minItems": 1, "items": {"type": "object"}}}}
BODIES = {":predict": TF_PREDICT, ":{verb}": TF_EXAMPLES, "/infer": V2_INFER}


def document(base: dict[str, Any], methods: dict[str, dict[str, Any]], max_items: int,
             token: bool) -> dict[str, Any]:
    """``base`` (FastAPI's ``get_openapi``) completed, plus the served models' methods."""
    base.setdefault("components", {}).setdefault("schemas", {})
    schemas = base["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422, which Kiln never answers
        schemas.pop(name, None)
    schemas["Error"] = ERROR_SCHEMA
    for path, item in base["paths"].items():
        for verb, op in item.items():
            op["responses"].pop("422", None)
            for param in op.get("parameters", []):
                if param["in"] == "path":  # a handler's Optional[str] = None is, in a path, a string
                    param["schema"] = {"type": "string", "title": param["schema"].get("title", param["name"])}
            body = next((b for end, b in BODIES.items() if path.endswith(end)), None)
            if body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
            _errors(op, "{model}" in path, verb == "post", token)
    latest: dict[str, int] = {}
    for ref in methods:
        latest[routing.name_of(ref)] = max(latest.get(routing.name_of(ref), 0), routing.version_of(ref))
    for ref, ms in sorted(methods.items()):
        name, version = routing.name_of(ref), routing.version_of(ref)
        for method, d in sorted(ms.items()):
            op = _operation(name, version, method, d, max_items)
            _errors(op, True, True, token)
            base["paths"][f"/models/{name}/versions/{version}/{method}"] = {"post": op}
            if version == latest[name]:
                base["paths"][f"/models/{name}/{method}"] = {
                    "post": {**op, "operationId": f"{name}_{method}",
                             "summary": f"{op['summary']} (latest version, {version})"}}
    return base


def _errors(op: dict[str, Any], model: bool, post: bool, token: bool) -> None:
    """The error answers an operation can give: on a model's path, with a body, with a token."""
    codes = {**ALWAYS, **(MODEL if model else {}), **(BODY if post else {}),
             **(TOKEN if token else {})}
    for code, why in codes.items():
        op["responses"].setdefault(code, {"description": why,
                                          "content": {"application/json": {"schema": ERROR}}})


def tensor(shape: list[int | None], low: float | None, high: float | None, max_items: int) -> dict[str, Any]:
    """JSON Schema of an array argument: nested arrays of the fixed axes' sizes around numbers in
    bounds; a batch of 1 to ``max_items`` examples, or one example without the batch axis (as
    plugin.Tensor.validate takes it)."""
    item: dict[str, Any] = {"type": "number"}
    if low is not None:
        item["minimum"] = low
    if high is not None:
        item["maximum"] = high
    for size in reversed(shape[1:]):
        item = {"type": "array", "items": item, "minItems": size or 1, **({"maxItems": size} if size else {})}
    batch = {"type": "array", "items": item, "minItems": 1, "maxItems": max_items}
    return {"anyOf": [batch, item]} if shape and shape[0] is None else batch


def _argument(s: dict[str, Any], max_items: int) -> dict[str, Any]:
    if s.get("type") == "array":
        prop = tensor(s.get("x-shape") or [], s.get("minimum"), s.get("maximum"), max_items)
        if s.get("x-optional"):
            prop = {"anyOf": [prop, {"type": "null"}]}
        return {**prop, "description": s.get("description") or "", "x-shape": s.get("x-shape"),
                "x-dtype": s.get("x-dtype")}
    prop = {k: v for k, v in s.items() if v is not None and k != "x-count"}
    if s.get("x-count"):  # how many items the method makes: the server bounds it
        prop["maximum"] = min(prop.get("maximum", max_items), max_items)
    if s.get("type") == "string":  # a string's bounds are its length
        for bound, key in (("minimum", "minLength"), ("maximum", "maxLength")):
            if bound in prop:
                prop[key] = int(prop.pop(bound))
    if "default" in prop:  # null, or leaving it out, takes the default
        core = {k: v for k, v in prop.items() if k not in ("default", "description")}
        prop = {"anyOf": [core, {"type": "null"}], "default": prop["default"],
                "description": prop.get("description", "")}
    return prop


def _operation(name: str, version: int, method: str, d: dict[str, Any], max_items: int) -> dict[str, Any]:
    inputs = d.get("inputs", {})
    props = {arg: _argument(s, max_items) for arg, s in inputs.items()}
    required = [a for a, s in inputs.items() if s.get("default") is None and not s.get("x-optional")]
    outputs = d.get("outputs", {})
    if "images" in outputs:
        props["format"] = {"type": "string", "enum": ["json", "png"], "default": "json",
                           "description": "png: the images output as one PNG grid"}
    content: dict[str, Any] = {"application/json": {"schema": {
        "type": "object", "properties": {k: {"description": v} for k, v in outputs.items()}}}}
    responses: dict[str, Any] = {"200": {"description": "; ".join(f"{k}: {v}" for k, v in outputs.items()),
                                         "content": content}}
    if "images" in outputs:
        content["image/png"] = {"schema": {"type": "string", "format": "binary"}}
        responses["406"] = {"description": "PNG asked of a method without images",
                            "content": {"application/json": {"schema": ERROR}}}
    return {
        "tags": [name], "summary": f"{name} v{version} {method}: {d.get('doc', '')}",
        "operationId": f"{name}_v{version}_{method}",
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "properties": props, "required": required, "additionalProperties": False}}}},
        "responses": responses,
    }
