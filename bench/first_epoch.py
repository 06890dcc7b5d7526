"""What the training loop's compiled function costs on a short run: Kiln's loop (the step once in
the graph, a compiled model's metrics made before it: kiln.trainer.repeated and build_metrics)
beside the loop that typed its logs with a first step of its own and let the metrics be made on
the first call (the step traced and optimised twice, the function traced twice). Each run is a
fresh process (nothing traced before), the loops alternate, REPEATS times per plugin, on tiny
configurations like the suite's. Reports the median seconds of the first epoch (tracing,
optimising and the steps) and of the whole `run.train` (data, evaluation, pictures, the store).

    python bench/first_epoch.py [--repeats 3] [--plugins cnn gpt diffusion cgan]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# the suite's session models (tests/helpers.py TRAINED): one epoch each
TINY = {"cnn": dict(limit=2000),
        "gpt": dict(limit=300, overrides={"layers": "2", "width": "32", "heads": "2"}),
        "diffusion": dict(limit=256, overrides={"width": "8", "blocks": "1"}),
        "cgan": dict(limit=1280, overrides={"sample_every": "0"}),
        "lstm": dict(limit=300, overrides={"units": "32"})}

ONE_RUN = """
import json, sys, tempfile, time
from pathlib import Path
from kiln import run, trainer

def two_sites(strategy, step):
    import tensorflow as tf

    @tf.function
    def run_(iterator, n):
        logs = strategy.run(step, args=(next(iterator),))
        for _ in tf.range(n - 1):
            logs = strategy.run(step, args=(next(iterator),))
        return logs
    return run_

plugin, loop, kw = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
if loop == "two sites":
    trainer.repeated = two_sites
    trainer.build_metrics = lambda *a: None
root = Path(tempfile.mkdtemp())
t0 = time.perf_counter()
version = run.train(run.plan(plugin, epochs=1, store=root / "store", runs_dir=root / "runs", **kw))
print(json.dumps({"epoch": version.manifest["history"][0]["seconds"], "total": time.perf_counter() - t0,
                  "loss": version.manifest["history"][0].get("loss")}))
"""


def once(plugin: str, loop: str) -> dict[str, float]:
    where = Path(tempfile.mkdtemp())
    script = where / "one_run.py"  # a file: AutoGraph converts a loop only from source it can read
    script.write_text(ONE_RUN)
    done = subprocess.run([sys.executable, str(script), plugin, loop, json.dumps(TINY[plugin])],
                          capture_output=True, text=True, timeout=900, cwd=where)
    if done.returncode:
        sys.exit(f"{plugin} ({loop}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--plugins", nargs="+", default=["cnn", "gpt", "diffusion", "cgan"], choices=sorted(TINY))
    a = ap.parse_args()
    loops = ["two sites", "kiln"]
    print("| plugin | loop | first epoch (s), runs | median | whole run (s), median | first epoch vs two sites |")
    print("| --- | --- | --- | --- | --- | --- |")
    for plugin in a.plugins:
        seen: dict[str, list[dict[str, float]]] = {loop: [] for loop in loops}
        for i in range(a.repeats):
            for loop in (loops if i % 2 == 0 else loops[::-1]):
                seen[loop].append(once(plugin, loop))
        losses = {loop: {r["loss"] for r in runs} for loop, runs in seen.items()}
        base = statistics.median(r["epoch"] for r in seen["two sites"])
        for loop, runs in seen.items():
            epoch = statistics.median(r["epoch"] for r in runs)
            firsts = ", ".join(f"{r['epoch']:.1f}" for r in runs)
            print(f"| {plugin} | {loop} | {firsts} | {epoch:.1f} | "
                  f"{statistics.median(r['total'] for r in runs):.1f} | {epoch / base:.2f} |", flush=True)
        if losses["kiln"] != losses["two sites"]:
            print(f"  {plugin}: the loops' first-epoch losses differ: {losses}")


if __name__ == "__main__":
    main()
