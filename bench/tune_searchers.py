"""Optuna's TPE vs random sampling on `har`, side by side in one run, both with ASHA, over
several seeds: the best validation accuracy after each number of trials (trials in the order
they were started), and how many trials Optuna needed to reach random's final best.

    .venv/bin/python bench/tune_searchers.py [--samples 12] [--epochs 6] [--seeds 0,1,2] [--limit 3000]

Trials run one at a time (--max-concurrent 1), so that each Optuna suggestion has every earlier
result to learn from, as it would on a cluster with few slots. Everything runs through the
`kiln` command a user types.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPACE = ["learning_rate=loguniform:1e-4:3e-2", "dropout=uniform:0.0:0.8",
         "filters=choice:16,16,32/32,32,64/64,64,128", "kernel_size=randint:3:9"]


def search(root: Path, searcher: str, seed: int, args: argparse.Namespace) -> tuple[list[float], float]:
    """The best-so-far validation accuracy after each trial (in start order), and the wall time."""
    run = f"{searcher}-{seed}"
    cmd = [sys.executable, "-m", "kiln.cli", "tune", "har", *(x for s in SPACE for x in ("--search", s)),
           "--searcher", searcher, "--samples", str(args.samples), "--epochs", str(args.epochs),
           "--limit", str(args.limit), "--seed", str(seed), "--max-concurrent", "1", "--run", run,
           "--name", f"har-{run}", "--runs-dir", str(root / "runs")]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "KILN_STORE": str(root / "store")})
    wall = time.perf_counter() - t0
    trials = json.loads((root / "runs" / run / "search.json").read_text())["trials"]
    started = sorted(trials, key=lambda t: _start(root / "runs" / run / "trials" / t["trial"]))
    best, curve = 0.0, []
    for t in started:
        best = max(best, t["best"] or 0.0)
        curve.append(best)
    return curve, wall


def _start(trial_dir: Path) -> float:
    first = sorted(trial_dir.glob("checkpoint_*"))
    return first[0].stat().st_mtime if first else float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--limit", type=int, default=3000)
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    curves: dict[str, list[list[float]]] = {"random": [], "optuna": []}
    walls: dict[str, list[float]] = {"random": [], "optuna": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-searchers-") as tmp:
        for seed in seeds:
            for searcher in ("random", "optuna"):  # side by side, seed by seed
                curve, wall = search(Path(tmp), searcher, seed, args)
                curves[searcher].append(curve)
                walls[searcher].append(wall)
    print(f"\nhar, {args.samples} trials of {args.epochs} epochs at most (ASHA), limit {args.limit}, "
          f"seeds {args.seeds}; best val_accuracy after N trials, mean over seeds")
    print("  trials  " + "  ".join(f"{n:>6}" for n in range(1, args.samples + 1)))
    for searcher, cs in curves.items():
        means = [statistics.mean(c[n] for c in cs) for n in range(args.samples)]
        print(f"  {searcher:<7} " + "  ".join(f"{m:6.4f}" for m in means))
    needed = []
    for r, o in zip(curves["random"], curves["optuna"]):
        target = r[-1]
        needed.append(next((n + 1 for n, v in enumerate(o) if v >= target), None))
    shown = ", ".join(str(n) if n else f">{args.samples}" for n in needed)
    print(f"  trials Optuna needed to reach random's final best, per seed: {shown} of {args.samples}")
    print(f"  final best, mean: random {statistics.mean(c[-1] for c in curves['random']):.4f}, "
          f"optuna {statistics.mean(c[-1] for c in curves['optuna']):.4f}")
    print(f"  wall time, mean: random {statistics.mean(walls['random']):.0f} s, "
          f"optuna {statistics.mean(walls['optuna']):.0f} s")


if __name__ == "__main__":
    main()
