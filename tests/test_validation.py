"""Validation and early stopping: every run holds out part of its training data (never the test
split), reports val_ metrics each epoch, and with --early-stop keeps the best epoch's weights.
On 2 Ray Train workers the validation metrics are global: tests/test_ray_train.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import kiln_here, run_kiln
from kiln import checkpoint, data


def test_images_hold_out_the_end_of_their_limited_training_split():
    info = data.prepare("mnist")
    assert data.split_size("mnist", info, "train", 3000, val_fraction=0.1) == 2700
    assert data.split_size("mnist", info, "val", 3000, val_fraction=0.1) == 300
    assert data.split_size("mnist", info, "test", 3000, val_fraction=0.1) == 3000  # untouched
    train = data.load("mnist", "train", limit=3000, val_fraction=0.1)
    val = data.load("mnist", "val", limit=3000, val_fraction=0.1)
    every = np.stack([x.numpy() for x, _ in data.load("mnist", "train", limit=3000).ds])
    assert (train.size, val.size) == (2700, 300)
    np.testing.assert_array_equal(np.stack([x.numpy() for x, _ in val.ds]), every[2700:])
    assert data.validation("mnist", info, 3000, 0.1)["how"] == \
        "the last examples of the training split (train[2700:3000])"


def test_sensor_windows_hold_out_whole_subjects():
    held = data.holdout("sp_sw_har", None, 0.2)
    arrays = data._arrays("sp_sw_har")[0]
    who = arrays["subject_train"]
    val_subjects, train_subjects = set(who[held["val"]]), set(who[held["train"]])
    assert val_subjects and train_subjects and not val_subjects & train_subjects
    assert len(held["train"]) + len(held["val"]) == len(arrays["x_train"])
    assert held["how"].startswith("subjects ")


def test_text_holds_out_the_windows_just_before_the_test_slice(tmp_path):
    text = tmp_path / "book.txt"
    text.write_text("".join(chr(97 + (i * 7) % 26) for i in range(20_000)))
    held = data.holdout(str(text), None, 0.1)
    n = len(held["train"]) + len(held["val"])
    assert held["val"].tolist() == list(range(n - len(held["val"]), n))  # by position, at the end


def test_arrays_hold_out_a_seeded_sample(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, x_train=np.arange(100.0)[:, None], y_train=np.zeros(100, int),
             x_test=np.zeros((5, 1)), y_test=np.zeros(5, int))
    a, b, c = (data.holdout(str(path), None, 0.2, seed) for seed in (0, 0, 1))
    assert len(a["val"]) == 20 and a["val"].tolist() == b["val"].tolist() != c["val"].tolist()
    assert not set(a["val"]) & set(a["train"])


def test_early_stop_stops_when_the_metric_stops_improving(workdir):
    """Learning rate 0: the validation accuracy never improves on epoch 1, so with patience 2 the
    run stops after epoch 3 and keeps epoch 1's weights."""
    out = kiln_here("train", "cnn", "--epochs", "8", "--limit", "1000", "--set", "learning_rate=0",
                   "--early-stop", "accuracy:2", "--run", "flat", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "val_accuracy=" in out.stdout
    assert "early stop: val_accuracy has not improved on epoch 1" in out.stdout
    manifest = json.loads((workdir / "store" / "cnn" / "1" / "manifest.json").read_text())
    assert [h["epoch"] for h in manifest["history"]] == [1, 2, 3]
    assert manifest["early_stop"]["epoch"] == 1 and manifest["early_stop"]["stopped"] == 3
    assert manifest["train"]["early_stop"] == "accuracy:2"
    # resuming a run that stopped early trains no further
    again = kiln_here("train", "--resume", "flat", "--epochs", "9", cwd=workdir)
    assert again.returncode == 0 and "stopped early at epoch 3" in again.stdout, again.stderr[-2000:]


def test_the_stored_model_is_the_best_epochs(workdir):
    out = kiln_here("train", "cnn", "--epochs", "4", "--limit", "1000", "--early-stop", "val_loss:4",
                   "--run", "best", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = json.loads((workdir / "store" / "cnn" / "1" / "manifest.json").read_text())
    losses = [h["val_loss"] for h in manifest["history"]]
    assert manifest["early_stop"]["epoch"] == 1 + int(np.argmin(losses))
    last = checkpoint.latest(workdir / "runs" / "best")
    from kiln import models

    _, model, _ = models.load("cnn:1", workdir / "store")
    for stored, best in zip(model.get_weights(), checkpoint.best_weights(last)):
        np.testing.assert_array_equal(stored, best)

    # `kiln runs` lists it; `kiln runs compare` draws its validation curve
    listed = kiln_here("runs", cwd=workdir)
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if line.startswith("best "))
    best_acc = max(h["val_accuracy"] for h in manifest["history"])
    assert "finished" in row and "4/4" in row and f"val_accuracy={best_acc:.4f}" in row and "cnn:1" in row
    drawn = kiln_here("runs", "compare", "best", "--metric", "val_loss", "--out", "curves.png", cwd=workdir)
    assert drawn.returncode == 0 and (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    unknown = kiln_here("runs", "compare", "best", "nope", cwd=workdir)
    assert unknown.returncode == 2 and "no run 'nope'" in unknown.stderr and len(unknown.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--val-fraction", "1.5"], "--val-fraction must be below 1, got 1.5"),
    (["--early-stop", "accuracy:x"], "--early-stop takes METRIC[:PATIENCE]"),
    (["--early-stop", "accuracy", "--val-fraction", "0"], "needs --val-fraction above 0"),
])
def test_bad_validation_flags_are_one_line(workdir, args, message):
    out = run_kiln("train", "cnn", *args, cwd=workdir)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert message in out.stderr


def test_an_unknown_early_stop_metric_names_the_ones_there_are(workdir):
    out = kiln_here("train", "cnn", "--epochs", "1", "--limit", "1000", "--early-stop", "val_f1", cwd=workdir)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
    assert "reports no val_f1; its validation metrics: val_" in out.stderr


def test_a_run_started_before_validation_existed_still_resumes(workdir):
    """A run file written by an older Kiln has no val_fraction: it held nothing out, so resuming
    it holds nothing out, and is not refused as a different run."""
    from kiln import run

    spec = run.plan("cnn", epochs=2, run="old", runs_dir=workdir / "runs")
    old = spec.to_dict()
    del old["val_fraction"]
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / run.RUN_FILE).write_text(json.dumps(old))
    resumed = run.resume_spec("old", workdir / "runs")
    assert resumed.val_fraction == 0.0
    run._check_run(resumed, spec.run_dir)  # before: "was started with val_fraction=None, not 0.0"
    with pytest.raises(run.KilnError, match="val_fraction=0.0, not 0.1"):
        run._check_run(spec, spec.run_dir)
