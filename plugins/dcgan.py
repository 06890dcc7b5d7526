"""DCGAN on MNIST: the recipe of Radford et al. (2016) in the Keras 3 style of keras-io's GAN
examples (a subclassed model with its own ``train_step``, ``compile(d_optimizer, g_optimizer,
loss_fn)`` and loss trackers).

The recipe: strided convolutions instead of pooling in the discriminator, transposed
convolutions to upsample in the generator, batch norm everywhere except the generator's output
and the discriminator's input, ReLU and a tanh output in the generator, LeakyReLU(0.2) in the
discriminator, Adam(2e-4, beta_1=0.5). Sized for a 2-core CPU (about 0.3 M parameters).

``GAN`` also serves the conditional GAN (plugins/cgan.py): with ``num_classes`` set, the
generator sees the one-hot class next to z and the discriminator sees it as extra image planes.

Batch norm under Ray Train: Keras creates the moving mean/variance with no cross-replica
aggregation, so under MultiWorkerMirroredStrategy each worker would keep its own statistics and
the workers' models would drift apart. ``synchronized=True`` computes the batch statistics over
the global batch (one all-reduce per layer and step), which keeps every worker's weights
identical; in one process it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from kiln import ImageOptions, KilnError, Pictures, Scalar, Tensor, grid, inference, line, loss_scaled, param


@dataclass
class DCGANConfig(ImageOptions):
    latent_dim: int = param(64, min=1, max=512, help="size of the noise vector z")
    width: int = param(64, min=4, max=1024, help="filters of the widest convolution")
    learning_rate: float = param(2e-4, min=0.0, max=1.0)
    beta_1: float = param(0.5, min=0.0, max=0.999, help="Adam beta_1 (DCGAN: 0.5)")
    ema: float = param(0.999, min=0.0, max=0.99999,
                       help="decay of the moving average of generator weights used to draw (0: off)")
    sample_every: int = param(1, min=0, max=10000,
                              help="write a sample grid every N epochs while training (0: only at the end)")


def norm() -> layers.Layer:
    return layers.BatchNormalization(synchronized=True)  # see the module docstring


def build_generator(latent_dim: int, width: int, num_classes: int = 0,
                    shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    h, w = shape[0] // 4, shape[1] // 4  # 7x7 for MNIST, doubled twice
    inputs = keras.Input(shape=(latent_dim + num_classes,))
    x = layers.Dense(h * w * width, use_bias=False)(inputs)
    x = layers.ReLU()(norm()(x))
    x = layers.Reshape((h, w, width))(x)
    x = layers.Conv2DTranspose(width // 2, 4, strides=2, padding="same", use_bias=False)(x)  # 14x14
    x = layers.ReLU()(norm()(x))
    outputs = layers.Conv2DTranspose(shape[2], 4, strides=2, padding="same", activation="tanh",
                                     dtype="float32")(x)  # 28x28
    return keras.Model(inputs, outputs, name="generator")


def build_discriminator(width: int, num_classes: int = 0, shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    inputs = keras.Input(shape=(shape[0], shape[1], shape[2] + num_classes))
    x = layers.Conv2D(width // 2, 4, strides=2, padding="same")(inputs)  # no batch norm on the input
    x = layers.LeakyReLU(0.2)(x)
    x = layers.Conv2D(width, 4, strides=2, padding="same", use_bias=False)(x)
    x = layers.LeakyReLU(0.2)(norm()(x))
    outputs = layers.Dense(1, dtype="float32")(layers.Flatten()(x))  # a logit: real vs generated
    return keras.Model(inputs, outputs, name="discriminator")


class GAN(keras.Model):
    """Generator + discriminator trained against each other; conditional when num_classes > 0."""

    def __init__(self, generator, discriminator, latent_dim, num_classes=0, ema=0.999, **kwargs):
        super().__init__(**kwargs)
        self.generator, self.discriminator = generator, discriminator
        # Samples come from an exponential moving average of the generator's weights (as in
        # ProGAN/StyleGAN; Yazici et al. 2019): it smooths the generator's oscillation in the
        # two-player game, which gives crisper digits than the last step's weights.
        self.ema = ema
        self.ema_generator = keras.models.clone_model(generator)
        self.ema_generator.trainable = False
        self.ema_generator.set_weights(generator.get_weights())
        self.latent_dim, self.num_classes = latent_dim, num_classes
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.d_real_tracker = keras.metrics.Mean(name="d_real")  # D's probability that real is real
        self.d_fake_tracker = keras.metrics.Mean(name="d_fake")  # ... that generated is real

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer = loss_scaled(self, d_optimizer), loss_scaled(self, g_optimizer)
        self.loss_fn = loss_fn
        self.d_optimizer.build(self.discriminator.trainable_variables)
        self.g_optimizer.build(self.generator.trainable_variables)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker, self.d_real_tracker, self.d_fake_tracker]

    def generate(self, z, classes=None, training=False):
        """Images in [-1, 1] from z; ``classes`` (one-hot or soft, (n, num_classes)) if conditional.
        Training uses the generator itself; drawing (training=False) its weight average."""
        if self.num_classes:
            z = ops.concatenate([z, ops.cast(classes, z.dtype)], axis=-1)
        if training:
            return self.generator(z, training=True)
        return self.ema_generator(z, training=False)

    def critic(self, images, classes=None, training=False):
        """The discriminator's logit; the class enters as num_classes constant image planes."""
        if self.num_classes:
            planes = ops.ones_like(images[..., :1]) * ops.cast(classes, images.dtype)[:, None, None, :]
            images = ops.concatenate([images, planes], axis=-1)
        return self.discriminator(images, training=training)

    def _batch(self, data):
        """Real images, their one-hot classes (conditional) and the real/fake targets."""
        real, labels = data if isinstance(data, tuple) else (data, None)
        batch = ops.shape(real)[0]
        classes = ops.one_hot(ops.cast(labels, "int32"), self.num_classes) if self.num_classes else None
        return real, classes, ops.ones((batch, 1)), ops.zeros((batch, 1))

    def train_step(self, data):
        real, classes, ones, zeros = self._batch(data)
        batch = ops.shape(real)[0]

        # Discriminator: real and generated batches kept apart (each has its own batch norm statistics).
        z = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        fake = self.generate(z, classes, training=True)
        with tf.GradientTape() as tape:
            real_logits = self.critic(real, classes, training=True)
            fake_logits = self.critic(fake, classes, training=True)
            # Keras loss objects divide by the replica count themselves (docs/design.md, "Losses under distribution").
            d_loss = self.loss_fn(ones, real_logits) + self.loss_fn(zeros, fake_logits)
            scaled = self.d_optimizer.scale_loss(d_loss)  # float16 only (kiln.loss_scaled)
        grads = tape.gradient(scaled, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))

        # Generator: make the discriminator call fresh samples real.
        z = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(ones, self.critic(self.generate(z, classes, training=True), classes,
                                                    training=True))
            scaled = self.g_optimizer.scale_loss(g_loss)
        grads = tape.gradient(scaled, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))

        # The average follows closely at first (decay (1 + t) / (10 + t)), then with ``ema``. Every
        # replica computes the same average from the same synchronised weights.
        t = ops.cast(self.g_optimizer.iterations, "float32")
        decay = ops.minimum(self.ema, (1.0 + t) / (10.0 + t))
        for avg, w in zip(self.ema_generator.weights, self.generator.weights):
            avg.assign(decay * avg + (1.0 - decay) * w)

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        self.d_real_tracker.update_state(ops.mean(ops.sigmoid(real_logits)))
        self.d_fake_tracker.update_state(ops.mean(ops.sigmoid(fake_logits)))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        """Validation: both players' losses on held-out real images and samples of the averaged
        generator (the one that draws), no update."""
        real, classes, ones, zeros = self._batch(data)
        z = keras.random.normal((ops.shape(real)[0], self.latent_dim), seed=self.seed_generator)
        real_logits = self.critic(real, classes, training=False)
        fake_logits = self.critic(self.generate(z, classes, training=False), classes, training=False)
        self.d_loss_tracker.update_state(self.loss_fn(ones, real_logits) + self.loss_fn(zeros, fake_logits))
        self.g_loss_tracker.update_state(self.loss_fn(ones, fake_logits))
        self.d_real_tracker.update_state(ops.mean(ops.sigmoid(real_logits)))
        self.d_fake_tracker.update_state(ops.mean(ops.sigmoid(fake_logits)))
        return {m.name: m.result() for m in self.metrics}


