"""A user's own photos: `kiln train cnn` on a folder of class subfolders (the shared hymenoptera
ants/bees set, and a folder the test writes), on one process and on 2 Ray Train workers with
augmentation; class names from the folder names end to end (manifest, classify, `kiln models`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_kiln
from test_data import write_folder

pytestmark = [pytest.mark.slow]
HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"


@pytest.fixture(scope="module", autouse=True)
def own_ray():
    """Ray Train starts a local Ray in this process: stopped when the module is done."""
    yield
    import ray

    ray.shutdown()


def photo(path: Path, shape):
    from kiln.images import decode

    return decode(path.read_bytes(), (None, *shape), source=str(path))[None]


@pytest.mark.ray
def test_cnn_learns_ants_and_bees_on_two_ray_workers_with_augmentation(workdir):
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
    out = run_kiln("train", "cnn", "--dataset", str(folder), "--set", "image_size=24", "--epochs", "2",
                   "--batch-size", "4", cwd=workdir)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"preparing image folder {folder}: 16 pictures at 24x24, RGB" in out.stdout
    manifest = json.loads((workdir / "store" / "cnn" / "1" / "manifest.json").read_text())
    assert manifest["dataset"]["class_names"] == ["cats", "dogs"]
    assert manifest["dataset"]["name"] == f"{folder}?size=24"
    assert manifest["dataset"]["extra"]["split"] == "20% of each class as the test split (seed 0)"
    # the two colours are trivially apart: two epochs learn them
    assert manifest["metrics"]["accuracy"] == 1.0, manifest["metrics"]
    again = run_kiln("evaluate", "cnn", cwd=workdir)
    assert again.returncode == 0 and "accuracy=1.0000" in again.stdout, again.stderr[-2000:]
    assert "prepar" not in again.stdout  # read from the cache, not decoded again
    bad = run_kiln("train", "cnn", "--dataset", str(folder / "cats"), cwd=workdir)  # pictures, no classes
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
    out = run_kiln("train", "vae", "--dataset", str(folder), "--set", "image_size=30", cwd=workdir)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "a multiple of 4" in out.stderr and "[30, 30, 3]" in out.stderr, out.stderr
