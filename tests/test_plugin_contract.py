"""The plugin contract: typed configs with validation, inference schemas, error messages."""

import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from kiln import DatasetInfo, KilnError, Scalar, Tensor, inference, make_config, param
from kiln.plugins.cnn import CNN, CNNConfig


def test_config_defaults_and_overrides_from_strings():
    c = make_config(CNNConfig, {"filters": "16,32,64", "dropout": "0.25", "kernel_size": "5"})
    assert c.filters == (16, 32, 64) and c.dropout == 0.25 and c.kernel_size == 5
    assert make_config(CNNConfig).filters == (16, 32)


@pytest.mark.parametrize("overrides, words", [
    ({"dropuot": "0.1"}, ["unknown config key 'dropuot'", "dropout", "filters"]),
    ({"dropout": "abc"}, ["'dropout'", "float"]),
    ({"dropout": "1.5"}, ["'dropout'", "<= 0.95"]),
    ({"kernel_size": "2.5"}, ["'kernel_size'", "int"]),
    ({"filters": "32,x"}, ["'filters'", "comma-separated ints"]),
    ({"learning_rate": "nan"}, ["'learning_rate'"]),
])
def test_bad_config_is_rejected_naming_the_key(overrides, words):
    with pytest.raises(KilnError) as e:
        make_config(CNNConfig, overrides)
    for w in words:
        assert w in str(e.value)


def test_config_validate_hook():
    @dataclass
    class C:
        low: int = param(1)
        high: int = param(2)

        def validate(self):
            if self.low >= self.high:
                raise ValueError("low must be below high")

    with pytest.raises(KilnError, match="low must be below high"):
        make_config(C, {"low": "5"})


def test_tensor_schema_validates_shape_range_and_finiteness():
    info = DatasetInfo("mnist", (28, 28, 1), 10)
    t = Tensor(shape=(None, "input"), min=0, max=255)
    assert t.validate("images", np.zeros((2, 28, 28, 1)), info).shape == (2, 28, 28, 1)
    assert t.validate("images", np.zeros((28, 28, 1)), info).shape == (1, 28, 28, 1)  # one example
    for bad, msg in [(np.zeros((2, 27, 28, 1)), "shape"), (np.full((1, 28, 28, 1), np.nan), "NaN"),
                     (np.full((1, 28, 28, 1), 300.0), "above 255"), ("abc", "numeric"),
                     # JSON booleans are no pixel values, even beside numbers (numpy reads them as 1)
                     ([[[[True]] * 28] * 28], "numeric"), ([[[[1.5]] * 27 + [[False]]] * 28], "numeric")]:
        with pytest.raises(KilnError, match=msg):
            t.validate("images", bad, info)


def test_scalar_schema():
    info = DatasetInfo("mnist", (28, 28, 1), 10)
    s = Scalar(int, default=4, min=1, max=64)
    assert s.validate("n", None, info) == 4
    with pytest.raises(KilnError, match="'n'"):
        s.validate("n", 1000, info)
    with pytest.raises(KilnError, match="'n'"):
        s.validate("n", "7", info)
    # JSON's types as the schema states them: a prompt of false is no prompt "False"
    with pytest.raises(KilnError, match="argument 'prompt' must be a string, got bool"):
        Scalar(str).validate("prompt", False, info)
    with pytest.raises(KilnError, match="argument 'n' must be an integer, got bool"):
        s.validate("n", True, info)
    assert s.validate("n", 7.0, info) == 7 and Scalar(float).validate("t", 1, info) == 1.0


def test_plugin_declares_inference_methods():
    methods = CNN.methods()
    assert list(methods) == ["classify", "features"]
    desc = methods["classify"].describe(DatasetInfo("mnist", (28, 28, 1), 10))
    assert desc["inputs"]["images"]["x-shape"] == [None, 28, 28, 1]
    assert "probabilities" in desc["outputs"]


