"""The ``kiln`` command line. Every user error is one line on stderr and a non-zero exit."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from kiln import settings
from kiln.logs import table
from kiln.options import pairs
from kiln.plugin import KilnError


def cmd_plugins(args: argparse.Namespace) -> int:
    from kiln import config_help, registry

    rows = []
    for e in registry.entries():
        if e.cls is None:
            rows.append((e.name, "BROKEN", "-", f"{e.error} (from {e.source})"))
        else:
            rows.append((e.name, e.cls.dataset, ",".join(sorted(e.cls.methods())) or "-", e.cls.description))
    for line in table([("NAME", "DATASET", "METHODS", "DESCRIPTION"), *rows]):
        print(line)
    if args.config:
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
        spec = run.plan(args.plugin, _train_options(args), store=args.store, plugin_path=args.plugin_path)
    try:
        run.train(spec)
    except KeyboardInterrupt:
        raise KilnError(f"interrupted; continue with `kiln train --resume {spec.run}`") from None
    return 0


def _train_options(args: argparse.Namespace) -> Any:
    from kiln import options
    from kiln.spec import TrainOptions

    return options.from_args(TrainOptions, args)


def cmd_tune(args: argparse.Namespace) -> int:
    from kiln import tune

    if args.resume:
        search = tune.load(args.resume, args.runs_dir)
    else:
        if not args.plugin:
            raise KilnError("name a plugin to search (see `kiln plugins`), or --resume SEARCH")
        from kiln import options

        search = tune.plan(args.plugin, options.from_args(tune.SearchOptions, args), _train_options(args),
                           store=args.store, plugin_path=args.plugin_path)
    try:
        summary = tune.run(search, resume=bool(args.resume))
    except KeyboardInterrupt:
        raise KilnError(f"interrupted; continue with `kiln tune --resume {search.name}`") from None
    print(f"[kiln] search results in {search.dir}: trials.csv, curves.png, params.png; best model "
          f"{summary['version']}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from kiln import run

    if args.action == "compare":
        if len(args.names) < 1:
            raise KilnError("name the runs to compare: `kiln runs compare RUN [RUN ...]`")
        path = run.compare(args.names, args.out, args.metric, args.runs_dir)
        print(f"[kiln] wrote {path}")
        return 0
    if args.names:
        raise KilnError(f"`kiln runs` takes no names; did you mean `kiln runs compare {' '.join(args.names)}`?")
    from kiln import tune

    found = sorted(run.runs(args.runs_dir) + tune.searches(args.runs_dir), key=lambda r: r["run"])
    if not found:
        print(f"no runs in {Path(args.runs_dir or settings.runs_dir()).resolve()} yet; start one with "
              "`kiln train cnn` or a search with `kiln tune`")
        return 0
    rows = [("RUN", "PLUGIN", "STATUS", "EPOCHS", "BEST VALIDATION", "STORED")]
    for r in found:
        best = f"{r['metric']}={r['best']:.4f}" if r["best"] is not None else "-"
        rows.append((r["run"], r["plugin"], r["status"], r["epochs"], best, r["version"] or "-"))
    for line in table(rows):
        print(line)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from kiln.store import Store

    store = Store(args.store)
    if args.action == "label":
        if len(args.args) != 2:
            raise KilnError("`kiln models label NAME:VERSION LABEL` points LABEL at that version")
        if args.mlflow:  # the MLflow alias first: where it is refused, the Kiln label stays as it was
            from kiln import tracking
            from kiln.store import check_label

            version = store.get(args.args[0], whole=False)
            uri = tracking.check_mlflow(args.mlflow)
            named = tracking.set_alias(uri, version, check_label(args.args[1]))
            print(f"[kiln] MLflow {', '.join(f'{n}@{args.args[1]}' for n in named)} -> {version.ref}")
        version = store.label(args.args[0], args.args[1])
        print(f"[kiln] {version.name}@{args.args[1]} -> {version.ref}")
        return 0
    if args.action == "unlabel":
        if len(args.args) != 2:
            raise KilnError("`kiln models unlabel NAME LABEL` removes a label")
        if args.mlflow:
            from kiln import tracking

            labels = store.labels(args.args[0])
            if args.args[1] in labels:
                version = store.get(f"{args.args[0]}:{labels[args.args[1]]}", whole=False)
                tracking.delete_alias(tracking.check_mlflow(args.mlflow), version, args.args[1])
        was = store.unlabel(args.args[0], args.args[1])
        print(f"[kiln] removed {args.args[0]}@{args.args[1]} (it named {args.args[0]}:{was})")
        return 0
    if args.action == "rm":
        if not args.args:
            raise KilnError("`kiln models rm NAME:VERSION [...]` deletes versions")
        for ref in args.args:
            print(f"[kiln] deleted {store.remove(ref).ref}")
        return 0
    if args.args:
        raise KilnError(f"`kiln models` takes no names; did you mean `kiln models label {' '.join(args.args)}`?")
    versions = store.list()
    if not versions:
        print(f"no models in {Store(args.store).spec} yet; train one with `kiln train cnn`")
        return 0
    rows = [("NAME", "VERSION", "LABELS", "PLUGIN", "DATASET", "METRICS", "CREATED")]
    labels: dict[tuple[str, int], list[str]] = {}
    for name in {v.name for v in versions}:
        for label, number in store.labels(name).items():
            labels.setdefault((name, number), []).append(label)
    for v in versions:
        m = v.manifest
        named = ",".join(sorted(labels.get((v.name, v.version), []))) or "-"
        if m.get("corrupt"):
            rows.append((v.name, str(v.version), named, "CORRUPT", "-", "-", "-"))
            continue
        metrics = m.get("metrics", {})
        head = m.get("headline")
        keys = ([head] if head in metrics else []) + [k for k in metrics if k != head]
        rows.append((v.name, str(v.version), named, m["plugin"], Path(m["dataset"]["name"]).name,
                     " ".join(f"{k}={metrics[k]:.4f}" for k in keys[:3]), m.get("created", "-")))
    for line in table(rows):
        print(line)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kiln import export

    path = export.export(args.model, args.format, args.out, args.store)
    print(f"[kiln] wrote {path}")
    if args.format == "saved_model":
        print(f"[kiln] TF Serving serves it as is: --model_base_path={path.parent.resolve()} "
              f"--model_name={path.parent.name}")
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
    from kiln import options
    from kiln.serve import app
    from kiln.serve.options import ServeOptions
    from kiln.serve.server import Server

    opts = options.from_args(ServeOptions, args)
    from kiln import tracking

    if any(tracking.is_registry_uri(m) for m in args.model or []):
        args.model = tracking.resolve_all(args.model, opts.mlflow, args.store)
    spec = app.plan(args.model, opts, store=args.store)
    if args.build_config:
        import yaml

        Path(args.build_config).write_text(yaml.safe_dump(app.serve_config(spec), sort_keys=False))
        print(f"[kiln] wrote {args.build_config}; deploy it with `serve deploy {args.build_config} "
              "--address http://HEAD:8265` (the store path must exist on the cluster)")
        return 0
    import faulthandler

    # `kill -USR1 PID`: every thread's stack on stderr, for a server that seems stuck
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    server = Server(spec, models=args.model)
    server.start()
    # SIGTERM (systemd, Docker, Kubernetes) stops the server as Ctrl-C does: after Ray's own
    # handler is installed, which printed a stack dump and left Ray's agents running
    signal.signal(signal.SIGTERM, _terminate)
    try:
        server.wait_ready()
        server.serve_forever()
    except _Terminated:
        return 0
    except KeyboardInterrupt:
        server.status = 130
        raise
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the stop short
        server.stop()


class _Terminated(Exception):
    """SIGTERM arrived: stop serving cleanly."""


def _terminate(signum: int, frame: object) -> None:
    raise _Terminated()


def _local_path(value: str) -> str:
    """A folder as the job sees it: made absolute where you submit (it must be one the cluster's
    nodes reach: shared, or a local head)."""
    return str(Path(value).expanduser().resolve())


def _train_argv(ns: argparse.Namespace, skip: tuple[str, ...], command: str = "train") -> list[str]:
    """``kiln train`` (or ``tune``) arguments rebuilt from their parsed namespace (the flags were
    parsed once, here): every value that differs from its default, except the ``skip`` ones."""
    sub = getattr(parser(), f"{command}_parser")
    out: list[str] = []
    for action in sub._actions:
        if action.dest in ("help", *skip) or action.default is argparse.SUPPRESS:
            continue
        value = getattr(ns, action.dest, None)
        if not action.option_strings:  # the plugin name
            out += [value] if value else []
        elif isinstance(value, list):
            out += [x for v in value for x in (action.option_strings[-1], str(v))]
        elif value is not None and value != action.default:
            out += [action.option_strings[-1], str(value)]
    return out


def cmd_submit(args: argparse.Namespace) -> int:
    from kiln import data, run, store as store_mod
    from kiln.cluster import jobs

    if not args.train_args or args.train_args[0] not in ("train", "tune"):
        raise KilnError("kiln submit runs a training job or a search: `kiln submit [--address URL] [--follow] "
                        "train PLUGIN [kiln train options]` or `... tune PLUGIN --search ...`")
    command, train_args = args.train_args[0], args.train_args[1:]
    ns = parser().parse_args([command, *train_args])  # bad flags fail here, before submitting
    if not ns.plugin and not ns.resume:
        raise KilnError(f"name a plugin to {command} (see `kiln plugins`), or --resume "
                        f"{'SEARCH' if command == 'tune' else 'RUN'}")
    if command == "tune" and not ns.resume:
        from kiln import registry, tune

        # a bad space fails here, not in the job (the plugin file is loaded by main())
        tune.parse_search(ns.search, registry.get(ns.plugin).Config, pairs(ns.overrides or [], "--set"))
    workers, _ = run.parse_workers(ns.workers)
    # Named here (flag or environment): made absolute here. Else the cluster's own $KILN_STORE.
    store = getattr(ns, "store", None) or args.store or settings.store_named()
    store = store_mod.resolve_root(store) if store else None  # a URI as given, a folder absolute
    runs_dir = ns.runs_dir or settings.runs_dir_named()
    if runs_dir and store_mod.is_uri(runs_dir):
        raise KilnError(f"{runs_dir!r}: --runs-dir must be a folder the cluster's nodes share")
    runs_dir = _local_path(runs_dir) if runs_dir else None
    plugin_path = getattr(ns, "plugin_path", None) or args.plugin_path
    rest = _train_argv(ns, skip=("store", "runs_dir", "plugin_path", "dataset"), command=command)
    if ns.dataset:
        rest += ["--dataset", _local_path(ns.dataset) if data.is_file_dataset(ns.dataset) else ns.dataset]
    job_id = jobs.submit(rest, plugin=ns.plugin or "resume", address=args.address, store=store, runs_dir=runs_dir,
                         plugin_path=plugin_path, workers=workers, gpus_per_worker=ns.gpus_per_worker,
                         cpus_per_worker=ns.cpus_per_worker, resume=bool(ns.resume or ns.run),
                         env=pairs(args.env, "--env"), job_id=args.job_id, command=command)
    address = jobs.dashboard_address(args.address)
    print(job_id)
    print(f"[kiln] submitted to {address}; the model goes to "
          f"{store or 'the store $KILN_STORE names on the cluster'}", file=sys.stderr)
    if not args.follow:
        print(f"[kiln] follow it with `kiln jobs logs {job_id} --follow`", file=sys.stderr)
        return 0
    return _follow(args.address, job_id)


def _follow(address: str | None, job_id: str) -> int:
    from kiln.cluster import jobs

    seen: list[str] = []

    def out(chunk: str) -> None:
        seen.append(chunk)
        sys.stdout.write(chunk if chunk.endswith("\n") else chunk + "\n")
        sys.stdout.flush()

    try:
        job = jobs.follow(address, job_id, out)
    except KeyboardInterrupt:
        raise KilnError(f"stopped following; job {job_id} keeps running (`kiln jobs stop {job_id}` "
                        "stops it)") from None
    status = jobs.status_text(job)
    if status != "SUCCEEDED":
        raise KilnError(f"job {job_id} {status}: {jobs.failure(job, ''.join(seen))}")
    print(f"[kiln] job {job_id} SUCCEEDED", file=sys.stderr)
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """What Kiln sees: TensorFlow's build and devices, the driver's GPUs, Ray's cluster; a line per
    problem with its fix. Exit status 1 when something blocks training."""
    import logging

    import ray
    import tensorflow as tf

    from kiln import devices
    from kiln.cluster.train import connect

    report = devices.Report()
    tf_gpus = devices.tensorflow_facts(report)
    devices.gpu_problems(report, len(tf_gpus), tf.test.is_built_with_cuda(), devices.nvidia_smi_gpus())
    started = not ray.is_initialized()  # a Python session's own Ray is inspected, and kept
    try:
        if args.address:
            from kiln import net

            net.check_ray_address(args.address)
            if not started:
                raise KilnError("this Python session is joined to a Ray already; run `kiln doctor "
                                f"--address {args.address}` from a shell to inspect another")
            connect(args.address)
        elif started:  # what a local training would get; its own Ray, no dashboard
            ray.init(address="local", include_dashboard=False, logging_level=logging.ERROR)
        devices.ray_facts(report, ray.cluster_resources(), len(tf_gpus), args.address or "local")
    except KilnError as e:
        report.problems.append((str(e), True))
    finally:
        if started:
            ray.shutdown()
    width = max(len(name) for name, _ in report.facts)
    for name, value in report.facts:
        print(f"{name:<{width}}  {value}")
    for line, blocking in report.problems:
        print(f"{'problem' if blocking else 'warning'}: {line}")
    if not report.problems:
        print("no problem found")
    return 0 if report.ok else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    import datetime

    from kiln.cluster import jobs

    action = args.action or "list"
    if action == "list":
        found = jobs.list_jobs(args.address)
        if not found:
            print(f"no jobs on {jobs.dashboard_address(args.address)}; submit one with `kiln submit train cnn`")
            return 0
        rows = [("ID", "STATUS", "STARTED", "SECONDS", "ENTRYPOINT")]
        for j in found:
            start = datetime.datetime.fromtimestamp(j.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S") \
                if j.start_time else "-"
            end = j.end_time or (time.time() * 1000 if j.start_time else None)
            seconds = f"{(end - j.start_time) / 1000:.0f}" if j.start_time and end else "-"
            rows.append((j.submission_id or j.job_id or "-", jobs.status_text(j), start, seconds,
                         jobs.command(j)))
        for line in table(rows):
            print(line)
        return 0
    if not args.id:
        raise KilnError(f"`kiln jobs {action}` needs a job id (see `kiln jobs`)")
    if action == "logs":
        if args.follow:
            return _follow(args.address, args.id)
        text = jobs.logs(args.address, args.id)
        sys.stdout.write(text)
        job = jobs.info(args.address, args.id)
        print(f"[kiln] job {args.id} {jobs.status_text(job)}", file=sys.stderr)
        return 0
    status = jobs.stop(args.address, args.id)
    print(f"[kiln] job {args.id} {status}")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from kiln.cluster import jobs

    if args.action == "up":
        gcs, dashboard = jobs.cluster_up(port=args.port or 6379, dashboard_port=args.dashboard_port,
                                         dashboard_host=args.dashboard_host, num_cpus=args.num_cpus,
                                         num_gpus=args.num_gpus)
        print(f"[kiln] Ray head on {gcs}; jobs and dashboard at {dashboard} (bound to "
              f"{args.dashboard_host})")
        print(f"[kiln] token authentication: {os.environ.get('RAY_AUTH_MODE', 'token')}; "
              "`kiln submit train cnn` sends the token from ~/.ray/auth_token")
        print("[kiln] `kiln cluster status` shows it, `kiln cluster down` stops it")
        return 0
    if args.action == "down":
        for gcs in jobs.cluster_down(args.port):
            print(f"[kiln] stopped the Ray head on {gcs}")
        return 0
    found = jobs.nodes(args.address)
    rows = [("NODE", "ADDRESS", "ROLE", "STATE", "CPUS", "GPUS")]
    cpus = gpus = 0.0
    for n in found:
        res = n.get("resources_total") or {}
        if n.get("state") == "ALIVE":
            cpus += res.get("CPU", 0)
            gpus += res.get("GPU", 0)
        rows.append((str(n.get("node_id", "-"))[:12], str(n.get("node_ip", "-")),
                     "head" if n.get("is_head_node") else "worker", str(n.get("state", "-")),
                     f"{res.get('CPU', 0):g}", f"{res.get('GPU', 0):g}"))
    for line in table(rows):
        print(line)
    alive = sum(1 for n in found if n.get("state") == "ALIVE")
    print(f"{alive} alive node(s): {cpus:g} CPUs, {gpus:g} GPUs")
    running = [j for j in jobs.list_jobs(args.address) if jobs.status_text(j) in ("PENDING", "RUNNING")]
    print(f"{len(running)} job(s) running" + "".join(
        f"\n  {j.submission_id}  {jobs.status_text(j)}  {jobs.command(j)}"
        for j in running))
    return 0


def _value(text: str, schema: dict | None = None) -> object:
    """A --set value for a server call: the text itself for a string argument (the server takes
    only strings there), else a JSON literal (7, 0.5, true, [1, 2]) or else the string."""
    import json

    if (schema or {}).get("type") == "string":
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _load_image(path: str, shape: list) -> object:
    """An image file as pixel values 0-255 in the model's input shape (its channels and size)."""
    from kiln.images import decode

    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise KilnError(f"cannot read image {path}: {e.strerror or e}") from None
    return decode(data, shape, source=f"image {path}")


