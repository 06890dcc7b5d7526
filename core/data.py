"""Data layer: named datasets through tensorflow-datasets (fed offline from raw files), Kiln's
sensor sets, and a user's own files. Everything returns raw examples ``(x, y)``; plugins preprocess.

Kinds of dataset (``kind(name)``):

* a tensorflow-datasets name: supervised image sets (mnist, fashion_mnist) and text
  (tiny_shakespeare);
* ``uci_har`` / ``sp_sw_har`` or a folder path: smartphone inertial recordings cut into windows
  (kiln.sensors);
* a path to an ``.npz`` file (arrays) or a ``.txt`` file (text);
* a folder of pictures sorted into class subfolders (``PATH/<class>/*.jpg``), or with ``train/``
  and ``val/`` (or ``test/``) subfolders of those: an image folder. A run names it with the size
  and channels its plugin asks for (``image_key``: ``PATH?size=64&channels=3``); it is decoded
  once per machine into ``$KILN_CACHE/images`` and read from there.

Text becomes next-character prediction: windows of ``TEXT_WINDOW`` character ids ``x`` and the same
window shifted by one ``y``; the vocabulary is the dataset's ``class_names``. Sensor windows come
with per-channel mean and standard deviation of the training split in ``DatasetInfo.extra``. Both
travel in the stored manifest, so serving needs no data.

Offline: tfds reads a dataset's source files from its ``manual_dir`` and checks their sha256
before trying the network (docs/design.md, "Data offline"). Kiln points ``manual_dir`` at
``$KILN_DATA_DIR/<dataset>`` and checks the expected files first, so a missing file fails in
milliseconds instead of after minutes of download retries.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln import settings
from kiln.plugin import DatasetInfo, KilnError

# Raw files tfds needs for each dataset Kiln knows offline (names as in tfds' checksums).
RAW_FILES: dict[str, tuple[str, ...]] = {
    "mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "fashion_mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "tiny_shakespeare": ("input.txt",),
}
# Sensor sets read by kiln.sensors from $KILN_DATA_DIR/<name>.
SENSOR_SETS = ("uci_har", "sp_sw_har")
# Characters per text example (the TensorFlow text-generation tutorial's sequence length).
TEXT_WINDOW = 100
# The last tenth of a user's text file is its test split (nanoGPT's split of tiny Shakespeare).
TEXT_TEST_FRACTION = 0.1


@dataclass
class Split:
    """One (possibly sharded) split: a tf.data.Dataset of raw (x, y) and its example count."""

    ds: Any
    size: int


IMAGE_TYPES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
# an image folder without its own split: this share of each class is its test split (seeded)
IMAGE_TEST_FRACTION = 0.2


def kind(name: str) -> str:
    """"npz", "text" (a .txt file), "images" (an image folder), "sensors" (a sensor set or
    folder) or "tfds"."""
    if "?size=" in name or is_image_folder(name):
        return "images"
    if name.endswith(".npz"):
        return "npz"
    if name.endswith(".txt"):
        return "text"
    if name in SENSOR_SETS or os.sep in name or Path(name).expanduser().is_dir():
        return "sensors"
    return "tfds"


def is_file_dataset(name: str) -> bool:
    """A dataset given by a path (resolved to an absolute path when a run is planned)."""
    return kind(name) != "tfds" and name not in SENSOR_SETS


@functools.lru_cache(maxsize=64)
def is_image_folder(name: str) -> bool:
    """Class subfolders holding pictures, directly or under ``train/`` (or pictures not yet sorted
    into classes, which the listing then asks for)."""
    path = Path(name).expanduser()
    try:
        if path.is_dir() and any(f.suffix.lower() in IMAGE_TYPES for f in path.iterdir()):
            return True
    except OSError:
        return False
    for root in (path, path / "train"):
        try:
            if root.is_dir() and any(f.suffix.lower() in IMAGE_TYPES for d in root.iterdir()
                                     if d.is_dir() for f in d.iterdir()):
                return True
        except OSError:
            continue
    return False


def named_folder(name: str) -> str | None:
    """``$KILN_DATA_DIR/<name>`` when it is an image folder (``--dataset hymenoptera``), else None."""
    root = settings.data_dir()
    if root is None or os.sep in name or not name or not is_image_folder(str(root / name)):
        return None
    return str(root / name)


def image_key(path: str, size: int, channels: int | None, skip_broken: bool = False) -> str:
    """The name a run gives an image folder read at ``size`` x ``size`` pixels with ``channels``
    (1 or 3; None: RGB if any picture has colour); ``skip_broken`` skips and counts pictures that
    do not decode instead of failing."""
    key = f"{Path(path).expanduser().resolve()}?size={int(size)}"
    if channels:
        key += f"&channels={int(channels)}"
    return key + ("&skip_broken=1" if skip_broken else "")


def parse_image_key(name: str) -> tuple[Path, int | None, int | None, bool]:
    """(folder, size, channels, skip_broken) of an image folder's name; a bare folder has no size."""
    path, _, query = name.partition("?")
    opts = dict(part.partition("=")[::2] for part in query.split("&") if part)
    size = int(opts["size"]) if opts.get("size") else None
    channels = int(opts["channels"]) if opts.get("channels") else None
    return Path(path).expanduser(), size, channels, opts.get("skip_broken") == "1"


