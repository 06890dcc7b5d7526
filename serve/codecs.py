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

from kiln import plugin
from kiln.serve.options import MIB, ServeOptions
from kiln.values import not_a_number


class ProtocolError(Exception):
    """A request the server cannot answer: an HTTP status and a message for the client. Kiln's one
    error type between its serving processes: a model replica returns it as one request's result
    in a batch (the others' results beside it), and the ingress raises it."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after

    def __reduce__(self) -> tuple:  # pickled between processes with all three fields
        return ProtocolError, (self.status, self.message, self.retry_after)


class Limits:
    """What one request may ask of the server: ``kiln serve``'s options (``ServeOptions``) as the
    ingress reads them per request, checked before any work, so one request cannot stall every
    model or bloat the ingress. Each 4xx names its flag. An option the ingress needs per request
    is read from here by its field name; only the sizes are converted."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.max_body_bytes = int(opts.max_body_mb * MIB)          # --max-body-mb, while read
        self.max_response_bytes = int(opts.max_response_mb * MIB)  # --max-response-mb

    def __getattr__(self, name: str) -> Any:  # max_items, body_timeout_s, request_timeout_s, ...
        if name.startswith("__") or name == "opts":  # copy and pickle probe before opts is set
            raise AttributeError(name)
        return getattr(self.opts, name)

    def check(self, args: dict[str, Any], inputs: dict[str, dict[str, Any]]) -> None:
        """ProtocolError 400 when an argument asks for more than the limits allow; ``inputs``
        are the method's argument schemas as ``describe()`` gives them."""
        for name, schema in inputs.items():
            value = args.get(name)
            if value is None:
                continue
            kind = schema.get("type")
            if kind == "array":
                n = _items(value, schema.get("x-shape") or [])
                if n > self.max_items:
                    raise ProtocolError(400, f"argument '{name}' holds {n} items, over the server's "
                                             f"limit of {self.max_items} (kiln serve --max-items); "
                                             "send them in several requests")
            elif kind == "string" and isinstance(value, str) and len(value) > self.max_chars:
                raise ProtocolError(400, f"argument '{name}' has {len(value)} characters, over the "
                                         f"server's limit of {self.max_chars} (kiln serve --max-chars)")
            elif schema.get("x-count") and isinstance(value, int) and value > self.max_items:
                raise ProtocolError(400, f"argument '{name}' asks for {value} items, over the "
                                         f"server's limit of {self.max_items} (kiln serve --max-items)")

    def max_values(self) -> int:
        """The most numbers an answer may hold: each takes at least 4 bytes in JSON ("0.0,") and
        exactly 4 as v2 binary FP32, so more than this cannot fit in ``max_response_bytes``."""
        return self.max_response_bytes // 4


def _items(value: Any, shape: list[Any]) -> int:
    """How many examples an array argument holds: its leading axis, or 1 for a single example
    sent without the batch axis (as Tensor.validate accepts it)."""
    if isinstance(value, np.ndarray):
        depth, n = value.ndim, (len(value) if value.ndim else 1)
    elif isinstance(value, list):
        depth, n, inner = 0, len(value), value
        while isinstance(inner, list):
            depth += 1
            inner = inner[0] if inner else None
    else:
        return 1
    if shape and shape[0] is None and depth == len(shape) - 1:
        return 1
    return n


def too_large(values: int, limits_bytes: int) -> str:
    return (f"the answer would hold {values:,} numbers, at least {values * 4 / 1e6:.0f} MB, over the "
            f"server's limit of {limits_bytes / 1e6:.0f} MB (kiln serve --max-response-mb); ask for "
            "fewer items per request")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (send finite numbers)")


def parse_json(body: bytes, content_type: str) -> Any:
    """A request body as JSON. Like TF Serving and KServe, the body is read as JSON whatever the
    header says (tritonclient sends none; curl -d sends a form type); a body that is not JSON gets
    415 unless its header said JSON, and then 400 saying what is malformed."""
    ctype = content_type.split(";")[0].strip().lower()
    if not body.strip():  # no body at all says nothing of its type: it is missing
        raise ProtocolError(400, "the body is empty; send a JSON body, with 'Content-Type: application/json'")
    try:  # orjson: several times faster than json on large image bodies (BENCHMARKS.md)
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    # what orjson refuses, the standard parser either words clearly (NaN, a missing comma,
    # nesting too deep) or reads (integers over 64 bits)
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        if not ctype.endswith("json"):
            raise ProtocolError(415, f"the body is not JSON ({f'Content-Type {ctype!r}' if ctype else 'no Content-Type'}); "
                                     "send a JSON body, with 'Content-Type: application/json'") from None
        raise ProtocolError(400, f"malformed JSON: {e}") from None
    # valid JSON that orjson refused: what no argument can use, and what would fail later, deep in
    # a method or while writing the answer (a 401-digit integer, 990 nested lists, a lone surrogate)
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError as e:
        why = str(e)
        if "64-bit" in why:
            why = "an integer does not fit in 64 bits"
        elif "ecursion" in why:
            why = "values are nested too deeply (at most 254 levels)"
        elif "surrogate" in why or "utf-8" in why.lower():
            why = "a string holds a lone surrogate (\\ud800-\\udfff); send valid Unicode"
        raise ProtocolError(400, f"cannot use this JSON: {why}") from None
    return value