def latent(n: int, dim: int, seed: int) -> np.ndarray:
    """n latent points z ~ N(0, I), the same for the same seed."""
    return np.random.default_rng(seed).standard_normal((n, dim)).astype("float32")


def to_unit(images) -> np.ndarray:
    """Generator output in [-1, 1] -> pixels in [0, 1]."""
    return np.clip((np.asarray(images) + 1.0) / 2.0, 0.0, 1.0)


class GANPlugin(Pictures):
    """What DCGAN and CGAN share: data in [-1, 1], the model, evaluation and progress pictures."""

    Config = DCGANConfig
    dataset = "mnist"
    epochs = 20
    batch_size = 128
    judged_by = "cnn"
    num_classes = 0

    pixel_range = (-1.0, 1.0)  # the generator ends in tanh

    def build(self):
        c = self.config
        gan = GAN(build_generator(c.latent_dim, c.width, self.num_classes, self.image_shape),
                  build_discriminator(c.width, self.num_classes, self.image_shape), c.latent_dim,
                  self.num_classes, c.ema)
        gan.compile(d_optimizer=keras.optimizers.Adam(c.learning_rate, beta_1=c.beta_1),
                    g_optimizer=keras.optimizers.Adam(c.learning_rate, beta_1=c.beta_1),
                    loss_fn=keras.losses.BinaryCrossentropy(from_logits=True))
        return gan

    def classes(self, labels) -> np.ndarray | None:
        return np.eye(self.num_classes, dtype="float32")[np.asarray(labels)] if self.num_classes else None

    def evaluate(self, model, test):
        """The discriminator's mean probability of 'real' on held-out real and on generated images
        (near 0.5 for both when the two players are balanced). Sample quality itself is judged by
        a stored classifier (kiln.quality)."""
        real, fake, n = 0.0, 0.0, 0
        for i, (x, y) in enumerate(test):
            b = int(x.shape[0])
            classes = self.classes(y.numpy())
            fake_images = model.generate(latent(b, self.config.latent_dim, i), classes)
            real += float(ops.sum(ops.sigmoid(model.critic(x, classes))))
            fake += float(ops.sum(ops.sigmoid(model.critic(fake_images, classes))))
            n += b
        return {"d_real": real / n, "d_fake": fake / n}

    def export_model(self, model):
        """The generator ``sample`` draws with (the weight average): noise ``z`` (and for a
        conditional GAN the class ``digit``) in, images with values in [0, 1] out."""
        z = keras.Input((self.config.latent_dim,), dtype="float32", name="z")
        inputs, classes = [z], None
        if self.num_classes:
            digit = keras.Input((), dtype="int32", name="digit")
            inputs.append(digit)
            classes = ops.one_hot(digit, self.num_classes)
        images = ops.clip((model.generate(z, classes) + 1.0) / 2.0, 0.0, 1.0)
        return keras.Model(inputs, images, name=f"{self.name}_generator")

