"""CNN training throughput: in-process vs Ray Train (1 worker with 2 CPUs, and 2 workers with
1 CPU each), measured side by side in one run; ratios are against in-process. A last variant
runs the same loop in-process under MultiWorkerMirroredStrategy without Ray, to show where the
gap comes from. In-process under Keras' mixed_bfloat16 policy (`kiln train --precision`) runs
beside float32 in-process.

    .venv/bin/python bench/train_throughput.py [--limit 30000] [--epochs 3] [--batch-size 128]
                                               [--precision-only]

Both runs train the same CNN on the same MNIST examples with the same global batch. The
first epoch (tracing, Ray start-up) is excluded; the figure is the mean examples/s of the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path


def measure(workers: int, cpus: float, args: argparse.Namespace, root: Path,
            precision: str = "float32") -> tuple[float, float]:
    from kiln import run

    spec = run.plan("cnn", epochs=args.epochs, batch_size=args.batch_size, workers=workers,
                    cpus_per_worker=cpus, limit=args.limit, store=root / "store", runs_dir=root / "runs",
                    run=f"bench-w{workers}-c{cpus:g}-b{args.batch_size}-{precision}", name=f"bench-w{workers}",
                    precision=precision)
    t0 = time.perf_counter()
    version = run.train(spec)
    wall = time.perf_counter() - t0
    history = json.loads((version.path / "manifest.json").read_text())["history"]
    return statistics.mean(h["examples_per_s"] for h in history[1:]), wall


def measure_mwms_in_process(args: argparse.Namespace, root: Path) -> float:
    """The same loop in this process under MultiWorkerMirroredStrategy (1 worker, no Ray): it
    separates the cost of the strategy from the cost of Ray and of cross-process all-reduce."""
    import tensorflow as tf

    from kiln import data, run
    from kiln.trainer import LocalContext, train_loop

    spec = run.plan("cnn", epochs=args.epochs, batch_size=args.batch_size, limit=args.limit,
                    store=root / "store", runs_dir=root / "runs", run="bench-mwms")
    ctx = LocalContext(root / "runs" / "bench-mwms")
    train_loop(spec, data.prepare("mnist"), tf.distribute.MultiWorkerMirroredStrategy(), ctx)
    history = json.loads((sorted((root / "runs" / "bench-mwms").glob("checkpoint_*"))[-1]
                          / "state.json").read_text())["history"]
    return statistics.mean(h["examples_per_s"] for h in history[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=30000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--precision-only", action="store_true", help="only in-process float32 and mixed_bfloat16")
    args = p.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory() as tmp:
        local, local_wall = measure(0, 1, args, Path(tmp))
        bf16, bf16_wall = measure(0, 1, args, Path(tmp), "mixed_bfloat16")
        if not args.precision_only:
            ray1, ray1_wall = measure(1, 2, args, Path(tmp))
            ray2, ray_wall = measure(2, 1, args, Path(tmp))
            mwms = measure_mwms_in_process(args, Path(tmp))
    print(f"\nCNN on {args.limit} MNIST images, global batch {args.batch_size}, "
          f"epochs 2..{args.epochs} (steady state), {os.cpu_count()} cores")
    print(f"  in-process                    {local:8.0f} examples/s  1.00x  (whole run {local_wall:.0f} s)")
    print(f"  in-process, mixed_bfloat16    {bf16:8.0f} examples/s  {bf16 / local:5.2f}x  (whole run {bf16_wall:.0f} s)")
    if args.precision_only:
        return
    print(f"  Ray Train, 1 worker x 2 CPUs  {ray1:8.0f} examples/s  {ray1 / local:5.2f}x  (whole run {ray1_wall:.0f} s)")
    print(f"  Ray Train, 2 workers x 1 CPU  {ray2:8.0f} examples/s  {ray2 / local:5.2f}x  (whole run {ray_wall:.0f} s)")
    print(f"  in-process under MWMS, no Ray {mwms:8.0f} examples/s  {mwms / local:5.2f}x")


if __name__ == "__main__":
    main()