def test_cnn_features_are_its_first_convolution():
    """The gallery's 'inside the CNN' view: kernels and ReLU feature maps of a chosen layer."""
    from kiln.models import build as build_model

    plugin = CNN()
    plugin.setup(DatasetInfo("mnist", (28, 28, 1), 10, tuple(map(str, range(10)))))
    model = build_model(plugin)
    image = np.random.default_rng(0).integers(0, 256, (1, 28, 28, 1)).astype("float32")
    with warnings.catch_warnings():  # Keras warned on every call that the input structure differed
        warnings.simplefilter("error")
        out = plugin.infer(model, "features", {"images": image})
    kernels, maps = np.asarray(out["kernels"]), np.asarray(out["maps"])
    assert kernels.shape == (16, 3, 3) and maps.shape == (1, 26, 26, 16) and maps.min() >= 0
    np.testing.assert_allclose(kernels, np.asarray(model.get_layer("conv1").kernel)[:, :, 0].transpose(2, 0, 1), atol=1e-5)
    last = np.asarray(plugin.infer(model, "features", {"images": image, "layer": 4})["maps"])
    assert last.shape == (1, 8, 8, 32) and last.min() >= 0  # two blocks of two, after their ReLU
    with pytest.raises(KilnError, match="'layer' must be 1..4"):
        plugin.infer(model, "features", {"images": image, "layer": 5})


@pytest.mark.parametrize("side, fits", [(24, True), (16, True), (12, False)])
def test_a_cnn_says_which_picture_size_its_convolutions_need(side, fits):
    plugin = CNN()
    info = DatasetInfo("photos", (side, side, 3), 2, ("ants", "bees"))
    if fits:
        plugin.setup(info)
        return
    with pytest.raises(KilnError, match=r"at least 16 pixels a side.*image_size=16"):
        plugin.setup(info)


@pytest.mark.parametrize("plugin_name, shape", [("cnn", (28, 28)), ("vae", (28, 28, 1)),
                                                 ("autoencoder", (32, 32, 3))])
def test_a_served_batch_is_scaled_without_tensorflow_to_the_same_pixels(plugin_name, shape):
    """A request's pixels arrive as numpy: scaling them with TensorFlow's eager ops cost 0.2 ms of
    every one-image call. numpy's float32 arithmetic must give the model the very same values as
    the TensorFlow path that training and export use."""
    import tensorflow as tf

    from kiln import registry

    plugin = registry.get(plugin_name)()
    plugin.setup(DatasetInfo("pictures", shape, 10, tuple(map(str, range(10)))))
    pixels = np.arange(2 * int(np.prod(shape))) % 256
    for raw in (pixels.astype("float32"), pixels.astype("uint8"), pixels.astype("float32") + 0.37):
        batch = raw.reshape(2, *shape)
        served, _ = plugin.preprocess(batch, None)
        trained, _ = plugin.preprocess(tf.constant(batch), None)
        assert isinstance(served, np.ndarray) and served.dtype == np.float32
        assert served.shape == tuple(trained.shape)
        np.testing.assert_array_equal(served, trained.numpy())


def test_methods_are_listed_once_per_plugin_class():
    """Every served call asked for the plugin's methods, and listing them walked the class with
    inspect (0.03 ms a call): the listing is made once per class, and a subclass has its own."""
    assert CNN.methods() is CNN.methods()

    class MoreCNN(CNN):
        @inference(images=Tensor(shape=(None, "input")))
        def count(self, model, images):
            """How many images."""
            return {"n": len(images)}

    assert "count" in MoreCNN.methods() and "count" not in CNN.methods()


def test_optional_tensor_passes_none_and_required_one_says_what_is_missing():
    info = DatasetInfo("mnist", (28, 28, 1), 10)
    assert Tensor(shape=(None,), optional=True).validate("z_a", None, info) is None
    with pytest.raises(KilnError, match="missing required argument 'images'"):
        Tensor().validate("images", None, info)


