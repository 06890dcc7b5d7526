"""Memory of a Kiln server against the number of served models, side by side in one run:
each model version in replicas of its own (the default) and all of them in one shared replica
(`kiln serve --shared-replicas`, Ray Serve's model multiplexing); then requests/s and latency of
one model in a shared replica next to the same model in its own.

The models are copies of one small CNN stored under N names (m1..mN): memory depends on what
is loaded, not on the weights' values. Memory is the proportional set size (PSS: shared pages
split among the processes that map them) summed over every process of the server (Ray's GCS,
raylet, HAProxy, controller, ingress, replicas), after each model answered one request.

    .venv/bin/python bench/serve_memory.py [--counts 1,4,8,16] [--own-counts 1,4] [--seconds 10]
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_throughput import wrk  # noqa: E402


def make_store(root: Path, n: int) -> str:
    from kiln import run
    from kiln.store import Store

    store = root / "store"
    run.train(run.plan("cnn", name="m1", epochs=1, limit=3000, store=store, runs_dir=root / "runs"))
    s = Store(store)
    first = s.get("m1")
    for k in range(2, n + 1):
        def write(tmp, src=first.path):
            for p in src.iterdir():
                (shutil.copytree if p.is_dir() else shutil.copy)(p, tmp / p.name)
            (tmp / "manifest.json").unlink()
            return {k: v for k, v in first.manifest.items() if k not in ("name", "version", "created")}
        s.save(f"m{k}", write)
    return str(store)


def pss_mb(pid: int) -> float:
    import psutil

    total = 0
    procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def serve(store: str, n: int, shared: bool, seconds: int, measure_speed: bool) -> dict:
    import requests

    from kiln.net import free_port

    port = free_port()
    args = [sys.executable, "-m", "kiln.cli", "serve", "--store", store, "--port", str(port),
            "--poll-seconds", "0", *sum((["--model", f"m{k}"] for k in range(1, n + 1)), [])]
    if shared:
        args.append("--shared-replicas")
    t0 = time.time()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:
            if "[kiln] ready:" in line:
                break
        else:
            raise SystemExit("kiln serve ended before it was ready")
        base = f"http://127.0.0.1:{port}"
        image = {"images": np.zeros((1, 28, 28, 1)).tolist()}
        for k in range(1, n + 1):  # every model loaded and answering
            r = requests.post(f"{base}/models/m{k}/classify", json=image, timeout=120)
            assert r.status_code == 200, r.text
        ready_s = time.time() - t0
        time.sleep(3)
        out = {"mode": "shared" if shared else "own", "models": n, "pss_mb": pss_mb(proc.pid), "ready_s": ready_s}
        if measure_speed:
            import json

            body = json.dumps(image)
            one = wrk(f"{base}/models/m1/classify", body, 1, seconds)
            many = wrk(f"{base}/models/m1/classify", body, 16, seconds)
            out.update(p50_1=one["p50"], rps_1=one["rps"], p50_16=many["p50"], rps_16=many["rps"])
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--counts", default="1,4,8,16", help="served models, shared replica")
    p.add_argument("--own-counts", default="1,4", help="served models, a replica each")
    p.add_argument("--seconds", type=int, default=10, help="wrk's duration per speed measurement")
    args = p.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    own = [int(c) for c in args.own_counts.split(",") if c]
    root = Path(tempfile.mkdtemp(prefix="kiln-memory-"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    store = make_store(root, max(counts + own))
    rows = []
    for n in own:
        rows.append(serve(store, n, False, args.seconds, measure_speed=n == own[0]))
        print(rows[-1], flush=True)
    for n in counts:
        rows.append(serve(store, n, True, args.seconds, measure_speed=n == counts[-1]))
        print(rows[-1], flush=True)
    print("\n| mode | models | server memory (PSS, MB) | per model beyond the first (MB) | ready (s) |")
    print("|---|---|---|---|---|")
    for mode in ("own", "shared"):
        mine = [r for r in rows if r["mode"] == mode]
        for r in mine:
            extra = (f"{(r['pss_mb'] - mine[0]['pss_mb']) / (r['models'] - mine[0]['models']):.0f}"
                     if r["models"] > mine[0]["models"] else "-")
            print(f"| {mode} | {r['models']} | {r['pss_mb']:.0f} | {extra} | {r['ready_s']:.0f} |")
    fast = [r for r in rows if "p50_1" in r]
    print("\n| m1 served | 1 conn p50 (ms) | 1 conn req/s | 16 conn p50 (ms) | 16 conn req/s |")
    print("|---|---|---|---|---|")
    for r in fast:
        print(f"| {r['mode']} replica, {r['models']} models served | {r['p50_1']:.1f} | {r['rps_1']:.0f} | "
              f"{r['p50_16']:.1f} | {r['rps_16']:.0f} |")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
