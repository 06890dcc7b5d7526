"""Transfer learning: reuse a trained network's features on a new task with few labels (the
keras-io "Transfer learning & fine-tuning" recipe: freeze the base, train a new head, then
unfreeze the top of the base and fine-tune it at a much lower learning rate).

The base is a model from Kiln's store (default: the MNIST ``cnn``; its ``features`` layer, or the
layer before the classifier, is the feature vector), or a ``keras.applications`` network named
``keras:<Application>`` (e.g. ``keras:MobileNetV2``) with its weights read from a local file
(``--set weights=PATH``; nothing is downloaded). ``--set pretrained=false`` trains the same
architecture from random weights, every layer at ``learning_rate``: the baseline transfer must beat.

Default task: Fashion-MNIST with only ``labels_per_class`` (50) labelled training images per class,
scored on the full test set. The stored base is pinned (``cnn`` becomes ``cnn:3``) in the
manifest, and a stored transfer model needs its base version in the same store to be rebuilt.

Any image dataset works, a folder of photos included: it is read at ``image_size`` (by default the
stored base's own size and channels), and the model resizes and converts what it is given to the
base's input. ``augment`` adds the cnn's random flip, shift and rotation, in training only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras import layers

from kiln import ImageOptions, KilnError, Plugin, confusion, grid, param
from kiln.plugins.cnn import CNN, augmentation

# keras.applications networks Kiln can feed, and how each expects its 0-255 RGB input scaled
# ("tf": to [-1, 1]; "raw": as is, the network rescales itself; "torch": ImageNet mean/std).
KERAS_BASES = {"MobileNet": "tf", "MobileNetV2": "tf", "MobileNetV3Small": "raw",
               "MobileNetV3Large": "raw", "ResNet50V2": "tf", "NASNetMobile": "tf",
               "DenseNet121": "torch", "EfficientNetB0": "raw", "EfficientNetV2B0": "raw"}


@dataclass
class TransferConfig(ImageOptions):
    base: str = param("cnn", help="stored model NAME[:VERSION], or keras:<Application> "
                                   f"({', '.join(KERAS_BASES)})")
    weights: str = param("", help="for keras: bases, a local .weights.h5 file with the base's weights")
    pretrained: bool = param(True, help="false: same architecture from random weights (baseline)")
    labels_per_class: int = param(50, min=0, max=1_000_000, help="labelled training images per class (0: all)")
    head_units: int = param(128, min=1, max=8192)
    dropout: float = param(0.5, min=0.0, max=0.95)
    learning_rate: float = param(1e-3, min=0.0, max=1.0, help="learning rate of the new head")
    head_epochs: int = param(10, min=0, max=100_000, help="epochs training only the head, before fine-tuning")
    fine_tune_layers: int = param(1, min=0, max=1000, help="top weighted base layers fine-tuned after head_epochs (0: none)")
    fine_tune_lr: float = param(1e-4, min=0.0, max=1.0, help="learning rate of the fine-tuned base layers")
    image_size: int = param(0, min=0, max=512, help="the side images are resized to (image folders are "
                                                     "read at it); 0: the stored base's, 32 for keras: bases")
    augment: tuple[str, ...] = param(("none",), choices=("none", "flip", "crop", "rotate"),
                                     help="random training-time changes, as the cnn's augment")


class TransferModel(keras.Model):
    """base -> new head. ``train_step`` always updates the head; the base's top layers follow, at
    their own learning rate, once ``fine_tuning`` is 1 (set after ``head_epochs``; it is a weight,
    so a resumed run remembers its phase). The base always runs in inference mode, so batch-norm
    statistics of a keras.applications base stay those it was trained with."""

    def __init__(self, base: keras.Model, head: keras.Model, tuned: list,
                 augment: tuple[str, ...] = ("none",), **kwargs):
        super().__init__(**kwargs)
        self.base, self.head, self.tuned = base, head, tuned
        # Keras' random layers change pictures only when called with training=True
        self.augment = augmentation(augment)
        self.fine_tuning = self.add_weight(shape=(), initializer="zeros", trainable=False,
                                           name="fine_tuning")
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.accuracy = keras.metrics.SparseCategoricalAccuracy(name="accuracy")

    def call(self, x, training=False):
        for layer in self.augment:
            x = layer(x, training=training)
        return self.head(self.base(x, training=False), training=training)

    def compile(self, head_optimizer, base_optimizer):
        super().compile()
        self.head_optimizer, self.base_optimizer = head_optimizer, base_optimizer
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy()
        head_optimizer.build(self.head.trainable_variables)
        base_optimizer.build(self.tuned)

    @property
    def metrics(self):
        return [self.loss_tracker, self.accuracy]

    def train_step(self, data):
        x, y = data
        head_vars = self.head.trainable_variables
        with tf.GradientTape() as tape:
            probs = self(x, training=True)
            loss = self.loss_fn(y, probs)
        grads = tape.gradient(loss, head_vars + self.tuned)
        self.head_optimizer.apply(grads[:len(head_vars)], head_vars)
        if self.tuned:
            # Adam moves nothing on zero gradients (both moments stay 0), so before fine-tuning
            # starts the base is exactly frozen, with one traced step for both phases.
            self.base_optimizer.apply([g * self.fine_tuning for g in grads[len(head_vars):]], self.tuned)
        self.loss_tracker.update_state(loss)
        self.accuracy.update_state(y, probs)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):  # validation: loss and accuracy, no update
        x, y = data
        probs = self(x, training=False)
        self.loss_tracker.update_state(self.loss_fn(y, probs))
        self.accuracy.update_state(y, probs)
        return {m.name: m.result() for m in self.metrics}


class Transfer(Plugin):
    name = "transfer"
    description = "Transfer learning: a stored CNN's (or keras.applications) features + new head, few labels"
    Config = TransferConfig
    dataset = "fashion_mnist"
    epochs = 30
    batch_size = 32
    headline = "accuracy"
    # one gradient feeds two optimizers (head and base), which float16's per-optimizer loss scale
    # cannot share
    precisions = ("float32", "mixed_bfloat16")

    def setup(self, info):
        c = self.config
        if info.num_classes < 2 or len(info.input_shape) not in (2, 3):
            raise KilnError(f"transfer needs images with integer labels; dataset {info.name} has "
                            f"inputs {list(info.input_shape)}")
        if c.base.startswith("keras:"):
            app = c.base.split(":", 1)[1]
            if app not in KERAS_BASES:
                raise KilnError(f"unknown keras base '{app}'; use one of {', '.join(KERAS_BASES)}")
            if c.pretrained and not c.weights:
                raise KilnError(f"base {c.base} needs its weights from a local file: --set "
                                "weights=PATH.weights.h5 (Kiln never downloads), or --set pretrained=false")
            if c.weights and not Path(c.weights).expanduser().is_file():
                raise KilnError(f"weights file not found: {c.weights}")
            if 0 < c.image_size < 32:
                raise KilnError(f"keras.applications bases need images of at least 32x32; "
                                f"image_size is {c.image_size} (try --set image_size=32)")
        else:
            c.base = self._base_version().ref  # pinned: the manifest records exactly which base was used
        super().setup(info)

    def _base_version(self):
        from kiln.store import Store

        version = Store(self.store).get(self.config.base)  # KilnError names the store and what to train
        shape = version.manifest["dataset"]["input_shape"]
        if len(shape) not in (2, 3):
            raise KilnError(f"base {version.ref} takes inputs {shape}, not images; pick a base "
                            "trained on images (a cnn)")
        return version

    def _base_shape(self) -> tuple[int, int, int]:
        """The stored base's picture shape (H, W, C), as its own plugin reshapes it."""
        shape = tuple(self._base_version().manifest["dataset"]["input_shape"])
        return shape if len(shape) == 3 else (*shape, 1)

    def image_view(self) -> tuple[int, int | None]:
        """A folder is read at the stored base's size and channels unless image_size says otherwise."""
        c = self.config
        if c.base.startswith("keras:"):
            return c.image_size or 32, c.image_channels()
        h, _, channels = self._base_shape()
        return c.image_size or h, c.image_channels() or (None if c.image_size else channels)

    def train_per_class(self):
        return self.config.labels_per_class or None

    @property
    def image_shape(self) -> tuple[int, ...]:
        shape = tuple(self.info.input_shape)
        return shape if len(shape) == 3 else (*shape, 1)

    def preprocess(self, x, y):
        return tf.reshape(tf.cast(x, "float32"), (-1, *self.image_shape)), y

    # -- the base ---------------------------------------------------------------------------
    def _stored_base(self) -> tuple[keras.Model, list]:
        from kiln import models

        base_plugin, base_model, _ = models.load(self.config.base, self.store)
        if not self.config.pretrained:
            base_model = base_plugin.build()  # same architecture, fresh random weights
        names = [layer.name for layer in base_model.layers]
        cut = "features" if "features" in names else names[-2]
        trunk = keras.Model(base_model.inputs, base_model.get_layer(cut).output, name="base_trunk")
        if not hasattr(base_plugin, "image_shape"):
            raise KilnError(f"base {self.config.base} is a {base_plugin.name} model, which does not "
                            "take pictures; pick a base trained on images (a cnn)")
        inputs = keras.Input(self.image_shape, name="image")
        x = self._fit_pictures(inputs, base_plugin.image_shape)
        # the base plugin's own input scaling (e.g. pixels / 255), as a layer of this model
        scaled = layers.Lambda(lambda t: base_plugin.preprocess(t, None)[0], name="base_scaling")(x)
        return keras.Model(inputs, trunk(scaled), name="base"), trunk.layers

    def _fit_pictures(self, x, shape: tuple[int, int, int]):
        """Resize and convert this dataset's pictures (pixels 0-255) to a base's input shape."""
        h, w, channels = shape
        if tuple(self.image_shape[:2]) != (h, w):
            x = layers.Resizing(h, w, name="resize_to_base")(x)
        if self.image_shape[-1] == 1 and channels == 3:
            x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
        elif self.image_shape[-1] == 3 and channels == 1:
            # ITU-R 601 luma, as PIL's convert("L") that made the base's grayscale pictures
            x = layers.Dense(1, use_bias=False, trainable=False, name="rgb_to_gray",
                             kernel_initializer=keras.initializers.Constant([[0.299], [0.587], [0.114]]))(x)
        return x

    def _keras_base(self) -> tuple[keras.Model, list]:
        c = self.config
        app_name = c.base.split(":", 1)[1]
        size = c.image_size or 32
        app = getattr(keras.applications, app_name)(
            include_top=False, weights=str(Path(c.weights).expanduser()) if c.pretrained else None,
            input_shape=(size, size, 3), pooling="avg")
        inputs = keras.Input(self.image_shape, name="image")
        x = self._fit_pictures(inputs, (size, size, 3))
        mode = KERAS_BASES[app_name]
        if mode == "tf":
            x = layers.Rescaling(1 / 127.5, offset=-1)(x)
        elif mode == "torch":
            x = layers.Rescaling(1 / 255.0)(x)
            x = layers.Normalization(mean=[0.485, 0.456, 0.406], variance=[0.229**2, 0.224**2, 0.225**2])(x)
        return keras.Model(inputs, app(x), name="base"), app.layers

    def build(self):
        c = self.config
        base, base_layers = self._keras_base() if c.base.startswith("keras:") else self._stored_base()
        weighted = [layer for layer in base_layers if layer.trainable_weights]
        if c.pretrained:
            tuned_layers = weighted[len(weighted) - c.fine_tune_layers:] if c.fine_tune_layers else []
        else:
            tuned_layers = weighted  # from scratch: everything trains from the first step
        for layer in weighted:
            layer.trainable = layer in tuned_layers
        features = keras.Input(base.output.shape[1:], name="features")
        x = layers.Dense(c.head_units, activation="relu", name="hidden")(features)
        x = layers.Dropout(c.dropout)(x)
        head = keras.Model(features, layers.Dense(self.info.num_classes, activation="softmax",
                                                  name="probabilities", dtype="float32")(x), name="head")
        tuned = [v for layer in tuned_layers for v in layer.trainable_weights]
        model = TransferModel(base, head, tuned, c.augment, name="transfer")
        model.compile(keras.optimizers.Adam(c.learning_rate),
                      keras.optimizers.Adam(c.fine_tune_lr if c.pretrained else c.learning_rate))
        model.fine_tuning.assign(1.0 if not c.pretrained or c.head_epochs == 0 else 0.0)
        return model

    def on_epoch_end(self, model, epoch, logs, rank):
        if self.config.pretrained and epoch == self.config.head_epochs and model.tuned:
            model.fine_tuning.assign(1.0)
            if rank == 0:
                from kiln.logs import say

                say(f"head trained for {epoch} epochs; now fine-tuning the base's top "
                    f"{self.config.fine_tune_layers} layer(s) at learning rate {self.config.fine_tune_lr}")

    # -- results ----------------------------------------------------------------------------
    def _predict(self, model, test):
        xs, ys, ps = [], [], []
        for x, y in test:
            xs.append(x.numpy())
            ys.append(y.numpy())
            ps.append(np.asarray(model.predict_on_batch(x)))
        return np.concatenate(xs), np.concatenate(ys), np.concatenate(ps)

    def evaluate(self, model, test):
        _, y, p = self._predict(model, test)
        loss = -np.mean(np.log(np.maximum(p[np.arange(len(y)), y.astype(int)], 1e-12)))
        return {"accuracy": float(np.mean(p.argmax(-1) == y)), "loss": float(loss)}

    def samples(self, model, test, out_dir: Path) -> list[Path]:
        x, y, p = self._predict(model, test)
        pred = p.argmax(-1)
        names, k = self.info.class_names or tuple(map(str, range(self.info.num_classes))), self.info.num_classes
        matrix = np.zeros((k, k), dtype=np.int64)
        np.add.at(matrix, (y.astype(int), pred), 1)
        first = np.arange(min(32, len(x)))
        return [confusion(matrix, names, out_dir / "confusion.png",
                          title=f"test accuracy {np.mean(pred == y):.4f}"),
                grid(x[first, ..., 0] / 255.0 if x.shape[-1] == 1 else x[first] / 255.0,
                     out_dir / "predictions.png", titles=[names[i] for i in pred[first]],
                     colors=["green" if a == b else "red" for a, b in zip(pred[first], y[first])],
                     title="test images with predicted class (red: wrong)")]

    # the same inputs, outputs and code as the cnn's classify (self.preprocess scales the pixels)
    classify = CNN.classify
