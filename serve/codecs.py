"""The wire formats, as pure functions: JSON bodies, TF Serving REST and the Open Inference
Protocol v2, in and out. No Ray, no FastAPI: the ingress calls these and turns ProtocolError into
a JSON error response; tests/test_codecs.py tests them alone.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

import numpy as np
import orjson

PREDICT_ORDER = ("classify", "reconstruct", "encode", "decode")


class ProtocolError(Exception):
    """A request the protocol cannot accept: an HTTP status and a message for the client."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (send finite numbers)")


def parse_json(body: bytes, content_type: str) -> Any:
    """A request body as JSON. Like TF Serving and KServe, the body is read as JSON whatever the
    header says (tritonclient sends none; curl -d sends a form type); a body that is not JSON gets
    415 unless its header said JSON, and then 400 saying what is malformed."""
    ctype = content_type.split(";")[0].strip().lower()
    try:  # orjson: 7x faster than json on a 256-image body (BENCHMARKS.md)
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # what orjson refuses, the standard parser either words clearly (NaN, a missing comma,
    # nesting too deep) or reads (integers over 64 bits)
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        if not ctype.endswith("json"):
            raise ProtocolError(415, f"the body is not JSON ({f'Content-Type {ctype!r}' if ctype else 'no Content-Type'}); "
                                     "send a JSON body, with 'Content-Type: application/json'") from None
        raise ProtocolError(400, f"malformed JSON: {e}") from None


def predict_method(info: dict[str, Any]) -> tuple[str, str]:
    """The method TF Serving's :predict and v2's infer call, and its one array argument: the first
    of classify, reconstruct, encode, decode that takes exactly one required array."""
    for name in PREDICT_ORDER:
        m = info["methods"].get(name)
        if m:
            arrays = [k for k, s in m["inputs"].items() if s["type"] == "array" and not s.get("x-optional")]
            if len(arrays) == 1:
                return name, arrays[0]
    raise ProtocolError(404, f"model {info['name']}:{info['version']} has no predict method "
                             f"(one of {', '.join(PREDICT_ORDER)}); use POST /models/{info['name']}/<method>")


# -- TF Serving REST ---------------------------------------------------------------------------

def decode_b64(data: Any, shape: list[int | None]) -> Any:
    """Replace ``{"b64": "<picture>"}`` items with pixel arrays in the model's input ``shape``
    (its channels and size), through the one decoder ``kiln.images.decode``."""
    from kiln.images import decode
    from kiln.plugin import KilnError

    def one(item: Any) -> Any:
        if isinstance(item, dict) and set(item) == {"b64"}:
            if not isinstance(item["b64"], str):
                raise ProtocolError(400, "'b64' must be a base64 string")
            try:
                raw = base64.b64decode(item["b64"], validate=True)
            except (binascii.Error, ValueError) as e:
                raise ProtocolError(400, f"'b64' is not valid base64: {e}") from None
            try:
                return decode(raw, shape, source="'b64'")
            except KilnError as e:
                raise ProtocolError(400, str(e)) from None
        return item

    if isinstance(data, list):
        return [one(d) for d in data]
    return one(data)


def tf_predict_request(body: Any, arg: str, shape: list[int | None]) -> tuple[Any, bool]:
    """The predict method's argument from a TF Serving body, and whether it was the row form."""
    if not isinstance(body, dict) or ("instances" in body) == ("inputs" in body):
        raise ProtocolError(400, "send exactly one of 'instances' (row format) or 'inputs' (column format)")
    rows = "instances" in body
    data = body["instances"] if rows else body["inputs"]
    if isinstance(data, dict):
        if set(data) != {arg}:
            raise ProtocolError(400, f"named inputs must be exactly {{'{arg}'}}; got {sorted(data)}")
        data = data[arg]
    # {"images": ...} rows are named inputs; a bare {"b64": ...} row is the value itself
    rows_as_list = data if rows and isinstance(data, list) else []
    if any(isinstance(r, dict) and set(r) != {"b64"} for r in rows_as_list):
        if any(set(r) != {arg} for r in data if isinstance(r, dict)):
            raise ProtocolError(400, f"each instance must have exactly the key '{arg}'")
        data = [r[arg] if isinstance(r, dict) else r for r in data]
    return decode_b64(data, shape), rows


def tf_predict_response(out: dict[str, Any], rows: bool, n: int) -> dict[str, Any]:
    if not rows:
        return {"outputs": out}
    per_row = {k: v for k, v in out.items() if isinstance(v, list) and len(v) == n}
    return {"predictions": [{k: v[i] for k, v in per_row.items()} for i in range(n)]}


def tf_status(versions: list[tuple[str, bool]]) -> dict[str, Any]:
    """``GET /v1/models/m[/versions/v]``: (version, ready) of each served version."""
    return {"model_version_status": [
        {"version": v, "state": "AVAILABLE" if ready else "LOADING",
         "status": {"error_code": "OK", "error_message": ""}} for v, ready in versions]}


def tf_metadata(model: str, version: str, info: dict[str, Any]) -> dict[str, Any]:
    method, _ = predict_method(info)
    m = info["methods"][method]
    return {"model_spec": {"name": model, "version": version, "signature_name": method},
            "metadata": {"signature_def": {"signature_def": {"serving_default": {
                "method_name": method, "inputs": m["inputs"], "outputs": m["outputs"]}}}}}


# -- Open Inference Protocol v2 ----------------------------------------------------------------

def v2_infer_request(body: Any, arg: str) -> np.ndarray:
    inputs = body.get("inputs") if isinstance(body, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"'inputs' must be a list of one tensor "
                                 f"{{'name': '{arg}', 'shape': [...], 'datatype': 'FP32', 'data': [...]}}")
    t = inputs[0]
    if t.get("name") not in (arg, None):
        raise ProtocolError(400, f"input is named {t.get('name')!r}; this model's input is '{arg}'")
    shape, flat = t.get("shape"), t.get("data")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ProtocolError(400, "'shape' must be a list of non-negative integers")
    try:
        array = np.asarray(flat, dtype="float64").reshape(shape)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(400, f"'data' does not fill shape {shape}: {e}") from None
    return array.astype("float32")


def v2_datatype(arr: np.ndarray) -> str:
    return "BYTES" if arr.dtype.kind in "USO" else ("INT64" if arr.dtype.kind in "iu" else "FP32")


def v2_infer_response(out: dict[str, Any], model: str, version: str, request_id: Any) -> dict[str, Any]:
    outputs = []
    for name, value in out.items():
        arr = np.asarray(value)
        outputs.append({"name": name, "shape": list(arr.shape), "datatype": v2_datatype(arr),
                        "data": arr.ravel().tolist()})
    return {"model_name": model, "model_version": version, "id": request_id, "outputs": outputs}


def v2_model_metadata(model: str, versions: list[str], info: dict[str, Any]) -> dict[str, Any]:
    method, arg = predict_method(info)
    schema = info["methods"][method]["inputs"][arg]
    return {"name": model, "versions": versions, "platform": f"kiln-{info['plugin']}",
            "inputs": [{"name": arg, "datatype": "FP32",
                        "shape": [-1 if s is None else s for s in schema["x-shape"]]}],
            "outputs": [{"name": k} for k in info["methods"][method]["outputs"]]}
