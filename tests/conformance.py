"""The protocols' own OpenAPI documents, made into schemathesis schemas that reach a served model:
the Open Inference Protocol's REST spec (read from ../shared/specs, never copied here) and Kiln's
own /openapi.json. What the specs cannot say, and the tests therefore adapt, is written here, one
line per adaptation."""

from __future__ import annotations

import math
from typing import Any

import requests

from helpers import ROOT

OIP_SPEC = ROOT.parent / "shared" / "specs" / "oip-v2-rest.yaml"   # MANIFEST.md there: source, licence
EXAMPLES = 5   # per operation and generation mode: bounded, so that the suite's budget holds


def config(base: str, token: str | None = None, without_coverage: str | None = None) -> Any:
    """Every check schemathesis has, positive and negative data, a bounded number of examples, and
    the examples, coverage (undeclared methods, missing and wrong parts, each bound's edge) and
    fuzzing phases, all sent to ``base`` (loopback), with the server's token if it has one. The
    paths ``without_coverage`` matches (a regular expression) skip the coverage phase."""
    import schemathesis

    operations = [{"include-path-regex": without_coverage, "phases": {"coverage": {"enabled": False}}}] \
        if without_coverage else []
    return schemathesis.Config.from_dict({"operations": operations,
        "base-url": base, **({"headers": {"Authorization": f"Bearer {token}"}} if token else {}), "seed": 7, "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
        "generation": {"mode": "all", "max-examples": EXAMPLES},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "checks": {"enabled": True}})


def oip(base: str, model: str, version: str) -> dict[str, Any]:
    """The Open Inference Protocol's REST spec, for ``model``:``version`` as ``base`` serves it."""
    import yaml

    spec = yaml.safe_load(OIP_SPEC.read_text())
    # Its paths read /v2/models/${MODEL_NAME}/...: OpenAPI templating expands {MODEL_NAME} and
    # leaves the `$` (MANIFEST.md), so a client would ask for model "$cnn".
    spec["paths"] = {path.replace("${", "{"): item for path, item in spec["paths"].items()}
    for path, item in spec["paths"].items():
        for p in item.get("parameters", []):
            p["schema"] = {"type": "string", "enum": [model if p["name"] == "MODEL_NAME" else version]}
        if "{MODEL_NAME}" in path:
            # The spec lists 200 and 400 only, yet its text has an unknown model or version answer
            # an error: Kiln says 404, with the spec's own error object.
            for op in (v for k, v in item.items() if k in ("get", "post")):
                op["responses"]["404"] = {"description": "no such model or version", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/inference_error_response"}}}}
    # The spec leaves the inference request's body optional; its text has every request carry one.
    infer = next(item["post"] for path, item in spec["paths"].items() if path.endswith("/infer"))
    infer["requestBody"]["required"] = True
    # The spec's request schema fits every model; the model's own metadata (GET /v2/models/m)
    # and value bounds (GET /models) say which of those requests this model takes.
    meta = requests.get(f"{base}/v2/models/{model}/versions/{version}", timeout=30).json()
    (tensor,) = meta["inputs"]
    kiln = next(m for m in requests.get(f"{base}/models", timeout=30).json()["models"]
                if m["ref"] == f"{model}:{version}")
    bounds = next(s for method in kiln["methods"].values() for name, s in method["inputs"].items()
                  if name == tensor["name"])
    shape = [1 if s == -1 else s for s in tensor["shape"]]
    number = {"type": "number", "minimum": bounds["minimum"], "maximum": bounds["maximum"]}
    schemas = spec["components"]["schemas"]
    schemas["request_input"]["properties"].update(
        name={"type": "string", "enum": [tensor["name"]]},
        datatype={"type": "string", "enum": [tensor["datatype"]]},
        shape={"type": "array", "items": {"type": "integer"}, "enum": [shape]},
        data={"type": "array", "items": number, "minItems": math.prod(shape), "maxItems": math.prod(shape)})
    schemas["request_output"]["properties"]["name"] = {"type": "string", "enum": [t["name"] for t in meta["outputs"]]}
    request = schemas["inference_request"]
    request["properties"]["inputs"].update(minItems=1, maxItems=1)
    # Its examples are another model's tensors (input0 as UINT32): this model's are generated.
    request.pop("x-examples", None)
    return spec


def kiln(base: str, token: str | None = None) -> dict[str, Any]:
    """Kiln's own /openapi.json as ``base`` serves it."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{base}/openapi.json", headers=headers, timeout=30).json()


# 400s that a schema-valid request may get, each named by its error's words:
EXEMPT = (
    # an answer over the server's --max-response-mb, whatever the request: its size is the
    # method's output size times the batch, which no request schema says
    "--max-response-mb",
    # a cnn's 'features' layer past the trained model's convolutions, which its schema, declared
    # by the plugin class for every cnn, does not know
    "'layer' must be 1..",
)


def check(case: Any) -> None:
    """Send ``case`` and run every check on the answer; an ``EXEMPT`` 400 is spared only the check
    that a schema-valid request is accepted."""
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    response = case.call(timeout=60)
    exempt = response.status_code == 400 and any(why in response.text for why in EXEMPT)
    case.validate_response(response, excluded_checks=[positive_data_acceptance] if exempt else [])