def _served(client: object, ref: str, url: str) -> dict:
    """The served, ready model that ``ref`` (NAME[:VERSION]) names, as GET /models describes it."""
    from kiln.store import Ref

    served = {Ref.parse(m["ref"]).name: m for m in client.models()  # type: ignore[attr-defined]
              if m.get("state") == "READY"}
    name = Ref.parse(ref).name
    if name not in served or "methods" not in served[name]:
        raise KilnError(f"model '{name}' is not served (ready) at {url}; served: "
                        f"{', '.join(sorted(served)) or 'none'}")
    return served[name]


def cmd_predict(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.input is None):
        raise KilnError("give --input PATH --output OUT (a dataset, on Ray Data) or --image FILE (one "
                        "picture, to a server)")
    if args.input is not None:
        from kiln import options
        from kiln.cluster import predict

        spec = predict.plan(args.model, args.input, options.from_args(predict.PredictOptions, args),
                            store=args.store)
        predict.run(spec)
        return 0
    from kiln.client import Client

    client = Client(args.url)
    model = _served(client, args.model, args.url)
    methods = model["methods"]
    if "classify" not in methods:
        raise KilnError(f"model '{model['name']}' has no classify method; its methods: "
                        f"{', '.join(sorted(methods))}")
    arg, schema = next(iter(methods["classify"]["inputs"].items()))
    out = client.call(args.model, "classify", **{arg: _load_image(args.image, schema["x-shape"])})
    probs = out["probabilities"][0]
    top = sorted(range(len(probs)), key=lambda i: -probs[i])[:3]
    names = model.get("class_names") or None
    print(f"{out['labels'][0]}  (" + ", ".join(f"{i if names is None else names[i]}: {probs[i]:.3f}" for i in top) + ")")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from kiln.client import Client

    client = Client(args.url)
    model = _served(client, args.model, args.url)
    methods = model["methods"]
    method = args.method or next((m for m in ("sample", "generate") if m in methods), None)
    if method is None or method not in methods:
        raise KilnError(f"model '{model['name']}' has no {args.method or 'sample or generate'} method; its "
                        f"methods: {', '.join(sorted(methods))}")
    inputs = methods[method]["inputs"]
    call = {k: _value(v, inputs.get(k)) for k, v in pairs(args.set, "--set").items()}
    if args.n is not None:
        call["n"] = args.n
    if args.out:
        Path(args.out).write_bytes(client.png(args.model, method, **call))
        print(f"[kiln] wrote {args.out}")
    else:
        out = client.call(args.model, method, **call)
        print(out["text"] if "text" in out else __import__("json").dumps(out))
    return 0


