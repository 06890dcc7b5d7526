"""Diffusion model on MNIST in the style of keras-io's "Denoising Diffusion Implicit Models"
example: a small U-Net learns to undo Gaussian noise, and sampling walks from pure noise to a
picture in a chosen number of steps.

- Training (DDPM, Ho et al. 2020): a random time t in [0, 1] per image, noise mixed in with the
  cosine schedule's rates (signal cos(a(t)), noise sin(a(t)), the continuous form keras-io uses),
  and the network predicts the velocity v = signal * noise - noise_rate * image (Salimans & Ho
  2022), which stays well scaled at both ends of the schedule; mean squared error.
- Classifier-free guidance (Ho & Salimans 2022): the class enters as an embedding added to the
  time embedding, and is replaced by a "no class" token with probability ``label_dropout``, so one
  network is conditional and unconditional. Sampling with guidance w uses
  v_uncond + w * (v_cond - v_uncond): w = 1 is plain conditional sampling, larger w sharper and
  more typical digits.
- Sampling (DDIM, Song et al. 2021): deterministic for a seed, any number of steps.
- An exponential moving average of the weights (as keras-io keeps its EMA network) is what
  validation, sampling and the store use.

The U-Net: residual blocks (group norm, swish, 3x3 convolutions, the time/class embedding added
in between) at three resolutions (full, 1/2, 1/4: 28, 14, 7 for MNIST), strided convolutions
down, nearest-neighbour upsampling and skip connections up. Group norm has no batch statistics,
so Ray Train workers stay identical without synchronised batch norm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from kiln import ImageOptions, KilnError, Pictures, Scalar, grid, inference, loss_scaled, param

MAX_STEPS = 1000
# the guidance scale sample, trajectory and the stored pictures use unless told (BENCHMARKS.md:
# label accuracy and Fréchet distance against guidance)
GUIDANCE = 1.5
MIN_SIGNAL, MAX_SIGNAL = 0.02, 0.98  # the schedule's signal rate at t = 1 and t = 0


@dataclass
class DiffusionConfig(ImageOptions):
    width: int = param(32, min=4, max=512, help="channels at full resolution (x2 at 1/2 and 1/4)")
    blocks: int = param(1, min=1, max=4, help="residual blocks per resolution")
    learning_rate: float = param(1e-3, min=0.0, max=1.0, help="AdamW learning rate")
    weight_decay: float = param(1e-4, min=0.0, max=1.0, help="AdamW weight decay")
    label_dropout: float = param(0.1, min=0.0, max=1.0,
                                 help="probability of training without the class (classifier-free guidance)")
    ema: float = param(0.999, min=0.0, max=0.99999, help="decay of the weights' moving average that samples")
    sample_every: int = param(1, min=0, max=10000,
                              help="write a sample grid every N epochs while training (0: only at the end)")


def schedule(t):
    """Signal and noise rates at diffusion time t in [0, 1] (cosine; signal^2 + noise^2 = 1)."""
    start, end = math.acos(MAX_SIGNAL), math.acos(MIN_SIGNAL)
    angles = start + t * (end - start)
    return ops.cos(angles), ops.sin(angles)


class TimeEmbedding(layers.Layer):
    """Sinusoidal features of t (frequencies 1 to 1000, as keras-io embeds its noise level)."""

    def __init__(self, dim: int, **kwargs):
        super().__init__(**kwargs)
        self.freqs = np.exp(np.linspace(0.0, math.log(1000.0), dim // 2)).astype("float32")

    def call(self, t):
        angles = 2.0 * math.pi * ops.cast(t, "float32")[:, None] * self.freqs[None]
        return ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)


def _groups(channels: int) -> int:
    return math.gcd(8, channels)


def build_unet(shape: tuple[int, int, int], width: int, blocks: int, num_classes: int) -> keras.Model:
    """(noisy images, t, class) -> predicted velocity. Class ``num_classes`` is "no class"."""
    x_in = keras.Input(shape=shape, name="noisy")
    t_in = keras.Input(shape=(), name="t")
    c_in = keras.Input(shape=(), dtype="int32", name="label")
    dim = 4 * width
    emb = layers.Dense(dim, activation="swish")(TimeEmbedding(width)(t_in))
    emb = layers.Dense(dim)(emb) + layers.Embedding(num_classes + 1, dim)(c_in)
    emb = layers.Activation("swish")(emb)

    def res(h, ch):
        skip = h if h.shape[-1] == ch else layers.Conv2D(ch, 1)(h)
        h = layers.Activation("swish")(layers.GroupNormalization(_groups(h.shape[-1]))(h))
        h = layers.Conv2D(ch, 3, padding="same")(h)
        h = h + layers.Reshape((1, 1, ch))(layers.Dense(ch)(emb))
        h = layers.Activation("swish")(layers.GroupNormalization(_groups(ch))(h))
        h = layers.Conv2D(ch, 3, padding="same")(h)
        return h + skip

    channels = (width, 2 * width, 2 * width)
    h = layers.Conv2D(width, 3, padding="same")(x_in)
    skips = []
    for level, ch in enumerate(channels):
        for _ in range(blocks):
            h = res(h, ch)
            skips.append(h)
        if level < len(channels) - 1:
            h = layers.Conv2D(ch, 3, strides=2, padding="same")(h)
    h = res(h, channels[-1])
    for level, ch in reversed(list(enumerate(channels))):
        for _ in range(blocks):
            h = res(layers.Concatenate()([h, skips.pop()]), ch)
        if level > 0:
            h = layers.UpSampling2D(2)(h)
    h = layers.Activation("swish")(layers.GroupNormalization(_groups(width))(h))
    out = layers.Conv2D(shape[2], 3, padding="same", kernel_initializer="zeros", dtype="float32")(h)
    return keras.Model([x_in, t_in, c_in], out, name="unet")


class Diffusion(keras.Model):
    """The network, its weight average, and the training and validation steps."""

    def __init__(self, network, num_classes, ema=0.999, label_dropout=0.1, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.ema_network = keras.models.clone_model(network)
        self.ema_network.trainable = False
        self.ema_network.set_weights(network.get_weights())
        self.num_classes, self.ema, self.label_dropout = num_classes, ema, label_dropout
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self._velocity = None

    def compile(self, optimizer):
        super().compile()
        self.optimizer_ = loss_scaled(self, optimizer)
        self.loss_fn = keras.losses.MeanSquaredError()  # a loss object: it divides by the replicas itself
        self.optimizer_.build(self.network.trainable_variables)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def _noised(self, data, drop: bool):
        images, labels = data if isinstance(data, tuple) else (data, None)
        b = ops.shape(images)[0]
        noise = keras.random.normal(ops.shape(images), seed=self.seed_generator)
        t = keras.random.uniform((b,), seed=self.seed_generator)
        signal, noise_rate = schedule(t[:, None, None, None])
        noisy = signal * images + noise_rate * noise
        target = signal * noise - noise_rate * images
        if labels is None or not self.num_classes:
            labels = ops.full((b,), self.num_classes, "int32")
        else:
            labels = ops.cast(labels, "int32")
            if drop and self.label_dropout:
                keep = keras.random.uniform((b,), seed=self.seed_generator) >= self.label_dropout
                labels = ops.where(keep, labels, self.num_classes)
        return noisy, t, labels, target

    def train_step(self, data):
        noisy, t, labels, target = self._noised(data, drop=True)
        with tf.GradientTape() as tape:
            loss = self.loss_fn(target, self.network([noisy, t, labels], training=True))
            scaled = self.optimizer_.scale_loss(loss)
        grads = tape.gradient(scaled, self.network.trainable_weights)
        self.optimizer_.apply_gradients(zip(grads, self.network.trainable_weights))
        # close at first (decay (1 + t) / (10 + t)), then with ``ema``; every replica computes the
        # same average from the same synchronised weights
        step = ops.cast(self.optimizer_.iterations, "float32")
        decay = ops.minimum(self.ema, (1.0 + step) / (10.0 + step))
        for avg, w in zip(self.ema_network.weights, self.network.weights):
            avg.assign(decay * avg + (1.0 - decay) * w)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    def test_step(self, data):
        """Validation: the averaged network's loss on held-out images at random times."""
        noisy, t, labels, target = self._noised(data, drop=False)
        self.loss_tracker.update_state(self.loss_fn(target, self.ema_network([noisy, t, labels], training=False)))
        return {"loss": self.loss_tracker.result()}

    def velocity(self, x, t, labels):
        if self._velocity is None:  # one compiled graph for every step and batch size
            net = self.ema_network
            self._velocity = tf.function(lambda x, t, c: net([x, t, c], training=False), reduce_retracing=True)
        return self._velocity(x, t, labels)

    def ddim(self, noise: np.ndarray, labels: np.ndarray | None, steps: int, guidance: float,
             keep: int = 0) -> tuple[np.ndarray, list[tuple[float, np.ndarray]]]:
        """Deterministic DDIM from ``noise`` to images in [-1, 1]; with ``keep``, also x at that
        many evenly spaced times (the trajectory)."""
        n = len(noise)
        x = tf.constant(noise)
        null = np.full((n,), self.num_classes, "int32")
        guided = labels is not None and guidance != 1.0
        cond = null if labels is None else labels.astype("int32")
        c_in = np.concatenate([cond, null]) if guided else cond
        times = np.linspace(1.0, 0.0, steps + 1, dtype="float32")
        marks = set(np.linspace(0, steps - 1, keep).round().astype(int)) if keep else set()
        trajectory = []
        for i in range(steps):
            t = times[i]
            signal, noise_rate = (float(v) for v in schedule(np.float32(t)))
            if i in marks:
                trajectory.append((float(t), np.asarray(x)))
            x_in = tf.concat([x, x], 0) if guided else x
            v = self.velocity(x_in, tf.fill((len(c_in),), t), c_in)
            if guided:
                v_c, v_u = v[:n], v[n:]
                v = v_u + guidance * (v_c - v_u)
            x0 = signal * x - noise_rate * v
            eps = noise_rate * x + signal * v
            s2, n2 = (float(r) for r in schedule(np.float32(times[i + 1])))
            x = s2 * x0 + n2 * eps
        return np.clip(np.asarray(x0), -1.0, 1.0), trajectory


