"""Tracking a user can open: the one module that writes a run's TensorBoard event files.

Layout as Keras' own TensorBoard callback writes it, so runs compare with other Keras runs:
``<run>/tensorboard/train`` and ``<run>/tensorboard/validation``, with ``epoch_<metric>`` scalars
at each epoch (validation metrics without their ``val_`` prefix, so the two curves share a chart),
``batch_<metric>`` scalars every ``STEPS_PER_CALL`` steps in a one-process run, the learning
rate, the pictures a plugin draws while training, and the run's config as hparams.
``tensorboard --logdir kiln-runs`` shows every run. Only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# what a history entry holds besides metrics
NOT_METRICS = ("epoch", "seconds", "workers")


class Board:
    def __init__(self, run_dir: Path, run: str, hparams: dict[str, Any]) -> None:
        import tensorflow as tf

        self.root = run_dir / "tensorboard"
        self.train = tf.summary.create_file_writer(str(self.root / "train"))
        self.validation = tf.summary.create_file_writer(str(self.root / "validation"))
        self.pictures_seen: set[str] = set()
        from tensorboard.plugins.hparams import api as hp

        with self.train.as_default():
            hp.hparams({k: _hparam(v) for k, v in hparams.items()}, trial_id=run)

    def steps(self, step: int, logs: dict[str, float]) -> None:
        import tensorflow as tf

        with self.train.as_default(step=step):
            for k, v in logs.items():
                tf.summary.scalar(f"batch_{k}", v)

    def epoch(self, epoch: int, metrics: dict[str, float], learning_rate: float | None) -> None:
        import tensorflow as tf

        with self.train.as_default(step=epoch):
            for k, v in metrics.items():
                if k not in NOT_METRICS and not k.startswith("val_"):
                    tf.summary.scalar(f"epoch_{k}", v)
            if learning_rate is not None:
                tf.summary.scalar("epoch_learning_rate", learning_rate)
        with self.validation.as_default(step=epoch):
            for k, v in metrics.items():
                if k.startswith("val_"):
                    tf.summary.scalar(f"epoch_{k[4:]}", v)
        self.train.flush()
        self.validation.flush()

    def pictures(self, epoch: int, folder: Path | None) -> None:
        """The PNGs a plugin drew into ``folder`` since the last call, as images at ``epoch``."""
        import tensorflow as tf

        if folder is None or not folder.is_dir():
            return
        with self.train.as_default(step=epoch):
            for png in sorted(folder.glob("*.png")):
                if png.name not in self.pictures_seen:
                    self.pictures_seen.add(png.name)
                    image = tf.io.decode_png(png.read_bytes(), channels=3)
                    tf.summary.image(png.stem.split("_epoch")[0], image[None], step=epoch)
        self.train.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def _hparam(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def learning_rate(model: Any) -> float | None:
    """The optimizer's current learning rate (a schedule's value at its step), if it has one."""
    opt = getattr(model, "optimizer", None)
    try:
        return float(opt.learning_rate)
    except (AttributeError, TypeError, ValueError):
        return None