def predict_method(info: dict[str, Any]) -> tuple[str, str]:
    """The method TF Serving's :predict and v2's infer call, and its one array argument
    (``kiln.plugin.predict_method``); a 404 that says why where the model has none."""
    found = plugin.predict_method(info["methods"], info.get("predict"))
    if found is not None:
        return found
    named = info.get("predict")
    if named:
        raise ProtocolError(404, f"model {info['name']}:{info['version']} names '{named}' as its "
                                 "predict method, but that is no inference method taking exactly "
                                 f"one required array; use POST /models/{info['name']}/<method>")
    raise ProtocolError(404, f"model {info['name']}:{info['version']} has no predict method "
                             f"(one of {', '.join(plugin.PREDICT_ORDER)}, or the one its plugin names with "
                             f"`predict = \"METHOD\"`); use POST /models/{info['name']}/<method>")


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


def tf_examples(body: Any, arg: str, shape: list[int | None]) -> list[Any]:
    """The predict method's argument from a TF Serving :classify or :regress body: one item per
    ``examples`` entry, its feature ``arg``, or the shared ``context``'s (a feature in the
    context must not appear in the examples)."""
    if not isinstance(body, dict) or not isinstance(body.get("examples"), list) or not body["examples"]:
        raise ProtocolError(400, f"send 'examples': a list of at least one {{'{arg}': ...}}")
    context = body.get("context", {})
    if not isinstance(context, dict) or not all(isinstance(e, dict) for e in body["examples"]):
        raise ProtocolError(400, "'context' and each of 'examples' must be objects of features")
    items = []
    for i, example in enumerate(body["examples"]):
        if set(example) & set(context):
            raise ProtocolError(400, f"example {i} repeats context feature(s) {sorted(set(example) & set(context))}")
        features = {**context, **example}
        if set(features) != {arg}:
            raise ProtocolError(400, f"example {i} has features {sorted(features)}; this model takes exactly '{arg}'")
        items.append(features[arg])
    return decode_b64(items, shape)


def tf_classify_response(out: dict[str, Any], class_names: list[str]) -> dict[str, Any]:
    """``{"result": [[[label, score], ...] per example]}``, every class, as TF Serving writes it."""
    return {"result": [[[name, float(p)] for name, p in zip(class_names, row)] for row in out["probabilities"]]}


def tf_status(versions: list[tuple[str, bool]]) -> dict[str, Any]:
    """``GET /v1/models/m[/versions/v]``: (version, ready) of each served version."""
    return {"model_version_status": [
        {"version": v, "state": "AVAILABLE" if ready else "LOADING",
         "status": {"error_code": "OK", "error_message": ""}} for v, ready in versions]}


TF_DTYPES = {"FP32": "DT_FLOAT", "INT64": "DT_INT64", "BYTES": "DT_STRING", "BOOL": "DT_BOOL"}


