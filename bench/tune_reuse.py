"""Tune trials in reused actors (what `kiln tune` does) vs a new actor per trial, side by side in
one run: the same search (the same seed samples the same configurations) twice, one trial at a
time, so each new actor's start-up (a Ray worker importing TensorFlow and Kiln) is on the path.

    .venv/bin/python bench/tune_reuse.py [--samples 8] [--epochs 2] [--limit 600]

Prints each search's wall time, its best validation accuracy (the same configurations give the
same figures) and the ratio. "new actor per trial" runs `kiln tune` with Tune's TuneConfig
defaulting to ``reuse_actors=False`` (Tune's own default), nothing else changed.
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

# `kiln tune` as Tune's default would run it: every trial in a new actor
NO_REUSE = """
import sys
from ray import tune
from kiln import cli
_made = tune.TuneConfig
tune.TuneConfig = lambda **kw: _made(**{**kw, "reuse_actors": False})
sys.exit(cli.main(sys.argv[1:]))
"""


def search(root: Path, name: str, args: list[str], reuse: bool) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "kiln.cli"] if reuse else [sys.executable, "-c", NO_REUSE]
    subprocess.run([*cmd, *args, "--run", name, "--name", f"har-{name}", "--runs-dir", str(root / "runs")],
                   cwd=root, check=True, env={**os.environ, "KILN_STORE": str(root / "store")})
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=600)
    args = p.parse_args()
    common = ["tune", "har", "--search", "learning_rate=loguniform:1e-4:1e-2", "--search", "dropout=uniform:0.1:0.7",
              "--samples", str(args.samples), "--epochs", str(args.epochs), "--limit", str(args.limit),
              "--scheduler", "fifo", "--max-concurrent", "1", "--seed", "0"]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-reuse-") as tmp:
        root = Path(tmp)
        wall = {"reused": search(root, "reused", common, reuse=True),
                "new": search(root, "new", common, reuse=False)}
        best = {k: json.loads((root / "runs" / k / "search.json").read_text())["best"]["value"] for k in wall}
    print(f"\n{args.samples} trials of {args.epochs} epochs on {args.limit} HAR windows, one at a time")
    print(f"{'trials':<24}{'wall':>8}{'per trial':>12}{'best val_accuracy':>20}")
    for k, label in (("reused", "reused actors (kiln)"), ("new", "a new actor per trial")):
        print(f"{label:<24}{wall[k]:>7.1f}s{wall[k] / args.samples:>11.1f}s{best[k]:>20.4f}")
    print(f"reused / new wall time: {wall['reused'] / wall['new']:.2f}x")


if __name__ == "__main__":
    main()
