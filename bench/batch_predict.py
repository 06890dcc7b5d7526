"""`kiln predict --input` on Ray Data against the same model's in-process `model.predict` and
against `kiln serve` in 256-image requests, side by side in one run, on the MNIST test set
written as PNG files; and the peak memory of a run over 10x the files.

1. in-process: the PNGs decoded in this process (Kiln's decoder), then `model.predict` at batch
   256, timed after a warm-up pass (steady state); measured first and again last, as this
   machine's speed drifts over minutes;
2. `kiln predict` (a subprocess, as a user runs it): the whole command's wall time over N files,
   start-up included, and its steady state in a run over 10 N: the rows of every part file
   after the first over the time between the first part file and the last (Ray's start and
   the actors' start fall before the first);
3. `kiln serve` with one replica: the same files as `{"b64": ...}` instances, 256 per TF Serving
   `:predict` request, one client, after a warm-up request.

Memory: the peak resident memory of `kiln predict`'s process tree (driver, Ray's processes and
its actors), sampled every 0.2 s, over N and over 10 N files.

    .venv/bin/python bench/batch_predict.py [--n 10000] [--memory-n 100000] [--workers 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

os.environ.setdefault("KILN_DATA_DIR", str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def write_pngs(folder: Path, n: int) -> list[Path]:
    """The MNIST test set as PNG files (repeated past its 10,000 images)."""
    from PIL import Image

    from kiln import data

    split = data.load("mnist", "test")
    images = np.stack([x[..., 0] for x, _ in split.ds.as_numpy_iterator()])
    folder.mkdir(parents=True)
    paths = []
    for i in range(n):
        p = folder / f"{i // 1000:03d}" / f"{i:06d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(images[i % len(images)]).save(p)
        paths.append(p)
    return paths


def link_copies(source: Path, dest: Path, k: int) -> Path:
    """``k`` copies of the files under ``source`` as hard links (a folder walk does not follow
    symbolic links to folders)."""
    for i in range(k):
        for f in source.rglob("*.png"):
            target = dest / f"copy{i}" / f.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(f, target)
    return dest


def tree_rss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def kiln_predict(store: Path, folder: Path, out: Path, workers: int, batch: int, cpus: float) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one `kiln predict` run."""
    peak = [0]
    t0 = time.perf_counter()
    # its own Ray (and its raylet's workers) in its own session, so the tree is all of it
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "predict", "cnn", "--input", str(folder),
                             "--output", str(out), "--workers", str(workers), "--batch-size", str(batch),
                             "--cpus-per-worker", str(cpus),
                             "--store", str(store)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss(proc.pid))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.communicate()[0]
    seconds = time.perf_counter() - t0
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"kiln predict failed:\n{output[-3000:]}")
    return seconds, peak[0]


def steady_rate(out: Path) -> float:
    """Rows/s of a finished `kiln predict` between its first part file and its last."""
    import pyarrow.parquet as pq

    parts = sorted(out.glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    if len(parts) < 3:
        raise SystemExit(f"{out}: {len(parts)} part files; give --memory-n at least 3000 files")
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in parts[1:])
    return rows / (parts[-1].stat().st_mtime - parts[0].stat().st_mtime)


def served(store: Path, files: list[Path], batch: int) -> float:
    """Images/s of `kiln serve` answering the files 256 at a time (after one warm-up request)."""
    from kiln.net import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", "--store", str(store), "--port", str(port),
                             "--model", "cnn"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    try:
        deadline = time.time() + 300
        while not any("[kiln] ready:" in line for line in lines):
            if proc.poll() is not None or time.time() > deadline:
                raise SystemExit("kiln serve did not start:\n" + "".join(lines)[-3000:])
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}/v1/models/cnn:predict"
        bodies = []
        for i in range(0, len(files), batch):
            instances = [{"b64": base64.b64encode(p.read_bytes()).decode()} for p in files[i:i + batch]]
            bodies.append(json.dumps({"instances": instances}).encode())

        def post(body: bytes) -> None:
            req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 200
                r.read()

        post(bodies[0])
        t0 = time.perf_counter()
        for body in bodies:
            post(body)
        return len(files) / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    from kiln import logs

    logs.quiet_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--memory-n", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    args = p.parse_args()
    from kiln import images, models, run

    root = Path(tempfile.mkdtemp(prefix="kiln-bench-predict-"))
    try:
        store = root / "store"
        run.train(run.plan("cnn", epochs=1, limit=2000, store=store, runs_dir=root / "runs"))
        files = write_pngs(root / "n", args.n)

        # 1. in-process
        plugin, model, _ = models.load("cnn:1", store)

        def in_process() -> tuple[float, float]:
            t0 = time.perf_counter()
            x = np.stack([images.decode(f.read_bytes(), (None, 28, 28, 1)) for f in files])
            decode_s = time.perf_counter() - t0
            model.predict(plugin.preprocess(x, None)[0], batch_size=args.batch_size, verbose=0)  # warm-up
            t0 = time.perf_counter()
            model.predict(plugin.preprocess(x, None)[0], batch_size=args.batch_size, verbose=0)
            predict_s = time.perf_counter() - t0
            return len(files) / predict_s, len(files) / (predict_s + decode_s)

        first = in_process()

        # 2. kiln predict: the whole command over N, and over 10 N for its steady state and memory
        t_n, peak_n = kiln_predict(store, root / "n", root / "n.parquet", args.workers, args.batch_size,
                                   args.cpus_per_worker)
        k = max(2, args.memory_n // args.n)
        many = link_copies(root / "n", root / "many", k)
        t_many, peak_many = kiln_predict(store, many, root / "many.parquet", args.workers, args.batch_size,
                                         args.cpus_per_worker)
        steady = steady_rate(root / "many.parquet")

        # 3. kiln serve
        serve_rate = served(store, files, args.batch_size)

        last = in_process()
        here, here_decoded = (first[0] + last[0]) / 2, (first[1] + last[1]) / 2

        print(f"MNIST test set as {args.n} PNG files, cnn, batch {args.batch_size}, "
              f"{args.workers} Ray Data actor(s) of {args.cpus_per_worker:g} CPU(s), {os.cpu_count()} CPUs")
        print(f"  in-process model.predict (decoded first)   {here:9.0f} images/s  "
              f"(first {first[0]:.0f}, last {last[0]:.0f})")
        print(f"  in-process decode + model.predict         {here_decoded:9.0f} images/s  "
              f"(first {first[1]:.0f}, last {last[1]:.0f})")
        print(f"  kiln predict, steady state over {k * args.n:<8d}  {steady:9.0f} images/s  "
              f"{steady / here_decoded:.2f}x in-process decode + predict "
              f"({steady / max(first[1], last[1]):.2f}x its faster measurement), {steady / here:.2f}x predict alone")
        print(f"  kiln predict, whole command over N        {args.n / t_n:9.0f} images/s  ({t_n:.1f} s wall)")
        print(f"  kiln predict, whole command over 10 N     {k * args.n / t_many:9.0f} images/s  ({t_many:.1f} s wall)")
        print(f"  kiln serve, 256-image :predict requests   {serve_rate:9.0f} images/s")
        print(f"  peak RSS of kiln predict: {peak_n / 2**20:.0f} MiB over {args.n} files, "
              f"{peak_many / 2**20:.0f} MiB over {k * args.n} ({peak_many / peak_n:.2f}x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
