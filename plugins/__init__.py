"""Kiln's built-in plugins, one file per model family, registered as ``kiln.plugins`` entry points."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from kiln import KilnError, Plugin


def line(a, b, steps: int) -> np.ndarray:
    """``steps`` evenly spaced points on the straight line from a to b (both ends included)."""
    t = np.linspace(0.0, 1.0, steps, dtype="float32")[:, None]
    return (1 - t) * np.asarray(a, "float32")[None] + t * np.asarray(b, "float32")[None]


class Pictures(Plugin):
    """Base of the plugins that model pictures, grayscale or RGB, 8 to 128 pixels a side and a
    multiple of ``multiple`` (the stride-2 layers halve it twice): MNIST, an .npz of images, or
    an image folder read at the config's ``image_size``. Scales pixels to ``pixel_range`` with
    shape (n, H, W, C)."""

    pixel_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    multiple: ClassVar[int] = 4

    def setup(self, info):
        shape = tuple(info.input_shape)
        fits = (len(shape) in (2, 3) and (len(shape) == 2 or shape[2] in (1, 3))
                and all(8 <= side <= 128 and side % self.multiple == 0 for side in shape[:2]))
        if not fits:
            raise KilnError(f"{self.name} models grayscale or RGB pictures 8 to 128 pixels a side, a "
                            f"multiple of {self.multiple}; dataset {info.name} has inputs {list(shape)} "
                            "(an image folder takes --set image_size=64)")
        super().setup(info)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = tuple(self.info.input_shape)
        return shape if len(shape) == 3 else (*shape, 1)

    def preprocess(self, x, y):
        low, high = self.pixel_range
        if isinstance(x, np.ndarray):  # a served request: numpy, not TensorFlow's eager ops
            x = x.astype("float32") * np.float32((high - low) / 255.0) + np.float32(low)
            return x.reshape(-1, *self.image_shape), y
        import tensorflow as tf

        x = tf.cast(x, "float32") * ((high - low) / 255.0) + low
        return tf.reshape(x, (-1, *self.image_shape)), y

    def progress_picture(self, model, path: Path, title: str) -> Path | None:
        """A picture of the model as it trains, written to ``path``; None where the plugin draws
        none. Drawn after every ``sample_every`` epochs of a config that has that key."""
        return None

    def on_epoch_end(self, model, epoch, logs, rank):
        every = getattr(self.config, "sample_every", 0)
        if rank == 0 and self.progress_dir is not None and every and epoch % every == 0:
            path = self.progress_picture(model, self.progress_dir / f"progress_epoch_{epoch:04d}.png",
                                         f"epoch {epoch}")
            if path is not None:
                from kiln.logs import say

                say(f"samples after epoch {epoch}: {path}")
