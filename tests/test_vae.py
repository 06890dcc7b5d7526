"""The VAE plugin: a short real run on MNIST, its pictures, deterministic sampling after reload,
input validation, and the KL/reconstruction loss scaled correctly across replicas."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import kiln_here
from kiln import KilnError


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae")
    env = {"KILN_STORE": str(root / "store"), "KILN_RUNS": str(root / "runs")}
    out = kiln_here("train", "vae", "--epochs", "3", "--limit", "6000", cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    from kiln import models

    return root, models.load("vae", root / "store")


@pytest.mark.slow
def test_short_run_beats_an_untrained_vae_by_far(vae):
    root, (plugin, model, version) = vae
    from kiln import run
    from kiln.models import build as build_model

    untrained = plugin.evaluate(build_model(plugin), run.test_dataset(plugin, "mnist", 6000))
    trained = version.manifest["metrics"]
    assert untrained["neg_elbo"] > 500  # ~784 * log 2: a coin flip per pixel
    assert trained["neg_elbo"] < 0.5 * untrained["neg_elbo"]
    assert trained["neg_elbo"] == pytest.approx(trained["reconstruction_loss"] + trained["kl_loss"], rel=1e-4)
    assert trained["kl_loss"] > 0.5  # the latent code carries information
    pictures = {p.name for p in version.artifacts()}
    assert {"samples.png", "reconstructions.png", "interpolation.png", "latent_space.png",
            "manifold.png"} <= pictures


@pytest.mark.slow
def test_reload_samples_the_same_for_a_seed(vae):
    root, (plugin, model, _) = vae
    from kiln import models

    p2, m2, _ = models.load("vae:1", root / "store")
    a = plugin.infer(model, "sample", {"n": 4, "seed": 3})["images"]
    b = p2.infer(m2, "sample", {"n": 4, "seed": 3})["images"]
    c = p2.infer(m2, "sample", {"n": 4, "seed": 4})["images"]
    assert a.shape == (4, 28, 28, 1) and 0 <= a.min() and a.max() <= 1
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert not np.allclose(a, c)


@pytest.mark.slow
def test_inference_methods_and_bad_input(vae):
    _, (plugin, model, _) = vae
    from kiln import data

    test = data.load("mnist", "test", limit=8)
    x = np.stack([a.numpy() for a, _ in test.ds]).astype("float32")
    rec = plugin.infer(model, "reconstruct", {"images": x})["images"]
    assert rec.shape == (8, 28, 28, 1) and 0 <= rec.min() and rec.max() <= 1
    z = plugin.infer(model, "encode", {"images": x})["z_mean"]
    assert z.shape == (8, 2)
    # reconstruct = decode(encode mean): the methods agree with each other
    np.testing.assert_allclose(rec, plugin.infer(model, "decode", {"z": z})["images"], atol=1e-5)
    strip = plugin.infer(model, "interpolate", {"a": x[0], "b": x[1], "steps": 5})["images"]
    assert strip.shape == (5, 28, 28, 1)
    np.testing.assert_allclose(strip[0], plugin.infer(model, "decode", {"z": z[:1]})["images"][0], atol=1e-5)
    for method, args, word in [("sample", {"n": 5000}, "'n'"), ("sample", {"n": "many"}, "'n'"),
                               ("decode", {"z": [[0.0, 1.0, 2.0]]}, "latent size is 2"),
                               ("reconstruct", {"images": np.zeros((1, 27, 28, 1))}, "shape"),
                               ("reconstruct", {"images": np.full((1, 28, 28, 1), np.nan)}, "NaN"),
                               ("interpolate", {"a": x[0], "b": x[1], "steps": 1}, "'steps'"),
                               ("sample", {"count": 3}, "unknown argument")]:
        with pytest.raises(KilnError, match=word):
            plugin.infer(model, method, args)


@pytest.mark.slow
def test_neighbours_arithmetic_and_latent_interpolation(vae):
    _, (plugin, model, version) = vae
    from kiln import data

    assert (version.assets / "latent_bank.npz").is_file()  # serving needs no dataset for neighbours
    test = list(data.load("mnist", "test", limit=6000).ds.take(3))
    x = np.stack([a.numpy() for a, _ in test]).astype("float32")
    near = plugin.infer(model, "neighbours", {"image": x[0], "k": 5})
    # the query is a test image itself: it comes back first, at distance 0, with its label
    np.testing.assert_allclose(near["images"][0], x[0] / 255.0, atol=1e-6)
    assert near["distances"][0] == pytest.approx(0.0, abs=1e-5) and near["labels"][0] == int(test[0][1])
    assert near["distances"] == sorted(near["distances"]) and near["images"].shape == (5, 28, 28, 1)
    # the latent map (the gallery's clickable plane) is the bank's codes, with their labels
    plane = plugin.infer(model, "latent_map", {})
    assert np.asarray(plane["z"]).shape == (len(plugin.bank["labels"]), 2) == (len(plane["labels"]), 2)
    z0 = plugin.infer(model, "encode", {"images": x[:1]})["z_mean"][0]
    np.testing.assert_allclose(plane["z"][0], z0, atol=1e-3)  # the bank starts with the first test image
    # a - a + c = c: the arithmetic decodes c's latent mean, which is c's reconstruction
    same = plugin.infer(model, "arithmetic", {"a": x[1], "b": x[1], "c": x[2]})["images"]
    np.testing.assert_allclose(same, plugin.infer(model, "reconstruct", {"images": x[2:3]})["images"], atol=1e-5)
    # interpolating between two latent points equals interpolating between the images they encode
    z = plugin.infer(model, "encode", {"images": x[:2]})["z_mean"]
    by_images = plugin.infer(model, "interpolate", {"a": x[0], "b": x[1], "steps": 4})["images"]
    by_points = plugin.infer(model, "interpolate", {"z_a": z[0], "z_b": z[1], "steps": 4})["images"]
    np.testing.assert_allclose(by_images, by_points, atol=1e-5)
    for args, word in [({"a": x[0]}, "either two images"), ({"a": x[0], "b": x[1], "z_a": z[0], "z_b": z[1]},
                       "either two images"), ({"z_a": [0.0, 1.0, 2.0], "z_b": [1.0, 2.0, 3.0]}, "latent size is 2")]:
        with pytest.raises(KilnError, match=word):
            plugin.infer(model, "interpolate", args)
    with pytest.raises(KilnError, match="'k'"):
        plugin.infer(model, "neighbours", {"image": x[0], "k": 0})


SCALING = textwrap.dedent('''
    import json, numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from kiln import data
    from kiln.plugins.vae import VAE
    from kiln.models import build as build_model

    info = data.prepare("mnist")
    x = np.stack([a.numpy() for a, _ in data.load("mnist", "train", limit=256).ds])

    def update_norm(strategy):
        keras.utils.set_random_seed(0)
        plugin = VAE()
        plugin.setup(info)
        with strategy.scope():
            model = build_model(plugin)
            model.compile(optimizer=keras.optimizers.SGD(1e-4))  # plain SGD: the update is the gradient
            model.optimizer.build(model.trainable_variables)
        before = [w.numpy().copy() for w in model.trainable_weights]
        ds = tf.data.Dataset.from_tensor_slices(x).batch(256).map(lambda b: plugin.preprocess(b, None)[0])
        batch = next(iter(strategy.experimental_distribute_dataset(ds)))
        tf.function(lambda b: strategy.run(model.train_step, args=(b,)))(batch)
        return float(np.sqrt(sum(np.sum((w.numpy() - b) ** 2) for w, b in zip(model.trainable_weights, before))))

    one = update_norm(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two = update_norm(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"one": one, "two": two}))
''')


@pytest.mark.slow
def test_hand_written_vae_loss_is_scaled_across_replicas():
    """Same global batch on 1 and on 2 replicas: the SGD update must be about the same size.
    Without dividing the hand-written loss by the replica count it would be twice as large."""
    out = subprocess.run([sys.executable, "-c", SCALING], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    norms = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.8 < norms["two"] / norms["one"] < 1.25, norms
