"""Judge a generative model with a trained classifier from the store (``kiln evaluate``).

GANs have no likelihood to report, so Kiln measures their samples with its own classifier (by
default the ``cnn`` model trained on the same dataset), using only the public inference methods
of both plugins: the generator's ``sample`` and the classifier's ``classify``.

- conditional generators (``Plugin.condition`` names the class argument of ``sample``):
  **label accuracy**, the share of samples the classifier assigns to the requested class, over
  ``per_class`` samples of every class;
- unconditional generators: **confidence**, the mean max-softmax probability (crisp digits score
  near 1, blurry or garbled ones lower), and **coverage**, the entropy of the predicted-class
  histogram divided by log(#classes) (1.0: every class equally often; mode collapse drives it to 0);
- any generator, on any data (``kiln evaluate``): the **Fréchet distance** between the generated
  and the real test images in the classifier's feature space, FID's method with the stored
  classifier's penultimate layer in place of Inception (whose weights cannot be downloaded here),
  beside its floor: the same distance between real test and real training images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from kiln.plugin import KilnError, Plugin

CHUNK = 500


def classifier_for(plugin: Plugin, ref: str | None, store: str | Path | None) -> tuple[Plugin, Any, str]:
    """Load the classifier named by ``ref`` (default: the plugin's ``judged_by``) and check it
    can judge this plugin's samples; KilnError says what to train or pass instead."""
    from kiln import models
    from kiln.store import Store, parse_ref

    if "sample" not in plugin.methods():
        raise KilnError(f"plugin '{plugin.name}' has no 'sample' method for a classifier to judge")
    ref = ref or plugin.judged_by
    if not ref:
        raise KilnError(f"plugin '{plugin.name}' names no classifier to judge its samples; "
                        "pass --classifier NAME[:VERSION]")
    what = "label accuracy" if plugin.condition else "sample confidence and coverage"
    name, _ = parse_ref(ref)
    found = Store(store)
    if not found.versions(name):
        raise KilnError(f"the {what} of '{plugin.name}' is measured with a trained classifier, but "
                        f"there is no model '{name}' in store {found.spec}; train one with "
                        f"`kiln train cnn --dataset {plugin.info.name}` or pass --classifier NAME[:VERSION]")
    judge, model, version = models.load(ref, store)
    if "classify" not in judge.methods():
        raise KilnError(f"model {version.ref} (plugin '{judge.name}') has no 'classify' method; "
                        "pass a classifier with --classifier NAME[:VERSION]")
    if judge.info.name != plugin.info.name:
        raise KilnError(f"classifier {version.ref} was trained on '{judge.info.name}' but "
                        f"'{plugin.name}' generates '{plugin.info.name}' images; pass a classifier "
                        "trained on the same data with --classifier NAME[:VERSION]")
    return judge, model, version.ref


def _sample(plugin: Plugin, model: Any, n: int, seed: int, **extra: Any) -> np.ndarray:
    """n images in [0, 1] from the plugin's public ``sample`` method, in validated chunks."""
    out, made = [], 0
    while made < n:
        k = min(CHUNK, n - made)
        out.append(np.asarray(plugin.infer(model, "sample", {"n": k, "seed": seed + made, **extra})["images"]))
        made += k
    return np.concatenate(out)


def _classify(judge: Plugin, model: Any, images: np.ndarray) -> np.ndarray:
    shape = tuple(judge.info.input_shape)
    if int(np.prod(images.shape[1:])) != int(np.prod(shape)):
        raise KilnError(f"the classifier takes images of shape {list(shape)}; the generator makes "
                        f"{list(images.shape[1:])}")
    x = np.clip(images, 0.0, 1.0).reshape(-1, *shape) * 255.0
    probs = [np.asarray(judge.infer(model, "classify", {"images": x[i:i + CHUNK]})["probabilities"])
             for i in range(0, len(x), CHUNK)]
    return np.concatenate(probs)


def judge(plugin: Plugin, model: Any, classifier: tuple[Plugin, Any, str], *, per_class: int = 1000,
          limit: int | None = None, seed: int = 0) -> dict[str, float]:
    """The classifier-based metrics of a generative model (see the module docstring). A model
    trained with ``limit`` (``--limit``: that many examples of each split) is judged on as many
    samples as its test split holds, when that is fewer."""
    judge_plugin, judge_model, _ = classifier
    k = judge_plugin.info.num_classes
    if limit:
        per_class = max(1, min(per_class, -(-limit // k)))
    if plugin.condition:
        correct, worst, confidence = 0, 1.0, 0.0
        for c in range(k):
            probs = _classify(judge_plugin, judge_model,
                              _sample(plugin, model, per_class, seed + 7919 * c, **{plugin.condition: c}))
            hit = float(np.mean(probs.argmax(axis=1) == c))
            correct += hit * per_class
            worst = min(worst, hit)
            confidence += float(probs.max(axis=1).mean()) / k
        return {"label_accuracy": correct / (k * per_class), "label_accuracy_worst_class": worst,
                "confidence": confidence}
    probs = _classify(judge_plugin, judge_model, _sample(plugin, model, per_class * k, seed))
    hist = np.bincount(probs.argmax(axis=1), minlength=k) / len(probs)
    entropy = float(-np.sum(hist[hist > 0] * np.log(hist[hist > 0])))
    return {"confidence": float(probs.max(axis=1).mean()), "class_entropy": entropy,
            "coverage": entropy / math.log(k)}


def features_of(judge: Plugin, model: Any) -> tuple[Any, str]:
    """The classifier's penultimate layer as a function of pixels (0-255): what its last layer
    (the softmax head) reads, and a line naming it for the report."""
    import keras

    head = model.layers[-1]
    try:
        # from the input tensor itself when there is one: a model built on the list of inputs
        # warned on every call with a tensor that the input structure did not match
        inner = keras.Model(model.inputs[0] if len(model.inputs) == 1 else model.inputs, head.input)
    except (AttributeError, ValueError, TypeError):
        raise KilnError(f"the classifier (plugin '{judge.name}') is no functional Keras model whose last "
                        "layer is its head; pass another with --classifier NAME[:VERSION]") from None
    width = int(np.prod(inner.output.shape[1:]))

    def embed(pixels: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), CHUNK):
            x, _ = judge.preprocess(pixels[i:i + CHUNK].reshape(-1, *judge.info.input_shape), None)
            out.append(np.asarray(inner(x, training=False), dtype="float64").reshape(len(x), -1))
        return np.concatenate(out)

    return embed, f"the input of its layer '{head.name}' ({width} features)"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b`` (n, d):
    |mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^1/2). The trace of the root is taken as the sum of
    the square roots of the eigenvalues of C_a^1/2 C_b C_a^1/2, a symmetric matrix: stable where
    scipy's sqrtm of the product returns complex noise."""
    a, b = np.asarray(a, "float64"), np.asarray(b, "float64")
    mu = a.mean(axis=0) - b.mean(axis=0)
    ca, cb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = np.linalg.eigvalsh(root_a @ cb @ root_a)
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2.0 * np.sum(np.sqrt(np.clip(middle, 0, None))))


def frechet(plugin: Plugin, model: Any, classifier: tuple[Plugin, Any, str], *, n: int = 5000,
            limit: int | None = None, seed: int = 0) -> tuple[dict[str, float], str]:
    """The Fréchet distance of ``n`` generated images to ``n`` real test images in the
    classifier's features (``fid``), and of those test images to ``n`` real training images
    (``fid_floor``: what a perfect generator would score with this many images); with a line
    saying what was measured. A model trained with ``limit`` is measured on at most that many."""
    from kiln import data

    n = min(n, limit or n)
    judge_plugin, judge_model, ref = classifier
    name = plugin.info.name
    test = data.load(name, "test", limit=n)
    train = data.load(name, "train", limit=n)
    real = np.stack([x.numpy() for x, _ in test.ds]).astype("float32")
    other = np.stack([x.numpy() for x, _ in train.ds]).astype("float32")
    n = min(n, len(real), len(other))
    if plugin.condition:  # every class equally often, as the real images nearly are
        k = judge_plugin.info.num_classes
        made = np.concatenate([_sample(plugin, model, -(-n // k), seed + 7919 * c, **{plugin.condition: c})
                               for c in range(k)])[:n]
    else:
        made = _sample(plugin, model, n, seed)
    _classify(judge_plugin, judge_model, made[:1])  # the same shape check as the other metrics
    embed, what = features_of(judge_plugin, judge_model)
    real_f = embed(real[:n])
    metrics = {"fid": frechet_distance(embed(np.clip(made, 0, 1) * 255.0), real_f),
               "fid_floor": frechet_distance(real_f, embed(other[:n]))}
    return metrics, (f"Fréchet distance of {n} generated to {n} test images in the features of {ref}, "
                     f"{what}; fid_floor: {n} test to {n} training images")
