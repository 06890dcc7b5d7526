"""CNN classifier: blocks of 3x3 convolutions with ReLU, each block ending in 2x2 max pooling; a
hidden dense layer with dropout; softmax. Adam with cosine decay of the learning
rate; random shifts and rotations while training (``augment``). Works on any image dataset with
integer labels (tfds name, .npz, or a folder of pictures in class subfolders, read at
``image_size``); images are pixel values 0-255 of the dataset's shape.

The default is sized to MNIST on 2 CPU cores: two blocks of two convolutions (16 and 32 filters)
cost about what the keras-io "Simple MNIST convnet" (one convolution of 32 and one of 64) costs
per epoch, and in 10 epochs reach 99.5% where its 12 stop near 99.2% (BENCHMARKS.md). ``filters=32,64
convs=1 hidden=0 dropout=0.5 schedule=constant learning_rate=1e-3 augment=none`` is the keras-io
network. Batch norm is left out: synchronized across Ray Train workers (as the GANs need it) it
costs an all-reduce per layer and step, which made an epoch on 2 workers 2.5 times as long for no
gain in accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import layers

from kiln import ImageOptions, KilnError, Plugin, Scalar, Tensor, confusion, grid, inference, param


@dataclass
class CNNConfig(ImageOptions):
    filters: tuple[int, ...] = param((16, 32), min=1, max=1024, help="filters of each conv block")
    convs: int = param(2, min=1, max=4, help="convolutions per block (each block ends in 2x2 pooling)")
    kernel_size: int = param(3, min=1, max=11)
    hidden: int = param(256, min=0, max=4096, help="units of the dense layer before the softmax (0: none)")
    dropout: float = param(0.3, min=0.0, max=0.95)
    learning_rate: float = param(4e-3, min=0.0, max=1.0)
    schedule: str = param("cosine", choices=("cosine", "constant"),
                          help="the learning rate: cosine decay to 0 over the run, or constant")
    augment: tuple[str, ...] = param(("crop", "rotate"), choices=("none", "flip", "crop", "rotate"),
                                     help="random training-time changes: flip (left-right), crop "
                                          "(shift by up to 8%), rotate (up to 11 degrees)")


def augmentation(names: tuple[str, ...]) -> list[keras.layers.Layer]:
    """Keras' preprocessing layers for ``augment``: random in training, the identity at inference
    (serving, evaluation and export see the picture as it is)."""
    made = {"flip": lambda: layers.RandomFlip("horizontal", name="random_flip"),
            "crop": lambda: layers.RandomTranslation(0.08, 0.08, fill_mode="reflect", name="random_shift"),
            "rotate": lambda: layers.RandomRotation(0.03, fill_mode="reflect", name="random_rotation")}
    return [made[n]() for n in dict.fromkeys(names) if n != "none"]


def smallest_side(config: CNNConfig) -> int:
    """The smallest picture side that leaves at least one pixel after every block's unpadded
    convolutions and pooling."""
    side = 1
    for _ in config.filters:
        side = 2 * side + config.convs * (config.kernel_size - 1)
    return side


def build_cnn(config: CNNConfig, input_shape: tuple[int, ...], num_classes: int) -> keras.Model:
    """Convolutions are named conv1, conv2, ... and the activations after them relu1, relu2, ...
    (``features`` reads both); the flattened maps are ``features`` (transfer learning cuts there)."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for layer in augmentation(config.augment):
        x = layer(x)
    n = 0
    for f in config.filters:
        for _ in range(config.convs):
            n += 1
            x = layers.Conv2D(f, config.kernel_size, name=f"conv{n}")(x)
            x = layers.ReLU(name=f"relu{n}")(x)
        x = layers.MaxPooling2D(2, name=f"pool{n}")(x)
    x = layers.Flatten(name="features")(x)
    if config.hidden:
        x = layers.Dense(config.hidden, activation="relu", name="hidden")(x)
    x = layers.Dropout(config.dropout)(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="cnn")


