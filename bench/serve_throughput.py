"""Serving speed, measured side by side in one run with wrk (a compiled HTTP load generator;
Debian: `apt install wrk`), for the CNN on single-image JSON requests:

1. Kiln over Ray Serve as `kiln serve` runs it (HAProxy in front, gRPC between replicas),
   batching on (the default), at 1 and 32 connections;
2. a plain single-process FastAPI/uvicorn server calling the same model (what a user would write
   instead), at 1 and 32 connections, each right after Kiln's;
3. GET /v2/health/live at 1 connection, alone and while /v2/health/ready is probed twice a
   second (readiness probes must not stall other requests);
4. one Open Inference Protocol v2 request with 256 images, against in-process ``model.predict``
   on the same batch (images/s);
5. Kiln with batching off, at 32 connections;
6. the floor under any Serve ingress: a FastAPI ingress deployment on the same data path whose
   route reads the body and returns a constant (no model, no parsing), at 32 connections;
7. Kiln, batching on, behind Serve's default Python HTTP proxy, at 32 connections;
8. the same model in a Serve deployment that is its own HTTP ingress (the plugin's ``classify``
   in a worker thread, as Kiln's replica runs it), at 1 connection: what a request would cost
   without the hop from Kiln's ingress to a model replica;
9. ``kiln serve --colocate`` (the model in the ingress's replicas: no hop) at 1 and 32
   connections, each against the plain server right after it, and on the 256-image v2 request.

At one connection it also prints the CPU time each process spent per request (from /proc, so
Linux only): where a lone client's time goes.

    .venv/bin/python bench/serve_throughput.py --store /tmp/bench/kiln-store [--seconds 15]
"""

# No `from __future__ import annotations`: FastAPI reads the no-op route's types at run time.

import argparse
import atexit
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np


def wait(url: str, timeout: float = 300) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout} s")


def cpu_seconds() -> dict[str, tuple[str, float]]:
    """pid -> (name, CPU seconds used so far) of every running process; Linux /proc. The name is
    a Ray worker's title without the task it runs now (ray::ServeController, not
    ray::ServeController.listen_for_change), else the program's file name (haproxy, raylet)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, tuple[str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            words = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").split()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if words:  # Ray's title pads the command line with spaces
            argv0 = words[0].decode(errors="replace")
            name = argv0.split(".")[0] if argv0.startswith("ray::") else Path(argv0).name
            out[pid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return out


def wrk(url: str, body: str | None, connections: int, seconds: int) -> dict[str, float]:
    """POST ``body`` as JSON (GET when None) over ``connections`` for ``seconds``."""
    script = Path(tempfile.mkdtemp()) / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body)}\n" if body is not None else "")
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:  # a rate of error answers measures nothing
        raise SystemExit(f"{url}: {non2xx.group(1)} of the responses were not 2xx")
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50": ms("50"),
            "p99": ms("99")}


PLAIN = textwrap.dedent('''
    """What a user would write instead of Kiln: one process, FastAPI, the model in memory."""
    import numpy as np
    from fastapi import FastAPI, Request
    from kiln import models

    plugin, model, _ = models.load("cnn", "{store}")
    app = FastAPI()

    @app.post("/classify")
    async def classify(request: Request):
        body = await request.json()
        x = np.asarray(body["images"], dtype="float32").reshape(-1, 28, 28, 1) / 255.0
        probs = np.asarray(model.predict_on_batch(x))
        return {{"classes": probs.argmax(-1).tolist(), "probabilities": probs.round(6).tolist()}}
''')


def start_plain(store: str) -> tuple[subprocess.Popen, str]:
    """The plain server (PLAIN) in a process of its own, once it answers: (process, its URL)."""
    from kiln.serve import runtime

    folder = Path(tempfile.mkdtemp())
    (folder / "plain_server.py").write_text(PLAIN.format(store=store))
    port = runtime.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "plain_server:app", "--host", "127.0.0.1",
                             "--port", str(port), "--log-level", "warning"], cwd=folder,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    wait(f"http://127.0.0.1:{port}/docs")
    return proc, f"http://127.0.0.1:{port}/classify"


def noop_app() -> object:
    """The floor: Serve's FastAPI ingress on Kiln's data path, with a route that does no work."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    @serve.ingress(api)
    class NoOp:
        @api.post("/models/{model}/{method}")
        async def call(self, model: str, method: str, request: Request) -> dict[str, list[int]]:
            await request.body()
            return {"classes": [7]}

    return NoOp.bind()


def direct_app(store: str) -> object:
    """The model in a deployment that is its own FastAPI ingress: no handle call between an
    ingress and a model replica, the model call as Kiln's replica makes it."""
    from fastapi import FastAPI, Request
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=256,
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
    @serve.ingress(api)
    class Direct:
        def __init__(self) -> None:
            from kiln import models

            self.plugin, self.model, _ = models.load("cnn", store)

        @api.post("/models/{model}/{method}")
        async def call(self, model: str, method: str, request: Request) -> dict:
            import asyncio

            import orjson

            images = np.asarray(orjson.loads(await request.body())["images"], dtype="float32")
            return await asyncio.to_thread(self.plugin.infer, self.model, method, {"images": images})

    return Direct.bind()


