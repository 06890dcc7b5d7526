"""`kiln train --precision`: every built-in plugin trains under Keras' mixed_bfloat16 policy, float16
scales the loss in compiled and hand-written steps alike, and a stored model loads as float32
(the served side is in test_serve.py: the session's photos model is trained in mixed precision).
Tiny runs: that they train, not how well (bench/train_throughput.py measures the speed)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import copy_models
from kiln import KilnError, models, run

pytestmark = pytest.mark.slow

TINY = {"cnn": dict(limit=256), "autoencoder": dict(limit=256), "vae": dict(limit=256),
        "cgan": dict(limit=256, overrides={"width": "16", "sample_every": "0"}),
        "har": dict(limit=256, val_fraction=0), "lstm": dict(limit=64, overrides={"units": "16"}),
        "gpt": dict(limit=64, overrides={"layers": "1", "width": "16", "heads": "2"}),
        "diffusion": dict(limit=64, overrides={"width": "8", "blocks": "1", "sample_every": "0"}),
        "transfer": dict(limit=128)}


def test_every_built_in_plugin_trains_under_mixed_bfloat16_and_loads_as_float32(tmp_path, trained):
    from kiln import registry

    built_in = {e.name for e in registry.entries() if e.cls and e.cls.__module__.startswith("kiln.plugins.")}
    # dcgan trains the same GAN class as cgan, which also takes the class through both networks
    assert set(TINY) | {"dcgan"} == built_in  # a new built-in plugin is tried here too
    store = copy_models(trained, tmp_path / "store", "cnn")  # transfer's base; the GANs' judge
    for plugin, kw in TINY.items():
        spec = run.plan(plugin, epochs=1, batch_size=32, store=store, runs_dir=tmp_path / "runs",
                        precision="mixed_bfloat16", **kw)
        version = run.train(spec)
        assert version.manifest["train"]["precision"] == "mixed_bfloat16", plugin
        loaded, model, _ = models.load(version.ref, store)
        assert all(w.dtype == "float32" for w in model.weights), plugin  # weights stay float32
        assert model.dtype_policy.name == "float32", plugin
        history = version.manifest["history"]
        assert np.isfinite([v for h in history for k, v in h.items() if isinstance(v, float)]).all(), plugin


def test_float16_scales_the_loss_in_compiled_and_hand_written_steps(trained):
    """Keras wraps a compiled optimizer in a LossScaleOptimizer under mixed_float16; a plugin's own
    train_step takes its optimizers through kiln.loss_scaled. A step updates every weight and keeps
    it finite (an unscaled float16 gradient of this size would underflow to zero or overflow)."""
    import keras
    import tensorflow as tf

    from kiln import data

    info = data.prepare("mnist")
    x = tf.constant(np.random.default_rng(0).random((16, 28, 28, 1)), tf.float32)
    y = tf.constant(np.arange(16) % 10)
    for name, optimizer in (("cnn", "optimizer"), ("autoencoder", "optimizer"), ("vae", "optimizer"),
                            ("dcgan", "d_optimizer"), ("dcgan", "g_optimizer"), ("diffusion", "optimizer_")):
        plugin = models.make_plugin(name, {"width": "16"} if name in ("dcgan", "diffusion") else {}, info)
        model = models.build(plugin, "mixed_float16")
        assert isinstance(getattr(model, optimizer), keras.optimizers.LossScaleOptimizer), (name, optimizer)
        before = [w.numpy().copy() for w in model.trainable_weights]
        logs = model.train_step((x, y))
        assert all(np.isfinite(float(v)) for v in logs.values()), (name, logs)
        after = [w.numpy() for w in model.trainable_weights]
        assert all(np.isfinite(w).all() for w in after), name
        assert sum(not np.array_equal(a, b) for a, b in zip(after, before)) > len(before) // 2, name
    # float32 is untouched: no wrapper
    plugin = models.make_plugin("dcgan", {"width": "16"}, info)
    assert not isinstance(models.build(plugin).d_optimizer, keras.optimizers.LossScaleOptimizer)


def test_a_plugin_refuses_a_precision_it_cannot_train_under(tmp_path):
    with pytest.raises(KilnError, match="--precision mixed_float16: transfer trains under float32, "
                                        "mixed_bfloat16 only"):
        run.plan("transfer", precision="mixed_float16", store=tmp_path / "store")
    with pytest.raises(KilnError, match="--precision takes float32 or mixed_float16 or mixed_bfloat16, got 'float8'"):
        run.plan("cnn", precision="float8", store=tmp_path / "store")