def test_every_builtin_plugin_builds_and_documents_its_methods():
    from kiln import registry
    from kiln.models import build as build_model

    images = DatasetInfo("mnist", (28, 28, 1), 10, tuple(map(str, range(10))), 60000, 10000)
    windows = DatasetInfo("sp_sw_har", (128, 6), 5, tuple("abcde"), 2000, 500,
                          {"channel_mean": [0.0] * 6, "channel_std": [1.0] * 6,
                           "magnitude_mean": [1.0, 1.0], "magnitude_std": [1.0, 1.0]})
    text = DatasetInfo("tiny_shakespeare", (100,), 3, ("a", "b", "\n"), 100, 10, {"text": True})
    expected = {"cnn": {"classify", "features"}, "autoencoder": {"reconstruct", "encode", "decode"},
                "vae": {"sample", "reconstruct", "encode", "decode", "interpolate", "neighbours",
                        "arithmetic", "latent_map"},
                "dcgan": {"sample", "interpolate"}, "cgan": {"sample", "interpolate"},
                "diffusion": {"sample", "trajectory"},
                "har": {"classify", "examples"}, "lstm": {"generate", "score"}, "gpt": {"generate", "score", "attention"},
                "transfer": {"classify"}}
    assert set(expected) == {e.name for e in registry.entries() if e.source.startswith("kiln.plugins.")}
    for name, methods in expected.items():
        cls = registry.get(name)
        assert set(cls.methods()) == methods, name
        # transfer's default base comes from the store; a keras.applications base needs none
        plugin = cls(base="keras:MobileNetV2", pretrained=False) if name == "transfer" else cls()
        info = {"har": windows, "lstm": text, "gpt": text}.get(name, images)
        plugin.setup(info)
        assert build_model(plugin).count_params() > 0
        for m in cls.methods().values():
            assert m.doc and m.outputs, f"{name}.{m.name} needs a docstring and described outputs"
            assert isinstance(m.describe(info)["inputs"], dict)  # {} for methods without arguments
    assert registry.get("cgan").condition == "digit" and registry.get("dcgan").judged_by == "cnn"
    assert registry.get("diffusion").condition == "digit" and registry.get("diffusion").judged_by == "cnn"


def test_a_plugin_author_imports_kilns_api_from_kiln_alone():
    """Everything a plugin uses, the picture helpers and the pictures base class included, comes
    from ``kiln``: the built-ins, which a plugin author copies from, import them from nowhere
    else. Importing kiln stays light (tests/test_boundaries.py)."""
    import re

    import kiln
    from helpers import ROOT

    for name in kiln.__all__:
        assert getattr(kiln, name) is not None, name
    assert issubclass(kiln.Pictures, kiln.Plugin) and callable(kiln.grid)
    for path in sorted((ROOT / "plugins").glob("*.py")):
        elsewhere = re.findall(r"^from kiln\.(?:images|plugins) import .+$", path.read_text(), re.M)
        assert not elsewhere, (path.name, elsewhere)


def test_a_cnn_stored_before_its_blocks_and_dense_layer_loads_as_the_network_it_was(tmp_path):
    """Upgrading Kiln keeps a store's cnn: a manifest without convs, hidden and schedule was
    written when every cnn was the keras-io network, and it loads as that network, answering
    what it answered."""
    import keras
    from keras import layers

    from kiln import models
    from kiln.store import WEIGHTS, Store

    info = DatasetInfo("mnist", (28, 28), 10, tuple(map(str, range(10))))
    keras.utils.set_random_seed(0)
    inputs = keras.Input((28, 28, 1), name="image")  # the network as the earlier build_cnn made it
    x = layers.Conv2D(32, 3, activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = layers.Conv2D(64, 3, activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.Dropout(0.5)(layers.Flatten(name="features")(x))
    earlier = keras.Model(inputs, layers.Dense(10, activation="softmax", name="probabilities")(x))
    config = {"filters": [32, 64], "kernel_size": 3, "dropout": 0.5, "learning_rate": 0.001,
              "augment": ["none"], "image_size": 64, "channels": "auto", "skip_broken": False}

    def write(tmp):
        earlier.save_weights(tmp / WEIGHTS)
        return {"plugin": "cnn", "config": config, "dataset": info.to_dict(), "metrics": {}}

    Store(tmp_path).save("cnn", write)
    plugin, model, _ = models.load("cnn:1", tmp_path)
    assert (plugin.config.convs, plugin.config.hidden) == (1, 0)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype("float32")
    np.testing.assert_allclose(plugin.classify(model, images)["probabilities"],
                               earlier.predict_on_batch(images[..., None] / 255.0), atol=1e-5)