def to_unit(images) -> np.ndarray:
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


class DiffusionPlugin(Pictures):
    name = "diffusion"
    description = "Diffusion model (DDPM training, DDIM sampling, classifier-free guidance): draw any digit"
    Config = DiffusionConfig
    dataset = "mnist"
    epochs = 6
    batch_size = 128
    headline = "label_accuracy"
    judged_by = "cnn"
    condition = "digit"
    judge_per_class = 50  # samples per class when a run ends; `kiln evaluate` judges 1,000 as for cgan
    pixel_range = (-1.0, 1.0)
    no_export = ("diffusion draws by calling its network once per DDIM step (twice with guidance) in a "
                 "loop around it; no single network maps sample's arguments to its pictures, so there is "
                 "nothing to export")

    def setup(self, info):
        super().setup(info)
        self.num_classes = int(info.num_classes)

    def build(self):
        c = self.config
        model = Diffusion(build_unet(self.image_shape, c.width, c.blocks, self.num_classes), self.num_classes,
                          c.ema, c.label_dropout)
        model.compile(keras.optimizers.AdamW(c.learning_rate, weight_decay=c.weight_decay))
        return model

    def evaluate(self, model, test):
        """The averaged network's velocity loss on the test images (sample quality itself is
        judged by a stored classifier: kiln.quality)."""
        model.loss_tracker.reset_state()
        for batch in test:
            model.test_step(batch)
        return {"loss": float(model.loss_tracker.result())}

    def _check(self, digit) -> None:
        if digit is None:
            return
        if not self.num_classes:
            raise KilnError(f"'digit': {self.info.name} has no classes to draw; leave it out")
        if digit >= self.num_classes:
            names = self.info.class_names
            raise KilnError(f"'digit' must be a class index 0..{self.num_classes - 1} (or -1: any), got {digit}"
                            + (f" (classes: {', '.join(names)})" if names else ""))

    def _noise(self, n, seed):
        """The noise ``sample`` starts ``n`` pictures from, for a seed."""
        return np.random.default_rng(seed).standard_normal((n, *self.image_shape)).astype("float32")

    @staticmethod
    def _frames(final, path, i):
        """Picture ``i``'s way from noise to the picture: x at each kept time, then the picture."""
        return [to_unit(x[i]) for _, x in path] + [to_unit(final[i])]

    def _draw(self, model, n, digit, steps, guidance, seed, keep=0):
        self._check(digit)
        noise = self._noise(n, seed)
        labels = None if digit is None else np.full((n,), digit)
        return model.ddim(noise, labels, steps, guidance, keep)

    @inference(digit=Scalar(int, default=-1, min=-1,
                            description="the class to draw (0-9 for MNIST); -1 or absent: any class (unconditional)"),
               n=Scalar(int, default=16, min=1, max=1024, count=True),
               steps=Scalar(int, default=25, min=1, max=MAX_STEPS, description="DDIM steps from noise to picture"),
               guidance=Scalar(float, default=GUIDANCE, min=0.0, max=20.0,
                               description="classifier-free guidance scale (1: conditional only, 0: unconditional)"),
               seed=Scalar(int, default=0, min=0),
               outputs={"images": "n generated images, values in [0, 1]"})
    def sample(self, model, digit, n, steps, guidance, seed):
        """Draw n images, of one class or any (deterministic for a seed)."""
        images, _ = self._draw(model, n, None if digit < 0 else digit, steps, guidance, seed)
        return {"images": to_unit(images)}

    @inference(digit=Scalar(int, default=-1, min=-1, description="the class to draw; -1: any class"),
               steps=Scalar(int, default=25, min=2, max=MAX_STEPS, description="DDIM steps from noise to picture"),
               guidance=Scalar(float, default=GUIDANCE, min=0.0, max=20.0, description="classifier-free guidance scale"),
               frames=Scalar(int, default=8, min=2, max=32, description="pictures along the way"),
               seed=Scalar(int, default=0, min=0),
               outputs={"images": "x at evenly spaced times from pure noise (t = 1) to the picture, "
                                  "values in [0, 1]",
                        "t": "the time of each picture (1: noise, 0: the picture)"})
    def trajectory(self, model, digit, steps, guidance, frames, seed):
        """One image's way from noise to a picture: x at several times t."""
        frames = min(frames, steps)
        final, path = self._draw(model, 1, None if digit < 0 else digit, steps, guidance, seed, keep=frames - 1)
        return {"images": np.stack(self._frames(final, path, 0)), "t": [round(t, 4) for t, _ in path] + [0.0]}

    # -- pictures -------------------------------------------------------------------------
    def _rows(self, model, k: int, per_row: int, keep: int = 0):
        """``per_row`` pictures of each of the first ``k`` classes (any class when the data has
        none), row c from seed c as ``sample`` draws it, in one DDIM loop for all rows: a tenth of
        the network calls of one loop per class."""
        noise = np.concatenate([self._noise(per_row, c) for c in range(k)])
        labels = np.repeat(np.arange(k), per_row) if self.num_classes else None
        return model.ddim(noise, labels, 25, GUIDANCE, keep)

    def progress_picture(self, model, path: Path, title: str) -> Path:
        images, _ = self._rows(model, max(1, self.num_classes), 8)
        return grid(to_unit(images), path, cols=8, title=title)

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        k = min(max(1, self.num_classes), 10)
        final, path = self._rows(model, k, 1, keep=7)
        rows = [self._frames(final, path, c) for c in range(k)]
        return [self.progress_picture(model, out_dir / "samples.png", f"one row per class (25 DDIM steps, guidance {GUIDANCE:g})"),
                grid(np.stack([im for row in rows for im in row]), out_dir / "trajectory.png", cols=8,
                     title="from noise (left) to picture (right), one class per row")]
