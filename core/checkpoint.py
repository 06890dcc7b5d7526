"""Checkpoints: the one module that reads and writes them (nanoGPT's one-place checkpoint).

A checkpoint is a folder holding the model's weights (``model.weights.h5``), every optimizer's
variables (``optimizers.npz``, by optimizer and variable index) and ``state.json`` (epoch,
history, restarts, the run's spec). In-process runs keep them in ``<runs>/<run>/checkpoint_NNNNN``;
Ray Train keeps its own ``checkpoint_*`` folders in the same run folder, with the same contents.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

WEIGHTS = "model.weights.h5"
OPTIMIZERS = "optimizers.npz"
STATE = "state.json"
BEST = "best.npz"  # with --early-stop: the best epoch's weights so far (model.get_weights order)


def optimizers(model: Any) -> list[Any]:
    """The model's optimizers: ``model.optimizer`` and any attribute holding one (GANs keep two)."""
    import keras

    found: dict[int, Any] = {}
    opt = getattr(model, "optimizer", None)
    if isinstance(opt, keras.optimizers.Optimizer):
        found[id(opt)] = opt
    for key in sorted(vars(model)):
        value = vars(model)[key]
        if isinstance(value, keras.optimizers.Optimizer):
            found.setdefault(id(value), value)
    return list(found.values())


def save(model: Any, directory: Path, state: dict[str, Any], best: list[np.ndarray] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_weights(directory / WEIGHTS)
    if best is not None:
        np.savez(directory / BEST, *best)
    arrays = {f"{i}/{j}": np.asarray(v.numpy()) for i, opt in enumerate(optimizers(model))
              for j, v in enumerate(opt.variables)}
    np.savez(directory / OPTIMIZERS, **arrays)
    (directory / STATE).write_text(json.dumps(state, indent=2))


def restore(model: Any, directory: Path, *, with_optimizers: bool = True, best: bool = False) -> dict[str, Any]:
    """Load weights (and optimizer state) written by save(); returns the saved state. With
    ``best``, the best epoch's weights where the checkpoint holds them."""
    if best and (directory / BEST).is_file():
        model.set_weights(best_weights(directory))
    else:
        model.load_weights(directory / WEIGHTS)
    if with_optimizers:
        with np.load(directory / OPTIMIZERS) as f:
            for i, opt in enumerate(optimizers(model)):
                for j, v in enumerate(opt.variables):
                    v.assign(f[f"{i}/{j}"])
    return state(directory)


def best_weights(directory: Path) -> list[np.ndarray] | None:
    """The best epoch's weights a checkpoint holds (--early-stop), else None."""
    if not (directory / BEST).is_file():
        return None
    with np.load(directory / BEST) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def state(directory: Path) -> dict[str, Any]:
    return json.loads((directory / STATE).read_text())


def weights(directory: Path) -> Path:
    return directory / WEIGHTS


def all_in(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (Kiln's or Ray Train's folders), oldest first by epoch."""
    found = []
    for d in run_dir.glob("checkpoint_*"):
        try:
            found.append((state(d)["epoch"], d.stat().st_mtime, d))
        except (OSError, ValueError, KeyError):
            continue
    return [d for _, _, d in sorted(found)]


def latest(run_dir: Path) -> Path | None:
    found = all_in(run_dir)
    return found[-1] if found else None


def keep(run_dir: Path, source: Path, epoch: int, keep_last: int = 2) -> Path:
    """Copy a checkpoint written elsewhere into ``run_dir`` as epoch ``epoch`` (renamed into
    place, so a crash never leaves half of one), keeping the last ``keep_last``."""
    target = run_dir / f"checkpoint_{epoch:05d}"
    tmp = run_dir / f".tmp-{target.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    for old in all_in(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target
