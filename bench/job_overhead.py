"""What a Ray job costs compared with running `kiln train` directly, measured side by side.

Starts a local head (`kiln cluster up`, not timed), then alternates, REPEATS times each:
  direct:  kiln train cnn ARGS                    (a subprocess, as a user types it)
  job:     kiln submit --follow train cnn ARGS    (through the Jobs API of that head)
for in-process training and for 2 Ray Train workers. Reports, per mode, the median seconds from
the command's start to its first `[kiln] epoch 1/` line and to its end, and job/direct ratios.

    python bench/job_overhead.py [--repeats 2] [--epochs 2] [--limit 6000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kiln.net import free_port


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float]:
    """(seconds to the first epoch line, seconds to the end) of one command."""
    t0 = time.perf_counter()
    first = None
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-20:]
        if first is None and "[kiln] epoch 1/" in line:
            first = time.perf_counter() - t0
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{''.join(tail)}")
    return first, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=6000)
    a = ap.parse_args()
    kiln = [sys.executable, "-m", "kiln.cli"]
    work = Path(tempfile.mkdtemp(prefix="kiln-bench-jobs-"))
    env = {**os.environ, "KILN_STORE": str(work / "store"), "KILN_RUNS": str(work / "runs"),
           "RAY_USAGE_STATS_ENABLED": "0"}
    dash = free_port()
    address = f"http://127.0.0.1:{dash}"
    up = subprocess.run([*kiln, "cluster", "up", "--num-cpus", "2", "--port", str(free_port()),
                         "--dashboard-port", str(dash)], cwd=work, env=env, capture_output=True, text=True)
    if up.returncode != 0:
        raise SystemExit(up.stderr)
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        train = ["train", "cnn", "--epochs", str(a.epochs), "--limit", str(a.limit)]
        for workers in ("0", "2"):
            for i in range(a.repeats):
                args = [*train, "--workers", workers]
                # direct runs join the running head too (ray.init finds it), as a user's would
                results.setdefault(f"direct w={workers}", []).append(timed([*kiln, *args], work, env))
                results.setdefault(f"job    w={workers}", []).append(
                    timed([*kiln, "submit", "--address", address, "--follow", *args], work, env))
    finally:
        subprocess.run([*kiln, "cluster", "down"], capture_output=True, env=env)
    print(f"cnn, {a.epochs} epochs, --limit {a.limit}, median of {a.repeats}; seconds from the command's "
          "start (submit included)")
    print(f"{'mode':<14}{'to epoch 1':>12}{'total':>10}")
    med = {k: (statistics.median(f for f, _ in v), statistics.median(t for _, t in v)) for k, v in results.items()}
    for k, (first, total) in med.items():
        print(f"{k:<14}{first:>12.1f}{total:>10.1f}")
    for w in ("0", "2"):
        d, j = med[f"direct w={w}"], med[f"job    w={w}"]
        print(f"workers={w}: job/direct to epoch 1 {j[0] / d[0]:.2f}x (+{j[0] - d[0]:.1f} s), "
              f"total {j[1] / d[1]:.2f}x (+{j[1] - d[1]:.1f} s)")


if __name__ == "__main__":
    main()
