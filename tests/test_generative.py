"""The generative plugins (autoencoder, dcgan, cgan, diffusion; the VAE has test_vae.py) on real MNIST:
short real runs, their pictures, reload giving the same outputs, validated inference, the
classifier-based evaluator (identical weights on 2 Ray Train workers: test_ray_train)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import copy_models, kiln_here
from kiln import KilnError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained):
    """One store with the session's CNN (the judge), VAE, denoising autoencoder and diffusion
    model, and a DCGAN and a CGAN trained here on a few batches (what their training prints is
    checked below; how good they get: bench/quality.py)."""
    root = tmp_path_factory.mktemp("generative")
    env = {"KILN_STORE": str(root / "store"), "KILN_RUNS": str(root / "runs")}
    copy_models(trained, root / "store", "cnn", "vae", "autoencoder", "diffusion")
    runs = [("dcgan", "--epochs", "2", "--limit", "256", "--set", "sample_every=1", "--set", "width=32"),
            ("cgan", "--epochs", "2", "--limit", "256", "--set", "sample_every=2")]
    outputs = {}
    for plugin, *args in runs:  # `kiln train` in this process (a fresh one: test_train_local)
        out = kiln_here("train", plugin, *args, cwd=root, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        outputs[plugin] = out.stdout
    return root, env, outputs


def manifest(root, name, version=1):
    return json.loads((root / "store" / name / str(version) / "manifest.json").read_text())


def mnist_test(n):
    from kiln import data

    return np.stack([a.numpy() for a, _ in data.load("mnist", "test", limit=n).ds]).reshape(n, 28, 28, 1)


def test_autoencoder_removes_noise(store):
    root, _, _ = store
    m = manifest(root, "autoencoder")["metrics"]
    assert m["psnr_denoised"] == pytest.approx(m["psnr_noisy"] + m["psnr_gain"], rel=1e-6)
    assert np.isfinite(m["psnr_gain"])  # how many dB it gains: bench/quality.py
    pictures = {p.name for p in (root / "store" / "autoencoder" / "1" / "artifacts").iterdir()}
    assert {"reconstructions.png", "interpolation.png"} <= pictures


def test_autoencoder_methods_agree_and_reload_is_identical(store):
    root, _, _ = store
    from kiln import models

    plugin, model, _ = models.load("autoencoder", root / "store")
    again, model2, _ = models.load("autoencoder:1", root / "store")
    x = mnist_test(8)
    out = plugin.infer(model, "reconstruct", {"images": x, "gaussian_std": 0.4, "salt_pepper": 0.1, "seed": 5})
    out2 = again.infer(model2, "reconstruct", {"images": x, "gaussian_std": 0.4, "salt_pepper": 0.1, "seed": 5})
    np.testing.assert_allclose(out["images"], out2["images"], atol=1e-6)
    np.testing.assert_array_equal(out["noisy"], out2["noisy"])  # the same seed adds the same noise
    assert not np.allclose(out["noisy"], x / 255.0)
    assert out["images"].shape == x.shape and 0 <= out["images"].min() and out["images"].max() <= 1
    z = plugin.infer(model, "encode", {"images": x})["z"]
    assert z.shape == (8, 32)
    plain = plugin.infer(model, "reconstruct", {"images": x})["images"]
    np.testing.assert_allclose(plain, plugin.infer(model, "decode", {"z": z})["images"], atol=1e-5)
    for method, args, word in [("decode", {"z": np.zeros((1, 3))}, "code size is 32"),
                               ("reconstruct", {"images": x, "gaussian_std": -1}, "gaussian_std"),
                               ("reconstruct", {"images": x[:, :14]}, "shape"),
                               ("reconstruct", {}, "missing required argument 'images'")]:
        with pytest.raises(KilnError, match=word):
            plugin.infer(model, method, args)


def test_dcgan_progress_pictures_samples_and_reload(store):
    root, _, outputs = store
    from kiln import models

    assert "samples after epoch 1:" in outputs["dcgan"] and "samples after epoch 2:" in outputs["dcgan"]
    pictures = {p.name for p in (root / "store" / "dcgan" / "1" / "artifacts").iterdir()}
    assert {"samples.png", "interpolation.png", "progress_epoch_0001.png", "progress_epoch_0002.png"} <= pictures
    plugin, model, _ = models.load("dcgan", root / "store")
    again, model2, _ = models.load("dcgan:1", root / "store")
    a = plugin.infer(model, "sample", {"n": 6, "seed": 11})
    b = again.infer(model2, "sample", {"n": 6, "seed": 11})
    np.testing.assert_allclose(a["images"], b["images"], atol=1e-6)
    assert a["images"].shape == (6, 28, 28, 1) and 0 <= a["images"].min() and a["images"].max() <= 1
    assert not np.allclose(a["images"], plugin.infer(model, "sample", {"n": 6, "seed": 12})["images"])
    strip = plugin.infer(model, "interpolate", {"a": a["z"][0], "b": a["z"][1], "steps": 4})["images"]
    np.testing.assert_allclose(strip[0], a["images"][0], atol=1e-5)  # the line starts and ends at
    np.testing.assert_allclose(strip[-1], a["images"][1], atol=1e-5)  # the sampled points
    for args, word in [({"a": a["z"][0], "b": np.zeros(3), "steps": 4}, "latent size is 64"),
                       ({"a": a["z"][0], "b": a["z"][1], "steps": 1}, "'steps'")]:
        with pytest.raises(KilnError, match=word):
            plugin.infer(model, "interpolate", args)
    with pytest.raises(KilnError, match="'n'"):
        plugin.infer(model, "sample", {"n": 100000})


def test_cgan_is_judged_by_the_stored_cnn(store):
    root, env, outputs = store
    m = manifest(root, "cgan")
    assert m["judged_by"] == "cnn:1"
    # how far above chance (0.1) it gets: bench/quality.py; here, that the figures are there
    assert 0 <= m["metrics"]["label_accuracy_worst_class"] <= m["metrics"]["label_accuracy"] <= 1
    assert "samples after epoch 2:" in outputs["cgan"] and "samples after epoch 1:" not in outputs["cgan"]
    out = kiln_here("evaluate", "cgan", cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert "label_accuracy=" in out.stdout and "d_real=" in out.stdout
    shown = float(out.stdout.split("label_accuracy=")[1].split()[0])
    assert shown == pytest.approx(m["metrics"]["label_accuracy"], abs=1e-4)  # same seeds, same figure
    out = kiln_here("evaluate", "dcgan", cwd=root, env=env)
    assert out.returncode == 0, out.stderr
    assert "confidence=" in out.stdout and "coverage=" in out.stdout
    # the Fréchet distance in the cnn's features, beside its real-vs-real floor: a GAN of 2 short
    # epochs is far from real digits, real test digits are close to real training digits
    fid = {k: float(out.stdout.split(f"{k}=")[1].split()[0]) for k in ("fid", "fid_floor")}
    assert 0 <= fid["fid_floor"] < fid["fid"], fid
    # trained with --limit 256, it is measured on as many images as its test split holds
    assert "Fréchet distance of 256 generated to 256 test images in the features of cnn:1" in out.stdout
    assert "the input of its layer 'probabilities'" in out.stdout
    vae = kiln_here("evaluate", "vae", "--classifier", "cnn", cwd=root, env=env)
    assert vae.returncode == 0 and "fid=" in vae.stdout and "neg_elbo=" in vae.stdout, vae.stderr[-2000:]


def test_cgan_draws_the_requested_digit_and_morphs_between_classes(store):
    root, _, _ = store
    from kiln import models, quality

    plugin, model, _ = models.load("cgan", root / "store")
    judge = quality.classifier_for(plugin, None, root / "store")
    sevens = plugin.infer(model, "sample", {"digit": 7, "n": 200, "seed": 1})["images"]
    classes = np.asarray(judge[0].infer(judge[1], "classify", {"images": sevens * 255})["classes"])
    assert classes.shape == (200,) and sevens.shape == (200, 28, 28, 1)  # mostly 7s: bench/quality.py
    strip = plugin.infer(model, "interpolate", {"a": 1, "b": 7, "steps": 5, "seed": 3})["images"]
    ends = plugin.infer(model, "sample", {"digit": 1, "n": 1, "seed": 3})["images"][0]
    np.testing.assert_allclose(strip[0], ends, atol=1e-5)  # step 0 is digit a with the same noise
    for args, word in [({"digit": 10}, "class index 0..9"), ({"n": 4}, "missing required argument 'digit'"),
                       ({"digit": "seven"}, "'digit'")]:
        with pytest.raises(KilnError, match=word):
            plugin.infer(model, "sample", args)
    with pytest.raises(KilnError, match="'b' must be a class index"):
        plugin.infer(model, "interpolate", {"a": 1, "b": 10})


def test_diffusion_is_judged_draws_classes_reproducibly_and_shows_its_trajectory(store):
    root, env, outputs = store
    from kiln import models

    m = manifest(root, "diffusion")
    assert m["judged_by"] == "cnn:1" and 0 <= m["metrics"]["label_accuracy"] <= 1
    art = root / "store" / "diffusion" / "1" / "artifacts"
    assert {"samples.png", "trajectory.png", "progress_epoch_0001.png"} <= {p.name for p in art.iterdir()}
    plugin, model, _ = models.load("diffusion", root / "store")
    args = {"digit": 7, "n": 6, "steps": 5, "guidance": 3.0, "seed": 1}
    a = plugin.infer(model, "sample", args)["images"]
    assert a.shape == (6, 28, 28, 1) and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, plugin.infer(model, "sample", args)["images"])  # a seed: the same digits
    assert not np.array_equal(a, plugin.infer(model, "sample", {**args, "seed": 2})["images"])
    # unconditional (digit omitted), and guidance changes what a class's noise becomes
    assert plugin.infer(model, "sample", {"n": 2, "steps": 3})["images"].shape == (2, 28, 28, 1)
    assert not np.array_equal(a, plugin.infer(model, "sample", {**args, "guidance": 0.0})["images"])
    path = plugin.infer(model, "trajectory", {"digit": 3, "steps": 10, "frames": 5, "seed": 0})
    assert path["images"].shape == (5, 28, 28, 1) and path["t"][0] == 1.0 and path["t"][-1] == 0.0
    assert path["t"] == sorted(path["t"], reverse=True)
    # the trajectory's picture is the sample with the same seed and steps
    same = plugin.infer(model, "sample", {"digit": 3, "n": 1, "steps": 10, "seed": 0})["images"][0]
    np.testing.assert_allclose(path["images"][-1], same, atol=1e-5)
    # the stored pictures draw every class in one DDIM loop: row c is what `sample` draws for c
    # with seed c (25 steps, the default guidance)
    rows, _ = plugin._rows(model, 3, 2)
    for c in range(3):
        alone = plugin.infer(model, "sample", {"digit": c, "n": 2, "steps": 25, "seed": c})["images"]
        np.testing.assert_allclose(np.clip((rows[2 * c:2 * c + 2] + 1) / 2, 0, 1), alone, atol=1e-4)
    for bad, word in [({"digit": 10}, "class index 0..9"), ({"steps": 0}, "'steps'"),
                      ({"steps": 5000}, "'steps'"), ({"guidance": -1}, "'guidance'"), ({"n": 10**6}, "'n'")]:
        with pytest.raises(KilnError, match=word):
            plugin.infer(model, "sample", bad)


def test_evaluate_without_a_classifier_fails_clearly(store, tmp_path):
    root, env, _ = store
    import shutil

    lone = tmp_path / "store"
    shutil.copytree(root / "store" / "cgan", lone / "cgan")
    out = kiln_here("--store", str(lone), "evaluate", "cgan", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "no model 'cnn'" in out.stderr and "kiln train cnn" in out.stderr
    out = kiln_here("evaluate", "cgan", "--classifier", "autoencoder", cwd=root, env=env)
    assert out.returncode == 2 and "has no 'classify' method" in out.stderr
    out = kiln_here("evaluate", "cnn", "--classifier", "cnn", cwd=root, env=env)
    assert out.returncode == 2 and "no 'sample' method" in out.stderr