def check_path(name: str) -> str:
    """A dataset given by a path, made absolute (an image folder's size and channels kept);
    KilnError naming it when nothing is there."""
    bare, mark, query = name.partition("?size=")
    path = Path(bare).expanduser().resolve()
    if not path.exists():
        raise KilnError(f"dataset file not found: {path} (give an existing .npz, .txt or folder, "
                        "or a dataset name such as mnist)")
    return str(path) + mark + query


def _manual_dir(name: str) -> Path | None:
    root = settings.data_dir()
    if root is None or name not in RAW_FILES:
        return None  # tfds downloads, where a network exists
    folder = root / name
    missing = [f for f in RAW_FILES[name] if not (folder / f).is_file()]
    if missing:
        raise KilnError(f"dataset '{name}': raw file {folder / missing[0]} is missing "
                        f"(KILN_DATA_DIR={root}); copy the files {', '.join(RAW_FILES[name])} there "
                        "or unset KILN_DATA_DIR to let tfds download them")
    return folder


def _builder(name: str) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=str(settings.tfds_dir()))
    except tfds.core.registered.DatasetNotFoundError:
        raise KilnError(f"unknown dataset '{name}': use a tensorflow-datasets name such as "
                        f"{', '.join(sorted(RAW_FILES))}, or a path to an .npz file") from None


def prepare(name: str) -> DatasetInfo:
    """Make a dataset ready to read (once per machine, under a file lock) and describe it."""
    if kind(name) != "tfds":
        return _arrays(name)[1]
    builder = _prepared(name)
    if _is_text(builder):
        return _arrays(name)[1]
    return _tfds_info(name, builder)


def _prepared(name: str) -> Any:
    """The tfds builder of ``name``, prepared from the raw files if it was not yet."""
    manual = _manual_dir(name)
    builder = _builder(name)
    settings.tfds_dir().mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(settings.tfds_dir() / f".{name}.lock")):
        if not Path(builder.data_path).joinpath("dataset_info.json").exists():
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
            print(f"[kiln] preparing dataset '{name}' from {manual or 'the network'} into "
                  f"{settings.tfds_dir()} (once per machine)", flush=True)
            config = tfds.download.DownloadConfig(manual_dir=str(manual) if manual else None)
            # One download folder per dataset: tfds names extracted files after the source file
            # only, so a shared folder hands MNIST's train-images to Fashion-MNIST (same names).
            # tfds prints its own two lines about "Unknown size" downloads; Kiln's line says it
            with contextlib.redirect_stdout(io.StringIO()):
                builder.download_and_prepare(download_dir=str(settings.tfds_dir() / "downloads" / name),
                                             download_config=config)
    # a builder reads dataset_info.json when it is made: one made before the lock, while another
    # process was still preparing, describes an empty dataset
    return _builder(name)


def _is_text(builder: Any) -> bool:
    return not builder.info.supervised_keys and "text" in builder.info.features


