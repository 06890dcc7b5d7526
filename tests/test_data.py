"""The data layer: tfds fed offline from ../shared/data, per-worker shards, .npz files, errors."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from helpers import write_folder

from kiln import KilnError, data


def test_mnist_prepared_offline_from_raw_files():
    assert __import__("kiln.settings").settings.data_dir() is not None, "set KILN_DATA_DIR or provide ../shared/data"
    info = data.prepare("mnist")
    assert (info.train_size, info.test_size) == (60000, 10000)
    assert info.input_shape == (28, 28, 1) and info.num_classes == 10


def test_a_process_that_waited_while_another_prepared_the_dataset_reads_it(tmp_path, monkeypatch):
    """Two Kiln processes on a fresh machine: the one that waits on the lock while the other
    prepares MNIST must then read what was prepared, not the empty dataset it saw before."""
    import shutil
    import threading

    from filelock import FileLock

    from kiln import settings

    prepared = data._prepared("mnist").data_path  # the session's copy, as the other process leaves it
    monkeypatch.setenv("KILN_TFDS_DIR", str(tmp_path / "tfds"))
    (tmp_path / "tfds").mkdir()
    looked, real = threading.Event(), data._builder
    monkeypatch.setattr(data, "_builder", lambda name: (real(name), looked.set())[0])
    result = {}
    with FileLock(str(settings.tfds_dir() / ".mnist.lock")):  # the other process, preparing
        waiter = threading.Thread(target=lambda: result.update(info=_or_error(data.prepare, "mnist")))
        waiter.start()
        assert looked.wait(60)
        target = settings.tfds_dir() / Path(prepared).relative_to(Path(prepared).parents[1])
        shutil.copytree(prepared, target)
    waiter.join(60)
    assert not isinstance(result["info"], Exception), result["info"]
    assert result["info"].train_size == 60000


def _or_error(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001  (handed to the test's thread)
        return e


def test_each_worker_reads_only_its_shard():
    full = data.load("mnist", "train", limit=1000)
    a = data.load("mnist", "train", shard=(0, 2), limit=1000)
    b = data.load("mnist", "train", shard=(1, 2), limit=1000)
    assert (a.size, b.size, full.size) == (500, 500, 1000)
    key = lambda split: {x.numpy().tobytes() + y.numpy().tobytes() for x, y in split.ds}  # noqa: E731
    ka, kb = key(a), key(b)
    assert not ka & kb and len(ka | kb) == len(key(full))


def test_missing_raw_file_fails_fast_naming_it(tmp_path, monkeypatch):
    (tmp_path / "raw" / "mnist").mkdir(parents=True)
    (tmp_path / "raw" / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    monkeypatch.setenv("KILN_DATA_DIR", str(tmp_path / "raw"))
    monkeypatch.setenv("KILN_TFDS_DIR", str(tmp_path / "cache"))
    t0 = time.time()
    with pytest.raises(KilnError) as e:
        data.prepare("mnist")
    assert time.time() - t0 < 10
    assert "train-labels-idx1-ubyte.gz" in str(e.value) and "KILN_DATA_DIR" in str(e.value)


def test_unknown_dataset():
    with pytest.raises(KilnError, match="unknown dataset 'no_such_set'"):
        data.prepare("no_such_set")


def test_npz_with_x_y_keys(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, (50, 8, 8), dtype=np.uint8)
    y = np.arange(50) % 3
    np.savez(tmp_path / "d.npz", x=x, y=y)
    info = data.prepare(str(tmp_path / "d.npz"))
    assert info.input_shape == (8, 8) and info.num_classes == 3 and (info.train_size, info.test_size) == (45, 5)
    shard = data.load(str(tmp_path / "d.npz"), "train", shard=(1, 2))
    assert shard.size == 22


@pytest.mark.parametrize("arrays, msg", [
    ({"images": np.zeros((3, 2))}, "must hold arrays x_train"),
    ({"x": np.zeros((3, 2)), "y": np.zeros(4, dtype=int)}, "3 rows but y has 4"),
    ({"x": np.full((3, 2), np.inf), "y": np.zeros(3, dtype=int)}, "finite"),
])
def test_bad_npz_is_explained(tmp_path, arrays, msg):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(KilnError, match=msg):
        data.prepare(str(tmp_path / "bad.npz"))


def test_fashion_mnist_is_not_mnist():
    # tfds names extracted files after their source file only; MNIST and Fashion-MNIST share
    # file names, so a shared download folder once gave Fashion-MNIST the MNIST digits.
    data.prepare("mnist")
    info = data.prepare("fashion_mnist")
    assert info.class_names[0] == "T-shirt/top"
    mean = lambda name: np.mean([x.numpy().mean() for x, _ in data.load(name, "test", limit=500).ds])  # noqa: E731
    # clothes cover far more of the picture than pen strokes: mean pixel about 73 against 33
    assert mean("mnist") < 40 < 60 < mean("fashion_mnist")


# --------------------------------------------------------------------------- image folders


def test_an_image_folder_is_classes_of_pictures_at_the_plugins_size(tmp_path, monkeypatch):
    """A folder of class subfolders: class names from the folder names, every picture at the
    size and channels asked for (RGB when any has colour), 20% of each class as a seeded test
    split that the manifest's dataset info records, the split made once and read from the cache."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    from kiln import run

    folder = write_folder(tmp_path / "pets")
    spec = run.plan("cnn", dataset=str(folder), overrides={"image_size": "32"})
    assert spec.dataset == f"{folder}?size=32" and data.kind(spec.dataset) == "images"
    info = data.prepare(spec.dataset)
    assert info.input_shape == (32, 32, 3) and info.class_names == ("cats", "dogs") and info.num_classes == 2
    assert (info.train_size, info.test_size) == (10, 2)  # of 6 per class, round(1.2) = 1 each for test
    assert info.extra["split"] == "20% of each class as the test split (seed 0)" and info.extra["skipped"] == 0
    x, y = (np.stack(a) for a in zip(*[(a.numpy(), b.numpy()) for a, b in data.load(spec.dataset, "train").ds]))
    assert x.dtype == np.uint8 and x.shape == (10, 32, 32, 3) and sorted(y.tolist()) == [0] * 5 + [1] * 5
    red = x[(y == 0) & (x[:, 16, 16, 1] < 100)][0, 16, 16]  # a cat JPEG: red stays red
    assert red[0] > 180 and red[2] < 80
    assert len(list((tmp_path / "cache" / "images").glob("pets-32px-3ch-*.npz"))) == 1
    gray = run.plan("cnn", dataset=str(folder), overrides={"image_size": "28", "channels": "grayscale"})
    assert data.prepare(gray.dataset).input_shape == (28, 28, 1)