def signatures(info: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """TF Serving signature names -> (method, its array argument): ``serving_default`` is the
    predict method; every other method with exactly one required array is a signature of its name."""
    out = {}
    try:
        out["serving_default"] = predict_method(info)
    except ProtocolError:
        pass
    for name, m in info["methods"].items():
        arrays = [k for k, s in m["inputs"].items() if s["type"] == "array" and not s.get("x-optional")]
        required = [k for k, s in m["inputs"].items() if s.get("default") is None and not s.get("x-optional")]
        if len(arrays) == 1 and required == arrays:
            out[name] = (name, arrays[0])
    return out


def tf_signature(body: Any, info: dict[str, Any]) -> tuple[str, str]:
    """The (method, argument) a :predict body's ``signature_name`` names (default serving_default)."""
    known = signatures(info)
    name = (body.get("signature_name") if isinstance(body, dict) else None) or "serving_default"
    if name not in known:
        if not known:
            predict_method(info)  # raises the 404 that says why
        raise ProtocolError(400, f"unknown signature_name {name!r}; this model's signatures: "
                                 f"{', '.join(sorted(known))}")
    return known[name]


def _tensor_info(name: str, shape: list[Any], dtype: str) -> dict[str, Any]:
    return {"name": name, "dtype": dtype, "tensor_shape": {
        "dim": [{"size": str(-1 if s is None else s), "name": ""} for s in shape], "unknown_rank": False}}


def tf_metadata(model: str, version: str, info: dict[str, Any]) -> dict[str, Any]:
    """``GET /v1/models/m[/versions/v]/metadata`` as TF Serving writes it: one signature_def per
    signature, inputs and outputs with TF dtypes and shapes (-1: any size)."""
    defs = {}
    for sig, (method, arg) in signatures(info).items():
        schema = info["methods"][method]["inputs"][arg]
        specs = info.get("output_specs", {}).get(method, {})
        defs[sig] = {"method_name": method,  # the Kiln method it calls
                     "inputs": {arg: _tensor_info(arg, schema["x-shape"], "DT_FLOAT")},
                     "outputs": {k: _tensor_info(k, specs.get(k, {}).get("shape", []),
                                                 TF_DTYPES.get(specs.get(k, {}).get("datatype", ""), "DT_INVALID"))
                                 for k in info["methods"][method]["outputs"]}}
    if not defs:
        predict_method(info)  # raises the 404 that says why
    return {"model_spec": {"name": model, "version": version, "signature_name": ""},
            "metadata": {"signature_def": {"signature_def": defs}}}


# -- Open Inference Protocol v2 ----------------------------------------------------------------

# the binary tensor data extension: numpy dtypes of the datatypes a tensor method can take or give
V2_DTYPES = {"FP16": "<f2", "FP32": "<f4", "FP64": "<f8", "INT8": "i1", "INT16": "<i2", "INT32": "<i4",
             "INT64": "<i8", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "BOOL": "?"}
HEADER_LENGTH = "Inference-Header-Content-Length"


def v2_split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """A v2 body as (JSON header, binary tensor data); without the extension all of it is JSON."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or int(header_length) > len(body):
        raise ProtocolError(400, f"{HEADER_LENGTH} {header_length!r} is not a length within the "
                                 f"{len(body)}-byte body")
    n = int(header_length)
    return body[:n], body[n:]


def v2_infer_request(body: Any, tensor: dict[str, Any], binary: bytes = b"") -> np.ndarray:
    """The predict method's array from a v2 request: JSON ``data``, or raw little-endian bytes
    (``parameters.binary_data_size``, the binary tensor data extension tritonclient uses).
    ``tensor`` is the model's input as its metadata states it (``v2_model_metadata``): a request
    whose tensor differs in name, datatype or shape is refused, as is one that breaks the
    protocol's request object (an ``id`` that is no string, ``parameters`` that are no object)."""
    if not isinstance(body, dict):
        raise ProtocolError(400, "the body must be a JSON inference request object")
    if "id" in body and not isinstance(body["id"], str):
        raise ProtocolError(400, f"'id' must be a string, got {_sent(body['id'])}")
    _parameters(body, "the request's")
    arg, want = tensor["name"], tensor["shape"]
    inputs = body.get("inputs")
    form = f"{{'name': '{arg}', 'shape': {want}, 'datatype': '{tensor['datatype']}', 'data': [...]}}"
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(400, f"'inputs' must be a list of one tensor {form}, got {_sent(inputs)}")
    t = inputs[0]
    missing = [k for k in ("name", "shape", "datatype") if k not in t]
    if "data" not in t and "binary_data_size" not in (t.get("parameters") or {}):
        missing.append("data")
    if missing:
        raise ProtocolError(400, f"the input tensor lacks {', '.join(map(repr, missing))}; send {form}")
    if t["name"] != arg:
        raise ProtocolError(400, f"input is named {_sent(t['name'])}; this model's input is '{arg}'")
    if t["datatype"] != tensor["datatype"]:
        raise ProtocolError(400, f"input '{arg}' has datatype {_sent(t['datatype'])}; this model's "
                                 f"metadata says '{tensor['datatype']}'")
    shape = t["shape"]
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape):
        raise ProtocolError(400, f"'shape' must be a list of non-negative integers, got {_sent(shape)}")
    if len(shape) != len(want) or any(w != -1 and w != s for w, s in zip(want, shape)):
        raise ProtocolError(400, f"input '{arg}' has shape {shape}; this model's metadata says {want} "
                                 "(-1: any size)")
    size = _parameters(t, f"input '{arg}'").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise ProtocolError(400, f"binary_data_size {size!r} does not match the {len(binary)} "
                                     "bytes after the JSON header")
        try:
            array = np.frombuffer(binary, dtype=V2_DTYPES[t["datatype"]]).reshape(shape)
        except ValueError as e:
            raise ProtocolError(400, f"the binary data does not fill shape {shape}: {e}") from None
    else:
        _numbers(t["data"], arg)
        try:
            array = np.asarray(t["data"], dtype="float64").reshape(shape)
        except (TypeError, ValueError, OverflowError) as e:
            raise ProtocolError(400, f"'data' does not fill shape {shape}: {e}") from None
    if array.size == 0:
        raise ProtocolError(400, f"shape {shape} holds no values; send at least one item")
    return array.astype("float32")


