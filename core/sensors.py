"""Smartphone inertial recordings -> fixed windows for human-activity recognition.

Two real layouts are read:

* **UCI HAR** (Anguita et al. 2012), the folder users download: ``UCI HAR Dataset/{train,test}/
  Inertial Signals/{body_acc,body_gyro,total_acc}_{x,y,z}_{split}.txt`` (one 128-step window per
  row, 50 Hz, already windowed with 50% overlap), labels in ``y_{split}.txt`` (1-based, names in
  ``activity_labels.txt``), subjects in ``subject_{split}.txt``. Its train/test split is by subject.
* **Per-recording CSVs** such as sp_sw_har (Matey-Sanz et al. 2023): ``<root>/sXX/*.csv`` with
  columns ``x_acc,y_acc,z_acc,x_gyro,y_gyro,z_gyro,timestamp,label`` (ms timestamps, one label per
  sample). Each recording is resampled onto a uniform 100 Hz grid (sp_sw_har's own rate, about
  one sample per 10 ms with jitter) by linear interpolation over its timestamps, cut into
  128-step windows with 50% overlap, and labelled by the most frequent sample label in the
  window. The last fifth of the subjects (sorted by name) is the test split. Training windows
  start every 16 steps instead of every 64 (87.5% overlap): four times as many, shifted views
  of the same recordings, which generalise better (BENCHMARKS.md); test windows keep 50%.

  Why 100 Hz and not UCI's 50 Hz: sp_sw_har's transitions (standing up, turning, sitting down)
  last 1-2 s, and a 50 Hz window spans 2.56 s: many windows then hold no dominant label, and the
  same 1D-CNN is less accurate (BENCHMARKS.md, "HAR").

Both give ``x`` of shape (n, 128, channels) float32, integer labels and the subject of each window.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.plugin import KilnError

WINDOW = 128
TEST_STRIDE = WINDOW // 2      # 50% overlap, the usual HAR protocol
TRAIN_STRIDE = WINDOW // 8     # denser training windows: a shift augmentation
UCI_RATE_HZ = 50.0
RECORDING_RATE_HZ = 100.0
UCI_SIGNALS = tuple(f"{kind}_{axis}" for kind in ("body_acc", "body_gyro", "total_acc")
                    for axis in "xyz")
CSV_CHANNELS = ("x_acc", "y_acc", "z_acc", "x_gyro", "y_gyro", "z_gyro")
TEST_FRACTION = 0.2


@dataclass
class Windows:
    """Windows of one dataset, both splits, with what a model must know to use them."""

    x: dict[str, np.ndarray]          # split -> (n, WINDOW, channels) float32
    y: dict[str, np.ndarray]          # split -> (n,) int64
    subjects: dict[str, list[str]]    # split -> subjects in it
    channels: tuple[str, ...]
    class_names: tuple[str, ...]
    rate_hz: float
    layout: str                       # "uci" or "recordings"
    who: dict[str, np.ndarray] | None = None  # split -> (n,) the subject of each window


def read(folder: Path) -> Windows:
    """Read a HAR folder of either layout (see the module docstring); KilnError if it is neither."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KilnError(f"HAR dataset folder not found: {folder}")
    for root in (folder, folder / "UCI HAR Dataset"):
        if (root / "train" / "y_train.txt").is_file():
            return _read_uci(root)
    data = folder / "DATA" if (folder / "DATA").is_dir() else folder
    if any(data.glob("*/*.csv")):
        return _read_recordings(data)
    raise KilnError(f"{folder} is not a HAR dataset Kiln can read: expected the UCI HAR layout "
                    "(train/Inertial Signals/body_acc_x_train.txt, train/y_train.txt, ...) or one "
                    "folder per subject holding CSV recordings with columns "
                    f"{','.join(CSV_CHANNELS)},timestamp,label")


# --------------------------------------------------------------------------- UCI HAR


def _read_uci(root: Path) -> Windows:
    names_file = root / "activity_labels.txt"
    if names_file.is_file():
        rows = [line.split() for line in names_file.read_text().splitlines() if line.strip()]
        class_names = tuple(name for _, name in sorted((int(i), n) for i, n in rows))
    else:
        class_names = ("WALKING", "WALKING_UPSTAIRS", "WALKING_DOWNSTAIRS", "SITTING", "STANDING",
                       "LAYING")
    xs, ys, subjects, who = {}, {}, {}, {}
    for split in ("train", "test"):
        signals = root / split / "Inertial Signals"
        missing = [s for s in UCI_SIGNALS if not (signals / f"{s}_{split}.txt").is_file()]
        if missing:
            raise KilnError(f"UCI HAR raw signals are missing: {signals / f'{missing[0]}_{split}.txt'} "
                            f"(and {len(missing) - 1} more). Download 'UCI HAR Dataset' from the UCI "
                            "repository and pass its folder with --dataset PATH, or use the "
                            "sp_sw_har recordings (--dataset sp_sw_har)")
        channels = [_matrix(signals / f"{s}_{split}.txt") for s in UCI_SIGNALS]
        shapes = {c.shape for c in channels}
        if len(shapes) != 1 or next(iter(shapes))[1] != WINDOW:
            raise KilnError(f"{signals}: every signal file must have the same number of rows of "
                            f"{WINDOW} values; found shapes {sorted(shapes)}")
        y = _matrix(root / split / f"y_{split}.txt").astype(np.int64).ravel() - 1
        subj = _matrix(root / split / f"subject_{split}.txt").astype(np.int64).ravel()
        if not (len(y) == len(subj) == channels[0].shape[0]):
            raise KilnError(f"{root / split}: {channels[0].shape[0]} signal rows, {len(y)} labels and "
                            f"{len(subj)} subjects; they must match")
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise KilnError(f"{root / split}/y_{split}.txt: labels must be 1..{len(class_names)}")
        xs[split] = np.stack(channels, axis=-1).astype("float32")
        ys[split] = y
        subjects[split] = sorted({f"{s}" for s in subj})
        who[split] = np.array([f"{s}" for s in subj])
    return Windows(xs, ys, subjects, UCI_SIGNALS, class_names, UCI_RATE_HZ, "uci", who)


