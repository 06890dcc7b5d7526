"""Ray Train: 2 real workers with MultiWorkerMirroredStrategy through Kiln's one loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TEST_PLUGINS, run_kiln

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_same_weights(probe, epoch, prefix=""):
    a, b = weights(probe / f"{prefix}rank0-epoch{epoch}.npz"), weights(probe / f"{prefix}rank1-epoch{epoch}.npz")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_two_workers_end_with_identical_weights(workdir):
    probe = workdir / "probe"
    probe.mkdir()
    out = run_kiln("--plugin-path", str(TEST_PLUGINS / "probe.py"), "train", "probe", "--workers", "2",
                   "--epochs", "2", "--limit", "4096", cwd=workdir, env={"KILN_PROBE_DIR": str(probe)})
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("[kiln] epoch 2/2") == 1  # rank 0 reports, once
    assert_same_weights(probe, 2)
    first = weights(probe / "rank0-epoch1.npz")
    assert any(not np.array_equal(x, y) for x, y in zip(first, weights(probe / "rank0-epoch2.npz")))
    manifest = json.loads((workdir / "store" / "probe" / "1" / "manifest.json").read_text())
    assert manifest["train"]["workers"] == 2 and manifest["metrics"]["accuracy"] > 0.85


def test_logged_metrics_are_global_not_one_workers(workdir):
    """With learning rate 0 the weights never change, so each worker's loss is the mean loss of
    its shard. The shards hold different digits: the logged loss must be the mean of both."""
    from kiln import data, run

    train = data.load("mnist", "train", limit=6000)
    x = np.stack([a.numpy() for a, _ in train.ds])
    y = np.array([int(b) for _, b in train.ds])
    order = np.argsort(y, kind="stable")[:2048]  # shard 0: low digits, shard 1: higher digits
    np.savez(workdir / "sorted.npz", x_train=x[order], y_train=y[order], x_test=x[:256], y_test=y[:256])
    probe = workdir / "probe"
    probe.mkdir()
    out = run_kiln("--plugin-path", str(TEST_PLUGINS / "probe.py"), "train", "probe", "--workers", "2",
                   "--epochs", "1", "--dataset", str(workdir / "sorted.npz"), "--set", "learning_rate=0",
                   "--set", "dropout=0", cwd=workdir, env={"KILN_PROBE_DIR": str(probe)})
    assert out.returncode == 0, out.stderr[-4000:]
    manifest = json.loads((workdir / "store" / "probe" / "1" / "manifest.json").read_text())
    logged = manifest["history"][0]["loss"]
    run.registry.load_file(TEST_PLUGINS / "probe.py")
    plugin, model, _ = run.load("probe", workdir / "store")
    xs, ys = plugin.preprocess(x[order], y[order])
    import keras

    per_example = keras.losses.sparse_categorical_crossentropy(ys, model.predict(xs, verbose=0)).numpy()
    shard0, shard1 = per_example[:1024].mean(), per_example[1024:].mean()
    assert abs(shard0 - shard1) > 0.05  # the shards really differ
    assert logged == pytest.approx((shard0 + shard1) / 2, rel=1e-3)


def test_killed_worker_resumes_from_last_checkpoint(workdir):
    probe = workdir / "probe"
    probe.mkdir()
    env = {"KILN_PROBE_DIR": str(probe), "KILN_PROBE_KILL_AT": "2", "KILN_PROBE_KILL_RANK": "1"}
    out = run_kiln("--plugin-path", str(TEST_PLUGINS / "probe.py"), "train", "probe", "--workers", "2",
                   "--epochs", "3", "--limit", "2048", "--max-failures", "1", "--set", "filters=8,16",
                   cwd=workdir, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (probe / "killed").exists()
    assert "resuming from checkpoint at epoch 1" in out.stdout
    manifest = json.loads((workdir / "store" / "probe" / "1" / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
    assert_same_weights(probe, 3)


def test_rerun_with_the_same_run_name_resumes_on_ray(workdir):
    args = ("train", "cnn", "--workers", "2", "--limit", "2048", "--run", "again", "--set", "filters=8,16")
    first = run_kiln(*args, "--epochs", "1", cwd=workdir)
    assert first.returncode == 0, first.stderr[-4000:]
    second = run_kiln("train", "--resume", "again", "--epochs", "2", cwd=workdir)
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resuming from checkpoint at epoch 1" in second.stdout
    assert "epoch 1/2" not in second.stdout and "epoch 2/2" in second.stdout
    manifest = json.loads((workdir / "store" / "cnn" / "2" / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["history"]] == [1, 2] and manifest["run"] == "again"
