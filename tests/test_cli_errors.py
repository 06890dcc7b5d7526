"""Bad input: one clear line on stderr, a non-zero exit, nothing half-written."""

from __future__ import annotations


import subprocess
import sys

import pytest

from helpers import NOISY_TF, TF_NOTICES, run_kiln


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
    (["train", "cnn", "--set", "dropout"], ["--set takes KEY=VALUE, got 'dropout'"]),
    (["train", "cnn", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
    (["train", "cnn", "--dataset", "/nonexistent/x.npz"], ["dataset file not found"]),
    (["train", "--resume", "never-ran"], ["no run 'never-ran'"]),
    (["evaluate", "ghost"], ["no model 'ghost'"]),
    (["evaluate", "cnn:zero"], ["bad version"]),
    # argparse's own errors too: no usage block first
    (["trian", "cnn"], ["invalid choice: 'trian'", "see `kiln --help`"]),
    (["tune", "har", "--scheduler", "random"], ["invalid choice: 'random'", "see `kiln tune --help`"]),
    # a bad search found after Tune loads (test_tune checks each kind of bad search in-process)
    (["tune", "har", "--search", "dropout=uniform:0.5:0.1"], ["LO must be below HI, got 0.5 and 0.1"]),
    (["train", "cnn", "--epochs", "many"], ["argument --epochs: invalid int value: 'many'"]),
    (["export", "cnn", "--format", "pt"], ["invalid choice: 'pt'", "saved_model"]),
    (["serve", "--traffic", "cnn=90"], ["--traffic cnn=90: name a version or a label", "not the bare model"]),
    (["serve", "--traffic", "cnn:1=ten"], ["the weight must be a whole number >= 1, got 'ten'"]),
    (["serve", "--traffic", "cnn:1"], ["--traffic takes NAME:VERSION=WEIGHT"]),
    (["models", "rm", "cnn"], ["`kiln models rm` takes NAME:VERSION, got 'cnn'"]),
    (["serve", "--own-replicas", "cnn"], ["use it with --shared-replicas"]),
    (["serve", "--colocate", "--shared-replicas"], ["--colocate loads every model in the ingress's replicas",
                                                     "cannot be combined with --shared-replicas"]),
])
def test_bad_input_is_one_clear_line(workdir, args, words):
    one_line_error(run_kiln(*args, cwd=workdir), *words)
    assert not (workdir / "store").exists() or not any((workdir / "store").rglob("manifest.json"))


@pytest.mark.parametrize("onednn", ["1", "0"])
def test_an_error_after_tensorflow_loads_is_still_one_line(workdir, onednn):
    """On AVX-512 CPUs TensorFlow prints oneDNN and absl notices while it loads (forced here with
    TF_ENABLE_ONEDNN_OPTS=1); Kiln's error must still be the only line, with oneDNN on or off."""
    out = run_kiln("train", "cnn", "--set", "colour=red", cwd=workdir, env={"TF_ENABLE_ONEDNN_OPTS": onednn})
    one_line_error(out, "unknown config key 'colour'")


def test_verbose_brings_tensorflows_notices_back(workdir):
    """What plain `import tensorflow` prints here is what `kiln --verbose` (or KILN_VERBOSE=1)
    shows, and what Kiln hides by default."""
    raw = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                         env={**__import__("os").environ, **NOISY_TF, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=120)
    notices = [n for n in TF_NOTICES if n in raw.stderr]
    verbose = run_kiln("--verbose", "train", "cnn", "--set", "colour=red", cwd=workdir, env=NOISY_TF)
    assert verbose.returncode == 2 and "unknown config key 'colour'" in verbose.stderr
    assert all(n in verbose.stderr for n in notices), (notices, verbose.stderr[-2000:])
    by_env = run_kiln("train", "cnn", "--set", "colour=red", cwd=workdir, env={**NOISY_TF, "KILN_VERBOSE": "1"})
    assert all(n in by_env.stderr for n in notices), (notices, by_env.stderr[-2000:])


@pytest.mark.parametrize("args, words", [
    (["train", "cnn", "--epochs", "0"], ["--epochs must be at least 1, got 0"]),
    (["train", "cnn", "--batch-size", "0"], ["--batch-size must be at least 1, got 0"]),
    (["train", "cnn", "--dataset", "missing.npz"], ["dataset file not found", "missing.npz"]),
    (["train", "cnn", "--workers", "two"], ["--workers takes N or MIN-MAX"]),
    (["train", "nope"], ["unknown plugin 'nope'"]),
])
def test_flag_errors_come_before_the_plugin_and_tensorflow_load(workdir, args, words):
    """An error that needs no plugin code is reported without importing the plugin (and with it
    TensorFlow, seconds of start-up)."""
    code = ("import sys\nfrom kiln import cli\nrc = cli.main(sys.argv[1:])\n"
            "print(rc, 'tensorflow' in sys.modules, 'kiln.plugins.cnn' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=workdir, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["2", "False", "False"], (out.stdout, out.stderr[-2000:])
    assert len(out.stderr.strip().splitlines()) == 1 and all(w in out.stderr for w in words), out.stderr


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
