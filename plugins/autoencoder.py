"""Denoising convolutional autoencoder on MNIST (keras-io "Convolutional autoencoder for image
denoising", in the subclassed-model style of the other generative plugins).

An encoder e: X -> Z (strided convolutions to a ``latent_dim`` vector) and a decoder d: Z -> X
(transposed convolutions back to pixels) are trained so that d(e(noisy x)) = x. Every training
step corrupts the clean batch afresh with Gaussian noise (``gaussian_std``, on [0, 1] pixels,
clipped) and salt-and-pepper noise (``salt_pepper``: the fraction of pixels set to 0 or 1).

Quality is PSNR (peak signal-to-noise ratio, dB, peak 1.0, averaged over images) of the denoised
test images against the clean ones, next to the PSNR of the noisy input itself: the gain says how
much noise the model removes. Test noise is drawn with a fixed seed, so the figure repeats.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers, ops

from kiln import ImageOptions, KilnError, Pictures, Scalar, Tensor, grid, inference, line, param


@dataclass
class AutoencoderConfig(ImageOptions):
    latent_dim: int = param(32, min=1, max=1024, help="size of the code z = e(x)")
    gaussian_std: float = param(0.4, min=0.0, max=2.0,
                                help="std of the Gaussian noise added to [0, 1] pixels in training (0: none)")
    salt_pepper: float = param(0.1, min=0.0, max=1.0,
                               help="fraction of pixels set to 0 or 1 in training (0: none)")
    learning_rate: float = param(1e-3, min=0.0, max=1.0)


def corrupt(images, gaussian_std: float, salt_pepper: float, seed):
    """Gaussian then salt-and-pepper noise on [0, 1] images; ``seed`` is a SeedGenerator or int."""
    x = images
    if gaussian_std > 0:
        x = x + gaussian_std * keras.random.normal(ops.shape(x), seed=seed)
    if salt_pepper > 0:
        u = keras.random.uniform(ops.shape(x), seed=seed)
        x = ops.where(u < salt_pepper / 2, 0.0, ops.where(u > 1 - salt_pepper / 2, 1.0, x))
    return ops.clip(x, 0.0, 1.0)


def psnr(clean, other):
    """Per-image PSNR in dB for images in [0, 1]."""
    mse = ops.mean(ops.square(clean - other), axis=(1, 2, 3))
    return 10.0 * ops.log(1.0 / ops.maximum(mse, 1e-10)) / np.log(10.0)


def build_encoder(latent_dim: int, shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    inputs = keras.Input(shape=shape)
    x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    outputs = layers.Dense(latent_dim, name="z", dtype="float32")(layers.Flatten()(x))
    return keras.Model(inputs, outputs, name="encoder")


def build_decoder(latent_dim: int, shape: tuple[int, int, int] = (28, 28, 1)) -> keras.Model:
    h, w, channels = shape[0] // 4, shape[1] // 4, shape[2]  # undone by the two stride-2 layers
    inputs = keras.Input(shape=(latent_dim,))
    x = layers.Reshape((h, w, 64))(layers.Dense(h * w * 64, activation="relu")(inputs))
    x = layers.Conv2DTranspose(64, 3, strides=2, padding="same", activation="relu")(x)
    x = layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(x)
    outputs = layers.Conv2D(channels, 3, padding="same", activation="sigmoid", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="decoder")


class DenoisingAutoencoder(keras.Model):
    def __init__(self, encoder, decoder, gaussian_std, salt_pepper, **kwargs):
        super().__init__(**kwargs)
        self.encoder, self.decoder = encoder, decoder
        self.gaussian_std, self.salt_pepper = gaussian_std, salt_pepper
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.loss_fn = keras.losses.BinaryCrossentropy()  # divides by the replica count itself
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.psnr_tracker = keras.metrics.Mean(name="psnr")

    @property
    def metrics(self):
        return [self.loss_tracker, self.psnr_tracker]

    def denoise(self, images, training=False):
        return self.decoder(self.encoder(images, training=training), training=training)

    def train_step(self, data):
        clean = data[0] if isinstance(data, tuple) else data
        noisy = corrupt(clean, self.gaussian_std, self.salt_pepper, self.seed_generator)
        with tf.GradientTape() as tape:
            output = self.denoise(noisy, training=True)
            loss = self.loss_fn(clean, output)
            scaled = self.optimizer.scale_loss(loss)  # float16 only: compile() wrapped it
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.loss_tracker.update_state(loss)
        self.psnr_tracker.update_state(ops.mean(psnr(clean, output)))
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):  # validation: the same noise and loss, no update
        clean = data[0] if isinstance(data, tuple) else data
        noisy = corrupt(clean, self.gaussian_std, self.salt_pepper, self.seed_generator)
        output = self.denoise(noisy, training=False)
        self.loss_tracker.update_state(self.loss_fn(clean, output))
        self.psnr_tracker.update_state(ops.mean(psnr(clean, output)))
        return {m.name: m.result() for m in self.metrics}


PIXELS = Tensor(shape=(None, "input"), min=0, max=255, description="images, pixel values 0-255")


class Autoencoder(Pictures):
    name = "autoencoder"
    description = "Denoising convolutional autoencoder: reconstruct (denoise), encode, decode"
    Config = AutoencoderConfig
    dataset = "mnist"
    epochs = 10
    batch_size = 128
    headline = "psnr_gain"

    def build(self):
        c = self.config
        model = DenoisingAutoencoder(build_encoder(c.latent_dim, self.image_shape),
                                     build_decoder(c.latent_dim, self.image_shape),
                                     c.gaussian_std, c.salt_pepper)
        model.compile(optimizer=keras.optimizers.Adam(c.learning_rate))
        return model

    def test_noise(self, clean, batch_index: int):
        """The training noise, drawn reproducibly for evaluation (seed = batch index)."""
        return corrupt(clean, self.config.gaussian_std, self.config.salt_pepper,
                       keras.random.SeedGenerator(batch_index))

    def evaluate(self, model, test):
        """PSNR (dB) of noisy and of denoised test images against the clean ones, and the gain."""
        noisy_sum = out_sum = n = 0.0
        for i, (x, _) in enumerate(test):
            noisy = self.test_noise(x, i)
            noisy_sum += float(ops.sum(psnr(x, noisy)))
            out_sum += float(ops.sum(psnr(x, model.denoise(noisy))))
            n += int(x.shape[0])
        return {"psnr_gain": (out_sum - noisy_sum) / n, "psnr_denoised": out_sum / n,
                "psnr_noisy": noisy_sum / n}

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        x, _ = next(iter(test))
        x = x[:10]
        noisy = self.test_noise(x, 0)
        c = self.config
        z = np.asarray(model.encoder(x[:2], training=False))
        return [grid(np.concatenate([np.asarray(x), np.asarray(noisy), np.asarray(model.denoise(noisy))]),
                     out_dir / "reconstructions.png", cols=10,
                     title=f"clean (top), noisy (Gaussian {c.gaussian_std:g}, salt & pepper "
                           f"{c.salt_pepper:g}), denoised (bottom)"),
                grid(self.decode(model, line(z[0], z[1], 10))["images"], out_dir / "interpolation.png",
                     cols=10, title="decoded straight line between two test images' codes")]

    # -- inference -------------------------------------------------------------------------
    def export_model(self, model):
        """Raw pixels (0-255) in, ``reconstruct``'s denoised images (no noise added) out."""
        images = keras.Input(tuple(self.info.input_shape), dtype="float32", name="images")
        x = layers.Reshape(self.image_shape)(layers.Rescaling(1 / 255.0)(images))
        return keras.Model(images, model.denoise(x), name="autoencoder_denoise")

    @inference(images=PIXELS,
               gaussian_std=Scalar(float, default=0.0, min=0.0, max=2.0,
                                   description="Gaussian noise to add first (0: denoise the images as given)"),
               salt_pepper=Scalar(float, default=0.0, min=0.0, max=1.0,
                                  description="fraction of pixels to set to 0 or 1 first"),
               seed=Scalar(int, default=0, min=0, description="seed of the added noise"),
               outputs={"images": "the denoised images, values in [0, 1]",
                        "noisy": "the model's input: the images with the requested noise, in [0, 1]"})
    def reconstruct(self, model, images, gaussian_std, salt_pepper, seed):
        """Denoise images (optionally adding noise first, to see what the model removes)."""
        x, _ = self.preprocess(images, None)
        noisy = corrupt(x, gaussian_std, salt_pepper, keras.random.SeedGenerator(seed))
        return {"images": np.asarray(model.denoise(noisy)), "noisy": np.asarray(noisy)}

    @inference(images=PIXELS, outputs={"z": "the code of each image"})
    def encode(self, model, images):
        """The code e(x) of each image."""
        x, _ = self.preprocess(images, None)
        return {"z": np.asarray(model.encoder(x, training=False))}

    @inference(z=Tensor(shape=(None, None), description="codes, as encode returns them"),
               outputs={"images": "decoded images, values in [0, 1]"})
    def decode(self, model, z):
        """Decode codes back to images."""
        if z.shape[1] != self.config.latent_dim:
            raise KilnError(f"'z' has {z.shape[1]} dimensions; this autoencoder's code size is "
                            f"{self.config.latent_dim}")
        return {"images": np.asarray(model.decoder(z, training=False))}
