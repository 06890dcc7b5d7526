"""Human-activity recognition from raw smartphone inertial windows with a 1D convolutional network
(Ronao & Cho 2016 report 94.79% on UCI HAR raw signals; a 2-layer LSTM 91.65%).

Input: windows of 128 steps x channels of raw accelerometer/gyroscope signals, as the data layer
cuts them (kiln.sensors): the UCI HAR folder users download (9 channels at 50 Hz), or per-subject
CSV recordings such as sp_sw_har (6 channels, 100 Hz), the default here because the UCI raw
signals are not in this repository's data. Train and test are split by subject.

The model normalises each channel with the training split's mean and standard deviation (stored
in the manifest, so serving needs only the raw window), then stacks Conv1D + max-pool blocks,
global average pooling, dropout and a softmax. A phone sits in a pocket at whatever angle: while
training, every window's xyz triads are turned by one random 3-D rotation (``rotate``), and
``magnitudes`` adds the length of each triad, which no rotation changes. On sp_sw_har's 5 test
subjects the default reaches 92.1-92.5% over three seeds (BENCHMARKS.md); most of that came from
denser training windows (kiln.sensors); rotation plus magnitudes add about 0.1-0.9 points there,
and the cosine learning-rate decay (``lr_decay``) 0.1-0.5.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers, ops

from kiln import KilnError, Plugin, Tensor, confusion, inference, param, traces

EXAMPLES = 3  # test windows of each activity kept with the model, for `examples`


@dataclass
class HARConfig:
    filters: tuple[int, ...] = param((64, 64, 128), min=1, max=1024, help="filters of each conv block")
    kernel_size: int = param(5, min=1, max=64)
    dropout: float = param(0.5, min=0.0, max=0.95)
    learning_rate: float = param(1e-3, min=0.0, max=1.0)
    lr_decay: bool = param(True, help="decay the learning rate to 0 along a cosine over the run")
    rotate: bool = param(True, help="turn each training window by a random 3-D rotation")
    magnitudes: bool = param(True, help="add the length of each xyz triad as a channel")


class RandomRotation3D(layers.Layer):
    """In training, multiply every xyz triad of a window by one uniformly random rotation matrix
    (a random unit quaternion); the identity at inference."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training:
            return x
        q = keras.random.normal((ops.shape(x)[0], 4), seed=self.seed_generator)
        a, b, c, d = ops.unstack(q / ops.norm(q, axis=-1, keepdims=True), axis=-1)
        rot = ops.stack([
            ops.stack([a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)], -1),
            ops.stack([2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)], -1),
            ops.stack([2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d], -1),
        ], 1)
        steps, channels = x.shape[1], x.shape[2]
        triads = ops.reshape(x, (-1, steps, channels // 3, 3))
        return ops.reshape(ops.einsum("btgi,bji->btgj", triads, rot), (-1, steps, channels))


class TriadMagnitudes(layers.Layer):
    """Append the length |xyz| of each triad as a channel (normalised with the rest)."""

    def call(self, x):
        steps, channels = x.shape[1], x.shape[2]
        return ops.concatenate([x, ops.norm(ops.reshape(x, (-1, steps, channels // 3, 3)), axis=-1)], -1)


def build_har(config: HARConfig, steps: int, extra: dict, num_classes: int) -> keras.Model:
    mean, std = np.array(extra["channel_mean"]), np.array(extra["channel_std"])
    inputs = keras.Input(shape=(steps, len(mean)), name="window")
    x = RandomRotation3D(name="rotate")(inputs) if config.rotate else inputs
    if config.magnitudes:
        x = TriadMagnitudes(name="magnitudes")(x)
        mean = np.concatenate([mean, extra["magnitude_mean"]])
        std = np.concatenate([std, extra["magnitude_std"]])
    # the training split's statistics, stored in the manifest: serving sends raw windows
    x = layers.Normalization(mean=mean, variance=np.maximum(std, 1e-6) ** 2, name="normalise")(x)
    for i, f in enumerate(config.filters):
        x = layers.Conv1D(f, config.kernel_size, padding="same", activation="relu", name=f"conv{i + 1}")(x)
        x = layers.MaxPooling1D(2, name=f"pool{i + 1}")(x)
    x = layers.GlobalAveragePooling1D(name="features")(x)
    x = layers.Dropout(config.dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="har_cnn")


class HAR(Plugin):
    name = "har"
    description = "1D-CNN over raw smartphone inertial windows -> activity (UCI HAR layout or CSV recordings)"
    Config = HARConfig
    dataset = "sp_sw_har"
    epochs = 20
    batch_size = 32
    headline = "accuracy"

    def setup(self, info):
        extra = info.extra
        if len(info.input_shape) != 2 or "channel_mean" not in extra or info.num_classes < 2:
            raise KilnError(f"har needs sensor windows (steps, channels) with activity labels, such "
                            f"as sp_sw_har or a UCI HAR folder; dataset {info.name} has inputs "
                            f"{list(info.input_shape)}")
        if (self.config.rotate or self.config.magnitudes) and (info.input_shape[1] % 3 or "magnitude_mean" not in extra):
            raise KilnError(f"rotate and magnitudes need xyz triads, but dataset {info.name} has "
                            f"{info.input_shape[1]} channels; use --set rotate=false --set "
                            "magnitudes=false")
        super().setup(info)

    def preprocess(self, x, y):
        import tensorflow as tf

        return tf.cast(x, "float32"), y

    def build(self):
        model = build_har(self.config, self.info.input_shape[0], self.info.extra, self.info.num_classes)
        lr = self.config.learning_rate
        if self.config.lr_decay:  # also when only loading: the stored optimizer has the same variables
            lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, self.total_steps))
        model.compile(optimizer=keras.optimizers.Adam(lr),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def export_model(self, model):
        """Raw windows in (the model normalises them itself), ``classify``'s probabilities out."""
        windows = keras.Input(tuple(model.input_shape[1:]), dtype="float32", name="windows")
        return keras.Model(windows, model(windows), name="har_probabilities")

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in test])
        x, y = np.concatenate(xs), np.concatenate(ys)
        p = np.asarray(model.predict(x, verbose=0, batch_size=256)).argmax(axis=-1)
        names, k = self.info.class_names, self.info.num_classes
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (y.astype(int), p), 1)
        # one test window of each class (the first), titled with true -> predicted activity
        pick = [int(np.flatnonzero(y == c)[0]) for c in range(k) if np.any(y == c)]
        return [
            confusion(matrix, names, out_dir / "confusion.png",
                      title=f"test accuracy {np.mean(p == y):.4f}"),
            traces(x[pick], self.info.extra.get("channels", [str(i) for i in range(x.shape[-1])]),
                   out_dir / "windows.png", titles=[f"{names[y[i]]} → {names[p[i]]}" for i in pick],
                   colors=["green" if y[i] == p[i] else "red" for i in pick],
                   rate_hz=self.info.extra.get("rate_hz", 50.0),
                   title="a test window of each activity (true → predicted)"),
        ]

    def save_assets(self, model, test, out_dir: Path) -> None:
        """A few test windows of each activity, for ``examples`` (what a demo can classify)."""
        xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in test])
        x, y = np.concatenate(xs), np.concatenate(ys)
        pick = [i for c in range(self.info.num_classes) for i in np.flatnonzero(y == c)[:EXAMPLES]]
        np.savez_compressed(out_dir / "examples.npz", windows=x[pick], labels=y[pick])

    def load_assets(self, directory: Path) -> None:
        path = directory / "examples.npz"
        if path.is_file():
            with np.load(path) as f:
                self.examples_bank = {k: f[k] for k in f.files}

    @inference(outputs={"windows": "raw test windows (n, steps, channels), a few of each activity",
                        "labels": "the true activity of each window", "channels": "channel names",
                        "rate_hz": "samples per second"})
    def examples(self, model):
        """Test windows kept with the model, a few of each activity, to try classify on."""
        bank = getattr(self, "examples_bank", None)
        if bank is None:
            raise KilnError("this model version keeps no example windows (it was stored before "
                            "Kiln kept them); train it again to use examples")
        names = self.info.class_names
        return {"windows": bank["windows"].round(5).tolist(),
                "labels": [names[int(c)] for c in bank["labels"]],
                "channels": list(self.info.extra.get("channels", [str(i) for i in range(bank["windows"].shape[-1])])),
                "rate_hz": float(self.info.extra.get("rate_hz", 50.0))}

    @inference(windows=Tensor(shape=(None, "input"),
                              description="raw sensor windows (n, steps, channels) in the dataset's "
                                          "units and channel order"),
               outputs={"classes": "predicted activity index per window",
                        "labels": "predicted activity name per window",
                        "probabilities": "softmax probabilities per window"})
    def classify(self, model, windows):
        """Recognise the activity in each window: its name and all activity probabilities."""
        probs = np.asarray(model.predict_on_batch(windows))
        classes = probs.argmax(axis=-1)
        return {"classes": classes.tolist(), "labels": [self.info.class_names[c] for c in classes],
                "probabilities": probs.round(6).tolist()}