def _matrix(path: Path) -> np.ndarray:
    try:
        return np.loadtxt(path, dtype="float64", ndmin=2)
    except (OSError, ValueError) as e:
        raise KilnError(f"cannot read {path} as a table of numbers: {e}") from None


# --------------------------------------------------------------------------- per-recording CSVs


def _read_recordings(data: Path) -> Windows:
    subject_dirs = sorted(d for d in data.iterdir() if d.is_dir() and any(d.glob("*.csv")))
    n_test = max(1, round(len(subject_dirs) * TEST_FRACTION))
    if len(subject_dirs) < 2:
        raise KilnError(f"{data}: need recordings of at least 2 subjects (one folder each) to "
                        "split train and test by subject")
    test_subjects = {d.name for d in subject_dirs[-n_test:]}
    recordings = []
    labels: list[str] = []  # class names in order of first appearance
    for d in subject_dirs:
        for f in sorted(d.glob("*.csv")):
            signal, names = _read_csv(f)
            for name in names:
                if name not in labels:
                    labels.append(name)
            recordings.append((d.name, signal, names))
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    who: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for subject, (t, values), names in recordings:
        split = "test" if subject in test_subjects else "train"
        x, y = _windows(t, values, np.array([labels.index(n) for n in names]), len(labels),
                        TEST_STRIDE if split == "test" else TRAIN_STRIDE)
        xs[split].append(x)
        ys[split].append(y)
        who[split].append(np.full(len(x), subject))
    empty = np.zeros((0, WINDOW, len(CSV_CHANNELS)), "float32")
    return Windows({s: np.concatenate(xs[s]) if xs[s] else empty for s in xs},
                   {s: np.concatenate(ys[s]) if ys[s] else np.zeros(0, np.int64) for s in ys},
                   {"train": sorted({r[0] for r in recordings} - test_subjects),
                    "test": sorted(test_subjects)},
                   CSV_CHANNELS, tuple(labels), RECORDING_RATE_HZ, "recordings",
                   {s: np.concatenate(who[s]) if who[s] else np.zeros(0, str) for s in who})


def _read_csv(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], list[str]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or [c.strip() for c in rows[0][:8]] != [*CSV_CHANNELS, "timestamp", "label"]:
        raise KilnError(f"{path}: the header must be {','.join(CSV_CHANNELS)},timestamp,label")
    body = rows[1:]
    try:
        values = np.array([[float(v) for v in r[:7]] for r in body], dtype="float64")
    except (ValueError, IndexError):
        raise KilnError(f"{path}: every row needs 6 numeric signals, a timestamp and a label") from None
    if len(body) < 2 or not np.all(np.isfinite(values)):
        raise KilnError(f"{path}: needs at least 2 rows of finite numbers")
    order = np.argsort(values[:, 6], kind="stable")
    return (values[order, 6], values[order, :6]), [body[i][7].strip() for i in order]


def _windows(t_ms: np.ndarray, values: np.ndarray, labels: np.ndarray, n_classes: int,
             stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Resample one recording to RECORDING_RATE_HZ, then windows starting every ``stride`` steps,
    each labelled by its most frequent label."""
    step = 1000.0 / RECORDING_RATE_HZ
    grid = np.arange(t_ms[0], t_ms[-1] + 1e-9, step)
    keep = np.concatenate([[True], np.diff(t_ms) > 0])  # np.interp needs increasing times
    t, v, lab = t_ms[keep], values[keep], labels[keep]
    signal = np.stack([np.interp(grid, t, v[:, c]) for c in range(v.shape[1])], axis=-1)
    nearest = lab[np.clip(np.searchsorted(t, grid), 0, len(t) - 1)]
    starts = range(0, len(grid) - WINDOW + 1, stride)
    x = np.array([signal[s:s + WINDOW] for s in starts], dtype="float32").reshape(-1, WINDOW, v.shape[1])
    y = np.array([np.bincount(nearest[s:s + WINDOW], minlength=n_classes).argmax() for s in starts],
                 dtype=np.int64)
    return x, y
