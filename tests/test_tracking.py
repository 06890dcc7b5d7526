"""TensorBoard: every run writes event files in its run folder; read back here with
TensorBoard's own reader (EventAccumulator) and checked against the run's stored history."""

from __future__ import annotations

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from helpers import kiln_here


def _read(folder) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    acc.Reload()
    return acc


def _scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    import tensorflow as tf

    return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}


@pytest.mark.slow  # trains 2 epochs: beyond the fast tier's few batches
def test_a_run_writes_what_tensorboard_shows(workdir):
    out = kiln_here("train", "cnn", "--epochs", "2", "--limit", "3000", "--run", "tb", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    history = json.loads((workdir / "store" / "cnn" / "1" / "manifest.json").read_text())["history"]
    board = workdir / "runs" / "tb" / "tensorboard"
    train, validation = _read(board / "train"), _read(board / "validation")
    for name in ("loss", "accuracy"):
        logged = _scalars(train, f"epoch_{name}")
        assert logged == {h["epoch"]: pytest.approx(h[name], rel=1e-5) for h in history}
        logged = _scalars(validation, f"epoch_{name}")  # val_ metrics share the chart's name
        assert logged == {h["epoch"]: pytest.approx(h[f"val_{name}"], rel=1e-5) for h in history}
    # the cnn's rate decays along a cosine from 4e-3 over the run's 42 steps: half at step 21
    assert _scalars(train, "epoch_learning_rate") == {1: pytest.approx(2e-3), 2: pytest.approx(0.0, abs=1e-9)}
    steps = _scalars(train, "batch_loss")  # every 50 steps: 2700 examples / 128 = 21 steps an epoch
    assert sorted(steps) == [21, 42]
    hparams = train.PluginTagToContent("hparams")
    assert hparams and b"learning_rate" in b"".join(hparams.values())


@pytest.mark.slow  # trains 2 epochs: beyond the fast tier's few batches
def test_pictures_drawn_while_training_are_images_in_tensorboard(workdir):
    out = kiln_here("train", "dcgan", "--epochs", "2", "--limit", "1280", "--set", "sample_every=1",
                   "--run", "gan", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    train = _read(workdir / "runs" / "gan" / "tensorboard" / "train")
    images = train.PluginTagToContent("images")
    assert "progress" in images, sorted(images)
    assert sorted(e.step for e in train.Tensors("progress")) == [1, 2]
    assert set(_scalars(train, "epoch_d_loss")) == {1, 2}


@pytest.mark.slow  # trains 2 epochs: beyond the fast tier's few batches
def test_on_a_terminal_each_epoch_shows_a_progress_bar_and_in_logs_one_line(workdir):
    """Under a pseudo-terminal (a user's shell) a bar moves within each epoch and is wiped before
    the epoch's line; captured output (logs, Ray jobs) keeps one line per epoch, no bar."""
    import os
    import pty
    import subprocess
    import sys
    import time

    args = [sys.executable, "-m", "kiln.cli", "train", "cnn", "--epochs", "2", "--limit", "3000"]
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args + ["--run", "tty"], cwd=workdir, stdin=follower, stdout=follower,
                            stderr=follower)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process is done
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=60)
    os.close(leader)
    text = seen.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    bars = [part for part in text.split("\r") if "examples/s  ETA" in part]
    assert len(bars) >= 4, text[-3000:]  # the bar moved within each epoch
    assert any("[kiln] epoch 1/2 [" in b for b in bars) and any("[kiln] epoch 2/2 [" in b for b in bars)
    assert any("loss" in b for b in bars)
    assert "epoch 2/2  loss=" in text  # and the epoch's line as before
    logged = kiln_here("train", "cnn", "--epochs", "2", "--limit", "1000", "--run", "log", cwd=workdir)
    assert logged.returncode == 0
    assert "ETA" not in logged.stdout + logged.stderr and "\r" not in logged.stdout + logged.stderr
    assert logged.stdout.count("[kiln] epoch ") == 2
