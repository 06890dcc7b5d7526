"""Kiln's built-in plugins, one file per model family, registered as ``kiln.plugins`` entry points."""

from __future__ import annotations

from typing import ClassVar

from kiln import KilnError, Plugin


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
