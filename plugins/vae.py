"""VAE: the keras-io "Variational AutoEncoder" recipe (examples/generative/vae.py) on MNIST.

A convolutional encoder maps an image to (mu, log sigma^2); the reparameterisation trick
z = mu + sigma * eps keeps sampling differentiable; a transposed-convolution decoder maps z back
to pixels. Loss = reconstruction (binary cross-entropy summed over pixels) + beta * KL(q(z|x) || N(0, I))
with the analytic Gaussian KL. keras-io reports about 147 nats/image of training loss with a
2-D latent space, which is small enough to draw: Kiln stores the latent scatter of the test set and
the decoded manifold as pictures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from kiln import (ImageOptions, KilnError, Pictures, Scalar, Tensor, grid, inference, line, param,
                  replicas, scatter)


@dataclass
class VAEConfig(ImageOptions):
    latent_dim: int = param(2, min=1, max=256, help="size of z (2 lets Kiln draw the latent space)")
    beta: float = param(1.0, min=0.0, max=100.0, help="weight of the KL term (beta-VAE)")
    hidden: int = param(16, min=1, max=1024, help="dense units before the latent heads")
    learning_rate: float = param(1e-3, min=0.0, max=1.0)


class Sampling(layers.Layer):
    """z = mu + exp(log_var / 2) * eps, eps ~ N(0, I): the reparameterisation trick."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        eps = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * eps