class CNN(Plugin):
    name = "cnn"
    description = "Convolutional image classifier (augmented, cosine-decayed; 99.5% on MNIST)"
    Config = CNNConfig
    dataset = "mnist"
    epochs = 10
    batch_size = 128
    headline = "accuracy"
    # a cnn stored before these keys existed is the keras-io network
    stored_defaults = {"convs": 1, "hidden": 0, "schedule": "constant"}

    def setup(self, info):
        if info.num_classes < 2 or len(info.input_shape) not in (2, 3):
            raise KilnError(f"cnn needs images (H, W[, C]) with integer labels; dataset {info.name} "
                            f"has inputs {list(info.input_shape)} and {info.num_classes} classes")
        need = smallest_side(self.config)
        if min(info.input_shape[:2]) < need:
            raise KilnError(f"cnn's convolutions (filters {','.join(map(str, self.config.filters))}, "
                            f"{self.config.convs} per block, kernel {self.config.kernel_size}) need pictures "
                            f"at least {need} pixels a side; dataset {info.name} has {list(info.input_shape)} "
                            f"(an image folder takes --set image_size={need})")
        super().setup(info)

    @property
    def image_shape(self) -> tuple[int, ...]:
        shape = tuple(self.info.input_shape)
        return shape if len(shape) == 3 else (*shape, 1)

    def preprocess(self, x, y):
        if isinstance(x, np.ndarray):  # a served request: numpy, not TensorFlow's eager ops
            return (x.astype("float32") / np.float32(255.0)).reshape(-1, *self.image_shape), y
        import tensorflow as tf

        x = tf.reshape(tf.cast(x, "float32") / 255.0, (-1, *self.image_shape))
        return x, y

    def build(self):
        model = build_cnn(self.config, self.image_shape, self.info.num_classes)
        c = self.config
        rate = c.learning_rate
        if c.schedule == "cosine":
            rate = keras.optimizers.schedules.CosineDecay(c.learning_rate, max(1, self.total_steps))
        model.compile(optimizer=keras.optimizers.Adam(rate),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model

    def export_model(self, model):
        """Raw pixels (0-255) in, the class probabilities of ``classify`` out."""
        images = keras.Input(self.info.input_shape, dtype="float32", name="images")
        x = layers.Reshape(self.image_shape)(layers.Rescaling(1 / 255.0)(images))
        # Keras' random layers default to training=True when the call does not say: exported
        # without it, the file would shift and turn every picture it classifies
        return keras.Model(images, model(x, training=False), name=f"{self.name}_probabilities")

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        xs, ys, preds = [], [], []
        for x, y in test:
            xs.append(x.numpy())
            ys.append(y.numpy())
            preds.append(np.argmax(model.predict_on_batch(x), axis=-1))
        x, y, p = np.concatenate(xs), np.concatenate(ys), np.concatenate(preds)
        names = self.info.class_names or tuple(map(str, range(self.info.num_classes)))
        k = self.info.num_classes
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (y.astype(int), p.astype(int)), 1)
        wrong = np.flatnonzero(p != y)[:16]
        first = np.arange(min(32, len(x)))
        written = [
            grid(x[first], out_dir / "predictions.png", titles=[names[i] for i in p[first]],
                 colors=["green" if a == b else "red" for a, b in zip(p[first], y[first])],
                 title="test images with predicted class (red: wrong)"),
            grid(x[wrong], out_dir / "mistakes.png",
                 titles=[f"{names[b]}→{names[a]}" for a, b in zip(p[wrong], y[wrong])],
                 title="misclassified (true→predicted)") if len(wrong) else None,
            confusion(matrix, names, out_dir / "confusion.png",
                      title=f"test accuracy {np.mean(p == y):.4f}"),
        ]
        return [w for w in written if w is not None]

    @inference(images=Tensor(shape=(None, "input"), min=0, max=255,
                             description="images, pixel values 0-255"),
               outputs={"classes": "predicted class index per image",
                        "labels": "predicted class name per image",
                        "probabilities": "softmax probabilities per image"})
    def classify(self, model, images):
        """Classify images: the most likely class and all class probabilities."""
        x, _ = self.preprocess(images, None)
        probs = np.asarray(model.predict_on_batch(x))
        names = self.info.class_names or tuple(map(str, range(self.info.num_classes)))
        classes = probs.argmax(axis=-1)
        return {"classes": classes.tolist(), "labels": [names[c] for c in classes],
                "probabilities": probs.round(6).tolist()}

    @inference(images=Tensor(shape=(None, "input"), min=0, max=255,
                             description="images, pixel values 0-255"),
               layer=Scalar(int, default=1, min=1, description="which convolution (1: the first)"),
               outputs={"kernels": "that convolution's kernels, (filters, k, k), averaged over its "
                                   "input channels",
                        "maps": "the feature maps it makes of each image (after its ReLU), "
                                "(n, H, W, filters)"})
    def features(self, model, images, layer):
        """What a convolution layer learned (its kernels) and sees (its feature maps)."""
        count = len(self.config.filters) * self.config.convs
        if layer > count:
            raise KilnError(f"'layer' must be 1..{count}: this CNN has {count} convolutions")
        x, _ = self.preprocess(images, None)
        conv = model.get_layer(f"conv{layer}")
        kernels = np.asarray(conv.kernel).mean(axis=2).transpose(2, 0, 1)
        # from the one input tensor, not the list of them: called with a tensor, a model built
        # on a list warned on every call that the structure did not match
        maps = keras.Model(model.inputs[0], model.get_layer(f"relu{layer}").output)(x, training=False)
        return {"kernels": kernels.round(5), "maps": np.asarray(maps).round(4)}
