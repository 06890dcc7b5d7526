"""Ray Train: 2 real workers with MultiWorkerMirroredStrategy through Kiln's one loop.

Also exercised elsewhere: a quiet driver, Train controller
and workers with oneDNN's notice forced on (test_cluster, the same `kiln train` run as a Ray job),
restarts after a lost node and rerunning a run by name (test_fault_tolerance)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TEST_PLUGINS, copy_models, kiln_here

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_logged_metrics_are_global_not_one_workers(workdir, shared_ray):
    """With learning rate 0 the weights never change, so each worker's loss is the mean loss of
    its shard. The shards hold different digits: the logged loss must be the mean of both, for
    the training and the validation metrics alike."""
    from kiln import data, models, run

    train = data.load("mnist", "train", limit=6000)
    x = np.stack([a.numpy() for a, _ in train.ds])
    y = np.array([int(b) for _, b in train.ds])
    order = np.argsort(y, kind="stable")[:2560]  # shard 0: low digits, shard 1: higher digits
    path = workdir / "sorted.npz"
    np.savez(path, x_train=x[order], y_train=y[order], x_test=x[:256], y_test=y[:256])
    out = kiln_here("--plugin-path", str(TEST_PLUGINS / "probe.py"), "train", "probe", "--workers", "2",
                    "--epochs", "1", "--dataset", str(path), "--set", "learning_rate=0",
                    "--set", "dropout=0", "--val-fraction", "0.2", cwd=workdir)
    assert out.returncode == 0, out.stderr[-4000:]
    manifest = json.loads((workdir / "store" / "probe" / "1" / "manifest.json").read_text())
    run.registry.load_file(TEST_PLUGINS / "probe.py")
    plugin, model, _ = models.load("probe", workdir / "store")
    import keras

    held = data.holdout(str(path), None, 0.2)  # 2048 to train on, a seeded sample of 512 held out
    assert (len(held["train"]), len(held["val"])) == (2048, 512)
    assert manifest["validation"] == {"fraction": 0.2, "examples": 512, "how": held["how"]}
    for key, keep in (("loss", held["train"]), ("val_loss", held["val"])):
        xs, ys = plugin.preprocess(x[order][keep], y[order][keep])
        per_example = keras.losses.sparse_categorical_crossentropy(ys, model.predict(xs, verbose=0)).numpy()
        half = len(per_example) // 2
        shard0, shard1 = per_example[:half].mean(), per_example[half:].mean()
        assert abs(shard0 - shard1) > 0.05  # the shards really differ
        assert manifest["history"][0][key] == pytest.approx((shard0 + shard1) / 2, rel=1e-3), key


def test_every_plugin_with_its_own_step_or_data_keeps_two_workers_identical(tmp_path, trained, shared_ray):
    """A few steps of each built-in plugin with its own train_step or data handling (the dump
    plugins of tests/plugins/dump.py), one after another on one group of 2 Ray Train workers (its
    start is paid once): afterwards both workers hold identical weights, batch-norm statistics
    and optimizer states. (dcgan and cgan share one GAN model and train_step; cgan, the
    conditional one, covers both.) How well each learns: the plugins' own modules."""
    from kiln import data, run
    from kiln.cluster.train import fit

    copy_models(trained, tmp_path / "store", "cnn")  # transfer's base
    jobs = [("autoencoder", dict(epochs=1, limit=256, batch_size=64), 10),
            ("vae", dict(epochs=1, limit=256, batch_size=64), 10),
            ("cgan", dict(epochs=1, limit=256, batch_size=64), 10),
            # no progress picture: 80 guided 25-step samples on rank 0 while rank 1 waits (cgan draws one)
            ("diffusion", dict(epochs=1, limit=256, batch_size=64,
                               overrides={"width": "8", "blocks": "1", "sample_every": "0"}), 10),
            ("har", dict(limit=512, batch_size=64, epochs=2), 4),  # 512: windows of 2 subjects, for validation
            ("lstm", dict(limit=128, batch_size=64, epochs=2, overrides={"units": "32"}), 4),
            ("gpt", dict(limit=128, batch_size=64, epochs=2, overrides={"layers": "1", "width": "32"}), 4),
            ("transfer", dict(batch_size=32, epochs=2, overrides={"labels_per_class": "8", "head_epochs": "1"}), 4)]
    runs = []
    for name, kw, _ in jobs:
        spec = run.plan(f"dump_{name}", workers=2, plugin_path=str(TEST_PLUGINS / "dump.py"),
                        store=tmp_path / "store", runs_dir=tmp_path / "runs", **kw)
        runs.append((spec, data.prepare(spec.dataset)))
    fit(*runs[0], then=runs[1:])
    for name, kw, min_arrays in jobs:
        with np.load(shared_ray / f"dump_{name}-rank0-epoch{kw['epochs']}.npz") as f0, \
                np.load(shared_ray / f"dump_{name}-rank1-epoch{kw['epochs']}.npz") as f1:
            assert f0.files == f1.files and len(f0.files) > min_arrays, (name, f0.files)
            for k in f0.files:
                np.testing.assert_array_equal(f0[k], f1[k], err_msg=f"{name}: array {k} differs")
    assert list((tmp_path / "runs").glob("dump_cgan-*/progress/progress_epoch_0001.png"))  # drawn by rank 0


def test_a_dead_head_recorded_on_this_machine_is_neither_joined_nor_asked():
    """`ray start` records its head in <tmp>/ray/ray_current_cluster, and a head that died
    without `ray stop` leaves it there. `ray.init()` joins the address in that file, so
    `kiln train --workers 2` and `kiln serve` waited minutes on a dead address. And Ray's state
    API, which Ray Train's placement-group cleaner asks at the end of every run, asked the dead
    head too. Kiln's own Ray starts anyway, and the state API in its workers answers about it."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from kiln.net import ray_address
    from kiln.net import free_port

    assert ray_address("10.0.0.5:6379") == "10.0.0.5:6379"
    temp = Path(tempfile.mkdtemp(prefix="kr-"))  # short: Ray's socket paths must fit 107 bytes
    (temp / "ray").mkdir()
    (temp / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")  # nothing there
    script = """if True:
        import json, ray
        from kiln.cluster.train import connect
        from kiln.serve.runtime import init_ray

        connect(None)  # what `kiln train --workers N` does without --address

        @ray.remote
        def nodes():
            from ray.util.state import list_nodes
            return [n.node_id for n in list_nodes(timeout=20)]

        print(json.dumps([ray.get_runtime_context().get_node_id(), ray.get(nodes.remote())]))
        ray.shutdown()
        init_ray()  # `kiln serve` without --address
        print(json.dumps(ray.get_runtime_context().get_node_id()))
        ray.shutdown()
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    try:
        out = subprocess.run([sys.executable, "-c", script], env={**env, "RAY_TMPDIR": str(temp)},
                             capture_output=True, text=True, timeout=240)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith(("[", '"'))]
    (node, seen), served = lines
    assert seen == [node] and served != node, lines  # its own one-node Ray, then a new one


def test_a_local_training_ray_leaves_the_default_dashboard_port_to_a_head(shared_ray):
    """The Ray that `kiln train --workers N` starts for itself runs a dashboard (Ray Train asks
    its state API). On Ray's default port 8265 it answered `kiln submit` and `kiln jobs`, which
    look for a `kiln cluster up` head there, and kept such a head from starting."""
    import ray

    url = ray._private.worker._global_node.address_info["webui_url"]
    assert url and not url.endswith(":8265"), url