def _tfds_info(name: str, builder: Any) -> DatasetInfo:
    feats = builder.info.features
    keys = builder.info.supervised_keys
    if not keys:
        raise KilnError(f"dataset '{name}' has no (input, label) pair; Kiln needs a supervised "
                        "dataset or a text dataset")
    xk, yk = keys[0], keys[1]
    label = feats[yk]
    names = tuple(getattr(label, "names", ()) or ())
    return DatasetInfo(name=name, input_shape=tuple(feats[xk].shape),
                       num_classes=int(getattr(label, "num_classes", 0) or 0), class_names=names,
                       train_size=builder.info.splits["train"].num_examples,
                       test_size=builder.info.splits["test"].num_examples)


def load(name: str, split: str, *, shard: tuple[int, int] | None = None,
         limit: int | None = None, per_class: int | None = None, val_fraction: float = 0.0,
         seed: int = 0) -> Split:
    """Raw examples of ``split``: "train", "val" or "test". "val" is held out of the training
    data (``holdout``) and "train" is what is left of it. With ``shard=(index, count)`` only that
    worker's even share is read; with ``limit`` only the first ``limit`` examples of the training
    (or test) split are used; with ``per_class`` only the first ``per_class`` training examples
    of each class (a small labelled budget)."""
    if kind(name) == "tfds":
        builder = _prepared(name)
        if not _is_text(builder):
            expr = _tfds_expr(builder, split, limit, val_fraction)
            if per_class and split == "train":
                return _from_arrays(*_tfds_arrays(builder, expr), shard, per_class)
            return _tfds_load(builder, expr, shard)
    arrays = _arrays(name)[0]
    if split == "test":
        x, y = arrays["x_test"], arrays["y_test"]
        if limit:
            x, y = x[:limit], y[:limit]
        return _from_arrays(x, y, shard, None)
    keep = holdout(name, limit, val_fraction, seed)[split]
    return _from_arrays(arrays["x_train"][keep], arrays["y_train"][keep], shard,
                        per_class if split == "train" else None)


def _tfds_expr(builder: Any, split: str, limit: int | None, val_fraction: float) -> str:
    """The tfds split expression of a Kiln split: a dataset's own validation split where it has
    one, else the last ``val_fraction`` of its (limited) training split."""
    if split == "test" or (split == "val" and "validation" in builder.info.splits):
        own = "test" if split == "test" else "validation"
        n = builder.info.splits[own].num_examples
        return f"{own}[:{limit}]" if limit and limit < n else own
    n = builder.info.splits["train"].num_examples
    n = min(n, limit or n)
    k = 0 if "validation" in builder.info.splits else _held(n, val_fraction)
    return f"train[:{n - k}]" if split == "train" else f"train[{n - k}:{n}]"


def _held(n: int, fraction: float) -> int:
    return min(n - 1, max(1, round(n * fraction))) if fraction > 0 and n > 1 else 0


def holdout(name: str, limit: int | None, fraction: float, seed: int = 0) -> dict[str, Any]:
    """Which training examples of an in-memory dataset are held out for validation: ``train``
    and ``val`` index arrays and ``how`` (for the manifest). Text holds out its last windows
    (the text just before the test slice), sensor windows whole subjects (the last of them by
    name), other arrays a seeded sample."""
    arrays, info = _arrays(name)
    n = len(arrays["x_train"]) if not limit else min(limit, len(arrays["x_train"]))
    every = np.arange(n)
    k = _held(n, fraction)
    if k == 0:
        return {"train": every, "val": every[:0], "how": "none"}
    if info.extra.get("text"):
        return {"train": every[:n - k], "val": every[n - k:], "how": f"the last {k} windows of the training text"}
    if "subject_train" in arrays:
        who = arrays["subject_train"][:n]
        subjects = sorted(set(who.tolist()))
        if len(subjects) < 2:
            raise KilnError(f"{name}: the training split has {len(subjects)} subject; validation "
                            "holds out whole subjects and needs 2 or more (or --val-fraction 0)")
        held = subjects[-min(len(subjects) - 1, max(1, round(len(subjects) * fraction))):]
        val = np.isin(who, held)
        return {"train": every[~val], "val": every[val],
                "how": f"subjects {', '.join(held)} of the training split"}
    val = np.sort(np.random.default_rng(seed).permutation(n)[:k])
    return {"train": np.setdiff1d(every, val), "val": val,
            "how": f"a sample of {k} training examples (seed {seed})"}