def _training_flags(s: argparse.ArgumentParser, command: str) -> None:
    """The flags of one training run; ``kiln tune`` takes them for each of its trials."""
    from kiln import options
    from kiln.spec import TrainOptions

    s.add_argument("plugin", nargs="?", help="plugin name (see `kiln plugins`)")
    options.add_flags(s, TrainOptions)
    what = "SEARCH" if command == "tune" else "RUN"
    s.add_argument("--resume", default=None, metavar=what,
                   help=f"continue the interrupted {what.lower()} {what} with its original settings")


class _Parser(argparse.ArgumentParser):
    """Flag errors as one line, like every other Kiln error (argparse prints its usage first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"kiln: error: {message} (see `{self.prog} --help`)\n")


JOBS_URL = "Ray head's jobs API (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)"


def _plugins_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("plugins", parents=[common], help="list registered plugins")
    s.add_argument("-v", "--config", action="store_true", help="also list each plugin's config keys")
    s.set_defaults(fn=cmd_plugins)
    return s


def _train_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("train", parents=[common], help="train a plugin and store the model as a new version")
    _training_flags(s, "train")
    s.set_defaults(fn=cmd_train)
    return s


def _tune_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("tune", parents=[common], help="search hyperparameters on Ray Tune; store the best model",
                       description="Hyperparameter search on Ray Tune: each trial is a Kiln run of one "
                                   "sampled config, judged on the validation split; ASHA stops poor trials "
                                   "early. The best trial's model is stored with the search in its manifest.")
    _training_flags(s, "tune")
    from kiln import options
    from kiln.tune import SearchOptions

    options.add_flags(s, SearchOptions)
    s.set_defaults(fn=cmd_tune)
    return s


def _runs_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("runs", help="list training runs, or draw their validation curves together")
    s.add_argument("action", nargs="?", choices=["list", "compare"], default="list")
    s.add_argument("names", nargs="*", metavar="RUN")
    s.add_argument("--runs-dir", default=None, help="runs folder (default $KILN_RUNS or ./kiln-runs)")
    s.add_argument("--metric", default=None, help="compare: the metric to draw (default: val_ of the plugin's headline)")
    s.add_argument("--out", default="runs-compare.png", help="compare: the PNG to write")
    s.set_defaults(fn=cmd_runs)
    return s


def _models_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("models", parents=[common], help="list the models in the store; label and delete versions",
                       description="`kiln models` lists every version with its labels; `kiln models label "
                                   "cnn:3 stable` points a label at a version (moving it if it named "
                                   "another), `kiln models unlabel cnn stable` removes it. Wherever a "
                                   "model is named, cnn@stable is the version the label names. `kiln "
                                   "models rm cnn:2` deletes a version that no label names and no "
                                   "running `kiln serve` serves.")
    s.add_argument("action", nargs="?", choices=["list", "label", "unlabel", "rm"], default="list")
    s.add_argument("args", nargs="*", metavar="NAME[:VERSION] LABEL")
    s.add_argument("--mlflow", default=None, metavar="URI",
                   help="label and unlabel also set and remove the alias of the version in this MLflow "
                        "server's model registry (`kiln train --register`)")
    s.set_defaults(fn=cmd_models)
    return s


def _evaluate_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("evaluate", parents=[common], help="re-evaluate a stored model on its test split")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--classifier", default=None, metavar="NAME[:VERSION]",
                   help="stored classifier that judges a generative model's samples (default: the "
                        "plugin's, e.g. cnn for dcgan and cgan)")
    s.set_defaults(fn=cmd_evaluate)
    return s


def _export_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("export", parents=[common], help="write a stored model's network as SavedModel, ONNX or LiteRT",
                       description="Export the network behind a stored model's predict method (raw "
                                   "inputs in, preprocessing included) for other servers: TF Serving's "
                                   "SavedModel layout, ONNX or LiteRT (.tflite).")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--format", default="saved_model", choices=["saved_model", "onnx", "litert"])
    s.add_argument("--out", default="exported", metavar="DIR",
                   help="folder to write into (SavedModel: DIR/NAME/VERSION/; default ./exported)")
    s.set_defaults(fn=cmd_export)
    return s


def _samples_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("samples", parents=[common], help="list (or copy) a stored model's pictures")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--out", default=None, metavar="DIR", help="copy the PNGs into DIR")
    s.set_defaults(fn=cmd_samples)
    return s


def _serve_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("serve", parents=[common], help="serve stored models over HTTP with Ray Serve")
    s.add_argument("--model", action="append", default=None, metavar="NAME[:VERSION]",
                   help="model to serve (repeatable; default: the latest version of every model); "
                        "models:/NAME@ALIAS serves a version registered in MLflow (--mlflow)")
    from kiln import options
    from kiln.serve.options import ServeOptions

    options.add_flags(s, ServeOptions)
    s.add_argument("--build-config", default=None, metavar="FILE.yaml",
                   help="write a Ray Serve config for `serve deploy` on a cluster instead of serving")
    s.set_defaults(fn=cmd_serve)

    return s


def _submit_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("submit", parents=[common], help="run `kiln train ...` or `kiln tune ...` as a job on a Ray cluster",
                       description="Submit a training job or a search through the Ray Jobs API: `kiln submit "
                                   "[options] train PLUGIN [kiln train options]` or `... tune PLUGIN "
                                   "[kiln tune options]`. The job carries Kiln's code; data and stores stay "
                                   "on the cluster.")
    s.add_argument("--address", default=None, help=JOBS_URL)
    s.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job, e.g. KILN_DATA_DIR=/data (repeatable)")
    s.add_argument("--job-id", default=None, help="job id (default kiln-PLUGIN-TIME-XXXX; also the run name)")
    s.add_argument("train_args", nargs=argparse.REMAINDER, metavar="train|tune PLUGIN ...")
    s.set_defaults(fn=cmd_submit)
    return s


def _doctor_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("doctor", parents=[common],
                       help="show what TensorFlow and Ray see (versions, CPUs, GPUs) and what to fix")
    s.add_argument("--address", default=None, help="Ray cluster to inspect (default: a local one, as "
                                                    "`kiln train` starts)")
    s.set_defaults(fn=cmd_doctor)
    return s


def _jobs_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("jobs", help="list Kiln's jobs on a Ray cluster, show their logs, stop them")
    s.add_argument("action", nargs="?", choices=["list", "logs", "stop"], default="list")
    s.add_argument("id", nargs="?", help="job id (for logs and stop)")
    s.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    s.add_argument("--address", default=None, help=JOBS_URL)
    s.set_defaults(fn=cmd_jobs)
    return s


def _cluster_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("cluster", help="start, inspect or stop a Ray head on this machine")
    s.add_argument("action", choices=["up", "down", "status"])
    s.add_argument("--address", default=None, help="status: " + JOBS_URL)
    s.add_argument("--port", type=int, default=None,
                   help="up: the head's GCS port (default 6379); down: stop only this one "
                        "(default: every head `kiln cluster up` started here, no other Ray)")
    s.add_argument("--dashboard-port", type=int, default=8265, help="up: dashboard and jobs API port")
    s.add_argument("--dashboard-host", default="127.0.0.1",
                   help="up: address the jobs API binds (default loopback; see docs/cluster.md before widening)")
    s.add_argument("--num-cpus", type=int, default=None, help="up: CPUs the head offers (default all)")
    s.add_argument("--num-gpus", type=int, default=None, help="up: GPUs the head offers (default all)")
    s.set_defaults(fn=cmd_cluster)
    return s


def _predict_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from kiln import options
    from kiln.cluster.predict import PredictOptions

    s = sub.add_parser("predict", parents=[common],
                       help="score a dataset with a stored model on Ray Data, or classify one image with a server",
                       description="`kiln predict MODEL --input PATH --output OUT.parquet` scores every "
                                   "row of a folder of pictures, an .npz, a HAR folder or a text file of "
                                   "prompts with a stored model, in a pool of Ray Data actors, and writes a "
                                   "row per input. `kiln predict MODEL --image FILE` classifies one "
                                   "picture with a running `kiln serve` (--url).")
    s.add_argument("model", metavar="NAME[:VERSION|@LABEL]")
    s.add_argument("--image", default=None, help="one PNG or JPEG file for a served model (resized to its input)")
    s.add_argument("--url", default=settings.url(), help="with --image: the Kiln server (default $KILN_URL "
                                                         "or %(default)s)")
    s.add_argument("--input", default=None, metavar="PATH",
                   help="a folder of pictures (class subfolders or flat), an .npz (its x), a HAR folder "
                        "(its test split) or a .txt of prompts, one per line")
    options.add_flags(s, PredictOptions)
    s.set_defaults(fn=cmd_predict)
    return s


def _generate_command(sub: Any, common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    s = sub.add_parser("generate", parents=[common], help="sample images or text from a served model")
    s.add_argument("model", metavar="NAME[:VERSION]")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a method argument, e.g. digit=7 or prompt=ROMEO: (repeatable)")
    s.add_argument("--n", type=int, default=None, help="how many samples")
    s.add_argument("--method", default=None, help="method to call (default: sample, else generate)")
    s.add_argument("--out", default=None, metavar="FILE.png", help="write the images as one PNG grid")
    s.add_argument("--url", default=settings.url(), help="Kiln server (default $KILN_URL or %(default)s)")
    s.set_defaults(fn=cmd_generate)
    return s


# each builds one subcommand's parser, its flags beside the command they belong to (cmd_*)
COMMANDS = (_plugins_command, _train_command, _tune_command, _runs_command, _models_command,
            _evaluate_command, _export_command, _samples_command, _serve_command, _submit_command,
            _jobs_command, _cluster_command, _predict_command, _generate_command, _doctor_command)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kiln", description="Train and serve Keras model plugins on Ray.")
    p.add_argument("--store", default=None, help="model store folder (default $KILN_STORE or ./kiln-store)")
    p.add_argument("--plugin-path", default=None, metavar="FILE.py",
                   help="also load the plugins defined in this Python file (for development)")
    p.add_argument("--verbose", action="store_true",
                   help="also show TensorFlow's and Ray's start-up notices (or set KILN_VERBOSE=1)")
    sub = p.add_subparsers(dest="command", required=True)
    # --store and --plugin-path work before or after the subcommand
    common = _Parser(add_help=False)
    common.add_argument("--store", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--plugin-path", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    commands = {}
    for add in COMMANDS:
        s = add(sub, common)
        commands[s.prog.split()[-1]] = s
    # kiln submit rebuilds a job's `kiln train`/`kiln tune` arguments with these
    p.train_parser, p.tune_parser = commands["train"], commands["tune"]  # type: ignore[attr-defined]
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from kiln import logs

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    args = parser().parse_args(argv)
    if args.verbose:
        os.environ[settings.VERBOSE] = "1"  # also for the Ray processes this command starts
    logs.quiet_process()
    if getattr(args, "address", None) or os.environ.get("RAY_ADDRESS"):  # Ray is not imported yet
        from kiln import net

        net.join_with_token()
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
