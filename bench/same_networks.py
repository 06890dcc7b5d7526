"""Does a change leave the built-in MNIST networks as they were? For each of an earlier commit and
this checkout, side by side in one run: build every image plugin for MNIST with seed 0, and take
one training step on the same fixed batch with seed 1. Prints, per plugin, whether the parameter
count, the variables' shapes, the initial weights and the first step's losses are the same.

Same everywhere means any difference in a trained model's figures is run-to-run noise (thread
scheduling, data order), not the change.

    .venv/bin/python bench/same_networks.py --against ad3b2b6
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("cnn", "autoencoder", "vae", "dcgan", "cgan")

FINGERPRINT = r"""
import hashlib, json, sys
import keras, numpy as np, tensorflow as tf
from kiln import registry
from kiln.plugin import DatasetInfo

info = DatasetInfo(name="mnist", input_shape=(28, 28), num_classes=10,
                   class_names=tuple(map(str, range(10))), train_size=60000, test_size=10000)
rng = np.random.default_rng(0)
x = rng.integers(0, 256, size=(16, 28, 28)).astype("float32")
y = rng.integers(0, 10, size=(16,)).astype("int64")
out = {}
for name in sys.argv[1:]:
    keras.utils.set_random_seed(0)
    plugin = registry.get(name)()
    plugin.total_steps = 100
    plugin.setup(info)
    model = plugin.build()
    digest = hashlib.sha256()
    for w in model.weights:
        digest.update(np.asarray(w).astype("float32").tobytes())
    keras.utils.set_random_seed(1)
    logs = model.train_step(plugin.preprocess(tf.constant(x), tf.constant(y)))
    out[name] = {"params": int(sum(np.prod(w.shape) for w in model.weights)),
                 "shapes": [list(w.shape) for w in model.weights], "weights": digest.hexdigest(),
                 "step": {k: float(v) for k, v in logs.items()}}
print(json.dumps(out))
"""


def package_of(source: Path, into: Path) -> Path:
    """An importable ``kiln`` package from a checkout's folders, laid out as that checkout's own
    pyproject.toml maps them (``kiln = "core"``, ``"kiln.plugins" = "plugins"``, ...)."""
    import tomllib

    layout = tomllib.loads((source / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    shutil.copytree(source / layout["kiln"], into / "kiln")
    for package, folder in layout.items():
        if package != "kiln":  # a subpackage: kiln.plugins -> kiln/plugins
            (into / Path(*package.split("."))).symlink_to(source / folder)
    return into


def fingerprint(path: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(path), "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", FINGERPRINT, *PLUGINS], env=env, cwd=path,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="the earlier commit")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        old = tmp / "old-checkout"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), args.against],
                       check=True)
        try:
            before = fingerprint(package_of(old, tmp / "old"))
            now = fingerprint(package_of(ROOT, tmp / "new"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=True)
    print(f"{'plugin':12} {'parameters':>10}  same shapes  same initial weights  first step's losses (then -> now)")
    for name in PLUGINS:
        a, b = before[name], now[name]
        steps = ", ".join(f"{k} {a['step'][k]:.5f} -> {b['step'].get(k, float('nan')):.5f}" for k in a["step"])
        print(f"{name:12} {b['params']:>10,}  {str(a['shapes'] == b['shapes']):11}  "
              f"{str(a['weights'] == b['weights']):20}  {steps}")


if __name__ == "__main__":
    main()
