"""kiln export: each exported file, run in the runtime that serves it elsewhere (TensorFlow's
SavedModel loader, onnxruntime, the LiteRT interpreter), answers what Kiln answers."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import copy_models, kiln_here, run_kiln

pytestmark = [pytest.mark.slow]

FORMATS = ["saved_model", "onnx", "litert"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained):
    """The session's cnn, vae, cgan, and three without a network to export (the answers need not
    be good, only equal)."""
    root = tmp_path_factory.mktemp("export")
    copy_models(trained, root / "store", "cnn", "vae", "cgan", "lstm", "gpt", "diffusion")
    return root


def kiln_answer(root, ref: str):
    """Kiln's own output for fixed inputs, through the plugin's inference method; the inputs."""
    from kiln import models

    plugin, model, _ = models.load(ref, root / "store")
    rng = np.random.default_rng(0)
    if ref.startswith("cnn"):
        x = {"images": rng.integers(0, 256, (5, 28, 28, 1)).astype("float32")}
        return np.asarray(plugin.classify(model, x["images"])["probabilities"]), x
    if ref.startswith("vae"):
        x = {"z": rng.standard_normal((5, plugin.config.latent_dim)).astype("float32")}
        return np.asarray(plugin.decode(model, x["z"])["images"]), x
    out = plugin.sample(model, 3, 5, 7)  # digit 3, 5 images, seed 7
    return np.asarray(out["images"]), {"z": np.asarray(out["z"], "float32"), "digit": np.full(5, 3, "int32")}


def run_exported(path, fmt: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    if fmt == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        (out,) = serve(**{k: tf.constant(v) for k, v in inputs.items()}).values()
        return out.numpy()
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        assert names == set(inputs), names
        return session.run(None, inputs)[0]
    from ai_edge_litert.interpreter import Interpreter

    runner = Interpreter(model_path=str(path)).get_signature_runner()  # its one signature
    (out,) = runner(**inputs).values()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("ref", ["cnn:1", "vae:1", "cgan:1"])
def test_the_exported_network_answers_what_kiln_answers(store, tmp_path, ref, fmt):
    expected, inputs = kiln_answer(store, ref)
    # in this process: what a fresh `kiln export` prints is checked below for lstm
    out = kiln_here("export", ref, "--format", fmt, "--out", str(tmp_path / "exported"),
                    "--store", str(store / "store"))
    assert out.returncode == 0, out.stderr[-3000:]
    name, version = ref.split(":")
    path = {"saved_model": tmp_path / "exported" / name / version,
            "onnx": tmp_path / "exported" / f"{name}-{version}.onnx",
            "litert": tmp_path / "exported" / f"{name}-{version}.tflite"}[fmt]
    assert f"[kiln] wrote {path}" in out.stdout
    if fmt == "saved_model":  # TF Serving's layout: NAME/VERSION/saved_model.pb
        assert (path / "saved_model.pb").is_file() and (path / "variables").is_dir()
    got = run_exported(path, fmt, inputs)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5)
    assert not list((tmp_path / "exported").rglob(".kiln-export-*"))  # nothing half-written left
    again = kiln_here("export", ref, "--format", fmt, "--out", str(tmp_path / "exported"),
                      "--store", str(store / "store"))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_a_plugin_without_an_exportable_network_says_why(store, tmp_path):
    out = run_kiln("export", "lstm", "--out", str(tmp_path / "x"), "--store", str(store / "store"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "lstm takes text and runs a loop over characters" in lines[0], lines
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


@pytest.mark.parametrize("name, words", [("gpt", "gpt takes text and runs a loop over characters"),
                                         ("diffusion", "diffusion draws by calling its network once per DDIM step")])
def test_each_plugin_without_a_network_names_itself_in_the_refusal(store, tmp_path, name, words):
    out = kiln_here("export", name, "--out", str(tmp_path / "x"), "--store", str(store / "store"))
    assert out.returncode == 2 and words in out.stderr, out.stderr
