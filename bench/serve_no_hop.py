"""What a lone request would cost without the hop between Kiln's ingress and a model replica,
with all of Kiln's ingress plumbing kept, measured side by side in one run with wrk:

1. Kiln as `kiln serve` runs it (HAProxy, the ingress, gRPC to the model replica), 1 connection;
2. Kiln's own ingress deployment (the same routes, middleware, limits, auth check, batcher and
   JSON errors) holding the model version in its own process: the ingress's calls to the model
   replica's handle go to a ``ModelServer`` built in the ingress instead, at 1 and 32 connections;
3. the plain FastAPI/uvicorn server (``serve_throughput.PLAIN``), right after each of them.

The second is an experiment, not a way Kiln serves: it answers the open question of the
serving-reliability issue's one-connection target (docs/design.md, "Where a lone request's time
goes") before the serving layout is changed for it. Rounds alternate, since this machine's speed
drifts by 2x over minutes.

    .venv/bin/python bench/serve_no_hop.py --store /tmp/bench/kiln-store [--seconds 8] [--rounds 3]
"""

import argparse
import inspect
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np

from serve_throughput import start_plain, wait, wrk


def in_process_app(store: str, ref: str) -> object:
    """Kiln's ingress deployment whose model "handle" is a ModelServer in the same process."""
    from ray import serve

    from kiln.serve import app
    from kiln.serve.codecs import Limits
    from kiln.serve.ingress import KilnIngress
    from kiln.serve.replica import ModelServer
    from kiln.store import Store

    class Method:  # handle.method.remote(...) -> an awaitable, as a DeploymentHandle gives
        def __init__(self, fn) -> None:
            self.fn = fn

        def remote(self, *args, **kwargs):
            out = self.fn(*args, **kwargs)
            if inspect.isawaitable(out):
                return out

            async def done():
                return out
            return done()

    class Local:
        deployment_name = "in-process"

        def __init__(self, server: ModelServer) -> None:
            for name in ("describe", "artifact", "infer", "infer_many"):
                setattr(self, name, Method(getattr(server, name)))

    class InProcessIngress(KilnIngress.func_or_class):
        async def reconfigure(self, config):
            refs = list(config["deployments"])
            await super().reconfigure({**config, "deployments": {}})
            if not hasattr(self, "servers"):
                self.servers = {r: ModelServer(store, r) for r in refs}
            self.handles = {r: Local(s) for r, s in self.servers.items()}

        async def _states(self):  # loaded on the first reconfigure, before any request: ready
            return {r: "HEALTHY" for r in self.handles}

    opts = app.ModelOptions()  # the batching `kiln serve` uses by default
    config = {"deployments": {ref: "in-process"}, "batching": {ref: [opts.batch_size, opts.batch_wait_ms]},
              "methods": {ref: Store(store).get(ref).manifest.get("methods", {})},
              "failed": {}, "labels": {}, "traffic": {}}
    dep = serve.deployment(InProcessIngress, name="KilnIngress", ray_actor_options={"num_cpus": 1},
                           max_ongoing_requests=256, user_config=config,
                           logging_config=app.logging_config(False))
    return dep.bind({}, asdict(Limits()), None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--store", required=True, help="store with a trained cnn")
    p.add_argument("--seconds", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (Debian: apt install wrk)")
    import ray
    import requests
    from ray import serve

    from kiln import data
    from kiln.serve import app, runtime

    store = str(Path(args.store).resolve())
    x = np.stack([a.numpy() for a, _ in data.load("mnist", "test", limit=1).ds]).astype("float32")
    one = json.dumps({"images": x.tolist()})
    proc, plain = start_plain(store)
    try:
        wrk(plain, one, 1, 2)  # warm-up
        runtime.init_ray(num_cpus=2)
        port = runtime.free_port()
        url = f"http://127.0.0.1:{port}/models/cnn/classify"
        ref = app.resolve_refs(store, ["cnn"])[0]
        ratios: dict[str, list[float]] = {}

        def pair(name: str, connections: int) -> None:
            wrk(url, one, connections, 2)  # warm-up
            r, q = wrk(url, one, connections, args.seconds), wrk(plain, one, connections, args.seconds)
            ratio = r["p50"] / q["p50"] if connections == 1 else r["rps"] / q["rps"]
            ratios.setdefault(f"{name}, {connections} conn", []).append(ratio)
            what = "p50" if connections == 1 else "req/s"
            print(f"{name:<40} {connections:>3} conn: req/s {r['rps']:7.1f} p50 {r['p50']:6.2f} ms | plain "
                  f"req/s {q['rps']:7.1f} p50 {q['p50']:6.2f} ms | {what} {ratio:.2f}x plain", flush=True)

        for _ in range(args.rounds):
            app.start(app.ServeSpec(store=store, refs=[ref], port=port,
                                    options={"cnn": app.ModelOptions(num_cpus=1)}))
            wait(f"http://127.0.0.1:{port}/v2/health/ready")
            pair("Kiln as `kiln serve` runs it", 1)
            serve.delete("kiln")
            serve.run(in_process_app(store, ref), name="in-process", route_prefix="/", blocking=False)
            wait(f"http://127.0.0.1:{port}/v2/health/ready")
            assert requests.post(url, data=one, headers={"Content-Type": "application/json"}).status_code == 200
            pair("Kiln's ingress, model in-process", 1)
            pair("Kiln's ingress, model in-process", 32)
            serve.delete("in-process")
        app.stop()
        ray.shutdown()
    finally:
        proc.terminate()
        proc.wait()
    print()
    for name, values in ratios.items():
        print(f"{name:<48} vs plain: " + ", ".join(f"{v:.2f}x" for v in values)
              + f" (median {float(np.median(values)):.2f}x)")


if __name__ == "__main__":
    main()