def build_encoder(latent_dim: int, hidden: int, shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    inputs = keras.Input(shape=shape)
    x = layers.Conv2D(32, 3, activation="relu", strides=2, padding="same")(inputs)
    x = layers.Conv2D(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Dense(hidden, activation="relu")(layers.Flatten()(x))
    z_mean = layers.Dense(latent_dim, name="z_mean", dtype="float32")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var", dtype="float32")(x)
    z = Sampling(dtype="float32")([z_mean, z_log_var])  # float32 noise, under any policy
    return keras.Model(inputs, [z_mean, z_log_var, z], name="encoder")


def build_decoder(latent_dim: int, shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    h, w, channels = shape[0] // 4, shape[1] // 4, shape[2]  # undone by the two stride-2 layers
    inputs = keras.Input(shape=(latent_dim,))
    x = layers.Reshape((h, w, 64))(layers.Dense(h * w * 64, activation="relu")(inputs))
    x = layers.Conv2DTranspose(64, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Conv2DTranspose(32, 3, activation="relu", strides=2, padding="same")(x)
    outputs = layers.Conv2DTranspose(channels, 3, activation="sigmoid", padding="same", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="decoder")


def vae_losses(images, reconstruction, z_mean, z_log_var):
    """Per-image reconstruction loss and KL divergence, in nats."""
    # per pixel and channel (Keras' BCE averages its last axis: give it one value each)
    rec = ops.sum(keras.losses.binary_crossentropy(images[..., None], reconstruction[..., None]), axis=(1, 2, 3))
    kl = -0.5 * ops.sum(1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1)
    return rec, kl


class VAEModel(keras.Model):
    def __init__(self, encoder, decoder, beta=1.0, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder, self.beta = encoder, decoder, beta
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def train_step(self, data):
        images = data[0] if isinstance(data, tuple) else data
        with tf.GradientTape() as tape:
            z_mean, z_log_var, z = self.encoder(images, training=True)
            rec, kl = vae_losses(images, self.decoder(z, training=True), z_mean, z_log_var)
            rec, kl = ops.mean(rec), ops.mean(kl)
            total = rec + self.beta * kl
            # Hand-written mean loss: gradients are summed over replicas, so scale by their count.
            scaled = self.optimizer.scale_loss(total / replicas())  # float16 only: compile() wrapped it
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.total_loss_tracker.update_state(total)
        self.reconstruction_loss_tracker.update_state(rec)
        self.kl_loss_tracker.update_state(kl)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):  # validation: the same losses, no update
        images = data[0] if isinstance(data, tuple) else data
        z_mean, z_log_var, z = self.encoder(images, training=False)
        rec, kl = vae_losses(images, self.decoder(z, training=False), z_mean, z_log_var)
        rec, kl = ops.mean(rec), ops.mean(kl)
        self.total_loss_tracker.update_state(rec + self.beta * kl)
        self.reconstruction_loss_tracker.update_state(rec)
        self.kl_loss_tracker.update_state(kl)
        return {m.name: m.result() for m in self.metrics}


BANK = "latent_bank.npz"
IMAGE = Tensor(shape=("input",), min=0, max=255, description="an image, pixels 0-255")


class VAE(Pictures):
    name = "vae"
    description = "Variational autoencoder (keras-io recipe): sample, reconstruct, interpolate"
    Config = VAEConfig
    dataset = "mnist"
    epochs = 30
    batch_size = 128
    headline = "neg_elbo"
    bank: dict[str, np.ndarray] | None = None  # test images and their latent means (neighbours)

    def build(self):
        c = self.config
        model = VAEModel(build_encoder(c.latent_dim, c.hidden, self.image_shape),
                         build_decoder(c.latent_dim, self.image_shape), beta=c.beta)
        model.compile(optimizer=keras.optimizers.Adam(c.learning_rate))
        return model

    def evaluate(self, model, test):
        """Held-out negative ELBO in nats/image (reconstruction + KL, at beta = 1)."""
        rec_sum = kl_sum = n = 0.0
        for x, _ in test:
            z_mean, z_log_var, z = model.encoder(x, training=False)
            rec, kl = vae_losses(x, model.decoder(z, training=False), z_mean, z_log_var)
            rec_sum += float(ops.sum(rec))
            kl_sum += float(ops.sum(kl))
            n += int(x.shape[0])
        return {"neg_elbo": (rec_sum + kl_sum) / n, "reconstruction_loss": rec_sum / n, "kl_loss": kl_sum / n}

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        x, y = next(iter(test))
        x, y = x.numpy()[:16], y.numpy()[:16]
        written = [
            grid(self.sample(model, 64, 0)["images"], out_dir / "samples.png",
                 title="samples z ~ N(0, I)"),
            grid(np.concatenate([x, self.reconstruct(model, x * 255.0)["images"]]), out_dir / "reconstructions.png",
                 title="test images (top) and their reconstructions (bottom)"),
            grid(self.interpolate(model, x[0] * 255.0, x[1] * 255.0, None, None, 10)["images"],
                 out_dir / "interpolation.png", cols=10, title="latent interpolation"),
        ]
        if self.config.latent_dim == 2:
            zs, labels = [], []
            for xb, yb in test:
                zs.append(model.encoder(xb, training=False)[0].numpy())
                labels.append(yb.numpy())
            written.append(scatter(np.concatenate(zs), np.concatenate(labels), out_dir / "latent_space.png",
                                   title="test set in latent space (mean of q(z|x))"))
            side = np.linspace(-2.5, 2.5, 15)
            points = np.array([[a, b] for b in side[::-1] for a in side], dtype="float32")
            written.append(grid(self.decode(model, points)["images"], out_dir / "manifold.png", cols=15,
                                cell=0.5, title="decoded latent grid"))
        return written

    def save_assets(self, model, test, out_dir: Path) -> None:
        """The latent bank for ``neighbours``: test images (uint8), labels and latent means."""
        xs, ys, zs = [], [], []
        for x, y in test:
            xs.append(np.round(x.numpy() * 255.0).astype("uint8"))
            ys.append(y.numpy())
            zs.append(model.encoder(x, training=False)[0].numpy())
        np.savez_compressed(out_dir / BANK, images=np.concatenate(xs), labels=np.concatenate(ys),
                            z=np.concatenate(zs))

    def load_assets(self, directory: Path) -> None:
        path = directory / BANK
        if path.is_file():
            with np.load(path) as f:
                self.bank = {k: f[k] for k in f.files}

    def export_model(self, model):
        """The decoder: latent points ``z`` in, ``decode``'s images (values in [0, 1]) out."""
        z = keras.Input((self.config.latent_dim,), dtype="float32", name="z")
        return keras.Model(z, model.decoder(z), name="vae_decoder")

    # -- inference -------------------------------------------------------------------------
    @inference(n=Scalar(int, default=16, min=1, max=1024, count=True), seed=Scalar(int, default=0, min=0),
               outputs={"images": "n generated images, values in [0, 1]"})
    def sample(self, model, n, seed):
        """Draw n images: decode z ~ N(0, I) (deterministic for a seed)."""
        z = np.random.default_rng(seed).standard_normal((n, self.config.latent_dim)).astype("float32")
        return {"images": np.asarray(model.decoder(z, training=False))}

    @inference(images=Tensor(shape=(None, "input"), min=0, max=255, description="pixel values 0-255"),
               outputs={"images": "reconstructions (decoded means), values in [0, 1]"})
    def reconstruct(self, model, images):
        """Encode images to the latent mean and decode them again."""
        x, _ = self.preprocess(images, None)
        return {"images": np.asarray(model.decoder(model.encoder(x, training=False)[0], training=False))}

    @inference(images=Tensor(shape=(None, "input"), min=0, max=255, description="pixel values 0-255"),
               outputs={"z_mean": "latent means", "z_log_var": "latent log variances"})
    def encode(self, model, images):
        """Latent mean and log-variance of each image."""
        x, _ = self.preprocess(images, None)
        z_mean, z_log_var, _ = model.encoder(x, training=False)
        return {"z_mean": np.asarray(z_mean), "z_log_var": np.asarray(z_log_var)}

    @inference(z=Tensor(shape=(None, None), description="latent points"),
               outputs={"images": "decoded images, values in [0, 1]"})
    def decode(self, model, z):
        """Decode latent points to images."""
        if z.shape[1] != self.config.latent_dim:
            raise KilnError(f"'z' has {z.shape[1]} dimensions; this VAE's latent size is {self.config.latent_dim}")
        return {"images": np.asarray(model.decoder(z.astype("float32"), training=False))}

    @inference(a=replace(IMAGE, optional=True), b=replace(IMAGE, optional=True),
               z_a=Tensor(shape=(None,), optional=True, description="first latent point (instead of a)"),
               z_b=Tensor(shape=(None,), optional=True, description="second latent point (instead of b)"),
               steps=Scalar(int, default=10, min=2, max=100),
               outputs={"images": "decoded images along the straight latent line from a to b"})
    def interpolate(self, model, a, b, z_a, z_b, steps):
        """Decode evenly spaced points between two images' latent means (or two latent points)."""
        if (a is None) != (b is None) or (z_a is None) != (z_b is None) or (a is None) == (z_a is None):
            raise KilnError("give either two images 'a' and 'b', or two latent points 'z_a' and 'z_b'")
        if a is not None:
            z_a, z_b = self.encode(model, np.stack([a, b]))["z_mean"]
        return self.decode(model, line(z_a, z_b, steps))

    @inference(outputs={"z": "latent means of the test images kept with the model",
                        "labels": "their labels"})
    def latent_map(self, model):
        """The test set in latent space (the points a latent-plane picture is drawn from)."""
        if self.bank is None:
            raise KilnError("this model version has no latent bank (it was stored before Kiln kept "
                            "one); train it again to use latent_map")
        return {"z": self.bank["z"].round(4).tolist(), "labels": self.bank["labels"].tolist()}

    @inference(image=IMAGE, k=Scalar(int, default=8, min=1, max=100),
               outputs={"images": "the k nearest test images, values in [0, 1], nearest first",
                        "labels": "their labels", "distances": "their latent distances to the query"})
    def neighbours(self, model, image, k):
        """The k test images whose latent means lie nearest the query image's."""
        if self.bank is None:
            raise KilnError("this model version has no latent bank (it was stored before Kiln kept "
                            "one); train it again to use neighbours")
        z = self.encode(model, image[None])["z_mean"][0]
        d = np.linalg.norm(self.bank["z"] - z, axis=1)
        nearest = np.argsort(d, kind="stable")[:k]
        return {"images": self.bank["images"][nearest].astype("float32") / 255.0,
                "labels": self.bank["labels"][nearest].tolist(), "distances": d[nearest].tolist()}

    @inference(a=IMAGE, b=IMAGE, c=IMAGE,
               outputs={"images": "decode(encode(a) - encode(b) + encode(c)), values in [0, 1]",
                        "z": "the latent point that was decoded"})
    def arithmetic(self, model, a, b, c):
        """Latent arithmetic on latent means: a - b + c ("a is to b as ? is to c")."""
        za, zb, zc = self.encode(model, np.stack([a, b, c]))["z_mean"]
        z = (za - zb + zc)[None]
        return {**self.decode(model, z), "z": z}
