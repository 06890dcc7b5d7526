"""Test plugin: a small GAN in the keras-io style (subclassed model, its own train_step, two
optimizers built in compile, loss trackers). Writes weights per worker like probe.py."""

import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from kiln import Plugin, param


@dataclass
class GANConfig:
    latent_dim: int = param(16, min=1, max=512)
    learning_rate: float = param(2e-4, min=0.0, max=1.0)


class GAN(keras.Model):
    def __init__(self, discriminator, generator, latent_dim):
        super().__init__()
        self.discriminator, self.generator, self.latent_dim = discriminator, generator, latent_dim
        self.seed_generator = keras.random.SeedGenerator(1337)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")

    def compile(self, d_optimizer, g_optimizer, loss_fn):
        super().compile()
        self.d_optimizer, self.g_optimizer, self.loss_fn = d_optimizer, g_optimizer, loss_fn
        self.d_optimizer.build(self.discriminator.trainable_variables)
        self.g_optimizer.build(self.generator.trainable_variables)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker]

    def train_step(self, real_images):
        if isinstance(real_images, tuple):
            real_images = real_images[0]
        batch_size = tf.shape(real_images)[0]
        z = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
        fake = self.generator(z)
        images = tf.concat([fake, real_images], axis=0)
        labels = tf.concat([tf.ones((batch_size, 1)), tf.zeros((batch_size, 1))], axis=0)
        with tf.GradientTape() as tape:
            d_loss = self.loss_fn(labels, self.discriminator(images))
        grads = tape.gradient(d_loss, self.discriminator.trainable_weights)
        self.d_optimizer.apply_gradients(zip(grads, self.discriminator.trainable_weights))
        z = keras.random.normal((batch_size, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            g_loss = self.loss_fn(tf.zeros((batch_size, 1)), self.discriminator(self.generator(z)))
        grads = tape.gradient(g_loss, self.generator.trainable_weights)
        self.g_optimizer.apply_gradients(zip(grads, self.generator.trainable_weights))
        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        return {m.name: m.result() for m in self.metrics}


class TinyGAN(Plugin):
    name = "tiny_gan"
    description = "A small MLP GAN (test plugin for custom train_steps)"
    Config = GANConfig
    dataset = "mnist"
    headline = "g_loss"

    def preprocess(self, x, y):
        return tf.reshape(tf.cast(x, "float32") / 127.5 - 1.0, (-1, 784)), y

    def build(self):
        d = keras.Sequential([keras.Input((784,)), layers.Dense(64), layers.LeakyReLU(0.2),
                              layers.Dense(1)], name="discriminator")
        g = keras.Sequential([keras.Input((self.config.latent_dim,)), layers.Dense(64),
                              layers.LeakyReLU(0.2), layers.Dense(784, activation="tanh")],
                             name="generator")
        gan = GAN(d, g, self.config.latent_dim)
        gan.compile(keras.optimizers.Adam(self.config.learning_rate),
                    keras.optimizers.Adam(self.config.learning_rate),
                    keras.losses.BinaryCrossentropy(from_logits=True))
        return gan

    def evaluate(self, model, test):
        z = keras.random.normal((256, self.config.latent_dim), seed=0)
        fake = model.generator(z)
        return {"fake_score": float(tf.reduce_mean(tf.sigmoid(model.discriminator(fake))))}

    def on_epoch_end(self, model, epoch, logs, rank):
        out = Path(os.environ["KILN_PROBE_DIR"])
        np.savez(out / f"rank{rank}-epoch{epoch}.npz", *[np.asarray(w) for w in model.get_weights()])
        opt = [np.asarray(v) for v in model.d_optimizer.variables + model.g_optimizer.variables]
        np.savez(out / f"opt-rank{rank}-epoch{epoch}.npz", *opt)
