"""Kiln's built-in plugins, one file per model family, registered as ``kiln.plugins`` entry points."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from kiln import KilnError, Plugin


def line(a, b, steps: int) -> np.ndarray:
    """``steps`` evenly spaced points on the straight line from a to b (both ends included)."""
    t = np.linspace(0.0, 1.0, steps, dtype="float32")[:, None]
    return (1 - t) * np.asarray(a, "float32")[None] + t * np.asarray(b, "float32")[None]


class Digits(Plugin):
    """Base of the plugins that model 28x28 grayscale images (MNIST, Fashion-MNIST, or an .npz
    of that shape): checks the data and scales pixels to ``pixel_range`` with shape (n, 28, 28, 1)."""

    pixel_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def setup(self, info):
        if tuple(info.input_shape) not in ((28, 28), (28, 28, 1)):
            raise KilnError(f"{self.name} models 28x28 grayscale images; dataset {info.name} has "
                            f"inputs {list(info.input_shape)}")
        super().setup(info)

    def preprocess(self, x, y):
        import tensorflow as tf

        low, high = self.pixel_range
        x = tf.cast(x, "float32") * ((high - low) / 255.0) + low
        return tf.reshape(x, (-1, 28, 28, 1)), y