def test_a_folder_with_train_and_val_keeps_its_own_split(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    write_folder(tmp_path / "set" / "train", n=4)
    write_folder(tmp_path / "set" / "val", n=2)
    info = data.prepare(data.image_key(str(tmp_path / "set"), 16, 1))
    assert (info.train_size, info.test_size, info.input_shape) == (8, 4, (16, 16, 1))
    assert info.extra["split"] == "the folder's own train/ and val/ subfolders"


@pytest.mark.parametrize("make, words", [
    (lambda r: write_folder(r, broken="dogs/9.jpg"), ["dogs/9.jpg", "is not a PNG, JPEG, GIF or BMP picture",
                                                       "--set skip_broken=true"]),
    (lambda r: (write_folder(r), (r / "owls").mkdir()), ["class folder", "owls holds no pictures"]),
    (lambda r: write_folder(r, classes=("cats",)), ["has a single class (cats)", "2 or more class subfolders"]),
    (lambda r: (write_folder(r / "train"), write_folder(r / "val", classes=("cats", "owls"))),
     ["has class 'owls'", "the two need the same class subfolders"]),
])
def test_a_bad_image_folder_is_one_clear_error_before_training(tmp_path, monkeypatch, make, words):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    make(tmp_path / "pets")
    with pytest.raises(KilnError) as e:
        data.prepare(data.image_key(str(tmp_path / "pets"), 32, None))
    assert all(w in str(e.value) for w in words), str(e.value)
    assert "\n" not in str(e.value)


def test_broken_pictures_are_skipped_and_counted_when_asked(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    from kiln import run

    folder = write_folder(tmp_path / "pets", broken="dogs/9.jpg")
    spec = run.plan("cnn", dataset=str(folder), overrides={"image_size": "32", "skip_broken": "true"})
    info = data.prepare(spec.dataset)
    assert info.extra["skipped"] == 1 and info.extra["skipped_files"] == [str(folder / "dogs" / "9.jpg")]
    assert info.train_size + info.test_size == 12
