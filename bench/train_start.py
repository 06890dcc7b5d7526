"""What a Ray Train run's start costs with Kiln's TensorFlow backend (kiln.cluster.tf_backend)
beside Ray's own TensorflowConfig, measured side by side: one local Ray (2 CPUs), then REPEATS
alternating 1-epoch runs of the cnn on 2 workers (--limit 512) with each backend. Reports the
median seconds of the whole run (Ray Train's fit: controller, workers, one short epoch, the
checkpoint) and the ratio.

    python bench/train_start.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    from ray.train.tensorflow import TensorflowConfig as RayTensorflowConfig

    from kiln import data, run
    from kiln.cluster import tf_backend
    from kiln.cluster.train import fit, local_cluster

    kiln_config = tf_backend.TensorflowConfig
    seen = {"ray's TensorflowConfig": [], "kiln's backend": []}
    root = Path(tempfile.mkdtemp())
    with local_cluster(num_cpus=2):
        for i in range(a.repeats):
            for variant in seen:
                tf_backend.TensorflowConfig = RayTensorflowConfig if variant.startswith("ray") else kiln_config
                spec = run.plan("cnn", workers=2, epochs=1, limit=512, store=root / "store",
                                runs_dir=root / "runs", run=f"{i}-{variant[:3]}")
                t0 = time.perf_counter()
                fit(spec, data.prepare(spec.dataset))
                seen[variant].append(time.perf_counter() - t0)
    base = statistics.median(seen["ray's TensorflowConfig"])
    print("| backend | runs (s) | median (s) | vs Ray's |\n| --- | --- | --- | --- |")
    for variant, times in seen.items():
        print(f"| {variant} | {', '.join(f'{t:.1f}' for t in times)} | {statistics.median(times):.1f} | "
              f"{statistics.median(times) / base:.2f} |")


if __name__ == "__main__":
    main()
