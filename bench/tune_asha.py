"""ASHA vs a full search on `har`, side by side in one run: the same sampled configurations (the
same seed draws the same 16), once with ASHA stopping poor trials early and once run to the end
(FIFO); then the default config trained alone, for its test accuracy.

    .venv/bin/python bench/tune_asha.py [--samples 16] [--epochs 20] [--grace-epochs 2] [--reduction-factor 4]

Prints, for each search: wall time, epochs run of the budget, best validation accuracy, the best
configuration and its stored model's test accuracy; then the ratios ASHA / full.
Everything runs through the `kiln` command a user types.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = ["learning_rate=loguniform:1e-4:1e-2", "dropout=uniform:0.1:0.7",
         "filters=choice:32,32,64/64,64,128/64,128,128", "kernel_size=randint:3:9"]


def kiln(*args: str, root: Path) -> float:
    """Run one kiln command in ``root``; its wall time."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kiln.cli", *args, "--runs-dir", str(root / "runs")],
                   cwd=root, check=True, env={**os.environ, "KILN_STORE": str(root / "store")})
    return time.perf_counter() - t0


def test_accuracy(root: Path, ref: str) -> float:
    name, version = ref.split(":")
    return json.loads((root / "store" / name / version / "manifest.json").read_text())["metrics"]["accuracy"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--grace-epochs", type=int, default=2)
    p.add_argument("--reduction-factor", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="kiln-bench-tune-") as tmp:
        root = Path(tmp)
        common = ["tune", "har", *(x for s in SPACE for x in ("--search", s)), "--samples", str(args.samples),
                  "--epochs", str(args.epochs), "--seed", str(args.seed), "--metric", "val_accuracy"]
        wall = {
            "asha": kiln(*common, "--scheduler", "asha", "--grace-epochs", str(args.grace_epochs),
                         "--reduction-factor", str(args.reduction_factor), "--run", "asha", "--name", "har-asha",
                         root=root),
            "full": kiln(*common, "--scheduler", "fifo", "--run", "full", "--name", "har-full", root=root),
            "default": kiln("train", "har", "--epochs", str(args.epochs), "--seed", str(args.seed),
                            "--run", "default", "--name", "har-default", root=root),
        }
        res = {k: json.loads((root / "runs" / k / "search.json").read_text()) for k in ("asha", "full")}
        configs = [[t["config"] for t in res[k]["trials"]] for k in ("asha", "full")]
        same = sorted(map(json.dumps, configs[0])) == sorted(map(json.dumps, configs[1]))
        print(f"\nhar, {args.samples} sampled configurations of {'; '.join(SPACE)}, {args.epochs} epochs at most; "
              f"the same configurations in both searches: {same}")
        print(f"{'search':8} {'wall':>8} {'epochs run':>14} {'best val_acc':>13} {'test acc':>9}  best config")
        for k in ("asha", "full"):
            r = res[k]
            print(f"{k:8} {wall[k]:7.0f}s {r['epochs_run']:5}/{r['epochs_budget']:<5} ({r['epochs_run'] / r['epochs_budget']:4.0%})"
                  f" {r['best']['value']:13.4f} {test_accuracy(root, r['version']):9.4f}  {r['best']['config']}")
        print(f"{'default':8} {wall['default']:7.0f}s {'':>14} {'':>13} {test_accuracy(root, 'har-default:1'):9.4f}  "
              "the plugin's defaults")
        a, f = res["asha"], res["full"]
        print(f"\nASHA / full: epochs {a['epochs_run'] / f['epochs_run']:.2f}x, wall {wall['asha'] / wall['full']:.2f}x; "
              f"best val_accuracy gap {100 * (f['best']['value'] - a['best']['value']):+.2f} points "
              f"(full minus ASHA)")


if __name__ == "__main__":
    main()