def _sent(value: Any) -> str:
    """What a client sent, for an error message: its JSON type and its start."""
    kind = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")
    return f"{kind} {json.dumps(value)[:60]}"


def _parameters(obj: dict[str, Any], whose: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError(400, f"{whose} 'parameters' must be an object, got {_sent(params)}")
    return params


def _numbers(data: Any, arg: str) -> None:
    """JSON ``data`` of a numeric tensor: the protocol's FP32 data are numbers only."""
    bad = not_a_number(data)
    if bad is not None:
        raise ProtocolError(400, f"input '{arg}' data must be numbers (nested arrays allowed), "
                                 f"found {_sent(bad)}")


def v2_datatype(arr: np.ndarray) -> str:
    if arr.dtype.kind in "USO":
        return "BYTES"
    if arr.dtype.kind == "b":
        return "BOOL"
    return "INT64" if arr.dtype.kind in "iu" else "FP32"


def _v2_bytes(arr: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":  # each element: 4-byte little-endian length, then its UTF-8 bytes
        parts = [str(x).encode() for x in arr.ravel()]
        return b"".join(len(p).to_bytes(4, "little") + p for p in parts)
    return np.ascontiguousarray(arr, dtype=V2_DTYPES[datatype]).tobytes()


def v2_outputs(body: dict[str, Any], names: list[str]) -> dict[str, bool]:
    """The outputs a v2 request asks for, each mapped to whether it wants it in binary
    (``parameters.binary_data``, or ``binary_data_output`` for all); all of them when it names
    none. Read before the model is called: a request that names a wrong one costs no model time."""
    binary_all = _parameters(body, "the request's").get("binary_data_output", False)
    if "outputs" not in body:
        return {name: bool(binary_all) for name in names}
    wanted = body["outputs"]
    if not isinstance(wanted, list) or not all(isinstance(w, dict) and isinstance(w.get("name"), str) for w in wanted):
        raise ProtocolError(400, f"'outputs' must be a list of {{'name': ...}}, got {_sent(wanted)}")
    unknown = [w["name"] for w in wanted if w["name"] not in names]
    if unknown:
        raise ProtocolError(400, f"unknown output(s) {', '.join(map(repr, unknown))}; this model's outputs: "
                                 f"{', '.join(names)}")
    return {w["name"]: bool(_parameters(w, f"output {w['name']!r}").get("binary_data", binary_all))
            for w in wanted}


def v2_infer_response(out: dict[str, Any], model: str, version: str, request_id: str | None,
                      chosen: dict[str, bool] | None = None) -> tuple[dict[str, Any], bytes]:
    """The v2 answer (JSON header, binary tail): the ``chosen`` outputs (``v2_outputs``; all, as
    JSON, if None)."""
    chosen = {name: False for name in out} if chosen is None else chosen
    outputs, tail = [], []
    for name, binary in chosen.items():
        arr = np.asarray(out[name])
        datatype = v2_datatype(arr)
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": datatype}
        if binary:
            raw = _v2_bytes(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        else:
            entry["data"] = arr.ravel().tolist()
        outputs.append(entry)
    answer = {"model_name": model, "model_version": version, "outputs": outputs}
    if request_id is not None:  # the protocol's id is a string, there only when the request had one
        answer["id"] = request_id
    return answer, b"".join(tail)


def v2_input(info: dict[str, Any]) -> dict[str, Any]:
    """The model's one input tensor as its v2 metadata states it, and as requests must send it."""
    method, arg = predict_method(info)
    schema = info["methods"][method]["inputs"][arg]
    return {"name": arg, "datatype": "FP32", "shape": [-1 if s is None else s for s in schema["x-shape"]]}


def v2_model_metadata(model: str, versions: list[str], info: dict[str, Any]) -> dict[str, Any]:
    method, _ = predict_method(info)
    specs = info.get("output_specs", {}).get(method, {})
    return {"name": model, "versions": versions, "platform": f"kiln-{info['plugin']}",
            "inputs": [v2_input(info)],
            "outputs": [{"name": k, **specs.get(k, {})} for k in info["methods"][method]["outputs"]]}
