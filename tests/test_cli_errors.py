"""Bad input: one clear line on stderr, a non-zero exit, nothing half-written."""

from __future__ import annotations


import pytest

from conftest import run_kiln


def one_line_error(out, *words):
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: "), out.stderr[-2000:]
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, words", [
    (["train", "nope"], ["unknown plugin 'nope'", "cnn"]),
    (["train", "cnn", "--dataset", "no_such_dataset"], ["unknown dataset 'no_such_dataset'"]),
    (["train", "cnn", "--set", "dropout=lots"], ["'dropout'", "float"]),
    (["train", "cnn", "--set", "colour=red"], ["unknown config key 'colour'", "dropout"]),
    (["train", "cnn", "--set", "dropout"], ["key=value"]),
    (["train", "cnn", "--epochs", "0"], ["--epochs must be >= 1"]),
    (["train", "cnn", "--dataset", "/nonexistent/x.npz"], ["dataset file not found"]),
    (["train", "--resume", "never-ran"], ["no run 'never-ran'"]),
    (["evaluate", "ghost"], ["no model 'ghost'"]),
    (["evaluate", "cnn:zero"], ["bad version"]),
])
def test_bad_input_is_one_clear_line(workdir, args, words):
    one_line_error(run_kiln(*args, cwd=workdir), *words)
    assert not (workdir / "store").exists() or not any((workdir / "store").rglob("manifest.json"))


def test_corrupt_manifest_is_one_clear_line(workdir):
    version = workdir / "store" / "cnn" / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{truncated")
    one_line_error(run_kiln("evaluate", "cnn", cwd=workdir), "corrupt manifest", str(version))
    models = run_kiln("models", cwd=workdir)
    assert models.returncode == 0 and "CORRUPT" in models.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_unreachable_ray_address(workdir):
    out = run_kiln("train", "cnn", "--workers", "2", "--limit", "512", "--epochs", "1",
                   "--address", "127.0.0.1:1", cwd=workdir, timeout=300)
    one_line_error(out, "cannot reach a Ray cluster", "127.0.0.1:1")
    assert not any((workdir / "store").rglob("manifest.json")) if (workdir / "store").exists() else True


@pytest.mark.slow
@pytest.mark.ray
def test_asking_for_gpus_the_cluster_lacks(workdir):
    out = run_kiln("train", "cnn", "--workers", "1", "--gpus-per-worker", "1", "--limit", "512",
                   cwd=workdir, timeout=300)
    one_line_error(out, "1 GPUs", "0 GPUs", "--gpus-per-worker")


def test_wrong_plugin_for_data(workdir):
    import numpy as np

    np.savez(workdir / "vectors.npz", x=np.zeros((40, 5)), y=np.zeros(40, dtype=int) + np.arange(40) % 2)
    one_line_error(run_kiln("train", "cnn", "--dataset", str(workdir / "vectors.npz"), cwd=workdir),
                   "cnn needs images")