def v2_batch(base: str, store: str, x: np.ndarray, n: int = 20) -> tuple[float, float]:
    """Images/s of the 256 images ``x`` in one v2 request, then of in-process ``model.predict``
    on the same batch right after (Serve idle meanwhile)."""
    import requests

    from kiln import models

    body = {"inputs": [{"name": "images", "shape": [256, 28, 28, 1], "datatype": "FP32",
                        "data": x.ravel().tolist()}]}
    requests.post(f"{base}/v2/models/cnn/infer", json=body)
    t0 = time.perf_counter()
    for _ in range(n):
        assert requests.post(f"{base}/v2/models/cnn/infer", json=body).status_code == 200
    served = 256 * n / (time.perf_counter() - t0)
    plugin, model, _ = models.load("cnn", store)
    batch = x.reshape(-1, 28, 28, 1) / 255.0
    model.predict(batch, verbose=0)
    t0 = time.perf_counter()
    for _ in range(n):
        model.predict(batch, verbose=0, batch_size=256)
    return served, 256 * n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store with a trained cnn")
    p.add_argument("--seconds", type=int, default=15)
    args = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt install wrk)")
    import ray
    import requests
    from ray import serve

    from kiln import data
    from kiln.serve import app, runtime
    from kiln.serve.options import ServeOptions

    store = str(Path(args.store).resolve())
    x = np.stack([a.numpy() for a, _ in data.load("mnist", "test", limit=256).ds]).astype("float32")
    one = json.dumps({"images": x[:1].tolist()})
    rows: list[tuple[str, int, dict[str, float]]] = []

    cpu: dict[str, list[tuple[str, float]]] = {}  # row name -> (process, CPU ms per request)

    def measure(name: str, url: str, body: str | None, connections: int, seconds: int,
                per_process: bool = False) -> None:
        before = cpu_seconds() if per_process else {}
        rows.append((name, connections, wrk(url, body, connections, seconds)))
        if per_process:  # where a request's time goes: the CPU each process spent on it
            after, n = cpu_seconds(), rows[-1][2]["rps"] * seconds
            used = [(k, (v - before[pid][1]) * 1000 / n) for pid, (k, v) in after.items() if pid in before]
            cpu[name] = sorted(((k, ms) for k, ms in used if ms >= 0.05), key=lambda e: -e[1])
        print(rows[-1], flush=True)

    # the plain server runs (idle) beside Kiln and is measured right after Kiln at the same number
    # of connections, so both see the same machine (this one's speed drifts by 2x over minutes)
    proc, plain_url = start_plain(store)
    atexit.register(proc.terminate)
    wrk(plain_url, one, 1, 2)  # warm-up
    # Serve's data path as `kiln serve` starts it (HAProxy, gRPC between replicas), then Serve's
    # default (its Python HTTP proxy), each in a fresh local Ray
    paths = (("", {}), (", Python proxy", {"RAY_SERVE_ENABLE_HA_PROXY": "0",
                                          "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}))
    for label, env in paths:
        os.environ.update(env)
        runtime.init_ray(num_cpus=2)
        for k in env:
            del os.environ[k]
        port = runtime.free_port()
        base = f"http://127.0.0.1:{port}"
        for batching in ((True, False) if not label else (True,)):
            opts = ServeOptions(port=port, cpus_per_replica=1, batch_size=32 if batching else 0)
            spec = app.ServeSpec(store=store, refs=[app.resolve_refs(store, ["cnn"])[0]], opts=opts)
            app.start(spec)
            wait(f"{base}/v2/health/ready")
            requests.post(f"{base}/models/cnn/classify", data=one, headers={"Content-Type": "application/json"})
            for c in ((1, 32) if batching and not label else (32,)):
                measure(f"Kiln, batching {'on' if batching else 'off'}{label}",
                        f"{base}/models/cnn/classify", one, c, args.seconds, per_process=c == 1)
                if batching and not label:
                    measure("plain FastAPI/uvicorn, 1 process", plain_url, one, c, args.seconds)
            if batching and not label:
                # health probes must not stall other requests
                live = f"{base}/v2/health/live"
                measure("GET /v2/health/live", live, None, 1, 10)
                stop = threading.Event()

                def probe() -> None:  # a load balancer asking for readiness twice a second
                    while not stop.wait(0.5):
                        requests.get(f"{base}/v2/health/ready", timeout=10)

                prober = threading.Thread(target=probe)
                prober.start()
                measure("GET /v2/health/live, /ready probed every 0.5 s", live, None, 1, 10)
                stop.set()
                prober.join()
                v2_ips, local_ips = v2_batch(base, store, x)
            serve.delete("kiln")
        if not label:
            # the models in the ingress's replicas (kiln serve --colocate): no hop
            spec = app.ServeSpec(store=store, refs=[app.resolve_refs(store, ["cnn"])[0]],
                                 opts=ServeOptions(port=port, cpus_per_replica=1, colocate=True))
            app.start(spec)
            wait(f"{base}/v2/health/ready")
            requests.post(f"{base}/models/cnn/classify", data=one, headers={"Content-Type": "application/json"})
            for c in (1, 32):
                measure("Kiln --colocate", f"{base}/models/cnn/classify", one, c, args.seconds,
                        per_process=c == 1)
                measure("plain FastAPI/uvicorn, 1 process", plain_url, one, c, args.seconds)
            colocated_ips, colocated_local_ips = v2_batch(base, store, x)
            serve.delete("kiln")
            serve.run(noop_app(), name="noop", route_prefix="/", blocking=False)
            wait(f"{base}/docs")
            measure("Serve ingress doing nothing (floor)", f"{base}/models/cnn/classify", one, 32,
                    args.seconds)
            serve.delete("noop")
            serve.run(direct_app(store), name="direct", route_prefix="/", blocking=False)
            wait(f"{base}/docs")
            requests.post(f"{base}/models/cnn/classify", data=one, headers={"Content-Type": "application/json"})
            measure("the model as its own Serve ingress (no hop)", f"{base}/models/cnn/classify", one, 1,
                    args.seconds, per_process=True)
            measure("plain FastAPI/uvicorn, 1 process", plain_url, one, 1, args.seconds)
            serve.delete("direct")
        app.stop()
        ray.shutdown()

    proc.terminate()
    proc.wait()

    plain32 = next(r for name, c, r in rows if name.startswith("plain") and c == 32)
    # each row is compared with the plain server's run right after it at the same connections
    after = {i: r if n.startswith("plain") else
             next(q for n2, c2, q in rows[i + 1:] + rows[:i] if n2.startswith("plain") and c2 == c)
             for i, (n, c, r) in enumerate(rows)}
    print(f"\n{'server':<48} {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'vs plain':>8}")
    for i, (name, c, r) in enumerate(rows):
        plain = after[i]
        ratio = "" if name.startswith("GET") else f"{r['rps'] / plain['rps']:>7.2f}x"
        print(f"{name:<48} {c:>5} {r['rps']:>8.1f} {r['p50']:>8.2f} {r['p99']:>8.2f} {ratio}")
    on = next(r for n, c, r in rows if n == "Kiln, batching on" and c == 32)
    off = next(r for n, c, r in rows if n == "Kiln, batching off")
    py = next(r for n, c, r in rows if "Python proxy" in n)
    print(f"\nbatching on vs off at 32 connections: {on['rps'] / off['rps']:.2f}x")
    print(f"Kiln vs plain at 32 connections: {on['rps'] / plain32['rps']:.2f}x")
    print(f"HAProxy vs Serve's Python proxy at 32 connections: {on['rps'] / py['rps']:.2f}x")
    floor = next(r for n, c, r in rows if "floor" in n)
    print(f"Serve's floor at 32 connections (an ingress doing nothing): {floor['rps']:.0f} req/s, "
          f"p99 {floor['p99']:.0f} ms")
    k = next(i for i, (n, c, r) in enumerate(rows) if n == "Kiln, batching on" and c == 1)
    d = next(i for i, (n, c, r) in enumerate(rows) if "no hop" in n)
    print(f"one connection, p50: Kiln {rows[k][2]['p50']:.2f} ms ({rows[k][2]['p50'] / after[k]['p50']:.2f}x "
          f"the plain server's {after[k]['p50']:.2f} ms); the model as its own ingress "
          f"{rows[d][2]['p50']:.2f} ms ({rows[d][2]['p50'] / after[d]['p50']:.2f}x the plain server's "
          f"{after[d]['p50']:.2f} ms)")
    for name, used in cpu.items():
        print(f"CPU per request at one connection, {name} (total {sum(ms for _, ms in used):.2f} ms on "
              f"{os.cpu_count()} cores): " + "; ".join(f"{k} {ms:.2f} ms" for k, ms in used[:6]))
    calm, probed = (r for n, c, r in rows if n.startswith("GET"))
    print(f"GET /v2/health/live p99 at 1 connection: {calm['p99']:.1f} ms alone, {probed['p99']:.1f} ms "
          "while /v2/health/ready is probed every 0.5 s")
    print(f"256 images in one v2 request: {v2_ips:.0f} images/s; in-process model.predict: "
          f"{local_ips:.0f} images/s; ratio {v2_ips / local_ips:.2f}")
    c1, c32 = (next(i for i, (n, c, r) in enumerate(rows) if n == "Kiln --colocate" and c == k) for k in (1, 32))
    print(f"Kiln --colocate: one connection p50 {rows[c1][2]['p50']:.2f} ms, "
          f"{rows[c1][2]['p50'] / after[c1]['p50']:.2f}x the plain server's {after[c1]['p50']:.2f} ms; "
          f"32 connections {rows[c32][2]['rps'] / after[c32]['rps']:.2f}x its req/s; 256 images in one v2 "
          f"request {colocated_ips:.0f} images/s, {colocated_ips / colocated_local_ips:.2f}x in-process predict")


if __name__ == "__main__":
    main()
