"""The ``kiln`` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from kiln.plugin import KilnError


def _overrides(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KilnError(f"--set takes key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_plugins(args: argparse.Namespace) -> int:
    from kiln import config_help, registry

    rows = []
    for e in registry.entries():
        if e.cls is None:
            rows.append((e.name, "BROKEN", "-", f"{e.error} (from {e.source})"))
        else:
            rows.append((e.name, e.cls.dataset, ",".join(sorted(e.cls.methods())) or "-", e.cls.description))
    width = [max(len(r[i]) for r in rows + [("NAME", "DATASET", "METHODS", "")]) for i in range(3)]
    print(f"{'NAME':<{width[0]}}  {'DATASET':<{width[1]}}  {'METHODS':<{width[2]}}  DESCRIPTION")
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]}")
    if args.verbose:
        for e in registry.entries():
            if e.cls is not None:
                print(f"\n{e.name} config (--set key=value):")
                for line in config_help(e.cls.Config):
                    print(f"  {line}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from kiln import run

    if args.resume:
        spec = run.resume_spec(args.resume, args.runs_dir, args.epochs)
    else:
        if not args.plugin:
            raise KilnError("name a plugin to train (see `kiln plugins`), or --resume RUN")
        spec = run.plan(args.plugin, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                        overrides=_overrides(args.set), workers=args.workers,
                        gpus_per_worker=args.gpus_per_worker, cpus_per_worker=args.cpus_per_worker,
                        seed=args.seed, name=args.name, run=args.run, store=args.store,
                        runs_dir=args.runs_dir, limit=args.limit, plugin_path=args.plugin_path,
                        max_failures=args.max_failures, address=args.address)
    try:
        run.train(spec)
    except KeyboardInterrupt:
        raise KilnError(f"interrupted; continue with `kiln train --resume {spec.run}`") from None
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kiln.store import Store

    versions = Store(args.store).list()
    if not versions:
        print(f"no models in {Store(args.store).root} yet; train one with `kiln train cnn`")
        return 0
    rows = [("NAME", "VERSION", "PLUGIN", "DATASET", "METRICS", "CREATED")]
    for v in versions:
        m = v.manifest
        if m.get("corrupt"):
            rows.append((v.name, str(v.version), "CORRUPT", "-", "-", "-"))
            continue
        metrics = m.get("metrics", {})
        head = m.get("headline")
        keys = ([head] if head in metrics else []) + [k for k in metrics if k != head]
        rows.append((v.name, str(v.version), m["plugin"], Path(m["dataset"]["name"]).name,
                     " ".join(f"{k}={metrics[k]:.4f}" for k in keys[:3]), m.get("created", "-")))
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(f"{c:<{w}}" for c, w in zip(r, width)) + "  " + r[5])
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from kiln import run

    version, metrics = run.evaluate(args.model, args.store, classifier=args.classifier)
    print(f"{version.ref}  " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_samples(args: argparse.Namespace) -> int:
    import shutil

    from kiln.store import Store

    version = Store(args.store).get(args.model)
    pictures = version.artifacts()
    if not pictures:
        print(f"{version.ref} has no stored pictures")
        return 0
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        pictures = [Path(shutil.copy2(p, out / f"{version.name}-{version.version}-{p.name}")) for p in pictures]
    for p in pictures:
        print(p)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import time

    from kiln.serve import app

    if args.max_body_mb <= 0 or args.cpus_per_replica < 0 or args.gpus_per_replica < 0 or args.replicas < 1:
        raise KilnError("--max-body-mb and --replicas must be positive, --cpus/--gpus-per-replica >= 0")
    if not 0 < args.port < 65536:
        raise KilnError(f"--port must be 1-65535, got {args.port}")
    if args.address:
        from kiln.cluster.train import check_address

        check_address(args.address)
    store = app.store_path(args.store)
    refs = app.resolve_refs(store, args.model)
    if args.batch_size < 0 or args.batch_wait_ms < 0 or args.poll_seconds < 0:
        raise KilnError("--batch-size, --batch-wait-ms and --poll-seconds must be >= 0")
    opts = app.ModelOptions(num_cpus=args.cpus_per_replica, num_gpus=args.gpus_per_replica,
                            num_replicas=args.replicas, max_ongoing_requests=args.max_ongoing_requests,
                            batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms)
    spec = app.ServeSpec(store=store, refs=refs, host=args.host, port=args.port,
                         max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                         options={r: opts for r in refs}, token=os.environ.get("KILN_API_TOKEN") or None)
    if args.build_config:
        import yaml

        Path(args.build_config).write_text(yaml.safe_dump(app.serve_config(spec), sort_keys=False))
        print(f"[kiln] wrote {args.build_config}; deploy it with `serve deploy {args.build_config} "
              "--address http://HEAD:8265` (the store path must exist on the cluster)")
        return 0
    print(f"[kiln] serving {', '.join(refs)} from {store}; loading...", flush=True)
    app.start(spec, address=args.address)
    try:
        models = app.wait_ready(args.host, args.port, timeout=args.ready_timeout, token=spec.token)
        base = f"http://{args.host}:{args.port}"
        for m in models["models"]:
            for method in sorted(m.get("methods", {})):
                print(f"[kiln] {m['ref']:<16} POST {base}/models/{m['name']}/{method}", flush=True)
        print(f"[kiln] ready: {base}/models  {base}/docs  (Ctrl-C stops)", flush=True)
        while True:
            time.sleep(args.poll_seconds or 3600)
            if args.poll_seconds:
                for ref in app.refresh(spec, args.model):
                    print(f"[kiln] new version in the store: now serving {ref}", flush=True)
    finally:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        print("[kiln] server stopped", flush=True)


def _value(text: str) -> object:
    """A --set value for a server call: a JSON literal (7, 0.5, true, [1, 2]) or else the string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def _load_image(path: str, shape: list) -> object:
    """An image file as pixel values 0-255 in the model's input shape (grayscale or RGB)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (OSError, UnidentifiedImageError) as e:
        raise KilnError(f"cannot read image {path}: {e}") from None
    h, w = shape[1], shape[2]
    channels = shape[3] if len(shape) > 3 else 1
    img = img.convert("L" if channels == 1 else "RGB").resize((w, h))
    x = np.asarray(img, dtype="float32")
    return x.reshape(shape[1:]) if len(shape) > 3 else x


def cmd_predict(args: argparse.Namespace) -> int:
    from kiln.client import Client

    client = Client(args.url)
    served = {m["ref"].split(":")[0]: m for m in client.models()}
    name = args.model.partition(":")[0]
    if name not in served or "methods" not in served[name]:
        raise KilnError(f"model '{name}' is not served (ready) at {args.url}; served: "
                        f"{', '.join(sorted(served)) or 'none'}")
    methods = served[name]["methods"]
    if "classify" not in methods:
        raise KilnError(f"model '{name}' has no classify method; its methods: {', '.join(sorted(methods))}")
    arg, schema = next(iter(methods["classify"]["inputs"].items()))
    out = client.call(args.model, "classify", **{arg: _load_image(args.image, schema["x-shape"])})
    probs = out["probabilities"][0]
    top = sorted(range(len(probs)), key=lambda i: -probs[i])[:3]
    names = served[name].get("class_names") or None
    print(f"{out['labels'][0]}  (" + ", ".join(f"{i if names is None else names[i]}: {probs[i]:.3f}" for i in top) + ")")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.client import Client

    client = Client(args.url)
    served = {m["ref"].split(":")[0]: m for m in client.models()}
    name = args.model.partition(":")[0]
    if name not in served or "methods" not in served[name]:
        raise KilnError(f"model '{name}' is not served (ready) at {args.url}; served: "
                        f"{', '.join(sorted(served)) or 'none'}")
    methods = served[name]["methods"]
    method = args.method or next((m for m in ("sample", "generate") if m in methods), None)
    if method is None or method not in methods:
        raise KilnError(f"model '{name}' has no {args.method or 'sample or generate'} method; its "
                        f"methods: {', '.join(sorted(methods))}")
    call = {k: _value(v) for k, v in _overrides(args.set).items()}
    if args.n is not None:
        call["n"] = args.n
    if args.out:
        Path(args.out).write_bytes(client.png(args.model, method, **call))
        print(f"[kiln] wrote {args.out}")
    else:
        out = client.call(args.model, method, **call)
        print(out["text"] if "text" in out else __import__("json").dumps(out))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kiln", description="Train and serve Keras model plugins on Ray.")
    p.add_argument("--store", default=None, help="model store folder (default $KILN_STORE or ./kiln-store)")
    p.add_argument("--plugin-path", default=None, metavar="FILE.py",
                   help="also load the plugins defined in this Python file (for development)")
    sub = p.add_subparsers(dest="command", required=True)
    # --store and --plugin-path work before or after the subcommand
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--store", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--plugin-path", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    s = sub.add_parser("plugins", parents=[common], help="list registered plugins")
    s.add_argument("-v", "--verbose", action="store_true", help="also list each plugin's config keys")
    s.set_defaults(fn=cmd_plugins)

    s = sub.add_parser("train", parents=[common], help="train a plugin and store the model as a new version")
    s.add_argument("plugin", nargs="?", help="plugin name (see `kiln plugins`)")
    s.add_argument("--epochs", type=int, default=None, help="epochs (default: the plugin's)")
    s.add_argument("--batch-size", type=int, default=None, help="global batch size (default: the plugin's)")
    s.add_argument("--workers", type=int, default=0, help="Ray Train workers; 0 trains in-process (default)")
    s.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs Ray gives each worker")
    s.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray gives each worker")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the plugin (repeatable; `kiln plugins -v` lists keys)")
    s.add_argument("--dataset", default=None, help="tfds name or path to an .npz (default: the plugin's)")
    s.add_argument("--limit", type=int, default=None, help="use only the first N examples of each split")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--name", default=None, help="model name in the store (default: the plugin name)")
    s.add_argument("--run", default=None, help="run name; rerunning an interrupted run resumes it")
    s.add_argument("--resume", default=None, metavar="RUN", help="resume run RUN with its original settings")
    s.add_argument("--runs-dir", default=None, help="checkpoints folder (default $KILN_RUNS or ./kiln-runs)")
    s.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local one)")
    s.add_argument("--max-failures", type=int, default=1, help="worker failures Ray Train may recover from")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("models", parents=[common], help="list the models in the store")
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("evaluate", parents=[common], help="re-evaluate a stored model on its test split")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--classifier", default=None, metavar="NAME[:VERSION]",
                   help="stored classifier that judges a generative model's samples (default: the "
                        "plugin's, e.g. cnn for dcgan and cgan)")
    s.set_defaults(fn=cmd_evaluate)

    s = sub.add_parser("samples", parents=[common], help="list (or copy) a stored model's pictures")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--out", default=None, metavar="DIR", help="copy the PNGs into DIR")
    s.set_defaults(fn=cmd_samples)

    s = sub.add_parser("serve", parents=[common], help="serve stored models over HTTP with Ray Serve")
    s.add_argument("--model", action="append", default=None, metavar="NAME[:VERSION]",
                   help="model to serve (repeatable; default: the latest version of every model)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local one)")
    s.add_argument("--replicas", type=int, default=1, help="replicas per model")
    s.add_argument("--cpus-per-replica", type=float, default=0.25)
    s.add_argument("--gpus-per-replica", type=float, default=0.0)
    s.add_argument("--max-ongoing-requests", type=int, default=16, help="per replica")
    s.add_argument("--batch-size", type=int, default=32,
                   help="requests merged into one model call (0: no batching)")
    s.add_argument("--batch-wait-ms", type=float, default=2.0, help="how long a batch waits to fill")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="larger request bodies get 413")
    s.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for models to load")
    s.add_argument("--poll-seconds", type=float, default=10.0,
                   help="look for new model versions in the store this often (0: never)")
    s.add_argument("--build-config", default=None, metavar="FILE.yaml",
                   help="write a Ray Serve config for `serve deploy` on a cluster instead of serving")
    s.set_defaults(fn=cmd_serve)

    url = os.environ.get("KILN_URL", "http://127.0.0.1:8000")
    s = sub.add_parser("predict", parents=[common], help="classify an image file with a served model")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--image", required=True, help="PNG or JPEG file (resized to the model's input)")
    s.add_argument("--url", default=url, help="Kiln server (default $KILN_URL or %(default)s)")
    s.set_defaults(fn=cmd_predict)

    s = sub.add_parser("generate", parents=[common], help="sample images or text from a served model")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method argument, e.g. digit=7 or prompt=ROMEO: (repeatable)")
    s.add_argument("--n", type=int, default=None, help="how many samples")
    s.add_argument("--method", default=None, help="method to call (default: sample, else generate)")
    s.add_argument("--out", default=None, metavar="FILE.png", help="write the images as one PNG grid")
    s.add_argument("--url", default=url, help="Kiln server (default $KILN_URL or %(default)s)")
    s.set_defaults(fn=cmd_generate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = parser().parse_args(argv)
    try:
        if args.plugin_path:
            from kiln import registry

            registry.load_file(args.plugin_path)
        return int(args.fn(args) or 0)
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
