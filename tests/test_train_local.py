"""Training in-process end to end on real MNIST: train, store, reload, evaluate, resume. `kiln
train` runs as a user's process (its output and a SIGKILL are the behaviour); the commands that
read the store run through the CLI's main in this process."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TEST_PLUGINS, kiln_here, run_kiln

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short real CNN run shared by the tests below (2 epochs on 4,096 MNIST images)."""
    root = tmp_path_factory.mktemp("local")
    env = {"KILN_STORE": str(root / "store"), "KILN_RUNS": str(root / "runs")}
    out = run_kiln("train", "cnn", "--epochs", "2", "--limit", "4096", "--run", "first",
                   "--set", "dropout=0.3", cwd=root, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return root, env, out


def test_progress_metrics_and_store(trained):
    root, env, out = trained
    assert "[kiln] epoch 1/2" in out.stdout and "[kiln] epoch 2/2" in out.stdout
    assert "examples/s" in out.stdout and "accuracy=" in out.stdout
    manifest = json.loads((root / "store" / "cnn" / "1" / "manifest.json").read_text())
    assert manifest["plugin"] == "cnn" and manifest["config"]["dropout"] == 0.3
    assert manifest["dataset"]["name"] == "mnist" and manifest["run"] == "first"
    assert manifest["metrics"]["accuracy"] > 0.85  # 2 short epochs on 4,096 images: far above chance (0.1)
    assert [h["epoch"] for h in manifest["history"]] == [1, 2]
    assert manifest["history"][1]["loss"] < manifest["history"][0]["loss"]
    assert "classify" in manifest["methods"]
    pngs = sorted(p.name for p in (root / "store" / "cnn" / "1" / "artifacts").glob("*.png"))
    assert "predictions.png" in pngs and "confusion.png" in pngs


def test_a_label_names_a_version_wherever_a_model_is_named(trained):
    root, env, _ = trained
    label = kiln_here("models", "label", "cnn:1", "stable", env=env)
    assert label.returncode == 0 and "cnn@stable -> cnn:1" in label.stdout, label.stderr
    listing = kiln_here("models", env=env)
    row = next(line for line in listing.stdout.splitlines() if line.startswith("cnn "))
    assert row.split()[:3] == ["cnn", "1", "stable"] and "LABELS" in listing.stdout
    samples = kiln_here("samples", "cnn@stable", env=env)
    assert samples.returncode == 0 and "cnn/1/artifacts/confusion.png" in samples.stdout
    bad = kiln_here("evaluate", "cnn@nightly", env=env)
    assert bad.returncode == 2 and "model 'cnn' has no label 'nightly'" in bad.stderr
    gone = kiln_here("models", "unlabel", "cnn", "stable", env=env)
    assert gone.returncode == 0 and "removed cnn@stable (it named cnn:1)" in gone.stdout
    assert json.loads((root / "store" / "cnn" / "labels.json").read_text()) == {}


def test_models_and_evaluate_agree_with_the_manifest(trained):
    root, env, _ = trained
    models = kiln_here("models", env=env)
    assert models.returncode == 0 and "cnn" in models.stdout and "mnist" in models.stdout
    manifest = json.loads((root / "store" / "cnn" / "1" / "manifest.json").read_text())
    samples = kiln_here("samples", "cnn", "--out", str(root / "pictures"), env=env)
    assert samples.returncode == 0 and "cnn-1-confusion.png" in samples.stdout
    assert (root / "pictures" / "cnn-1-predictions.png").stat().st_size > 1000
    ev = kiln_here("evaluate", "cnn:1", env=env)
    assert ev.returncode == 0, ev.stderr
    assert f"accuracy={manifest['metrics']['accuracy']:.4f}" in ev.stdout


def test_reload_gives_the_same_predictions(trained):
    root, env, _ = trained
    from kiln import data, models

    plugin, model, version = models.load("cnn", root / "store")
    test = data.load("mnist", "test", limit=64)
    images = np.stack([x.numpy() for x, _ in test.ds])
    out = plugin.infer(model, "classify", {"images": images})
    again = models.load("cnn:1", root / "store")
    out2 = again[0].infer(again[1], "classify", {"images": images})
    assert out["classes"] == out2["classes"]
    np.testing.assert_allclose(out["probabilities"], out2["probabilities"], atol=1e-6)
    labels = np.array([int(y) for _, y in test.ds])
    assert np.mean(np.array(out["classes"]) == labels) > 0.85


def test_interrupted_run_resumes_from_last_checkpoint(workdir):
    """The process dies (SIGKILL) at the end of epoch 2; rerunning the same command continues
    from epoch 1's checkpoint with the optimizer state, not from scratch."""
    probe = workdir / "probe"
    probe.mkdir()
    args = ("--plugin-path", str(TEST_PLUGINS / "probe.py"), "train", "probe", "--epochs", "3",
            "--limit", "2048", "--run", "interrupted", "--set", "filters=8,16")
    env = {"KILN_PROBE_DIR": str(probe), "KILN_PROBE_KILL_AT": "2"}
    first = run_kiln(*args, cwd=workdir, env=env)
    assert first.returncode != 0 and (probe / "killed").exists()
    assert "epoch 2/3" in first.stdout and "stored" not in first.stdout
    second = run_kiln(*args, cwd=workdir, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from checkpoint at epoch 1" in second.stdout
    assert "epoch 1/3" not in second.stdout and "epoch 3/3" in second.stdout
    manifest = json.loads((workdir / "store" / "probe" / "1" / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
    # optimizer state travelled: Adam's iteration counter counts all 3 epochs of steps
    ckpt = sorted((workdir / "runs" / "interrupted").glob("checkpoint_*"))[-1]
    with np.load(ckpt / "optimizers.npz") as f:
        assert int(f["0/0"]) == 3 * ((2048 - 205) // 128)  # 205 (10%) held out for validation
    again = kiln_here(*args, cwd=workdir, env=env)
    assert again.returncode == 2 and "already finished 3/3 epochs" in again.stderr


def test_a_run_resumes_with_its_own_network_after_a_default_changes(workdir, monkeypatch):
    """The run file records the plugin's whole config: a run checkpointed before a default
    changed (a newer Kiln) resumes with the network it checkpointed, not a shape error."""
    import dataclasses

    from kiln import registry

    args = ("--limit", "600", "--batch-size", "64", "--set", "augment=none")
    first = kiln_here("train", "cnn", "--epochs", "1", "--run", "before", *args, cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    cls = registry.get("cnn")
    hidden = {f.name: f for f in dataclasses.fields(cls.Config)}["hidden"]
    assert hidden.default == 256
    changed = dataclasses.make_dataclass(  # the dense layer's default, as a newer Kiln might set it
        "CNNConfig", [("hidden", int, dataclasses.field(default=32, metadata=hidden.metadata))], bases=(cls.Config,))
    monkeypatch.setattr(cls, "Config", changed)
    resumed = kiln_here("train", "--resume", "before", "--epochs", "2", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from checkpoint at epoch 1" in resumed.stdout
    manifest = json.loads((workdir / "store" / "cnn" / "2" / "manifest.json").read_text())
    assert manifest["config"]["hidden"] == 256 and manifest["config"]["augment"] == ["none"]


def test_user_npz_dataset(workdir):
    from kiln import data

    test = data.load("mnist", "train", limit=1200)
    x = np.stack([a.numpy() for a, _ in test.ds])[..., 0]
    y = np.array([int(b) for _, b in test.ds])
    np.savez(workdir / "digits.npz", x=x, y=y)
    out = run_kiln("train", "cnn", "--dataset", str(workdir / "digits.npz"), "--epochs", "2",
                   "--batch-size", "64", "--name", "digits", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((workdir / "store" / "digits" / "1" / "manifest.json").read_text())
    assert manifest["dataset"]["input_shape"] == [28, 28] and manifest["dataset"]["test_size"] == 120
    assert manifest["metrics"]["accuracy"] > 0.5