def validation(name: str, info: DatasetInfo, limit: int | None, fraction: float, seed: int = 0) -> dict[str, Any]:
    """What a run holds out for validation, as the manifest records it."""
    if fraction <= 0:
        return {"fraction": 0.0, "examples": 0, "how": "none"}
    if kind(name) == "tfds" and not info.extra.get("text"):
        builder = _prepared(name)
        expr = _tfds_expr(builder, "val", limit, fraction)
        own = expr.startswith("validation")
        return {"fraction": fraction, "examples": builder.info.splits[expr].num_examples,
                "how": f"the dataset's own split {expr}" if own else f"the last examples of the training split ({expr})"}
    held = holdout(name, limit, fraction, seed)
    return {"fraction": fraction, "examples": len(held["val"]), "how": held["how"]}


def _tfds_load(builder: Any, expr: str, shard: tuple[int, int] | None) -> Split:
    import tensorflow_datasets as tfds

    if shard is not None and shard[1] > 1:
        expr = tfds.even_splits(expr, n=shard[1])[shard[0]]
    size = builder.info.splits[expr].num_examples
    ds = builder.as_dataset(split=expr, as_supervised=True, shuffle_files=False)
    return Split(ds, size)


def _tfds_arrays(builder: Any, expr: str) -> tuple[np.ndarray, np.ndarray]:
    import tensorflow_datasets as tfds

    x, y = tfds.as_numpy(builder.as_dataset(split=expr, as_supervised=True, batch_size=-1))
    return x, y


def _from_arrays(x: np.ndarray, y: np.ndarray, shard: tuple[int, int] | None,
                 per_class: int | None) -> Split:
    import tensorflow as tf

    if per_class:
        keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in np.unique(y)])
        x, y = x[np.sort(keep)], y[np.sort(keep)]
    if shard is not None and shard[1] > 1:
        parts = np.array_split(np.arange(len(x)), shard[1])[shard[0]]
        x, y = x[parts], y[parts]
    return Split(tf.data.Dataset.from_tensor_slices((x, y)), len(x))


def split_size(name: str, info: DatasetInfo, split: str, limit: int | None = None,
               per_class: int | None = None, val_fraction: float = 0.0, seed: int = 0) -> int:
    """Examples a run reads from ``split`` ("train", "val", "test"): after ``limit`` and the
    validation hold-out, at most ``per_class`` per class."""
    if split == "test":
        size = min(info.test_size, limit or info.test_size)
    elif kind(name) == "tfds" and not info.extra.get("text"):
        builder = _prepared(name)
        size = builder.info.splits[_tfds_expr(builder, split, limit, val_fraction)].num_examples
    else:
        size = len(holdout(name, limit, val_fraction, seed)[split])
    if per_class and split == "train":
        size = min(size, per_class * max(1, info.num_classes))
    return size


# --------------------------------------------------------------------------- array-backed datasets
# .npz files, text and sensor windows are small enough to hold in memory: read once per process.


@functools.lru_cache(maxsize=8)
def _arrays(name: str) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    k = kind(name)
    if k == "npz":
        arrays = _npz_arrays(name)
        info = _array_info(str(Path(name).expanduser().resolve()), arrays)
    elif k == "text":
        arrays, info = _text_file(name)
    elif k == "sensors":
        arrays, info = _sensor_arrays(name)
    elif k == "images":
        arrays, info = _image_arrays(name)
    else:
        arrays, info = _tfds_text(name)
    for s in ("train", "test"):
        if not len(arrays[f"x_{s}"]):
            raise KilnError(f"dataset '{name}' has no {s} examples")
    return arrays, info


def test_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    """The test split of an array-backed dataset (an .npz, a HAR folder) as (x, y)."""
    arrays, _ = _arrays(name)
    return arrays["x_test"], arrays["y_test"]


