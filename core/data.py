"""Data layer: named datasets through tensorflow-datasets (fed offline from raw files), and a
user's own ``.npz`` file. Everything returns raw examples ``(x, y)``; plugins preprocess.

Offline: tfds reads a dataset's source files from its ``manual_dir`` and checks their sha256
before trying the network (DESIGN.md section 8). Kiln points ``manual_dir`` at
``$KILN_DATA_DIR/<dataset>`` and checks the expected files first, so a missing file fails in
milliseconds instead of after minutes of download retries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.plugin import DatasetInfo, KilnError

# Raw files tfds needs for each dataset Kiln knows offline (names as in tfds' checksums).
RAW_FILES: dict[str, tuple[str, ...]] = {
    "mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    "fashion_mnist": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def data_dir() -> Path | None:
    """Where raw dataset files live: $KILN_DATA_DIR, else ../shared/data beside this repository."""
    env = os.environ.get("KILN_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2] / "shared" / "data"
    return here if here.is_dir() else None


def cache_dir() -> Path:
    """Where tfds keeps prepared datasets: $KILN_TFDS_DIR, else ~/.cache/kiln/tfds."""
    return Path(os.environ.get("KILN_TFDS_DIR", "~/.cache/kiln/tfds")).expanduser()


@dataclass
class Split:
    """One (possibly sharded) split: a tf.data.Dataset of raw (x, y) and its example count."""

    ds: Any
    size: int


def is_file_dataset(name: str) -> bool:
    return name.endswith(".npz")


def _manual_dir(name: str) -> Path | None:
    root = data_dir()
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
        return tfds.builder(name, data_dir=str(cache_dir()))
    except tfds.core.registered.DatasetNotFoundError:
        raise KilnError(f"unknown dataset '{name}': use a tensorflow-datasets name such as "
                        f"{', '.join(sorted(RAW_FILES))}, or a path to an .npz file") from None


def prepare(name: str) -> DatasetInfo:
    """Make a dataset ready to read (once per machine, under a file lock) and describe it."""
    if is_file_dataset(name):
        return _npz_info(name)
    manual = _manual_dir(name)
    builder = _builder(name)
    cache_dir().mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(cache_dir() / f".{name}.lock")):
        if not Path(builder.data_path).joinpath("dataset_info.json").exists():
            import tensorflow_datasets as tfds

            tfds.disable_progress_bar()
            print(f"[kiln] preparing dataset '{name}' from {manual or 'the network'} into "
                  f"{cache_dir()} (once per machine)", flush=True)
            config = tfds.download.DownloadConfig(manual_dir=str(manual) if manual else None)
            builder.download_and_prepare(download_config=config)
    return _tfds_info(name, builder)


def _tfds_info(name: str, builder: Any) -> DatasetInfo:
    feats = builder.info.features
    keys = builder.info.supervised_keys
    if not keys:
        raise KilnError(f"dataset '{name}' has no (input, label) pair; Kiln needs a supervised dataset")
    xk, yk = keys[0], keys[1]
    label = feats[yk]
    names = tuple(getattr(label, "names", ()) or ())
    return DatasetInfo(name=name, input_shape=tuple(feats[xk].shape),
                       num_classes=int(getattr(label, "num_classes", 0) or 0), class_names=names,
                       train_size=builder.info.splits["train"].num_examples,
                       test_size=builder.info.splits["test"].num_examples)


def _split_expr(split: str, limit: int | None) -> str:
    return f"{split}[:{limit}]" if limit else split


def load(name: str, split: str, *, shard: tuple[int, int] | None = None,
         limit: int | None = None) -> Split:
    """Raw examples of ``split`` ("train"/"test"). With ``shard=(index, count)`` only that worker's
    even share is read; with ``limit`` only the first ``limit`` examples of the split."""
    if is_file_dataset(name):
        return _npz_load(name, split, shard, limit)
    import tensorflow_datasets as tfds

    builder = _builder(name)
    if not Path(builder.data_path).joinpath("dataset_info.json").exists():
        prepare(name)
        builder = _builder(name)
    if limit and limit >= builder.info.splits[split].num_examples:
        limit = None
    expr: Any = _split_expr(split, limit)
    if shard is not None and shard[1] > 1:
        expr = tfds.even_splits(expr, n=shard[1])[shard[0]]
    size = builder.info.splits[expr].num_examples
    ds = builder.as_dataset(split=expr, as_supervised=True, shuffle_files=False)
    return Split(ds, size)


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


def _npz_info(path: str) -> DatasetInfo:
    a = _npz_arrays(path)
    y = np.concatenate([a["y_train"], a["y_test"]])
    integer = np.issubdtype(y.dtype, np.integer) and y.ndim == 1
    if integer and y.min() < 0:
        raise KilnError(f"{path}: labels must be integers >= 0 (found {y.min()})")
    num_classes = int(y.max()) + 1 if integer and len(y) else 0
    return DatasetInfo(name=str(Path(path).expanduser().resolve()), input_shape=tuple(a["x_train"].shape[1:]),
                       num_classes=num_classes, class_names=tuple(str(i) for i in range(num_classes)),
                       train_size=len(a["x_train"]), test_size=len(a["x_test"]))


def _npz_load(path: str, split: str, shard: tuple[int, int] | None, limit: int | None) -> Split:
    import tensorflow as tf

    a = _npz_arrays(path)
    x, y = a[f"x_{split}"], a[f"y_{split}"]
    if limit:
        x, y = x[:limit], y[:limit]
    if shard is not None and shard[1] > 1:
        parts = np.array_split(np.arange(len(x)), shard[1])[shard[0]]
        x, y = x[parts], y[parts]
    return Split(tf.data.Dataset.from_tensor_slices((x, y)), len(x))
