"""Transfer learning vs training from scratch on the same small labelled budget, side by side in
one run: Kiln's `transfer` plugin (a stored MNIST CNN's features, new head, then fine-tuning)
against the same architecture from random weights (`--set pretrained=false`), on Fashion-MNIST
with N labelled images per class, for several seeds; full 10,000-image test set.

    .venv/bin/python bench/transfer_vs_scratch.py [--store DIR] [--labels 50] [--seeds 3]

The base is the latest `cnn` in the store (train it first with `kiln train cnn`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", default=None, help="store holding the base cnn (default: KILN_STORE)")
    p.add_argument("--labels", type=int, nargs="+", default=[50], help="labels per class")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()

    from kiln import run
    from kiln.store import Store

    store = Store(args.store)
    base = store.get("cnn")
    print(f"base {base.ref}: MNIST test accuracy {base.manifest['metrics']['accuracy']:.4f}")
    runs = Path(tempfile.mkdtemp(prefix="kiln-bench-transfer-"))
    print(f"{'labels/class':>12} {'seed':>4} {'transfer':>9} {'scratch':>9} {'gain':>7} {'s':>5}")
    for labels in args.labels:
        gains, results = [], {"transfer": [], "scratch": []}
        for seed in range(args.seeds):
            acc = {}
            t0 = time.perf_counter()
            for what, pretrained in (("transfer", "true"), ("scratch", "false")):
                spec = run.plan("transfer", seed=seed, store=store.root, runs_dir=runs,
                                name=f"bench-{what}",
                                overrides={"labels_per_class": str(labels), "pretrained": pretrained,
                                           "base": base.ref})
                acc[what] = run.train(spec).manifest["metrics"]["accuracy"]
                results[what].append(acc[what])
            gains.append(acc["transfer"] - acc["scratch"])
            print(f"{labels:>12} {seed:>4} {acc['transfer']:>9.4f} {acc['scratch']:>9.4f} "
                  f"{gains[-1]:>+7.4f} {time.perf_counter() - t0:>5.0f}", flush=True)
        t, s = statistics.mean(results["transfer"]), statistics.mean(results["scratch"])
        print(f"{labels:>12} mean {t:>9.4f} {s:>9.4f} {t - s:>+7.4f}  (transfer/scratch error "
              f"ratio {(1 - t) / (1 - s):.2f}; transfer wins {sum(g > 0 for g in gains)}/{len(gains)} seeds)")


if __name__ == "__main__":
    main()