def _array_info(name: str, a: dict[str, np.ndarray], **extra: Any) -> DatasetInfo:
    y = np.concatenate([a["y_train"], a["y_test"]])
    integer = np.issubdtype(y.dtype, np.integer) and y.ndim == 1
    if integer and y.min() < 0:
        raise KilnError(f"{name}: labels must be integers >= 0 (found {y.min()})")
    num_classes = int(y.max()) + 1 if integer and len(y) else 0
    x = a["x_train"]
    if x.ndim == 3 and np.issubdtype(x.dtype, np.floating):
        # (windows, steps, channels): per-channel statistics of the training split, so that a
        # model normalises its inputs the same way in training and serving
        extra.setdefault("channel_mean", x.mean(axis=(0, 1)).astype(float).round(6).tolist())
        extra.setdefault("channel_std", x.std(axis=(0, 1)).astype(float).round(6).tolist())
        if x.shape[-1] % 3 == 0:  # xyz triads (accelerometer, gyroscope): their lengths too
            mags = np.linalg.norm(x.reshape(*x.shape[:2], -1, 3), axis=-1)
            extra.setdefault("magnitude_mean", mags.mean(axis=(0, 1)).astype(float).round(6).tolist())
            extra.setdefault("magnitude_std", mags.std(axis=(0, 1)).astype(float).round(6).tolist())
    extra.setdefault("class_names", [str(i) for i in range(num_classes)])
    names = tuple(extra.pop("class_names"))
    return DatasetInfo(name=name, input_shape=tuple(x.shape[1:]), num_classes=num_classes,
                       class_names=names, train_size=len(x), test_size=len(a["x_test"]),
                       extra=extra)


def _sensor_arrays(name: str) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    from kiln import sensors

    if name in SENSOR_SETS:
        root = settings.data_dir()
        if root is None:
            raise KilnError(f"dataset '{name}' is read from $KILN_DATA_DIR/{name}; set KILN_DATA_DIR "
                            "to the folder holding it, or pass the dataset's folder with --dataset PATH")
        folder, label = root / name, name
    else:
        folder = Path(name).expanduser().resolve()
        label = str(folder)
    w = sensors.read(folder)
    arrays = {"x_train": w.x["train"], "y_train": w.y["train"],
              "x_test": w.x["test"], "y_test": w.y["test"]}
    if w.who is not None:  # each training window's subject: validation holds out whole subjects
        arrays["subject_train"] = w.who["train"]
    return arrays, _array_info(label, arrays, class_names=list(w.class_names),
                               channels=list(w.channels), rate_hz=w.rate_hz, layout=w.layout,
                               subjects=w.subjects)


def _text_info(name: str, train: str, test: str) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    vocab = sorted(set(train) | set(test))
    if len(vocab) < 2:
        raise KilnError(f"{name}: text needs at least 2 different characters")
    index = {c: i for i, c in enumerate(vocab)}
    arrays = {}
    for split, text in (("train", train), ("test", test)):
        ids = np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))
        n = (len(ids) - 1) // TEXT_WINDOW
        if n < 1:
            raise KilnError(f"{name}: the {split} text has {len(text)} characters; it needs more "
                            f"than {TEXT_WINDOW} (one example)")
        arrays[f"x_{split}"] = ids[:n * TEXT_WINDOW].reshape(n, TEXT_WINDOW)
        arrays[f"y_{split}"] = ids[1:n * TEXT_WINDOW + 1].reshape(n, TEXT_WINDOW)
    info = DatasetInfo(name=name, input_shape=(TEXT_WINDOW,), num_classes=len(vocab),
                       class_names=tuple(vocab), train_size=len(arrays["x_train"]),
                       test_size=len(arrays["x_test"]),
                       extra={"text": True, "train_chars": len(train), "test_chars": len(test)})
    return arrays, info


