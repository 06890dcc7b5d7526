"""What the test suite's short runs no longer check: how good a model gets on real data. Each
row trains the run a test used to train (the same plugin, data, size and epochs), in this
process, and prints the figure beside the bar that test held it to. The suite checks that these
runs work and that their figures are stored and shown; this script checks that they are good.

    .venv/bin/python bench/quality.py [--only NAME ...]

Exit status 1 when a figure misses its bar (the table says which).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from judge import JUDGE  # bench/judge.py


def _train(root: Path, plugin: str, **kw):
    from kiln import run

    return run.train(run.plan(plugin, store=root / "store", runs_dir=root / "runs", **kw))


def cnn_judge(root: Path) -> list[tuple[str, float, str, bool]]:
    """The default cnn's short run (test_generative's former judge)."""
    v = _train(root, "cnn", epochs=1, limit=12000)
    acc = v.manifest["metrics"]["accuracy"]
    return [("cnn, 1 epoch on 12,000 MNIST: test accuracy", acc, "> 0.85", acc > 0.85)]


def autoencoder(root: Path):
    from kiln import data, models

    v = _train(root, "autoencoder", epochs=3, limit=12000)
    gain = v.manifest["metrics"]["psnr_gain"]
    plugin, model, _ = models.load(v.ref, root / "store")
    x = np.stack([a.numpy() for a, _ in data.load("mnist", "test", limit=8).ds]).reshape(8, 28, 28, 1)
    out = plugin.infer(model, "reconstruct", {"images": x, "gaussian_std": 0.4, "salt_pepper": 0.1, "seed": 5})
    clean = x / 255.0
    ratio = float(np.mean((out["images"] - clean) ** 2) / np.mean((out["noisy"] - clean) ** 2))
    return [("autoencoder, 3 epochs on 12,000: PSNR gain (dB)", gain, "> 3.0", gain > 3.0),
            ("autoencoder: output MSE / noisy MSE to the clean digits", ratio, "< 0.5", ratio < 0.5)]


def cgan(root: Path):
    from kiln import models, quality

    # judged, as when the bars were set, by the keras-io network after the cnn row's short run
    judged = root / "judged"
    if not (judged / "store" / "cnn").is_dir():
        _train(judged, "cnn", epochs=1, limit=12000, overrides=JUDGE)
    v = _train(judged, "cgan", epochs=3, limit=12800, overrides={"sample_every": "0"})
    acc = v.manifest["metrics"]["label_accuracy"]
    plugin, model, _ = models.load(v.ref, judged / "store")
    judge = quality.classifier_for(plugin, None, judged / "store")
    sevens = plugin.infer(model, "sample", {"digit": 7, "n": 200, "seed": 1})["images"]
    classes = np.asarray(judge[0].infer(judge[1], "classify", {"images": sevens * 255})["classes"])
    share = float(np.mean(classes == 7))
    top = int(np.bincount(classes, minlength=10).argmax())
    return [("cgan, 3 epochs on 12,800: label accuracy by the cnn", acc, "> 0.25", acc > 0.25),
            ("cgan: share of 200 samples asked as 7 read as 7", share, "most common class is 7", top == 7)]


def har(root: Path):
    from kiln import models

    v = _train(root, "har", epochs=2)
    acc = v.manifest["metrics"]["accuracy"]
    plugin, model, _ = models.load(v.ref, root / "store")
    ex = plugin.infer(model, "examples", {})
    right = plugin.infer(model, "classify", {"windows": ex["windows"]})["labels"]
    picked = float(np.mean([p == t for p, t in zip(right, ex["labels"])]))
    return [("har, 2 epochs on sp_sw_har: accuracy on unseen subjects", acc, "> 0.75", acc > 0.75),
            ("har: the gallery's example windows classified right", picked, "> 0.5", picked > 0.5)]


CHECKS = {"cnn": cnn_judge, "autoencoder": autoencoder, "cgan": cgan, "har": har}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run only these checks")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="kiln-bench-quality-"))
    rows = []
    for name in args.only or list(CHECKS):
        t0 = time.perf_counter()
        for row in CHECKS[name](root):
            rows.append((*row, time.perf_counter() - t0))
    print(f"\n{'check':<62} {'figure':>8}  {'bar':<24} {'ok':<3} {'s':>5}")
    for what, figure, bar, ok, seconds in rows:
        print(f"{what:<62} {figure:>8.3f}  {bar:<24} {'yes' if ok else 'NO':<3} {seconds:>5.0f}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
