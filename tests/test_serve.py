"""A real Ray Serve application on a free loopback port, spoken to over real HTTP: Kiln routes,
TF Serving row and column forms, Open Inference Protocol v2, readiness, errors that never take
the server down, and token authentication (a second application with a token)."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import schemathesis

import conformance
from helpers import LATE_CHECKS, NOISY_TF, ROOT, copy_models, copy_version, kiln_here, run_kiln
from kiln.serve.options import ServeOptions
from kiln.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]
TOKEN = "s3cret-token"
# small, so that the limit tests stay small; the CLI's defaults are larger (kiln serve --help)
LIMITS = dict(max_body_mb=1.0, max_items=64, max_chars=20_000, max_response_mb=2.0, body_timeout_s=4.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, trained, own_ray):
    """The session's cnn, autoencoder, lstm, gpt, cgan, vae, diffusion and photos (a cnn on the ants and bees
    photos), served by app "kiln" at / and, with a token, cnn and lstm by app "secure" at /secure (and an lstm
    with a request timeout no call meets by app "hasty" at /hasty); yields
    (base URL, store, what was seen while the models loaded)."""
    root = tmp_path_factory.mktemp("serve")
    copy_models(trained, root / "store", "cnn", "autoencoder", "lstm", "gpt", "cgan", "vae", "diffusion", "photos")

    import ray

    from kiln.serve import app, runtime

    port = free_port()
    store = str(root / "store")
    # an eighth of a CPU per replica: the eight models, the apps below and a version stored
    # later (test_a_version_stored_while_serving...) all fit the module's 2 CPUs
    spec = app.ServeSpec(store=store, refs=app.resolve_refs(store, None),
                         opts=ServeOptions(port=port, cpus_per_replica=0.125, **LIMITS))
    runtime.init_ray(num_cpus=2)  # as `kiln serve` starts it: HAProxy in front, gRPC between replicas
    try:
        app.start(spec)
        base = f"http://127.0.0.1:{port}"
        seen = []  # responses while loading: readiness must say 503, never 400 or a hang
        for _ in range(600):
            try:
                r = requests.get(f"{base}/v2/health/ready", timeout=5)
            except requests.ConnectionError:
                continue
            if r.status_code == 200:
                break
            seen.append((r.status_code, r.json()))
            c = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=30)
            seen.append((c.status_code, c.json()))
            time.sleep(0.2)
        # what the conformance test fuzzes with Kiln's own OpenAPI: few items per request, since
        # schemathesis tries the largest batch the document allows (no CPU reserved, as below)
        secure = ServeOptions(port=port, max_items=4, cpus_per_replica=0)
        app.start(app.ServeSpec(store=store, refs=["cnn:1", "lstm:1"], opts=secure, token=TOKEN),
                  app_name="secure", route_prefix="/secure")
        app.wait_ready("127.0.0.1", port, prefix="/secure", token=TOKEN, timeout=300)
        # a deadline no model call meets: every call there gets 504
        # (no CPU reserved: the module's Ray has 2, which the other apps and a new version fill)
        hasty = ServeOptions(port=port, request_timeout_s=1e-6, cpus_per_replica=0)
        app.start(app.ServeSpec(store=store, refs=["lstm:1"], opts=hasty), app_name="hasty", route_prefix="/hasty")
        app.wait_ready("127.0.0.1", port, prefix="/hasty", timeout=300)
        yield base, store, seen, spec
    finally:
        app.stop()
        ray.shutdown()


def mnist(n):
    from kiln import data

    pairs = [(x.numpy(), int(y)) for x, y in data.load("mnist", "test", limit=n).ds]
    return np.stack([p[0] for p in pairs]).astype(float), [p[1] for p in pairs]


def test_loading_models_answer_503_then_ready(server):
    base, _, seen, _ = server
    for status, body in seen:
        assert status == 503 and "loading" in body["error"]
    assert requests.get(f"{base}/v2/health/ready").json() == {"ready": True}
    assert requests.get(f"{base}/v2/health/live").json() == {"live": True}
    models = requests.get(f"{base}/models").json()["models"]
    assert {m["ref"] for m in models} == {"autoencoder:1", "cgan:1", "cnn:1", "diffusion:1", "gpt:1", "lstm:1", "photos:1", "vae:1"} \
        and all(m["state"] == "READY" for m in models)
    cnn = next(m for m in models if m["ref"] == "cnn:1")
    assert cnn["methods"]["classify"]["inputs"]["images"]["x-shape"] == [None, 28, 28, 1]


def test_tf_serving_row_and_column_forms(server):
    base, store, *_ = server
    x, _ = mnist(16)
    rows = requests.post(f"{base}/v1/models/cnn:predict", json={"instances": x.tolist()}).json()
    assert len(rows["predictions"]) == 16
    got = [p["classes"] for p in rows["predictions"]]
    # the stored model's own answers, as `kiln evaluate` gets them (how good: bench/quality.py)
    from kiln import models

    plugin, model, _ = models.load("cnn:1", store)
    assert got == plugin.infer(model, "classify", {"images": x})["classes"]
    cols = requests.post(f"{base}/v1/models/cnn/versions/1:predict", json={"inputs": {"images": x.tolist()}}).json()
    assert cols["outputs"]["classes"] == got
    status = requests.get(f"{base}/v1/models/cnn").json()
    assert status["model_version_status"][0] == {"version": "1", "state": "AVAILABLE",
                                                 "status": {"error_code": "OK", "error_message": ""}}
    meta = requests.get(f"{base}/v1/models/cnn/metadata").json()
    assert meta["metadata"]["signature_def"]["signature_def"]["serving_default"]["method_name"] == "classify"


def test_tf_serving_b64_images_are_decoded(server):
    """TF Serving clients send encoded images as {"b64": ...}; a PNG of a test digit is classified
    like its pixels, and a string that is not an image is a 400 naming b64."""
    import base64
    import io

    from PIL import Image

    base, *_ = server
    x, y = mnist(4)
    encoded = []
    for img in x:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0].astype("uint8"), mode="L").save(buf, format="PNG")
        encoded.append({"b64": base64.b64encode(buf.getvalue()).decode()})
    by_png = requests.post(f"{base}/v1/models/cnn:predict", json={"instances": encoded}).json()
    by_pixels = requests.post(f"{base}/v1/models/cnn:predict", json={"instances": x.tolist()}).json()
    assert [p["classes"] for p in by_png["predictions"]] == [p["classes"] for p in by_pixels["predictions"]]
    bad = requests.post(f"{base}/v1/models/cnn:predict", json={"instances": [{"b64": "bm90IGFuIGltYWdl"}]})
    assert bad.status_code == 400 and "b64" in bad.json()["error"]


def test_v2_infer_and_metadata(server):
    base, *_ = server
    x, y = mnist(4)
    body = {"id": "req-1", "inputs": [{"name": "images", "shape": [4, 28, 28, 1], "datatype": "FP32",
                                       "data": x.ravel().tolist()}]}
    r = requests.post(f"{base}/v2/models/cnn/infer", json=body).json()
    assert r["model_name"] == "cnn" and r["model_version"] == "1" and r["id"] == "req-1"
    out = {o["name"]: o for o in r["outputs"]}
    assert out["probabilities"]["shape"] == [4, 10] and out["probabilities"]["datatype"] == "FP32"
    assert out["classes"]["data"] == requests.post(f"{base}/models/cnn/classify", json={"images": x.tolist()}).json()["classes"]
    assert requests.get(f"{base}/v2").json()["name"] == "kiln"
    model = requests.get(f"{base}/v2/models/cnn").json()
    assert model["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 28, 28, 1]}]
    assert requests.get(f"{base}/v2/models/cnn/ready").json() == {"name": "cnn", "ready": True}


def test_kiln_routes_generate_text_deterministically(server):
    base, *_ = server
    args = {"prompt": "ROMEO:", "max_chars": 30, "temperature": 0.7, "seed": 3}
    a = requests.post(f"{base}/models/lstm/generate", json=args).json()
    b = requests.post(f"{base}/models/lstm/versions/1/generate", json=args).json()
    assert a == b and a["text"].startswith("ROMEO:") and len(a["continuation"]) == 30
    score = requests.post(f"{base}/models/lstm/score", json={"text": "To be"}).json()
    assert len(score["per_char"]) == 4


def test_gpt_answers_good_requests_beside_bad_ones_with_400s_naming_the_argument(server):
    """gpt's generate over HTTP: the same seed gives the same text, a prompt longer than the
    context window is continued, and each bad argument sent among good requests at the same time
    gets a 400 that names it while every good one is answered."""
    base, *_ = server
    url = f"{base}/models/gpt/generate"
    good = {"prompt": "ROMEO:", "max_chars": 40, "temperature": 0.8, "top_k": 40, "seed": 0}
    first = requests.post(url, json=good, timeout=60).json()
    assert first["text"] == "ROMEO:" + first["continuation"] and len(first["continuation"]) == 40
    long_prompt = {**good, "prompt": "To be, or not to be: that is the question.\n" * 6}  # 264 > 100 characters
    assert len(requests.post(url, json=long_prompt, timeout=60).json()["continuation"]) == 40
    bad = [({"prompt": ""}, "prompt"), ({"prompt": "Café"}, "outside the model's vocabulary"),
           ({"max_chars": 10**6}, "max_chars"), ({"temperature": 0}, "temperature"),
           ({"temperature": -1}, "temperature"), ({"top_k": -1}, "top_k"), ({"top_k": 5000}, "top_k")]
    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(requests.post, url, json=good, timeout=120) for _ in range(4)]
        bads = [pool.submit(requests.post, url, json={**good, **args}, timeout=120) for args, _ in bad]
        for f in goods:
            assert f.result().status_code == 200 and f.result().json() == first
        for f, (args, words) in zip(bads, bad):
            r = f.result()
            assert r.status_code == 400 and words in r.json()["error"], (args, r.text)


def test_kiln_generate_gpt_as_the_readme_shows(server):
    base, *_ = server
    cmd = ("generate", "gpt", "--url", base, "--set", "prompt=ROMEO:", "--set", "temperature=0.8",
           "--set", "top_k=40", "--set", "max_chars=60", "--set", "seed=0")
    out, again = kiln_here(*cmd), kiln_here(*cmd)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout == again.stdout and out.stdout.startswith("ROMEO:") and len(out.stdout) >= 66
    bad = kiln_here(*cmd, "--set", "top_k=-1")
    assert bad.returncode == 2 and "top_k" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_a_long_diffusion_request_does_not_hold_up_other_models(server):
    """300 DDIM steps (seconds) run in diffusion's own replica: the cnn answers meanwhile, and the
    long request still gets its pictures."""
    base, *_ = server
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(requests.post, f"{base}/models/diffusion/sample",
                           json={"digit": 3, "n": 8, "steps": 300, "seed": 0}, timeout=300)
        answered = 0
        for _ in range(20):  # bounded: stops when the long request is done
            r = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=30)
            assert r.status_code == 200
            if long.done():
                break
            answered += 1
        out = long.result()
    assert out.status_code == 200 and np.asarray(out.json()["images"]).shape == (8, 28, 28, 1)
    assert answered >= 1  # at least one classification came back while the sampler ran


def test_a_model_past_the_request_timeout_gets_504_and_its_neighbours_do_not(server):
    base, *_ = server
    args = {"prompt": "ROMEO:", "max_chars": 2000}
    late = requests.post(f"{base}/hasty/models/lstm/generate", json=args, timeout=60)
    assert late.status_code == 504 and "--request-timeout-s" in late.json()["error"], late.text
    # the same model without a deadline answers, and so does the late one's app afterwards
    assert requests.post(f"{base}/models/lstm/generate", json=args, timeout=60).status_code == 200
    assert requests.get(f"{base}/hasty/v2/models/lstm/ready", timeout=10).status_code == 200


BAD = [
    # (what, method, path, kwargs, status, words in the error)
    ("malformed JSON", "post", "/models/cnn/classify", {"data": "{bad", "headers": {"Content-Type": "application/json"}}, 400, "malformed JSON"),
    ("wrong shape", "post", "/models/cnn/classify", {"json": {"images": [[1, 2]]}}, 400, "has shape [1, 2]"),
    ("non-finite", "post", "/models/cnn/classify", {"data": '{"images": NaN}', "headers": {"Content-Type": "application/json"}}, 400, "NaN"),
    ("wrong dtype", "post", "/models/cnn/classify", {"json": {"images": "zeros"}}, 400, "numeric array"),
    # numpy reads true and "1" as numbers: the schema's numbers do not
    ("booleans for pixels", "post", "/models/cnn/classify", {"json": {"images": [[[True]] * 28] * 28}}, 400, "numeric array of shape [None, 28, 28, 1]; found true"),
    ("strings for pixels", "post", "/models/cnn/classify", {"json": {"images": [[[0]] * 27 + [["1"]]] * 28}}, 400, 'found "1"'),
    ("a prompt that is no string", "post", "/models/lstm/generate", {"json": {"prompt": False}}, 400, "argument 'prompt' must be a string, got bool"),
    ("out of range", "post", "/models/cnn/classify", {"json": {"images": np.full((28, 28, 1), 300).tolist()}}, 400, "above 255"),
    ("both forms", "post", "/v1/models/cnn:predict", {"json": {"instances": [], "inputs": []}}, 400, "exactly one of 'instances'"),
    ("unknown model", "post", "/models/nope/classify", {"json": {}}, 404, "'nope' is not served"),
    ("unknown version", "post", "/models/cnn/versions/9/classify", {"json": {}}, 404, "no served version '9'"),
    ("unknown method", "post", "/models/cnn/sample", {"json": {}}, 404, "no method 'sample'"),
    ("unknown argument", "post", "/models/cnn/classify", {"json": {"imgs": []}}, 400, "unknown argument(s) imgs"),
    ("too many characters", "post", "/models/lstm/generate", {"json": {"prompt": "A", "max_chars": 10**7}}, 400, "max_chars"),
    ("no predict method", "post", "/v1/models/lstm:predict", {"json": {"instances": [1]}}, 404, "no predict method"),
    ("oversize body", "post", "/models/cnn/classify", {"data": b"[" + b"0," * 700_000 + b"0]", "headers": {"Content-Type": "application/json"}}, 413, "over the limit"),
    ("content type", "post", "/models/cnn/classify", {"data": "images=1"}, 415, "Content-Type: application/json"),
    ("v2 bad shape", "post", "/v2/models/cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [2, 3], "datatype": "FP32", "data": [1]}]}}, 400, "this model's metadata says [-1, 28, 28, 1]"),
    ("no route", "get", "/nowhere", {}, 404, "no route"),
    # found by trying hostile input (each was a plain-text 500 before)
    ("401-digit integer", "post", "/models/cnn/classify", {"data": '{"images": 1' + "0" * 400 + "}", "headers": {"Content-Type": "application/json"}}, 400, "64 bits"),
    ("990 nested lists", "post", "/models/lstm/generate", {"data": '{"prompt": ' + "[" * 990 + "]" * 990 + "}", "headers": {"Content-Type": "application/json"}}, 400, "nested too deeply"),
    ("lone surrogate name", "post", "/models/cnn/classify", {"data": '{"\\ud800": 1}', "headers": {"Content-Type": "application/json"}}, 400, "lone surrogate"),
    ("lone surrogate v2 id", "post", "/v2/models/cnn/infer", {"data": '{"id": "\\ud800", "inputs": []}', "headers": {"Content-Type": "application/json"}}, 400, "lone surrogate"),
    ("v2 zero items", "post", "/v2/models/cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [0, 28, 28, 1], "datatype": "FP32", "data": []}]}}, 400, "holds no values"),
    ("list as prompt", "post", "/models/lstm/generate", {"json": {"prompt": ["RO", "MEO"]}}, 400, "argument 'prompt' must be a string"),
    ("argument wording", "post", "/models/lstm/generate", {"json": {"prompt": "A", "max_chars": 1.5}}, 400, "argument 'max_chars'"),
    ("shape sent", "post", "/v2/models/cnn/infer", {"json": {"inputs": [{"name": "images", "shape": [1, 27, 27, 1], "datatype": "FP32", "data": [0] * 729}]}}, 400, "has shape [1, 27, 27, 1]"),
    ("unknown signature", "post", "/v1/models/cnn:predict", {"json": {"signature_name": "nope", "instances": [np.zeros((28, 28, 1)).tolist()]}}, 400, "serving_default"),
    (":classify without examples", "post", "/v1/models/cnn:classify", {"json": {"examples": []}}, 400, "send 'examples'"),
    ("an unknown TF verb", "post", "/v1/models/cnn:explain", {"json": {}}, 404, ":predict, :classify and :regress"),
    ("GET :predict", "get", "/v1/models/cnn:predict", {}, 405, "POST"),
    # per-request limits, each naming its flag (before: 500 images of features made 141 MB)
    ("too many images", "post", "/models/cnn/classify", {"json": {"images": np.zeros((65, 28, 28, 1), "uint8").tolist()}}, 400, "limit of 64 (kiln serve --max-items)"),
    ("too many b64 images", "post", "/v1/models/cnn:predict", {"json": {"instances": [{"b64": "x"}] * 65}}, 400, "--max-items"),
    ("too many samples", "post", "/models/cgan/sample", {"json": {"digit": 1, "n": 65}}, 400, "asks for 65 items"),
    ("too long a text", "post", "/models/lstm/score", {"json": {"text": "a" * 20_001}}, 400, "20001 characters, over the server's limit of 20000 (kiln serve --max-chars)"),
    ("too large an answer", "post", "/models/cnn/features", {"json": {"images": np.zeros((64, 28, 28, 1), "uint8").tolist()}}, 400, "--max-response-mb"),
]


def test_openapi_documents_each_served_method_with_its_arguments(server):
    base, *_ = server
    doc = requests.get(f"{base}/openapi.json").json()
    generate = doc["paths"]["/models/lstm/generate"]["post"]
    body = generate["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "max_chars", "temperature", "seed"} <= set(body["properties"])
    temperature = body["properties"]["temperature"]  # null or absent takes its default
    assert temperature["anyOf"] == [{"type": "number", "minimum": 0.01, "maximum": 5.0}, {"type": "null"}]
    assert "text" in generate["responses"]["200"]["description"]
    classify = doc["paths"]["/models/cnn/versions/1/classify"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert classify["required"] == ["images"] and classify["properties"]["images"]["x-shape"] == [None, 28, 28, 1]
    sample = doc["paths"]["/models/cgan/sample"]["post"]
    assert "image/png" in sample["responses"]["200"]["content"]  # a method with images can answer PNG
    assert "/models/{model}/artifacts/{name}" in doc["paths"] and "/" not in doc["paths"]
    assert "Models" in requests.get(f"{base}/docs").text or requests.get(f"{base}/docs").status_code == 200


# The protocols' own specs drive schemathesis against this module's server: every check, positive
# and negative data, a bounded number of examples (tests/conformance.py says what is adapted, why).
@pytest.fixture
def oip_api(server):
    base, *_ = server
    return schemathesis.openapi.from_dict(conformance.oip(base, "cnn", "1"), config=conformance.config(base))


@pytest.fixture
def kiln_api(server):
    """Kiln's own document as app "secure" serves it: every route, the token's 401 among the
    statuses, and a cnn's and an lstm's methods (what a method's schema says comes from the same
    code for every plugin: a cnn's arrays and an lstm's strings cover both kinds)."""
    secure = f"{server[0]}/secure"
    # The coverage phase's edge cases of 28x28 images took three quarters of the test's time; the
    # cnn's methods keep positive and negative fuzzing, and the v2 test covers them at the edges.
    config = conformance.config(secure, TOKEN, without_coverage="^/models/cnn/")
    return schemathesis.openapi.from_dict(conformance.kiln(secure, TOKEN), config=config)


@pytest.mark.usefixtures("server")  # placed with the module's other tests on its Ray (conftest)
@schemathesis.pytest.from_fixture("oip_api").parametrize()
def test_the_open_inference_protocol_as_its_rest_spec_states_it(case):
    conformance.check(case)


@pytest.mark.usefixtures("server")
@schemathesis.pytest.from_fixture("kiln_api").parametrize()
def test_every_route_as_kilns_own_openapi_states_it(case):
    conformance.check(case)


def test_a_client_generated_from_the_openapi_document_calls_each_kind_of_route(server, tmp_path):
    """openapi-python-client makes a package from the secure app's /openapi.json as its docs say
    (PNG answers read as bytes through its content-type override); the package then calls a
    model's method, TF Serving's :predict and :classify, the v2 infer and metadata, a stored
    picture, and reads a 404 as the document's Error."""
    import importlib

    secure = f"{server[0]}/secure"
    doc = tmp_path / "openapi.json"
    doc.write_text(json.dumps(conformance.kiln(secure, TOKEN)))
    config = tmp_path / "client.yaml"
    config.write_text("post_hooks: []\ncontent_type_overrides:\n  image/png: application/octet-stream\n")
    generator = Path(sys.executable).parent / "openapi-python-client"
    out = subprocess.run([generator, "generate", "--path", doc, "--meta", "none", "--config", config,
                          "--output-path", tmp_path / "kiln_client"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "will not be generated" not in out.stdout + out.stderr, out.stdout + out.stderr
    sys.path.insert(0, str(tmp_path))
    try:
        api = lambda module: importlib.import_module(f"kiln_client.{module}")  # noqa: E731
        client = api("client").AuthenticatedClient(base_url=secure, token=TOKEN, timeout=60)
        x, _ = mnist(2)
        classify = api("api.cnn.cnn_classify").sync(
            client=client, body=api("models").CnnClassifyBody.from_dict({"images": x.tolist()}))
        assert len(classify.to_dict()["probabilities"]) == 2
        text = api("api.lstm.lstm_generate").sync(
            client=client, body=api("models").LstmGenerateBody.from_dict({"prompt": "RO", "max_chars": 5}))
        assert len(text.to_dict()["continuation"]) == 5
        predict = api("api.default.tf_predict_v1_models_model_predict_post")
        rows = predict.sync(model="cnn", client=client, body=api("models").TfPredictV1ModelsModelPredictPostBody.from_dict(
            {"instances": x.tolist()}))
        assert [p["labels"] for p in rows["predictions"]] == classify.to_dict()["labels"]
        examples = api("api.default.tf_examples_v1_models_model_verb_post")
        result = examples.sync(model="cnn", verb="classify", client=client, body=api("models")
                               .TfExamplesV1ModelsModelVerbPostBody.from_dict({"examples": [{"images": x[0].tolist()}]}))
        assert len(result["result"][0]) == 10
        infer = api("api.default.v2_infer_v2_models_model_infer_post").sync(
            model="cnn", client=client, body=api("models").V2InferV2ModelsModelInferPostBody.from_dict(
                {"id": "a", "inputs": [{"name": "images", "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}))
        assert infer["id"] == "a" and infer["outputs"][0]["name"] == "classes"
        meta = api("api.default.v2_model_v2_models_model_get").sync(model="cnn", client=client)
        assert meta["inputs"][0]["shape"] == [-1, 28, 28, 1]
        picture = api("api.default.artifact_models_model_artifacts_name_get").sync_detailed(
            model="cnn", name="predictions.png", client=client)
        assert picture.status_code == 200 and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
        missing = api("api.default.v2_model_v2_models_model_get").sync(model="nope", client=client)
        assert isinstance(missing, api("models").Error) and "nope" in missing.error
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "kiln_client" or m.startswith("kiln_client.")]:
            del sys.modules[name]


@pytest.mark.parametrize("what, method, path, kwargs, status, words", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_clear_json_errors_and_the_server_lives(server, what, method, path, kwargs, status, words):
    base, *_ = server
    r = getattr(requests, method)(base + path, timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]
    ok = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["probabilities"][0]) == 10


def _raw(port: int, head: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head)
    return s


def _answer(s: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            (re.search(rb"content-length: *(\d+)", data, re.I) or [b"", b"0"])[1]):
        part = s.recv(65536)
        if not part:
            break
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_a_chunked_body_is_refused_at_the_limit_while_it_arrives(server):
    """Before: a chunked 400 MB body with no Content-Length was read to the end (the ingress grew
    to 1 GB) before its 413. Now the 413 comes once 1 MB (this server's limit) has arrived: the
    client is still sending, far from the end of its 64 MB."""
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    s = _raw(port, b"POST /models/cnn/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"0," * 32768
    sent, answered = 0, False
    for _ in range(1024):  # at most 64 MB
        try:
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        except OSError:  # the server closed the connection after answering
            answered = True
            break
        sent += len(chunk)
        if select.select([s], [], [], 0)[0]:
            answered = True
            break
    # the kernel's and HAProxy's buffers on the way hold several MB before the client can notice
    assert answered and sent < 40 * 1024 * 1024, sent
    status, body = _answer(s)
    s.close()
    assert status == 413 and "--max-body-mb" in body["error"]


def test_a_trickled_body_gets_408_and_others_are_answered_meanwhile(server):
    """Before: a body sent at 40 bytes/s got no answer after 100 s. Now the ingress gives a body
    --body-timeout-s (4 s here) to arrive."""
    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    s = _raw(port, b"POST /models/cnn/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   b"Content-Length: 5000\r\n\r\n{\"images\": [")
    t0 = time.time()
    for _ in range(20):  # a few bytes a second, for at most 10 s
        if select.select([s], [], [], 0.5)[0]:
            break
        s.sendall(b"0,")
        ok = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=30)
        assert ok.status_code == 200
    status, body = _answer(s)
    s.close()
    assert status == 408 and "--body-timeout-s" in body["error"], body
    assert 3.5 < time.time() - t0 < 10


def test_a_client_that_hangs_up_mid_body_leaves_no_error_in_the_log(server):
    """Seen at the end of every benchmark run: a client that closed its connection with its body
    half sent left "internal error (ClientDisconnect)" and a traceback in the ingress's log, as
    if Kiln had failed. A hang-up is the client's doing: nothing is logged as a failure, and the
    next requests are answered."""
    import ray
    from pathlib import Path

    base, *_ = server
    port = int(base.rsplit(":", 1)[1])
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"

    def failures() -> int:
        return sum(p.read_text(errors="replace").count("ClientDisconnect")
                   for p in logs.glob("replica_kiln_KilnIngress_*.log"))

    assert list(logs.glob("replica_kiln_KilnIngress_*.log")), "the ingress keeps a log"
    before = failures()
    for _ in range(3):
        s = _raw(port, b"POST /models/cnn/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 5000\r\n\r\n{\"images\": [0,")
        time.sleep(0.3)
        s.close()
    image = {"images": np.zeros((28, 28, 1)).tolist()}
    for _ in range(10):  # the log is written as each hang-up is noticed: give it 2 s to show one
        assert requests.post(f"{base}/models/cnn/classify", json=image, timeout=30).status_code == 200
        time.sleep(0.2)
    assert failures() == before


def test_a_loaded_version_answers_any_batch_size_without_tracing_again(server):
    """Batching sends a model every batch size from 1 to --batch-size. Warmed up on one example,
    Keras traced the predict function again for the first batch of another size, after the
    replica had said it was ready: 70-90 ms on top of that batch, and TensorFlow's retracing
    warning under load."""
    from kiln.serve.replica import ModelServer

    _, store, *_ = server
    for ref, method, shape in (("cnn:1", "classify", (28, 28, 1)), ("photos:1", "classify", (32, 32, 3))):
        replica = ModelServer(store, ref)
        traced = replica.model.predict_function.experimental_get_tracing_count()
        for n in (3, 1, 32, 7):
            out = replica.plugin.infer(replica.model, method, {"images": np.zeros((n, *shape), "float32")})
            assert len(next(iter(out.values()))) == n
        assert replica.model.predict_function.experimental_get_tracing_count() == traced, ref


def test_a_model_trained_in_mixed_precision_serves_float32_answers_equal_to_its_own(server):
    """photos:1 trained under mixed_bfloat16 (conftest): served, it answers float32 probabilities,
    the stored model's own in this process, and within bfloat16's precision of the network as it
    computed while training."""
    from kiln import models

    base, store, *_ = server
    plugin, model, version = models.load("photos:1", store)
    assert version.manifest["train"]["precision"] == "mixed_bfloat16"
    x = np.random.default_rng(0).random((4, 32, 32, 3)).astype("float32")
    served = requests.post(f"{base}/models/photos/classify", json={"images": x.tolist()}).json()
    here = plugin.infer(model, "classify", {"images": x})
    np.testing.assert_allclose(served["probabilities"], here["probabilities"], rtol=1e-5, atol=1e-6)
    meta = requests.get(f"{base}/v2/models/photos").json()
    assert {o["name"]: o["datatype"] for o in meta["outputs"]}["probabilities"] == "FP32"
    mixed = models.build(plugin, "mixed_bfloat16")
    mixed.set_weights(model.get_weights())
    trained_as = plugin.infer(mixed, "classify", {"images": x})["probabilities"]
    np.testing.assert_allclose(served["probabilities"], trained_as, atol=0.02)


def test_token_protects_every_route_but_health(server):
    base, *_ = server
    secure = f"{base}/secure"
    image = {"images": np.zeros((28, 28, 1)).tolist()}
    assert requests.get(f"{secure}/v2/health/live").status_code == 200
    assert requests.get(f"{secure}/v2/health/ready").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = requests.post(f"{secure}/models/cnn/classify", json=image, headers=headers)
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        assert requests.get(f"{secure}/models", headers=headers).status_code == 401
    r = requests.post(f"{secure}/models/cnn/classify", json=image, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert requests.post(f"{base}/models/cnn/classify", json=image).status_code == 200  # no token: open
    # the API's own description lists every model and argument: it needs the token too
    for path in ("/openapi.json", "/docs", "/v2", "/v1/models/cnn/metadata"):
        r = requests.get(f"{secure}{path}")
        assert r.status_code == 401 and "Bearer" in r.json()["error"], (path, r.status_code)
    assert "cnn_v1_classify" in str(requests.get(f"{secure}/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json())
    # the scheme name is case-insensitive (RFC 7235); the gallery's static files are public
    assert requests.get(f"{secure}/models", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert requests.get(f"{secure}/").status_code == 200 and requests.get(f"{secure}/gallery/gallery.js").status_code == 200
    # every route the ingress declares, today's and any added later: one middleware checks them
    # all (the routes read from its source: Serve moves them off the module's FastAPI app)
    import ast

    from kiln.serve import ingress

    values = {"model": "cnn", "version": "1", "label": "stable", "method": "classify",
              "name": "confusion.png", "verb": "predict"}
    public = {"/", "/gallery/{name}", "/v2/health/live", "/v2/health/ready", "/-/drain"}
    routes = [(d.func.attr.upper(), d.args[0].value)
              for node in ast.walk(ast.parse(Path(ingress.__file__).read_text()))
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              for d in node.decorator_list
              if isinstance(d, ast.Call) and isinstance(d.func, ast.Attribute)
              and isinstance(d.func.value, ast.Name) and d.func.value.id == "api"
              and d.func.attr in ("get", "post", "put", "patch", "delete")]
    assert len(routes) >= 30, routes
    for method, path in routes:
        r = requests.request(method, f"{secure}{path.format(**values)}", json=image, timeout=30)
        assert (r.status_code == 401) == (path not in public), (method, path, r.status_code, r.text[:200])


def test_the_official_triton_client_json_and_binary(server):
    """tritonclient.http as its docs use it: it sends no Content-Type, and by default binary tensors
    both ways (the binary data extension); Kiln answered every infer with 415 before."""
    import tritonclient.http as httpclient

    base, *_ = server
    client = httpclient.InferenceServerClient(url=base.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("cnn")
    meta = client.get_model_metadata("cnn")
    assert meta["inputs"][0]["shape"] == [-1, 28, 28, 1]
    types = {o["name"]: o["datatype"] for o in meta["outputs"]}
    assert types["probabilities"] == "FP32" and types["labels"] == "BYTES"  # labels are class names
    images, labels = mnist(4)
    expected = requests.post(f"{base}/models/cnn/classify", json={"images": images.tolist()}).json()
    for binary in (True, False):
        x = httpclient.InferInput("images", [4, 28, 28, 1], "FP32")
        x.set_data_from_numpy(images.astype("float32"), binary_data=binary)
        out = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
        result = client.infer("cnn", [x], outputs=out, request_id="r1")
        probs = result.as_numpy("probabilities")
        assert probs.shape == (4, 10) and result.as_numpy("labels") is None  # only what was asked
        np.testing.assert_allclose(probs, expected["probabilities"], rtol=1e-5, atol=1e-6)
    result = client.infer("cnn", [x])  # no outputs named: all of them, binary by default
    assert [b.decode() for b in result.as_numpy("labels")] == [str(x) for x in expected["labels"]]


def test_tf_servings_own_curl_command_and_metadata(server, tmp_path):
    """TF Serving's REST docs: `curl -d @body -X POST .../v1/models/m:predict` (a form Content-Type)."""
    import json
    import subprocess

    base, *_ = server
    images, _ = mnist(2)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"instances": images.tolist()}))
    out = subprocess.run(["curl", "-s", "-d", f"@{body}", "-X", "POST", f"{base}/v1/models/cnn:predict"],
                         capture_output=True, text=True, timeout=60)
    predictions = json.loads(out.stdout)["predictions"]
    assert len(predictions) == 2 and len(predictions[0]["probabilities"]) == 10, out.stdout[:500]
    meta = requests.get(f"{base}/v1/models/cnn/versions/1/metadata").json()
    sig = meta["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sig["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert [d["size"] for d in sig["inputs"]["images"]["tensor_shape"]["dim"]] == ["-1", "28", "28", "1"]
    assert sig["outputs"]["probabilities"]["dtype"] == "DT_FLOAT" and sig["outputs"]["labels"]["dtype"] == "DT_STRING"
    # a signature per method: the features of the cnn by name
    named = requests.post(f"{base}/v1/models/cnn:predict",
                          json={"signature_name": "classify", "instances": images[:1].tolist()}).json()
    assert len(named["predictions"]) == 1


def test_tf_servings_classify_and_regress_as_its_docs_show(server, tmp_path):
    """TF Serving's Classify API (`curl -d '{"examples": [...]}' -X POST .../m:classify`): every
    class with its score per example, the best one the :predict label; features shared in
    'context'; :regress on a classifier is TF Serving's 400 for a signature of the wrong kind."""
    import json
    import subprocess

    base, *_ = server
    images, _ = mnist(2)
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"examples": [{"images": img.tolist()} for img in images]}))
    out = subprocess.run(["curl", "-s", "-d", f"@{body}", "-X", "POST", f"{base}/v1/models/cnn:classify"],
                         capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout)["result"]
    predicted = requests.post(f"{base}/v1/models/cnn:predict", json={"instances": images.tolist()}).json()
    assert [[label for label, _ in pairs] for pairs in result] == [[str(d) for d in range(10)]] * 2
    assert [max(pairs, key=lambda p: p[1])[0] for pairs in result] == [p["labels"] for p in predicted["predictions"]]
    assert all(abs(sum(score for _, score in pairs) - 1) < 1e-4 for pairs in result)
    shared = requests.post(f"{base}/v1/models/cnn/versions/1:classify",
                           json={"context": {"images": images[0].tolist()}, "examples": [{}]}).json()
    # the same scores: a batch of one and a batch of two may round the last float digits apart
    assert [[label for label, _ in pairs] for pairs in shared["result"]] == [[str(d) for d in range(10)]]
    np.testing.assert_allclose([[score for _, score in pairs] for pairs in shared["result"]],
                               [[score for _, score in pairs] for pairs in result[:1]], atol=1e-5)
    regress = requests.post(f"{base}/v1/models/cnn:regress", json={"examples": [{"images": images[0].tolist()}]})
    assert regress.status_code == 400 and "no regression signature" in regress.json()["error"]


def test_a_poisoned_request_fails_alone_in_its_batch(server):
    """A 401-digit integer inside an array once raised OverflowError in the batched model call:
    all 60 valid requests batched with it got 500. Now it alone gets a 400."""
    import concurrent.futures

    base, *_ = server
    good = {"images": np.zeros((28, 28, 1)).tolist()}
    poison = '{"images": [[[' + "1" + "0" * 400 + ']]]}'

    def send(k: int) -> tuple[int, int]:
        if k % 16 == 7:
            r = requests.post(f"{base}/models/cnn/classify", data=poison,
                              headers={"Content-Type": "application/json"}, timeout=60)
        else:
            r = requests.post(f"{base}/models/cnn/classify", json=good, timeout=60)
        return k, r.status_code

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = dict(pool.map(send, range(64)))
    assert all(c == 400 for k, c in codes.items() if k % 16 == 7), codes
    assert all(c == 200 for k, c in codes.items() if k % 16 != 7), codes


def test_cli_serve_errors_are_one_line(tmp_path):
    out = run_kiln("serve", "--store", str(tmp_path / "empty"))
    assert out.returncode == 2 and "holds no models" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    out = run_kiln("serve", "--port", "70000")
    assert out.returncode == 2 and "--port must be at most 65535, got 70000" in out.stderr
    out = run_kiln("serve", "--replicas", "3-1")
    assert out.returncode == 2 and "--replicas takes N or MIN-MAX" in out.stderr


def test_a_port_in_use_is_one_line_and_starts_nothing(server):
    """Another server on the port: `kiln serve` printed a 47-line Ray traceback from HAProxy's
    failed bind and exited 1, after starting Ray for nothing."""
    import tempfile

    _, store, *_ = server
    ray_tmp = Path(tempfile.mkdtemp(prefix="kr-"))  # where this server's Ray would keep its session
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run_kiln("serve", "--store", store, "--model", "cnn", "--port", str(port), timeout=300,
                       env={"RAY_TMPDIR": str(ray_tmp)})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert f"port {port}" in lines[0] and "in use" in lines[0] and "--port" in lines[0], lines
    assert not list(ray_tmp.rglob("session_*")), list(ray_tmp.rglob("*"))  # refused before Ray started
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_an_open_files_limit_too_low_is_one_line_and_starts_nothing(server):
    """Under `ulimit -n 8192`, `kiln serve` died at start-up with 51 lines of traceback and
    HAProxy's "Cannot raise FD limit to 10276, limit is 8192"."""
    import tempfile

    _, store, *_ = server
    ray_tmp = Path(tempfile.mkdtemp(prefix="kr-"))  # where this server's Ray would keep its session
    command = (f"ulimit -n 8192 && exec {sys.executable} -m kiln.cli serve --store {store} --model cnn "
               f"--port {free_port()} --max-connections 5000")
    out = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert "--max-connections 5000" in lines[0] and "limit of 8192" in lines[0] and "ulimit" in lines[0], lines
    assert not list(ray_tmp.rglob("session_*"))  # refused before Ray started
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_cli_serve_prints_routes_and_stops_cleanly_on_ctrl_c(server):
    """`kiln serve` as a user runs it (its own local Ray cluster): it prints each route once the
    model is ready, answers, and Ctrl-C stops Serve and Ray, leaving no process behind. SIGTERM
    is tested on the operations module's server (test_serve_ops)."""
    from helpers import haproxy_folders, server_processes, shared_listeners, start_serve, stop_server_and_check

    _, store, *_ = server
    port = free_port()
    proc, lines, reader = start_serve("--store", store, "--model", "cnn", "--port", str(port),
                                      "--poll-seconds", "0", env=NOISY_TF, session=True)
    try:
        # Two servers on one machine (this one and the module's): both Serve fallback proxies,
        # HAProxy's backup while an ingress replica restarts, listened on 127.0.0.1:8500 with
        # SO_REUSEPORT, so a server's requests were answered by the other's models
        mine = server_processes(proc)
        assert not shared_listeners(mine), shared_listeners(mine)
        backup = {int(m.group(1)) for folder in haproxy_folders(mine.values())
                  for cfg in folder.glob("*/haproxy.cfg")
                  for m in re.finditer(r"^\s*server \S+ 127\.0\.0\.1:(\d+) .*\bbackup\b", cfg.read_text(), re.M)}
        assert len(backup) == 1, backup
        (fallback,) = backup
        for _ in range(20):  # a new connection each: the kernel picks a listener per connection
            listed = requests.get(f"http://127.0.0.1:{fallback}/models", timeout=30)
            assert [m["ref"] for m in listed.json()["models"]] == ["cnn:1"], listed.text[:300]
        assert any(f"POST http://127.0.0.1:{port}/models/cnn/classify" in l for l in lines), lines
        # Kiln's lines, not Ray Serve's start-up notices: its controller's nine lines of data path
        # settings, and "New http_options ... will not be applied" (they were)
        assert not [l for l in lines if " INFO " in l or "will not be applied" in l], lines
        r = requests.post(f"http://127.0.0.1:{port}/models/cnn/classify",
                          json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=30)
        assert r.status_code == 200
    except BaseException:
        proc.kill()
        raise
    stop_server_and_check(proc, lines, reader, "SIGINT", group=True)  # as a terminal sends Ctrl-C


@pytest.fixture
def own_store(trained, tmp_path) -> str:
    """A store of the session's cnn for a test that starts its own `kiln serve` process: without
    the module's server, conftest places it with the tests whose Ray runs in processes of their
    own, beside the module's."""
    copy_models(trained, tmp_path / "store", "cnn")
    return str(tmp_path / "store")


def test_sigterm_to_the_whole_service_stops_it_with_status_0(own_store):
    """systemd's default (KillMode=control-group) sends SIGTERM to every process of the service
    at once: Ray's GCS went first, and the server reported "the Ray cluster under the server
    stopped" and exited 1 from a stop that was asked for."""
    from helpers import start_serve, stop_server_and_check

    proc, lines, reader = start_serve("--store", own_store, "--model", "cnn", "--port", str(free_port()),
                                      "--poll-seconds", "0", session=True)
    stop_server_and_check(proc, lines, reader, "SIGTERM", group=True)


def test_a_killed_server_leaves_nothing_on_its_port(own_store):
    """An OOM kill or `kill -9` gives `kiln serve` no chance to stop Serve: Ray's own processes
    follow it down, but Serve's HAProxy, a child of one of them, kept listening on the server's
    port for hours, so the next `kiln serve` there could not start. Within a bounded wait the
    port must be free and none of the killed server's processes left."""
    from helpers import ray_processes, server_processes, start_serve

    port = free_port()
    proc, lines, _ = start_serve("--store", own_store, "--model", "cnn", "--port", str(port), "--poll-seconds", "0")
    try:
        assert requests.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=30).status_code == 200, lines
        killed = set(server_processes(proc))  # once killed, its processes are no one's children
        haproxy = {pid for pid, line in ray_processes().items() if pid in killed and "haproxy" in line}
        assert haproxy  # the listener whose fate is tested
    finally:
        proc.kill()
        proc.wait(timeout=60)
    # HAProxy, the listener, follows its parent down within seconds
    deadline = time.time() + 60
    while haproxy & set(ray_processes()) and time.time() < deadline:
        time.sleep(0.5)
    assert not haproxy & set(ray_processes()), [ray_processes()[p] for p in haproxy & set(ray_processes())]
    # what the next `kiln serve` on this port checks first; binding without SO_REUSEADDR, as this
    # test did, failed on the killed listener's connections left in TIME_WAIT for 60 s
    from kiln.net import check_port_free

    check_port_free("127.0.0.1", port)
    # Ray's two agents see their raylet die at once, then spend 60 s trying to report it to the
    # dead GCS (publish_error_to_driver's fixed timeout in Ray 2.60) before they exit: the test
    # process's last step checks that none of the killed server's processes is left, while others test
    LATE_CHECKS.append(("the killed server's processes", lambda: killed & set(ray_processes())))


def test_client_cli_predict_and_png_generation(server, tmp_path):
    base, store, *_ = server
    from PIL import Image

    from kiln.client import Client

    x, y = mnist(1)
    Image.fromarray(x[0, ..., 0].astype("uint8")).save(tmp_path / "digit.png")
    out = run_kiln("predict", "cnn", "--image", str(tmp_path / "digit.png"), "--url", base)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[0] == Client(base).call("cnn", "classify", images=x)["labels"][0]
    out = run_kiln("generate", "lstm", "--set", "prompt=ROMEO:", "--set", "max_chars=20", "--set", "seed=1", "--url", base)
    assert out.returncode == 0 and out.stdout.startswith("ROMEO:"), out.stderr
    # an image method answers with a PNG when asked (Accept: image/png or "format": "png")
    png = Client(base).png("autoencoder", "reconstruct", images=mnist(3)[0])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import io

    assert Image.open(io.BytesIO(png)).size == (2 * (3 * 30 + 2), 2 * 32)  # 3 tiles of 28+2, x2
    same = requests.post(f"{base}/models/autoencoder/reconstruct", json={"images": mnist(3)[0].tolist(), "format": "png"})
    assert same.headers["content-type"] == "image/png" and same.content == png
    r = requests.post(f"{base}/models/lstm/generate", json={"prompt": "A", "format": "png"})
    assert r.status_code == 406 and "returns no images" in r.json()["error"]
    out = run_kiln("predict", "cnn", "--image", str(tmp_path / "digit.png"), "--url", "http://127.0.0.1:9")
    assert out.returncode == 2 and "cannot reach a Kiln server" in out.stderr


def test_concurrent_requests_are_batched_and_a_bad_one_fails_alone(server):
    base, *_ = server
    from concurrent.futures import ThreadPoolExecutor

    x, _ = mnist(24)
    alone = requests.post(f"{base}/models/cnn/classify", json={"images": x.tolist()}).json()

    def one(i):
        images = x[i:i + 1].tolist() if i != 5 else [[1, 2]]  # request 5 has the wrong shape
        return requests.post(f"{base}/models/cnn/classify", json={"images": images}, timeout=60)

    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(one, range(24)))
    assert replies[5].status_code == 400 and "has shape [1, 2]" in replies[5].json()["error"]
    for i, r in enumerate(replies):
        if i != 5:
            assert r.status_code == 200
            assert r.json()["classes"] == alone["classes"][i:i + 1]
            assert np.allclose(r.json()["probabilities"], alone["probabilities"][i:i + 1], atol=1e-5)
    cnn = next(m for m in requests.get(f"{base}/models").json()["models"] if m["ref"] == "cnn:1")
    assert "classify" in cnn["batchable"] and cnn["largest_batch"] > 1


def test_a_batch_of_two_methods_answers_each_request_with_its_own_method(server):
    """vae's encode and reconstruct are both batchable: requests for both that arrive together
    share a batch, and each gets what it would get alone."""
    base, *_ = server
    from concurrent.futures import ThreadPoolExecutor

    x, _ = mnist(16)
    alone = {m: requests.post(f"{base}/models/vae/{m}", json={"images": x.tolist()}).json()
             for m in ("encode", "reconstruct")}

    def one(i):
        method = ("encode", "reconstruct")[i % 2]
        return method, requests.post(f"{base}/models/vae/{method}", json={"images": x[i:i + 1].tolist()},
                                     timeout=60)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(one, range(16)))
    for i, (method, r) in enumerate(replies):
        assert r.status_code == 200, r.text
        got, want = r.json(), alone[method]
        assert set(got) == set(want)
        for k in got:
            assert np.allclose(got[k], want[k][i:i + 1], atol=1e-4), (method, k)
    vae = next(m for m in requests.get(f"{base}/models").json()["models"] if m["ref"] == "vae:1")
    assert {"encode", "reconstruct"} <= set(vae["batchable"]) and vae["largest_batch"] > 1


# --------------------------------------------------------------------------- the gallery, in a browser
SHOTS = ROOT / "build" / "gallery-screenshots"   # written by every run, for review


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system (Debian's chromium + chromium-driver, installed by
    `make setup`), driven by Selenium; never a downloaded browser build."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver_path, "chromium and chromedriver are missing: run `make setup`"
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1100,1400"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(browser, condition, timeout=60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout, poll_frequency=0.2).until(lambda d: condition(d))


def console_errors(browser) -> list[str]:
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def shoot(browser, name: str, file: str | None = None) -> None:
    from selenium.webdriver.common.by import By

    el = browser.find_element(By.ID, name)
    browser.execute_script("arguments[0].scrollIntoView()", el)
    el.screenshot(str(SHOTS / f"{file or name}.png"))


def draw(browser, strokes) -> None:
    """Drag the mouse along each stroke, in pad pixels (the pad is 280x280)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    pad = browser.find_element(By.ID, "pad")
    browser.execute_script("arguments[0].scrollIntoView()", pad)
    for stroke in strokes:
        chain = ActionChains(browser, duration=20)
        x, y = stroke[0]
        chain.move_to_element_with_offset(pad, x - 140, y - 140).click_and_hold()
        for (x0, y0), (x1, y1) in zip(stroke, stroke[1:]):
            chain.move_by_offset(x1 - x0, y1 - y0)
        chain.release().perform()


def test_gallery_classifies_a_drawn_digit_and_shows_the_filters(server, browser):
    from selenium.webdriver.common.by import By

    base = server[0]
    browser.get(base + "/")
    wait_for(browser, lambda d: d.find_element(By.ID, "bars") and "Loading" not in d.find_element(By.ID, "model-list").text)
    # a "1": one vertical stroke, in several moves so the prediction updates while drawing
    draw(browser, [[(140, 50), (140, 90), (140, 130), (140, 170), (140, 210), (140, 240)]])
    wait_for(browser, lambda d: "%" in d.find_element(By.ID, "prediction").text)
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    assert len(bars) == 10
    assert browser.find_element(By.ID, "prediction").text.startswith("1 ("), \
        browser.find_element(By.ID, "prediction").text
    shoot(browser, "classify")
    # an uploaded picture (dark ink on white paper, as photographed) replaces the drawing
    from PIL import Image, ImageDraw

    photo = Image.new("L", (200, 200), 255)
    ImageDraw.Draw(photo).line([(100, 30), (100, 170)], fill=0, width=18)
    photo.save(SHOTS / "upload-one.png")
    browser.find_element(By.ID, "clear").click()
    assert browser.find_element(By.ID, "prediction").text == "Draw a digit."
    browser.find_element(By.ID, "upload").send_keys(str(SHOTS / "upload-one.png"))
    wait_for(browser, lambda d: d.find_element(By.ID, "prediction").text.startswith("1 ("))
    # inside the CNN: fixed kernels computed in the page, learned kernels and maps from the API
    browser.find_element(By.ID, "inside-run").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#learned > div")) == 16)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#fixed figure")) == 4
    shoot(browser, "inside")
    # denoise: the autoencoder and the VAE reconstruct the noisy drawing
    browser.find_element(By.ID, "denoise-run").click()
    wait_for(browser, lambda d: d.execute_script(
        "const c = document.getElementById('vae-out').getContext('2d').getImageData(0, 0, 112, 112).data;"
        "return c.some((v, i) => i % 4 === 0 && v > 0);"))
    shoot(browser, "denoise")
    assert console_errors(browser) == []


def test_gallery_classifies_an_uploaded_photo_with_the_chosen_model(server, browser):
    """The classify section's chooser lists every served image classifier; with the photo model
    chosen, an uploaded photo is sent whole at that model's size and colours (32x32 RGB), not as
    an MNIST digit, and the answer names the folder's class."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select

    base = server[0]
    browser.get(base + "/")
    wait_for(browser, lambda d: "Loading" not in d.find_element(By.ID, "model-list").text)
    choice = Select(browser.find_element(By.ID, "classifier"))
    options = [o.get_attribute("value") for o in choice.options]
    assert options[0] == "cnn:1" and "photos:1" in options and "lstm:1" not in options
    assert choice.first_selected_option.get_attribute("value") == "cnn:1"  # the digits' CNN first
    choice.select_by_value("photos:1")
    bee = next((ROOT.parent / "shared" / "data" / "hymenoptera" / "val" / "bees").glob("*.jpg"))
    browser.find_element(By.ID, "upload").send_keys(str(bee))
    wait_for(browser, lambda d: d.find_element(By.ID, "prediction").text.split(" (")[0] in ("ants", "bees"))
    assert len(browser.find_elements(By.CSS_SELECTOR, "#bars .bar")) == 2
    shoot(browser, "classify", "classify-photo")
    assert console_errors(browser) == []


def test_gallery_latent_plane_generate_and_text(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.select import Select
    from selenium.webdriver.common.keys import Keys

    browser.get(server[0] + "/")
    wait_for(browser, lambda d: "z = (0.00, 0.00)" in d.find_element(By.ID, "decoded-at").text)
    plane = browser.find_element(By.ID, "plane")
    plane.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)  # keyboard: move the point, decode it
    wait_for(browser, lambda d: d.find_element(By.ID, "decoded-at").text.startswith("z = (0.") and
             d.find_element(By.ID, "decoded-at").text != "z = (0.00, 0.00)")
    shoot(browser, "latent")
    # generate: a CGAN digit button and the class-to-class strip
    browser.find_element(By.CSS_SELECTOR, "#digits button[aria-label='Generate the digit 7']").click()
    wait_for(browser, lambda d: d.execute_script("const i = document.getElementById('cgan-out');"
                                                 "return !i.hidden && i.complete && i.naturalWidth > 0;"))
    browser.find_element(By.ID, "morph-run").click()
    wait_for(browser, lambda d: d.execute_script("const i = document.getElementById('morph-out');"
                                                 "return !i.hidden && i.complete && i.naturalWidth > 0;"))
    # diffusion: a chosen digit in a few steps, and one digit's way from noise
    Select(browser.find_element(By.ID, "diffusion-digit")).select_by_value("3")
    steps = browser.find_element(By.ID, "diffusion-steps")
    steps.clear()
    steps.send_keys("5")
    for button, img in (("diffusion-run", "diffusion-out"), ("diffusion-path", "diffusion-trajectory")):
        browser.find_element(By.ID, button).click()
        wait_for(browser, lambda d: d.execute_script(f"const i = document.getElementById('{img}');"
                                                     "return !i.hidden && i.complete && i.naturalWidth > 0;"))
    shoot(browser, "generate")
    # text: raise the temperature with the keyboard, ask for a continuation
    slider = browser.find_element(By.ID, "temperature")
    slider.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    assert browser.find_element(By.ID, "temperature-value").text == "1.1"
    length = browser.find_element(By.ID, "length")
    length.clear()
    length.send_keys("80")
    # both text models are offered; gpt (chosen first) continues the prompt and shows attention
    options = [o.text for o in browser.find_elements(By.CSS_SELECTOR, "#text-model option")]
    assert options == ["gpt:1 (gpt)", "lstm:1 (lstm)"] or options == ["lstm:1 (lstm)", "gpt:1 (gpt)"], options
    assert browser.find_element(By.ID, "text-model").get_attribute("value") == "gpt:1"
    browser.find_element(By.ID, "text-run").click()
    wait_for(browser, lambda d: len(d.find_element(By.ID, "text-out").text) > 40)
    assert browser.find_element(By.ID, "text-out").text.startswith("ROMEO:")
    browser.find_element(By.ID, "attention-run").click()
    wait_for(browser, lambda d: d.execute_script(
        "const c = document.getElementById('attention'); if (c.hidden) return false;"
        "const p = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "for (let i = 0; i < p.length; i += 4) if (p[i] > 150 && p[i + 1] < 120) return true; return false;"))
    shoot(browser, "text")
    Select(browser.find_element(By.ID, "text-model")).select_by_value("lstm:1")
    browser.find_element(By.ID, "text-run").click()
    wait_for(browser, lambda d: len(d.find_element(By.ID, "text-out").text) > 40)
    assert browser.find_element(By.ID, "text-out").text.startswith("ROMEO:")
    # sections whose model is not served say so, with the command that would serve them
    assert "kiln train har" in browser.find_element(By.CSS_SELECTOR, "#activity .missing").text
    assert "kiln train dcgan" in browser.find_element(By.CSS_SELECTOR, "#generate .missing").text
    shoot(browser, "activity")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-list .thumbs img[src^='blob:']")) >= 4)
    shoot(browser, "models")
    assert console_errors(browser) == []


def test_gallery_fits_a_phone_and_every_control_has_a_label(server, browser):
    from selenium.webdriver.common.by import By

    browser.set_window_size(390, 844)
    try:
        browser.get(server[0] + "/")
        wait_for(browser, lambda d: "Loading" not in d.find_element(By.ID, "model-list").text)
        browser.save_screenshot(str(SHOTS / "phone.png"))
        wide = browser.execute_script("""
            return [...document.querySelectorAll('body *')].filter(
                (e) => e.getBoundingClientRect().right > window.innerWidth + 1
            ).map((e) => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));""")
        assert wide == [], f"wider than a {browser.execute_script('return window.innerWidth')}px phone: {wide}"
    finally:
        browser.set_window_size(1100, 1400)
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, select')].filter(
            (e) => !document.querySelector(`label[for="${e.id}"]`) && !e.getAttribute('aria-label')
        ).map((e) => e.id);""")
    assert unlabelled == []
    assert browser.execute_script(
        "return [...document.querySelectorAll('button')].every((b) => b.textContent.trim() || b.getAttribute('aria-label'))")
    # everything the page loads comes from this server
    sources = browser.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert sources and all(s.startswith(server[0]) or s.startswith("blob:") for s in sources), sources


def test_gallery_asks_for_the_token_and_keeps_it_in_the_tab(server, browser):
    from selenium.webdriver.common.by import By

    browser.get(server[0] + "/secure")   # redirected to /secure/, the page of the app with a token
    form = wait_for(browser, lambda d: d.find_element(By.ID, "auth").is_displayed() and d.find_element(By.ID, "auth"))
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    form.submit()
    wait_for(browser, lambda d: "cnn v1" in d.find_element(By.ID, "model-list").text)
    draw(browser, [[(140, 50), (140, 130), (140, 240)]])
    wait_for(browser, lambda d: "%" in d.find_element(By.ID, "prediction").text)
    stored = browser.execute_script("return [localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]
    # the page's only 401 is the one that asked for the token
    errors = console_errors(browser)
    assert len(errors) <= 1 and all("401" in e for e in errors), errors


def test_a_version_stored_while_serving_is_served_without_restart(server):
    base, store, _, spec = server
    from kiln.serve import app

    assert copy_version(store, "cnn:1", "cnn") == "cnn:2"  # what a second training run stores
    assert app.refresh(spec, None) == (["cnn:2"], [])
    assert app.refresh(spec, None) == ([], [])  # nothing new: nothing redeployed
    import time

    deadline = time.time() + 240
    while time.time() < deadline:
        models = {m["ref"]: m["state"] for m in requests.get(f"{base}/models").json()["models"]}
        if models.get("cnn:2") == "READY":
            break
        time.sleep(1)
    assert models.get("cnn:2") == "READY" and "cnn:1" not in models  # the latest of each model
    image = {"images": np.zeros((28, 28, 1)).tolist()}
    assert requests.post(f"{base}/models/cnn/versions/2/classify", json=image).status_code == 200
    assert requests.get(f"{base}/v1/models/cnn").json()["model_version_status"][0]["version"] == "2"