class DCGAN(GANPlugin):
    name = "dcgan"
    description = "Deep convolutional GAN (Radford et al. recipe): sample digits, interpolate in z"
    headline = "confidence"
    epochs = 45  # the CNN's confidence in the samples crosses 0.9 at 45 epochs (BENCHMARKS.md)

    def progress_picture(self, model, path, title):
        return grid(self.sample(model, 64, 0)["images"], path, title=f"samples (seed 0), {title}")

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        z = latent(12, self.config.latent_dim, 1)
        rows = [self.interpolate(model, z[i], z[i + 1], 10)["images"] for i in range(0, 12, 2)]
        return [
            grid(self.sample(model, 64, 0)["images"], out_dir / "samples.png", title="samples (seed 0)"),
            grid(np.concatenate(rows), out_dir / "interpolation.png", cols=10,
                 title="straight lines between random latent points (one per row)"),
        ]

    @inference(n=Scalar(int, default=16, min=1, max=1024, count=True), seed=Scalar(int, default=0, min=0),
               outputs={"images": "n generated images, values in [0, 1]",
                        "z": "the latent point of each image (for interpolate)"})
    def sample(self, model, n, seed):
        """Generate n digits from z ~ N(0, I) (deterministic for a seed)."""
        z = latent(n, self.config.latent_dim, seed)
        return {"images": to_unit(model.generate(z)), "z": z}

    @inference(a=Tensor(shape=(None,), description="first latent point (e.g. a 'z' from sample)"),
               b=Tensor(shape=(None,), description="second latent point"),
               steps=Scalar(int, default=10, min=2, max=100),
               outputs={"images": "generated images along the straight line from a to b"})
    def interpolate(self, model, a, b, steps):
        """Generate images at evenly spaced points between two latent points."""
        for name, v in (("a", a), ("b", b)):
            if v.shape[0] != self.config.latent_dim:
                raise KilnError(f"'{name}' has {v.shape[0]} dimensions; this generator's latent size is "
                                f"{self.config.latent_dim}")
        return {"images": to_unit(model.generate(line(a, b, steps)))}
