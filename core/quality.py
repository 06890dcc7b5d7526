"""Judge a generative model with a trained classifier from the store (``kiln evaluate``).

GANs have no likelihood to report, so Kiln measures their samples with its own classifier (by
default the ``cnn`` model trained on the same dataset), using only the public inference methods
of both plugins: the generator's ``sample`` and the classifier's ``classify``.

- conditional generators (``Plugin.condition`` names the class argument of ``sample``):
  **label accuracy**, the share of samples the classifier assigns to the requested class, over
  ``per_class`` samples of every class;
- unconditional generators: **confidence**, the mean max-softmax probability (crisp digits score
  near 1, blurry or garbled ones lower), and **coverage**, the entropy of the predicted-class
  histogram divided by log(#classes) (1.0: every class equally often; mode collapse drives it to 0).
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
          seed: int = 0) -> dict[str, float]:
    """The classifier-based metrics of a generative model (see the module docstring)."""
    judge_plugin, judge_model, _ = classifier
    k = judge_plugin.info.num_classes
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
