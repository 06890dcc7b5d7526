"""The check a GPU owner runs: does Kiln use the GPUs, and how well?

On a machine with GPUs: trains `cnn` for one epoch on one GPU worker and on every GPU (Ray
Train, one worker per GPU), serves it with four replicas of 0.25 GPU each (capped at
--gpu-memory-mb apiece), sends requests for a few seconds, and prints images/s per GPU, the
scaling efficiency (N-GPU images/s over N times one GPU's) and every serving process's GPU
memory as nvidia-smi reports it. On a machine without a GPU it says so and exits 0: there is
nothing to measure.

    .venv/bin/python bench/gpu_check.py [--limit 60000] [--seconds 10] [--gpu-memory-mb 2048]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def gpus_seen() -> int:
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


def memory_by_pid() -> dict[int, int]:
    """MiB of GPU memory per process, as nvidia-smi lists its compute processes."""
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=30)
    found = {}
    for line in out.stdout.splitlines():
        pid, _, mib = line.partition(",")
        if pid.strip().isdigit():
            found[int(pid)] = int(mib.strip() or 0)
    return found


def train(root: Path, workers: int, limit: int) -> float:
    """Images/s of the epoch of a one-epoch cnn run on ``workers`` GPU workers."""
    from kiln import run

    spec = run.plan("cnn", name=f"gpu{workers}", epochs=1, limit=limit, workers=workers, gpus_per_worker=1,
                    cpus_per_worker=1, batch_size=256 * workers, store=root / "store", runs_dir=root / "runs",
                    run=f"gpu{workers}")
    version = run.train(spec)
    return float(version.manifest["history"][-1]["examples_per_s"])


def serve(root: Path, seconds: float, memory_mb: int) -> tuple[float, dict[int, int]]:
    """Four 0.25-GPU replicas of gpu1: images/s over ``seconds`` of 8 clients sending 256-image
    requests, and the GPU memory of each of the server's processes."""
    import numpy as np
    import requests

    from kiln.net import free_port
    from kiln.serve import app
    from kiln.serve.options import ServeOptions
    from kiln.serve.server import Server

    port = free_port()
    opts = ServeOptions(port=port, replicas="4", gpus_per_replica=0.25, cpus_per_replica=0.5,
                        gpu_memory_mb=memory_mb, poll_seconds=0)
    body = {"images": np.random.default_rng(0).random((256, 28, 28)).round(3).tolist()}
    done, stop = [0], time.time() + seconds
    with Server(app.plan(["gpu1"], opts, store=str(root / "store")), models=["gpu1"]) as server:
        server.wait_ready()

        def client() -> None:
            with requests.Session() as s:
                while time.time() < stop:
                    r = s.post(f"http://127.0.0.1:{port}/models/gpu1/classify", json=body, timeout=60)
                    r.raise_for_status()
                    done[0] += 256

        threads = [threading.Thread(target=client) for _ in range(8)]
        t0 = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = done[0] / (time.time() - t0)
        return rate, memory_by_pid()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=60000, help="training examples (default: all of MNIST)")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--gpu-memory-mb", type=int, default=2048, help="each serving replica's cap")
    args = ap.parse_args()
    n = gpus_seen()
    if n == 0:
        print("no GPU: TensorFlow sees none here (`kiln doctor` says why); nothing to check")
        return 0
    with tempfile.TemporaryDirectory(prefix="kiln-gpu-check-") as tmp:
        root = Path(tmp)
        one = train(root, 1, args.limit)
        print(f"train cnn, 1 GPU worker:  {one:,.0f} images/s")
        if n > 1:
            many = train(root, n, args.limit)
            print(f"train cnn, {n} GPU workers: {many:,.0f} images/s ({many / n:,.0f} per GPU), "
                  f"scaling efficiency {many / (n * one):.2f}")
        rate, memory = serve(root, args.seconds, args.gpu_memory_mb)
        print(f"serve cnn, 4 replicas x 0.25 GPU (--gpu-memory-mb {args.gpu_memory_mb}): {rate:,.0f} images/s")
        for pid, mib in sorted(memory.items()):
            print(f"  process {pid}: {mib} MiB of GPU memory")
    return 0


if __name__ == "__main__":
    sys.exit(main())