def _text_file(path: str) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise KilnError(f"dataset file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KilnError(f"cannot read {p} as UTF-8 text: {e}") from None
    cut = int(len(text) * (1 - TEXT_TEST_FRACTION))
    return _text_info(str(p), text[:cut], text[cut:])


def _tfds_text(name: str) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    """A tfds text dataset; its validation and test splits together are Kiln's test split (for
    tiny_shakespeare: the last 10% of the text, nanoGPT's validation split)."""
    import tensorflow_datasets as tfds

    builder = _prepared(name)
    test = "validation+test" if "validation" in builder.info.splits else "test"

    def text(split: str) -> str:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        return "".join(ex["text"].decode("utf-8") for ex in tfds.as_numpy(ds))

    return _text_info(name, text("train"), text(test))


# --------------------------------------------------------------------------- .npz files
# Keys: x_train, y_train, x_test, y_test; or x, y (the last 10% become the test split).


def _npz_arrays(path: str) -> dict[str, np.ndarray]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise KilnError(f"dataset file not found: {p}")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:
        raise KilnError(f"cannot read {p} as .npz: {e}") from None
    if {"x_train", "y_train", "x_test", "y_test"} <= arrays.keys():
        out = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    elif {"x", "y"} <= arrays.keys():
        x, y = arrays["x"], arrays["y"]
        if len(x) != len(y):
            raise KilnError(f"{p}: x has {len(x)} rows but y has {len(y)}")
        cut = len(x) - max(1, len(x) // 10)
        out = {"x_train": x[:cut], "y_train": y[:cut], "x_test": x[cut:], "y_test": y[cut:]}
    else:
        raise KilnError(f"{p} must hold arrays x_train, y_train, x_test, y_test (or x, y); "
                        f"found: {', '.join(sorted(arrays)) or 'nothing'}")
    for s in ("train", "test"):
        x, y = out[f"x_{s}"], out[f"y_{s}"]
        if len(x) != len(y):
            raise KilnError(f"{p}: x_{s} has {len(x)} rows but y_{s} has {len(y)}")
        if not np.issubdtype(x.dtype, np.number) or not np.all(np.isfinite(x)):
            raise KilnError(f"{p}: x_{s} must be finite numbers")
    return out




# --------------------------------------------------------------------------- image folders
# Pictures are decoded by kiln.images.decode, the decoder the server and `kiln predict --image`
# use, so a photo becomes the same pixels in training and in serving (docs/design.md).


def _listing(root: Path) -> tuple[dict[str, list[tuple[Path, int]]], tuple[str, ...], str]:
    """The pictures of each split as (file, class index), the class names (the subfolders' names,
    sorted) and how the split was made. KilnError, before any decoding, for a folder without
    class subfolders, an empty class or a single class."""
    def pictures(folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")
                      and f.suffix.lower() in IMAGE_TYPES)

    def classes(folder: Path) -> dict[str, list[Path]]:
        found = {d.name: pictures(d) for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")}
        if not found or not any(found.values()):
            raise KilnError(f"{folder} holds no class subfolders with pictures ({', '.join(IMAGE_TYPES)}); "
                            "sort the pictures into one subfolder per class: "
                            f"{folder}/<class>/picture.jpg")
        empty = [c for c, files in found.items() if not files]
        if empty:
            raise KilnError(f"class folder {folder / empty[0]} holds no pictures ({', '.join(IMAGE_TYPES)}); "
                            "add some or remove the folder")
        if len(found) < 2:
            raise KilnError(f"{folder} has a single class ({next(iter(found))}); a classifier needs 2 or "
                            "more class subfolders")
        return found

    if not root.is_dir():
        raise KilnError(f"image folder not found: {root}")
    own = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and own is not None:
        train, test = classes(root / "train"), classes(own)
        unknown = sorted(set(test) - set(train))
        if unknown:
            raise KilnError(f"{own} has class {unknown[0]!r}, which {root / 'train'} lacks; the two "
                            "need the same class subfolders")
        names = tuple(train)
        return ({"train": [(f, names.index(c)) for c, fs in train.items() for f in fs],
                 "test": [(f, names.index(c)) for c, fs in test.items() for f in fs]},
                names, f"the folder's own train/ and {own.name}/ subfolders")
    found = classes(root)
    names = tuple(found)
    rng = np.random.default_rng(0)
    splits: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for k, files in enumerate(found.values()):
        if len(files) < 2:
            raise KilnError(f"class folder {root / names[k]} holds {len(files)} picture; splitting it into "
                            "training and test pictures needs 2 or more")
        order = rng.permutation(len(files))
        cut = max(1, round(len(files) * IMAGE_TEST_FRACTION))
        splits["test"] += [(files[i], k) for i in sorted(order[:cut])]
        splits["train"] += [(files[i], k) for i in sorted(order[cut:])]
    return splits, names, f"{IMAGE_TEST_FRACTION:.0%} of each class as the test split (seed 0)"


def _channels_of(files: list[Path]) -> int:
    """3 if any picture has colour (from its header: no decoding), else 1."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as img:
                if img.mode not in ("1", "L", "LA", "I", "I;16", "F"):
                    return 3
        except Exception:  # noqa: BLE001 - a broken file is found and named when it is decoded
            continue
    return 1


def _decode_pictures(files: list[Path], size: int, channels: int,
                     skip_broken: bool) -> tuple[np.ndarray, list[int], list[Path]]:
    """Pixels of ``files`` (uint8, (n, size, size, channels)), decoded in parallel threads (PIL
    releases the GIL); the indices that decoded, and the files that did not."""
    from concurrent.futures import ThreadPoolExecutor

    from kiln.images import decode

    def one(f: Path) -> np.ndarray | None:
        try:
            x = decode(f.read_bytes(), (None, size, size, channels), source=str(f), max_pixels=1 << 30)
        except (KilnError, OSError) as e:
            if skip_broken:
                return None
            raise KilnError(f"{e}; remove or replace it, or skip such files with --set skip_broken=true") from None
        return np.clip(np.round(x), 0, 255).astype(np.uint8)

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        decoded = list(pool.map(one, files))
    keep = [i for i, x in enumerate(decoded) if x is not None]
    x = np.stack([decoded[i] for i in keep]) if keep else np.zeros((0, size, size, channels), np.uint8)
    return x, keep, [files[i] for i, d in enumerate(decoded) if d is None]


def _image_arrays(name: str) -> tuple[dict[str, np.ndarray], DatasetInfo]:
    """An image folder as arrays, decoded once per machine (cached under $KILN_CACHE/images, keyed
    by the folder's listing, each file's size and time, and the size and channels asked for)."""
    import glob
    import hashlib
    import json
    import time

    root, size, channels, skip = parse_image_key(name)
    root = root.resolve()
    if size is None:
        raise KilnError(f"{root} is an image folder: train a plugin that reads pictures on it (cnn), "
                        "which sets the size (--set image_size=64)")
    splits, names, how = _listing(root)
    every = [f for s in ("train", "test") for f, _ in splits[s]]
    stats = [f.stat() for f in every]
    # keyed by what was asked (the name holds forced channels), so that a later read finds the
    # cache without opening any picture; "auto" channels are resolved only when preparing
    sig = hashlib.sha1(json.dumps([name, [(str(f), st.st_size, st.st_mtime_ns) for f, st in zip(every, stats)]])
                       .encode()).hexdigest()[:20]
    folder = settings.cache_dir() / "images"
    folder.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(folder / f"{root.name}-{size}px-{sig}.lock")):
        found = sorted(folder.glob(f"{glob.escape(root.name)}-{size}px-*ch-{sig}.npz"))
        if found:
            cached = found[0]
        else:
            channels = channels or _channels_of(every)
            cached = folder / f"{root.name}-{size}px-{channels}ch-{sig}.npz"
            t0 = time.perf_counter()
            print(f"[kiln] preparing image folder {root}: {len(every)} pictures at {size}x{size}, "
                  f"{'RGB' if channels == 3 else 'grayscale'}, into {folder} (once per machine)", flush=True)
            arrays: dict[str, np.ndarray] = {}
            skipped: list[str] = []
            for s in ("train", "test"):
                x, keep, broken = _decode_pictures([f for f, _ in splits[s]], size, channels, skip)
                arrays[f"x_{s}"], arrays[f"y_{s}"] = x, np.array([splits[s][i][1] for i in keep], dtype=np.int64)
                skipped += [str(f) for f in broken]
            arrays["skipped"] = np.array(skipped, dtype=str)
            tmp = cached.with_suffix(".tmp.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, cached)  # a reader sees the whole file or none
            print(f"[kiln] prepared in {time.perf_counter() - t0:.1f} s"
                  + (f"; skipped {len(skipped)} that did not decode, e.g. {skipped[0]}" if skipped else ""),
                  flush=True)
    with np.load(cached, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    skipped = [str(s) for s in arrays.pop("skipped")]
    return arrays, _array_info(name, arrays, class_names=list(names), split=how, folder=str(root),
                               skipped=len(skipped), skipped_files=skipped[:20])
