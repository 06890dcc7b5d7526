"""A user's own photos: `kiln train cnn` on a folder of class subfolders (the shared hymenoptera
ants/bees set, and a folder the test writes), on one process and on 2 Ray Train workers with
augmentation; class names from the folder names end to end (manifest, classify, `kiln models`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers import HYMENOPTERA, kiln_here, run_kiln, write_folder

pytestmark = [pytest.mark.slow]


def photo(path: Path, shape):
    from kiln.images import decode

    return decode(path.read_bytes(), (None, *shape), source=str(path))[None]


@pytest.mark.ray
def test_cnn_learns_ants_and_bees_on_two_ray_workers_with_augmentation(workdir, shared_ray):
    """The hymenoptera photos (JPEGs of many sizes) at 32 px on 2 Ray Train workers, with random
    flips, shifts and rotations in training: the stored model names its classes, answers
    "ants"/"bees" for a real photo, and its augmentation is off at inference (the same photo
    twice, the same answer)."""
    from kiln import models, run

    assert HYMENOPTERA.is_dir(), f"{HYMENOPTERA} is missing (see ../shared/data/MANIFEST.md)"
    spec = run.plan("cnn", dataset=str(HYMENOPTERA), workers=2, epochs=2, batch_size=32,
                    overrides={"image_size": "32", "augment": "flip,crop,rotate"},
                    store=workdir / "store", runs_dir=workdir / "runs")
    version = run.train(spec)
    d = version.manifest["dataset"]
    assert d["class_names"] == ["ants", "bees"] and d["input_shape"] == [32, 32, 3]
    assert (d["train_size"], d["test_size"]) == (245, 153)
    assert 0.0 <= version.manifest["metrics"]["accuracy"] <= 1.0
    assert (version.path / "artifacts" / "predictions.png").is_file()
    plugin, model, _ = models.load(version.ref, workdir / "store")
    bee = photo(next((HYMENOPTERA / "val" / "bees").glob("*.jpg")), (32, 32, 3))
    first, again = (plugin.infer(model, "classify", {"images": bee}) for _ in range(2))
    assert first["labels"][0] in ("ants", "bees") and first["probabilities"] == again["probabilities"]


def test_kiln_train_on_a_folder_then_models_and_evaluate(workdir):
    """What a user types, on a folder of their own (JPEG and PNG, colour and grayscale)."""
    folder = write_folder(workdir / "pets", n=8)
    out = kiln_here("train", "cnn", "--dataset", str(folder), "--set", "image_size=24", "--epochs", "2",
                   "--batch-size", "4", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"preparing image folder {folder}: 16 pictures at 24x24, RGB" in out.stdout
    manifest = json.loads((workdir / "store" / "cnn" / "1" / "manifest.json").read_text())
    assert manifest["dataset"]["class_names"] == ["cats", "dogs"]
    assert manifest["dataset"]["name"] == f"{folder}?size=24"
    assert manifest["dataset"]["extra"]["split"] == "20% of each class as the test split (seed 0)"
    # red and blue are apart, the grey pictures less so: more than chance on the 4 test pictures,
    # and `kiln evaluate` gives the stored model's figure again
    accuracy = manifest["metrics"]["accuracy"]
    assert accuracy >= 0.75, manifest["metrics"]
    again = run_kiln("evaluate", "cnn", cwd=workdir)
    assert again.returncode == 0 and f"accuracy={accuracy:.4f}" in again.stdout, again.stderr[-2000:]
    assert "prepar" not in again.stdout  # read from the cache, not decoded again
    bad = kiln_here("train", "cnn", "--dataset", str(folder / "cats"), cwd=workdir)  # pictures, no classes
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "holds no class subfolders with pictures" in bad.stderr and "one subfolder per class" in bad.stderr


@pytest.mark.parametrize("plugin, picture, method, args", [
    ("autoencoder", "reconstructions.png", "reconstruct", None),
    ("vae", "manifold.png", "reconstruct", None),
    ("dcgan", "samples.png", "sample", {"n": 2}),
    ("cgan", "samples.png", "sample", {"digit": 1, "n": 2}),
])
def test_every_generative_plugin_models_the_colour_pictures_of_a_folder(workdir, plugin, picture, method, args):
    """The autoencoder, the VAE and both GANs take the folder's shape (32x32 RGB here) instead of
    28x28 grayscale: they train, store their pictures, and make colour pictures of that size."""
    from kiln import models, run

    folder = write_folder(workdir / "pets", n=8)
    version = run.train(run.plan(plugin, dataset=str(folder), epochs=1, batch_size=8,
                                 overrides={"image_size": "32", **({"sample_every": "0"} if "gan" in plugin else {})},
                                 store=workdir / "store", runs_dir=workdir / "runs"))
    assert version.manifest["dataset"]["input_shape"] == [32, 32, 3]
    assert (version.path / "artifacts" / picture).stat().st_size > 1000
    plugin_, model, _ = models.load(version.ref, workdir / "store")
    args = args or {"images": photo(folder / "cats" / "0.jpg", (32, 32, 3))}
    out = plugin_.infer(model, method, args)
    assert np.asarray(out["images"]).shape[1:] == (32, 32, 3)


def test_a_picture_size_the_networks_cannot_halve_twice_is_one_clear_line(workdir):
    folder = write_folder(workdir / "pets", n=4)
    out = kiln_here("train", "vae", "--dataset", str(folder), "--set", "image_size=30", cwd=workdir)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "a multiple of 4" in out.stderr and "[30, 30, 3]" in out.stderr, out.stderr


def test_transfer_reuses_a_cnn_trained_on_photos_at_its_size_with_augmentation(workdir):
    """`kiln train transfer --dataset FOLDER` with a cnn trained on those photos as the base: the
    folder is read at the base's size and channels without being told, training flips and shifts
    the pictures (off at inference), and the stored model answers with the folder's class names.
    Asked for another size and channels, the model resizes and converts to the base's input."""
    from kiln import models, run

    folder = write_folder(workdir / "pets", n=12)
    common = dict(dataset=str(folder), batch_size=4, store=workdir / "store", runs_dir=workdir / "runs")
    run.train(run.plan("cnn", epochs=2, overrides={"image_size": "24"}, **common))
    spec = run.plan("transfer", epochs=8, **common,
                    overrides={"augment": "flip,crop", "labels_per_class": "0", "head_epochs": "4"})
    assert spec.dataset == f"{folder}?size=24&channels=3"  # the base's view of the folder
    version = run.train(spec)
    d = version.manifest["dataset"]
    assert d["class_names"] == ["cats", "dogs"] and d["input_shape"] == [24, 24, 3]
    assert version.manifest["config"]["base"] == "cnn:1"
    history = version.manifest["history"]
    assert history[-1]["loss"] < history[0]["loss"] / 1.5, history
    # red and dark-gray cats, blue and light-gray dogs: seeds 0-3, oneDNN on or off, all get 1.0
    assert version.manifest["metrics"]["accuracy"] == 1.0, version.manifest["metrics"]
    plugin, model, _ = models.load(version.ref, workdir / "store")
    assert [layer.name for layer in model.augment] == ["random_flip", "random_shift"]
    cat = photo(folder / "cats" / "0.jpg", (24, 24, 3))
    first, again = (plugin.infer(model, "classify", {"images": cat}) for _ in range(2))
    assert first["labels"] == ["cats"] and first["probabilities"] == again["probabilities"]

    other = run.plan("transfer", epochs=1, name="gray", **common,
                     overrides={"image_size": "32", "channels": "grayscale", "labels_per_class": "0"})
    assert other.dataset == f"{folder}?size=32&channels=1"
    gray = run.train(other)
    assert gray.manifest["dataset"]["input_shape"] == [32, 32, 1]
    plugin, model, _ = models.load(gray.ref, workdir / "store")
    names = [layer.name for layer in model.base.layers]
    assert "resize_to_base" in names and "gray_to_rgb" in names
    out = plugin.infer(model, "classify", {"images": photo(folder / "dogs" / "1.jpg", (32, 32, 1))})
    assert out["labels"][0] in ("cats", "dogs") and abs(sum(out["probabilities"][0]) - 1) < 1e-4


def test_transfer_converts_colour_photos_for_a_grayscale_base_as_the_decoder_does(tmp_path):
    """A base trained on grayscale pictures sees an RGB photo as Kiln's decoder would have made
    it gray (PIL's ITU-R 601 luma), resized to the base's side: the same pixels either way."""
    import keras
    from PIL import Image

    from kiln import DatasetInfo
    from kiln.images import decode
    from kiln.plugins.transfer import Transfer

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "p.png")
    rgb = decode((tmp_path / "p.png").read_bytes(), (None, 40, 40, 3))
    gray = decode((tmp_path / "p.png").read_bytes(), (None, 40, 40, 1))
    plugin = Transfer(base="keras:MobileNetV2", pretrained=False)
    plugin.info = DatasetInfo(name="photos", input_shape=(40, 40, 3), num_classes=2)
    inputs = keras.Input((40, 40, 3))
    converted = keras.Model(inputs, plugin._fit_pictures(inputs, (40, 40, 1)))(rgb[None])
    np.testing.assert_allclose(np.asarray(converted)[0], gray, atol=1.0)
    resized = keras.Model(inputs, plugin._fit_pictures(inputs, (20, 20, 1)))(rgb[None])
    assert np.asarray(resized).shape == (1, 20, 20, 1)
