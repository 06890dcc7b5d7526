"""What Kiln's quiet TensorFlow start-up costs: `kiln train cnn` in-process, side by side in one
run, as Kiln starts it (oneDNN on, its load-time notices filtered), with KILN_VERBOSE=1 (nothing
filtered), and with TF_ENABLE_ONEDNN_OPTS=0 (the other way to hide the notice: oneDNN off).
TF_ENABLE_ONEDNN_OPTS=1 is forced in the first two, as on an AVX-512 CPU. The variants alternate
for --rounds rounds, so a drift of the machine's speed hits each alike.

    .venv/bin/python bench/quiet_start.py [--limit 20000] [--epochs 3] [--rounds 2]

Printed per variant: mean examples/s of epochs 2.. (epoch 1 traces), the command's wall time, and
the lines it printed on stderr.
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

VARIANTS = {
    "kiln (quiet, oneDNN on)": {"TF_ENABLE_ONEDNN_OPTS": "1"},
    "KILN_VERBOSE=1 (oneDNN on)": {"TF_ENABLE_ONEDNN_OPTS": "1", "KILN_VERBOSE": "1"},
    "TF_ENABLE_ONEDNN_OPTS=0": {"TF_ENABLE_ONEDNN_OPTS": "0"},
}


def once(env: dict[str, str], args: argparse.Namespace, root: Path, i: int) -> tuple[float, float, int]:
    store = root / f"store{i}"
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "kiln.cli", "train", "cnn", "--limit", str(args.limit),
                          "--epochs", str(args.epochs), "--store", str(store), "--runs-dir", str(root / "runs"),
                          "--run", f"quiet-{i}"], env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    history = json.loads((store / "cnn" / "1" / "manifest.json").read_text())["history"]
    return statistics.mean(h["examples_per_s"] for h in history[1:]), wall, len(out.stderr.splitlines())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", type=int, default=20000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    seen: dict[str, list[tuple[float, float, int]]] = {k: [] for k in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-quiet-") as tmp:
        i = 0
        for _ in range(args.rounds):
            for name, env in VARIANTS.items():
                i += 1
                seen[name].append(once(env, args, Path(tmp), i))
                print(f"  {name}: {seen[name][-1][0]:.0f} examples/s", flush=True)
    base = statistics.mean(r[0] for r in seen["kiln (quiet, oneDNN on)"])
    print(f"\n{'variant':<30} {'examples/s':>10} {'vs kiln':>8} {'wall s':>7} {'stderr lines':>13}")
    for name, rows in seen.items():
        rate = statistics.mean(r[0] for r in rows)
        print(f"{name:<30} {rate:>10.0f} {rate / base:>7.2f}x {statistics.mean(r[1] for r in rows):>7.1f} "
              f"{max(r[2] for r in rows):>13}")


if __name__ == "__main__":
    main()
