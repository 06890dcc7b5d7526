"""The wire formats (kiln.serve.codecs) and the one picture decoder, without Ray: what standard
clients send is read as they mean it, and what is wrong gets a status and a message."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from kiln.serve import codecs
from kiln.serve.codecs import ProtocolError
from kiln.serve.options import ServeOptions

INFO = {"name": "cnn", "version": 1, "plugin": "cnn",
        "methods": {"classify": {"inputs": {"images": {"type": "array", "x-shape": [None, 4, 4, 3]}},
                                 "outputs": {"labels": "", "probabilities": ""}},
                    "features": {"inputs": {"images": {"type": "array"}, "layer": {"type": "integer"}},
                                 "outputs": {"maps": ""}}}}


def png(array: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(array.astype("uint8")).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_an_rgb_picture_keeps_its_colours_for_an_rgb_model():
    rgb = np.zeros((4, 4, 3))
    rgb[..., 0] = 200  # red
    rgb[0, 0] = (0, 0, 255)  # one blue pixel
    data, rows = codecs.tf_predict_request({"instances": [{"b64": png(rgb)}]}, "images", [None, 4, 4, 3])
    assert rows and np.asarray(data).shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(data[0]), rgb)


def test_a_picture_is_converted_and_resized_to_the_models_input():
    rgb = np.full((8, 8, 3), 255.0)
    data, _ = codecs.tf_predict_request({"instances": [{"b64": png(rgb)}]}, "images", [None, 4, 4, 1])
    assert np.asarray(data).shape == (1, 4, 4, 1) and np.allclose(data, 255)


def test_a_picture_too_large_to_decode_is_refused_before_decoding():
    big = Image.new("L", (5000, 5000))  # a few KB as PNG, 25 megapixels decoded
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    with pytest.raises(ProtocolError) as e:
        codecs.decode_b64({"b64": base64.b64encode(buf.getvalue()).decode()}, [None, 28, 28, 1])
    assert e.value.status == 400 and "5000x5000" in e.value.message


@pytest.mark.parametrize("ctype", ["", "application/x-www-form-urlencoded", "text/plain", "application/json"])
def test_a_json_body_is_json_whatever_the_header_says(ctype):
    """tritonclient sends no Content-Type; `curl -d @body` sends a form type (TF Serving's docs)."""
    assert codecs.parse_json(b'{"instances": [1, 2]}', ctype) == {"instances": [1, 2]}


def test_a_body_that_is_not_json_is_415_unless_it_claimed_to_be_json():
    with pytest.raises(ProtocolError) as e:
        codecs.parse_json(b"images=1", "application/x-www-form-urlencoded")
    assert e.value.status == 415 and "Content-Type: application/json" in e.value.message
    with pytest.raises(ProtocolError) as e:
        codecs.parse_json(b"{bad", "application/json")
    assert e.value.status == 400 and "malformed JSON" in e.value.message
    with pytest.raises(ProtocolError) as e:  # a missing body is a bad request, whatever its type
        codecs.parse_json(b"", "")
    assert e.value.status == 400 and "the body is empty" in e.value.message


def test_predict_method_and_v2_round_trip():
    assert codecs.predict_method(INFO) == ("classify", "images")
    x = codecs.v2_infer_request({"inputs": [{"name": "images", "shape": [1, 2], "datatype": "FP32",
                                             "data": [[1, 2.5]]}]}, PAIR)
    assert x.dtype == np.float32 and x.shape == (1, 2)
    out, tail = codecs.v2_infer_response({"labels": [3], "probabilities": [[0.5, 0.5]]}, "cnn", "1", "r1")
    assert tail == b"" and out["id"] == "r1"
    # the protocol's id is a string: a request without one gets an answer without one, not null
    assert "id" not in codecs.v2_infer_response({"labels": [3]}, "cnn", "1", None)[0]
    assert out["outputs"][0] == {"name": "labels", "shape": [1], "datatype": "INT64", "data": [3]}


def test_v2_binary_tensors_both_ways_and_the_outputs_filter():
    """The binary tensor data extension, as tritonclient sends and reads it by default."""
    x = np.arange(6, dtype="float32").reshape(1, 6)
    six = {"name": "images", "datatype": "FP32", "shape": [-1, 6]}
    body = {"inputs": [{"name": "images", "shape": [1, 6], "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    np.testing.assert_array_equal(codecs.v2_infer_request(body, six, x.tobytes()), x)
    chosen = codecs.v2_outputs(body, ["labels", "probabilities"])
    out, tail = codecs.v2_infer_response({"labels": [3], "probabilities": [[0.25, 0.75]]}, "cnn", "1", None, chosen)
    assert [o["name"] for o in out["outputs"]] == ["probabilities"]  # only what was asked for
    assert out["outputs"][0]["parameters"] == {"binary_data_size": 8} and "data" not in out["outputs"][0]
    np.testing.assert_array_equal(np.frombuffer(tail, "<f4"), [0.25, 0.75])
    with pytest.raises(ProtocolError, match="unknown output"):
        codecs.v2_outputs({"outputs": [{"name": "nope"}]}, ["labels"])
    with pytest.raises(ProtocolError, match="'outputs' must be a list of {'name': ...}, got null"):
        codecs.v2_outputs({"outputs": None}, ["labels"])
    # an output's parameters are an object: a list there was a 500
    with pytest.raises(ProtocolError, match="output 'labels' 'parameters' must be an object"):
        codecs.v2_outputs({"outputs": [{"name": "labels", "parameters": []}]}, ["labels"])
    with pytest.raises(ProtocolError, match="binary_data_size"):
        codecs.v2_infer_request(body, six, x.tobytes()[:-4])
    meta = codecs.v2_model_metadata("cnn", ["1"], INFO)
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 4, 4, 3]}]


PAIR = {"name": "images", "datatype": "FP32", "shape": [-1, 2]}  # a model's input, as its v2 metadata says
GOOD = {"name": "images", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}


@pytest.mark.parametrize("body, words", [
    ({"inputs": [{**GOOD, "data": [10 ** 400, 1]}]}, "does not fill shape"),
    ({"inputs": [{**GOOD, "name": "x"}]}, "this model's input is 'images'"),
    ({"inputs": [{**GOOD, "shape": [-1, 2], "data": []}]}, "non-negative integers"),
    ({"inputs": "nope"}, "'inputs' must be a list of one tensor"),
    # what the model's metadata says, checked: datatype, shape, and numbers for FP32 data
    ({"inputs": [{**GOOD, "datatype": "INT32"}]}, "datatype string \"INT32\"; this model's metadata says 'FP32'"),
    ({"inputs": [{**GOOD, "datatype": "FOO"}]}, "metadata says 'FP32'"),
    ({"inputs": [{**GOOD, "shape": [2], "data": [1, 2]}]}, "has shape [2]; this model's metadata says [-1, 2]"),
    ({"inputs": [{**GOOD, "shape": [1, 3], "data": [1, 2, 3]}]}, "metadata says [-1, 2]"),
    ({"inputs": [{**GOOD, "data": ["1", 2]}]}, "data must be numbers (nested arrays allowed), found string"),
    ({"inputs": [{**GOOD, "data": [True, 2]}]}, "found boolean true"),
    ({"inputs": [{**GOOD, "shape": [1, True]}]}, "non-negative integers"),
    # the request object as the protocol types it
    ({"inputs": [{k: v for k, v in GOOD.items() if k != "datatype"}]}, "lacks 'datatype'"),
    ({"inputs": [{k: v for k, v in GOOD.items() if k != "name"}]}, "lacks 'name'"),
    ({"inputs": [{k: v for k, v in GOOD.items() if k != "data"}]}, "lacks 'data'"),
    ({"id": 42, "inputs": [GOOD]}, "'id' must be a string, got number 42"),
    ({"parameters": [], "inputs": [GOOD]}, "request's 'parameters' must be an object"),
    ({"inputs": [{**GOOD, "parameters": "x"}]}, "input 'images' 'parameters' must be an object"),
    ([GOOD], "must be a JSON inference request object"),
])
def test_v2_requests_that_cannot_be_read_say_why(body, words):
    with pytest.raises(ProtocolError) as e:
        codecs.v2_infer_request(body, PAIR)
    assert e.value.status == 400 and words in e.value.message


def test_limits_count_examples_not_rows_of_one_example():
    limits = codecs.Limits(ServeOptions(max_items=3, max_chars=5))
    images = {"images": {"type": "array", "x-shape": [None, 4, 4, 1]}}
    limits.check({"images": np.zeros((4, 4, 1)).tolist()}, images)       # one image, no batch axis
    limits.check({"images": np.zeros((3, 4, 4, 1))}, images)              # three, as numpy
    limits.check({"images": [{"b64": "x"}] * 3}, images)                   # three encoded pictures
    for too_many in (np.zeros((4, 4, 4, 1)).tolist(), np.zeros((4, 4, 4, 1)), [{"b64": "x"}] * 4):
        with pytest.raises(ProtocolError, match=r"holds 4 items, over the server's limit of 3 \(kiln serve --max-items\)"):
            limits.check({"images": too_many}, images)
    with pytest.raises(ProtocolError, match="6 characters, over the server's limit of 5"):
        limits.check({"text": "abcdef"}, {"text": {"type": "string"}})
    with pytest.raises(ProtocolError, match="asks for 4 items"):
        limits.check({"n": 4}, {"n": {"type": "integer", "x-count": True}})
    limits.check({"seed": 4}, {"seed": {"type": "integer"}})  # a plain integer is no count
    assert codecs.Limits(ServeOptions(max_response_mb=400 / 2**20)).max_values() == 100


def test_a_plugin_names_the_method_the_standard_protocols_call():
    """Before: a third-party `regress` model got 404 on every TF Serving and v2 route."""
    regress = {"name": "prices", "version": 1, "plugin": "prices",
               "methods": {"regress": {"inputs": {"x": {"type": "array", "x-shape": [None, 8]}},
                                       "outputs": {"y": ""}}}}
    with pytest.raises(ProtocolError, match='predict = "METHOD"'):
        codecs.predict_method(regress)
    assert codecs.predict_method({**regress, "predict": "regress"}) == ("regress", "x")
    assert codecs.signatures({**regress, "predict": "regress"})["serving_default"] == ("regress", "x")
    with pytest.raises(ProtocolError, match="names 'nope' as its predict method"):
        codecs.predict_method({**regress, "predict": "nope"})
    assert codecs.predict_method(INFO) == ("classify", "images")  # the default order


def test_a_protocol_error_travels_between_processes_whole():
    """A model replica returns one request's failure in a batch as a ProtocolError, which Ray
    pickles to the ingress: its status and Retry-After must arrive with its message (the default
    pickling of an exception keeps only the message, and could not even rebuild this one)."""
    import pickle

    back = pickle.loads(pickle.dumps(ProtocolError(503, "the model is loading", retry_after=2)))
    assert (back.status, back.message, back.retry_after, str(back)) == (503, "the model is loading", 2, "the model is loading")


@pytest.mark.parametrize("body, words", [
    ({"examples": []}, "send 'examples'"),
    ({"instances": [[1, 2]]}, "send 'examples'"),
    ({"examples": [[1, 2]]}, "must be objects of features"),
    ({"examples": [{"images": [1, 2]}], "context": {"images": [3, 4]}}, "repeats context feature(s) ['images']"),
    ({"examples": [{"pixels": [1, 2]}]}, "has features ['pixels']; this model takes exactly 'images'"),
])
def test_tf_classify_bodies_that_cannot_be_read_say_why(body, words):
    with pytest.raises(ProtocolError) as e:
        codecs.tf_examples(body, "images", [None, 2])
    assert e.value.status == 400 and words in e.value.message


def test_tf_classify_takes_context_features_and_answers_every_class():
    items = codecs.tf_examples({"context": {"images": [1, 2]}, "examples": [{}, {}]}, "images", [None, 2])
    assert items == [[1, 2], [1, 2]]
    out = codecs.tf_classify_response({"probabilities": [[0.25, 0.75]]}, ["ant", "bee"])
    assert out == {"result": [[["ant", 0.25], ["bee", 0.75]]]}
