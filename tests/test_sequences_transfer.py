"""The sequence and transfer plugins on real data: har (sp_sw_har recordings, and the UCI HAR
folder layout written here), lstm (tiny Shakespeare, and a user's text file), transfer (a stored
MNIST CNN's features on Fashion-MNIST with few labels, and a keras.applications base from a local
weights file). Short real runs with bars a user would check, reload equality and validated inputs (identical
weights on 2 Ray Train workers: test_ray_train)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from helpers import copy_models, kiln_here
from kiln import KilnError

pytestmark = pytest.mark.slow

TRANSFER_EPOCHS = 3
UCI_NAMES = ["WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING", "LAYING"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, trained):
    """One store: har on part of sp_sw_har, a short lstm and gpt, the session's MNIST cnn, and transfer
    and scratch from it on few labels and epochs (how well each does: bench/quality.py and
    bench/transfer_vs_scratch.py)."""
    root = tmp_path_factory.mktemp("sequences")
    env = {"KILN_STORE": str(root / "store"), "KILN_RUNS": str(root / "runs")}
    copy_models(trained, root / "store", "cnn")
    few = ("--epochs", str(TRANSFER_EPOCHS), "--set", "head_epochs=1", "--set", "labels_per_class=10")
    runs = [("har", "--epochs", "1", "--limit", "2000"),
            ("lstm", "--epochs", "2", "--limit", "2000", "--batch-size", "64",
             "--set", "units=128", "--set", "learning_rate=0.005"),
            ("gpt", "--epochs", "2", "--limit", "2000", "--batch-size", "16", "--set", "layers=2",
             "--set", "width=64", "--set", "learning_rate=0.005", "--set", "warmup_steps=20"),
            ("transfer", *few),
            ("transfer", "--name", "scratch", "--set", "pretrained=false", *few)]
    for plugin, *args in runs:  # `kiln train` in this process (a fresh one: test_train_local)
        out = kiln_here("train", plugin, *args, cwd=root, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    return root


def manifest(root, name, version=1):
    return json.loads((root / "store" / name / str(version) / "manifest.json").read_text())


# --------------------------------------------------------------------------- har


def test_har_recognises_activities_of_unseen_subjects(store):
    m = manifest(store, "har")
    info = m["dataset"]
    subjects = info["extra"]["subjects"]
    assert subjects["train"] and subjects["test"] and not set(subjects["train"]) & set(subjects["test"])
    assert info["input_shape"] == [128, 6] and len(info["class_names"]) == 5
    assert len(info["extra"]["channel_mean"]) == 6  # normalisation travels with the model
    # how far it beats the most frequent activity (52% of the test windows): bench/quality.py
    assert 0 < m["metrics"]["accuracy"] <= 1
    assert {"confusion.png", "windows.png"} <= {p.name for p in (store / "store" / "har" / "1" / "artifacts").iterdir()}


def test_har_reload_classifies_raw_windows_identically_and_validates(store):
    from kiln import data, models

    windows = np.stack([x.numpy() for x, _ in data.load("sp_sw_har", "test", limit=16).ds])
    a, model_a, _ = models.load("har", store / "store")
    b, model_b, _ = models.load("har:1", store / "store")
    out = a.infer(model_a, "classify", {"windows": windows.tolist()})
    assert out == b.infer(model_b, "classify", {"windows": windows})
    assert set(out["labels"]) <= set(a.info.class_names) and len(out["labels"]) == 16
    one = a.infer(model_a, "classify", {"windows": windows[0]})  # one window without batch axis
    assert one["labels"] == out["labels"][:1]
    with pytest.raises(KilnError, match=r"'windows' has shape \[1, 64, 6\]; expected \[None, 128, 6\]"):
        a.infer(model_a, "classify", {"windows": windows[:1, :64]})
    bad = windows[:1].copy()
    bad[0, 3, 2] = np.nan
    with pytest.raises(KilnError, match="NaN"):
        a.infer(model_a, "classify", {"windows": bad})
    # test windows kept with the model (the gallery's activity picker): a few of each activity
    ex = a.infer(model_a, "examples", {})
    assert sorted(set(ex["labels"])) == sorted(a.info.class_names) and len(ex["channels"]) == 6
    assert np.asarray(ex["windows"]).shape == (len(ex["labels"]), 128, 6)
    right = a.infer(model_a, "classify", {"windows": ex["windows"]})["labels"]
    assert len(right) == len(ex["labels"]) and set(right) <= set(a.info.class_names)


def write_uci(root, seed=0):
    """A small dataset in the exact UCI HAR layout: every activity its own rhythm and pose."""
    from kiln.sensors import UCI_SIGNALS

    base = root / "UCI HAR Dataset"
    base.mkdir(parents=True)
    (base / "activity_labels.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(UCI_NAMES)))
    rng = np.random.default_rng(seed)
    t = np.arange(128) / 50.0
    for split, n, subjects in (("train", 300, [1, 3, 5, 6]), ("test", 120, [2, 4])):
        signals = base / split / "Inertial Signals"
        signals.mkdir(parents=True)
        y = rng.integers(0, 6, n)
        for c, name in enumerate(UCI_SIGNALS):
            wave = np.sin(2 * np.pi * (0.7 + 0.6 * y[:, None]) * t + rng.uniform(0, 6.3, (n, 1)))
            x = wave * (1 + c % 3) + 0.5 * (y[:, None] % 3 == c % 3) + 0.3 * rng.normal(size=(n, 128))
            np.savetxt(signals / f"{name}_{split}.txt", x, fmt="%.7e")
        np.savetxt(base / split / f"y_{split}.txt", y + 1, fmt="%d")
        np.savetxt(base / split / f"subject_{split}.txt", rng.choice(subjects, n), fmt="%d")
    return base


def test_har_reads_the_uci_layout_and_trains_on_it(tmp_path, workdir):
    folder = write_uci(tmp_path / "download")
    from kiln import data

    info = data.prepare(str(folder.parent))  # the folder holding "UCI HAR Dataset" works too
    assert info.input_shape == (128, 9) and info.class_names == tuple(UCI_NAMES)
    assert (info.train_size, info.test_size) == (300, 120) and info.extra["rate_hz"] == 50.0
    assert set(info.extra["subjects"]["train"]).isdisjoint(info.extra["subjects"]["test"])
    out = kiln_here("train", "har", "--dataset", str(folder), "--epochs", "16", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((workdir / "store" / "har" / "1" / "manifest.json").read_text())
    assert m["dataset"]["input_shape"] == [128, 9]
    assert m["metrics"]["accuracy"] > 0.6  # chance: 1/6


def test_har_folder_errors_say_what_is_missing(tmp_path):
    from kiln import data

    folder = write_uci(tmp_path / "d")
    (folder / "test" / "Inertial Signals" / "body_gyro_y_test.txt").unlink()
    with pytest.raises(KilnError, match=r"body_gyro_y_test.txt.*--dataset PATH"):
        data.prepare(str(folder))
    (tmp_path / "empty").mkdir()
    with pytest.raises(KilnError, match="not a HAR dataset"):
        data.prepare(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- lstm


def test_lstm_learns_text_and_reports_bits(store):
    m = manifest(store, "lstm")
    vocab = m["dataset"]["class_names"]
    assert len(vocab) == 65 and "\n" in vocab and m["dataset"]["extra"]["test_chars"] == 111540
    nats = m["metrics"]["nats_per_char"]
    assert nats < 0.7 * math.log(len(vocab))  # log(65) = 4.17: a uniform guess
    assert m["metrics"]["bits_per_char"] == pytest.approx(nats / math.log(2))
    assert (store / "store" / "lstm" / "1" / "artifacts" / "sample.txt").read_text().startswith("ROMEO:")


def test_lstm_generates_deterministically_and_scores(store):
    from kiln import models

    a, model_a, _ = models.load("lstm", store / "store")
    b, model_b, _ = models.load("lstm:1", store / "store")
    args = {"prompt": "KING:", "max_chars": 80, "temperature": 0.8, "seed": 7}
    first = a.infer(model_a, "generate", args)
    assert first == b.infer(model_b, "generate", args)  # reload + same seed: same text
    assert first["text"] == "KING:" + first["continuation"] and len(first["continuation"]) == 80
    assert set(first["continuation"]) <= set(a.vocab)
    assert a.infer(model_a, "generate", {**args, "seed": 8}) != first
    text = "First Citizen:\nBefore we proceed any further"
    score = a.infer(model_a, "score", {"text": text})
    assert len(score["per_char"]) == len(text) - 1 and score["nats_per_char"] == pytest.approx(np.mean(score["per_char"]), abs=1e-3)
    # text the model has seen the like of is less surprising than the same letters shuffled
    rng = np.random.default_rng(0)
    shuffled = "".join(rng.permutation(list(text)))
    assert a.infer(model_a, "score", {"text": shuffled})["nats_per_char"] > score["nats_per_char"]


@pytest.mark.parametrize("args, msg", [
    ({"prompt": "Café ☕"}, r"2 character\(s\) outside the model's vocabulary: 'é', '☕'"),
    ({"prompt": ""}, "argument 'prompt' has 0 characters; give 1 to"),
    ({"prompt": "A", "max_chars": 10**6}, "max_chars"),
    ({"prompt": "A", "temperature": 0}, "temperature"),
    ({}, "missing required argument 'prompt'"),
])
def test_lstm_rejects_bad_prompts_clearly(store, args, msg):
    from kiln import models

    plugin, model, _ = models.load("lstm", store / "store")
    with pytest.raises(KilnError, match=msg):
        plugin.infer(model, "generate", args)


def test_lstm_trains_on_a_users_text_file(tmp_path, workdir):
    from kiln import data

    text = "".join(f"{w} " for w in ["to be or not to be that is the question"] * 400)
    path = tmp_path / "mine.txt"
    path.write_text(text)
    info = data.prepare(str(path))
    assert info.class_names == tuple(sorted(set(text)))
    assert info.extra["test_chars"] == len(text) - int(len(text) * 0.9)  # the last 10%, by position
    out = kiln_here("train", "lstm", "--dataset", str(path), "--epochs", "3", "--batch-size", "16",
                    "--set", "units=64", "--set", "learning_rate=0.01", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads((workdir / "store" / "lstm" / "1" / "manifest.json").read_text())
    assert m["metrics"]["nats_per_char"] < 0.5 * math.log(len(info.class_names))  # repetitive text


# --------------------------------------------------------------------------- transfer


# --------------------------------------------------------------------------- gpt


def test_gpt_learns_text_and_draws_its_attention(store):
    m = manifest(store, "gpt")
    assert m["dataset"]["class_names"] == manifest(store, "lstm")["dataset"]["class_names"]  # lstm's vocabulary
    assert m["metrics"]["nats_per_char"] < 0.7 * math.log(65)
    art = store / "store" / "gpt" / "1" / "artifacts"
    assert (art / "sample.txt").read_text().startswith("ROMEO:")
    from PIL import Image

    with Image.open(art / "attention.png") as img:
        assert min(img.size) > 200


def test_gpt_generates_reproducibly_past_its_context_and_scores(store):
    from kiln import models

    a, model_a, _ = models.load("gpt", store / "store")
    b, model_b, _ = models.load("gpt:1", store / "store")
    args = {"prompt": "KING:", "max_chars": 150, "temperature": 0.8, "top_k": 40, "seed": 7}
    first = a.infer(model_a, "generate", args)
    assert first == b.infer(model_b, "generate", args)  # reload + same seed: same text
    assert len(first["continuation"]) == 150 > a.context  # generation slid past the window
    assert a.infer(model_a, "generate", {**args, "seed": 8}) != first
    # top_k=1 is greedy: the seed no longer matters
    greedy = {**args, "top_k": 1}
    assert a.infer(model_a, "generate", greedy) == a.infer(model_a, "generate", {**greedy, "seed": 99})
    long_prompt = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 5  # 320 > 100 characters
    assert a.infer(model_a, "generate", {**args, "prompt": long_prompt})["text"].startswith(long_prompt)
    score = a.infer(model_a, "score", {"text": long_prompt})
    assert len(score["per_char"]) == len(long_prompt) - 1
    assert score["nats_per_char"] == pytest.approx(np.mean(score["per_char"]), abs=1e-3)
    shuffled = "".join(np.random.default_rng(0).permutation(list(long_prompt)))
    assert a.infer(model_a, "score", {"text": shuffled})["nats_per_char"] > score["nats_per_char"]
    att = a.infer(model_a, "attention", {"text": "ROMEO: hi", "layer": 2})
    w = np.asarray(att["weights"])
    assert w.shape == (a.config.heads, 9, 9) and att["characters"] == list("ROMEO: hi")
    assert np.allclose(w.sum(-1), 1, atol=1e-3) and np.allclose(np.triu(w, 1), 0)  # causal: no look ahead


@pytest.mark.parametrize("args, msg", [
    ({"prompt": "Café ☕"}, r"2 character\(s\) outside the model's vocabulary: 'é', '☕'"),
    ({"prompt": ""}, "argument 'prompt' has 0 characters; give 1 to"),
    ({"prompt": "A", "max_chars": 10**6}, "max_chars"),
    ({"prompt": "A", "temperature": 0}, "temperature"),
    ({"prompt": "A", "top_k": -1}, "top_k"),
    ({"prompt": "A", "top_k": 5000}, "top_k"),
])
def test_gpt_rejects_bad_arguments_naming_them(store, args, msg):
    from kiln import models

    plugin, model, _ = models.load("gpt", store / "store")
    with pytest.raises(KilnError, match=msg):
        plugin.infer(model, "generate", args)
    with pytest.raises(KilnError, match="'layer' must be 1..2"):
        plugin.infer(model, "attention", {"text": "AB", "layer": 3})


def test_transfer_beats_the_same_network_from_scratch(store):
    transfer, scratch = manifest(store, "transfer"), manifest(store, "scratch")
    assert transfer["config"]["base"] == "cnn:1"  # pinned in the manifest
    assert transfer["dataset"]["name"] == "fashion_mnist" and transfer["dataset"]["class_names"][0] == "T-shirt/top"
    assert scratch["config"]["pretrained"] is False and transfer["config"]["pretrained"] is True
    # that it beats scratch, over seeds and with the default budget: bench/transfer_vs_scratch.py
    assert 0 < scratch["metrics"]["accuracy"] <= 1 and 0 < transfer["metrics"]["accuracy"] <= 1


def test_transfer_reload_and_fine_tuning_phase(store):
    from kiln import data, models

    images = np.stack([x.numpy() for x, _ in data.load("fashion_mnist", "test", limit=8).ds])
    a, model_a, _ = models.load("transfer", store / "store")
    b, model_b, _ = models.load("transfer:1", store / "store")
    assert a.infer(model_a, "classify", {"images": images}) == b.infer(model_b, "classify", {"images": images})
    assert float(model_a.fine_tuning) == 1.0  # the run went past head_epochs into fine-tuning
    history = manifest(store, "transfer")["history"]
    assert len(history) == TRANSFER_EPOCHS


def test_transfer_from_a_keras_application_with_local_weights(tmp_path, workdir):
    import keras

    weights = tmp_path / "mobilenet.weights.h5"
    keras.applications.MobileNetV2(include_top=False, weights=None, input_shape=(32, 32, 3),
                                   pooling="avg").save_weights(weights)
    out = kiln_here("train", "transfer", "--set", "base=keras:MobileNetV2", "--set", f"weights={weights}",
                    "--set", "labels_per_class=4", "--set", "head_epochs=1", "--epochs", "2",
                    "--batch-size", "8", "--limit", "2000", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "fine-tuning the base's top 1 layer(s)" in out.stdout
    from kiln import models

    plugin, model, _ = models.load("transfer", workdir / "store")
    probs = plugin.infer(model, "classify", {"images": np.zeros((2, 28, 28, 1))})["probabilities"]
    assert np.allclose(np.sum(probs, axis=1), 1, atol=1e-4)


@pytest.mark.parametrize("sets, msg", [
    (["base=keras:MobileNetV2"], "needs its weights from a local file"),
    (["base=keras:NoSuchNet"], "unknown keras base 'NoSuchNet'"),
    (["base=nosuchmodel"], "no model 'nosuchmodel' in store"),
])
def test_transfer_bad_base_is_one_line(workdir, sets, msg):
    args = [a for s in sets for a in ("--set", s)]
    out = kiln_here("train", "transfer", *args, cwd=workdir)
    assert out.returncode == 2 and msg in out.stderr and len(out.stderr.strip().splitlines()) == 1
