"""The Python API behind ``kiln train`` / ``kiln evaluate``: plan a run (validate everything before
any work), train it in-process or on Ray Train, then evaluate and store the result.

    from kiln import run
    spec = run.plan("cnn", epochs=3, workers=2, overrides={"dropout": "0.3"})
    version = run.train(spec)            # a kiln.store.Version
    plugin, model, version = kiln.models.load(version.ref)
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from kiln import __version__, checkpoint, data, models, net, registry, settings, store as store_mod
from kiln.plugin import DatasetInfo, KilnError, Plugin, make_config
from kiln.spec import TrainOptions, TrainSpec, parse_early_stop, parse_span
from kiln.logs import say
from kiln.values import plain

RUN_FILE = "kiln-run.json"


def parse_workers(text: str | int) -> tuple[int, int]:
    """--workers N (fixed; 0 trains in-process) or MIN-MAX (elastic Ray Train) -> (min, max)."""
    return parse_span(text, "--workers", least=0)


def plan(plugin: str, opts: TrainOptions | None = None, *, store: str | Path | None = None,
         plugin_path: str | None = None, **options_: Any) -> TrainSpec:
    """Validate a training request and return its spec; raises KilnError naming what is wrong.
    ``opts`` are the run's options (``TrainOptions``), or give them as keywords:
    ``plan("cnn", epochs=3, workers=2, overrides={"dropout": "0.3"})``.

    Everything that does not need the plugin's code is checked first, so a bad flag or a missing
    file is one line in a fraction of a second, before the plugin (and TensorFlow) is imported."""
    from kiln import options

    if opts is not None and options_:
        raise TypeError("give plan() its options as TrainOptions or as keywords, not both")
    o = options.check(opts or TrainOptions(**options_))
    workers, max_workers = parse_workers(o.workers)
    if o.early_stop:
        parse_early_stop(o.early_stop)
        if o.val_fraction == 0:
            raise KilnError("--early-stop watches a validation metric; it needs --val-fraction above 0")
    dataset, overrides, address = o.dataset, o.overrides, o.address
    if dataset and data.is_file_dataset(dataset):
        dataset = data.check_path(dataset)
    tracking = None
    if o.mlflow or settings.mlflow_uri():
        from kiln.tracking import check_mlflow

        tracking = {"uri": check_mlflow(o.mlflow or settings.mlflow_uri() or ""),
                    "experiment": settings.mlflow_experiment()}
    if o.register is not None:
        if tracking is None:
            raise KilnError("--register registers the model in MLflow's model registry; give the server "
                            "with --mlflow URI (or MLFLOW_TRACKING_URI)")
        tracking["register"] = store_mod.check_name(o.register) if o.register else ""
    if address:
        net.check_ray_address(address)
    if plugin_path:
        plugin_path = str(Path(plugin_path).resolve())
        registry.load_file(plugin_path)
    cls = registry.get(plugin)
    config = make_config(cls.Config, overrides)  # unknown keys / bad values fail here, before any work
    if o.precision not in cls.precisions:
        raise KilnError(f"--precision {o.precision}: {plugin} trains under {', '.join(cls.precisions)} only")
    if o.register is not None and cls.export_model is Plugin.export_model:
        raise KilnError(f"--register puts the network `kiln export` writes in MLflow's registry: "
                        f"{cls.no_export_reason()}")
    dataset = dataset or cls.dataset
    dataset = data.named_folder(dataset) or dataset  # an image folder under $KILN_DATA_DIR
    if data.is_file_dataset(dataset):
        dataset = data.check_path(dataset)
    store = store_mod.resolve_root(store)
    if data.kind(dataset) == "images" and "?size=" not in dataset:
        # the plugin's size and channels name the folder's view (Plugin.image_view)
        plugin_obj = cls(config)
        plugin_obj.store = store
        size, channels = plugin_obj.image_view()
        dataset = data.image_key(dataset, size, channels, getattr(config, "skip_broken", False))
    batch = o.batch_size or cls.batch_size
    if workers and max_workers == workers and batch % workers:
        raise KilnError(f"--batch-size {batch} must be divisible by --workers {workers}: each worker "
                        f"takes an equal share (try {batch - batch % workers or workers})")
    if batch < max_workers:
        raise KilnError(f"--batch-size {batch} is smaller than the {max_workers} workers")
    name = store_mod.check_name(o.name or plugin)
    run = o.run or f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    store_mod.check_name(run)
    return TrainSpec(plugin=plugin, dataset=dataset, epochs=o.epochs or cls.epochs,
                     batch_size=batch, run=run, name=name,
                     store=store,
                     runs_dir=str(Path(o.runs_dir or settings.runs_dir()).resolve()),
                     overrides=dict(overrides or {}), workers=workers,
                     max_workers=max_workers if max_workers > workers else 0,
                     gpus_per_worker=o.gpus_per_worker,
                     cpus_per_worker=o.cpus_per_worker, seed=o.seed, limit=o.limit, plugin_path=plugin_path,
                     max_failures=o.max_failures, address=address,
                     val_fraction=cls.val_fraction if o.val_fraction is None else o.val_fraction,
                     early_stop=o.early_stop, mlflow=tracking, precision=o.precision)


def resume_spec(run: str, runs_dir: str | Path | None = None, epochs: int | None = None) -> TrainSpec:
    """The spec a run was started with (for ``--resume RUN``), optionally with more epochs."""
    path = Path(runs_dir or settings.runs_dir()).resolve() / run / RUN_FILE
    if not path.is_file():
        raise KilnError(f"no run '{run}' in {path.parent.parent} (looked for {path})")
    spec = TrainSpec.from_dict(json.loads(path.read_text()))
    if epochs:
        spec.epochs = epochs
    return spec


def _check_run(spec: TrainSpec, run_dir: Path) -> None:
    """A run name is reused only to resume the same training; refuse to mix different runs."""
    path = run_dir / RUN_FILE
    if path.is_file():
        # read as a spec: a field newer than the run file (val_fraction) takes its default, so a
        # run started before it still resumes
        old = TrainSpec.from_dict(json.loads(path.read_text()))
        for key in ("plugin", "dataset", "overrides", "batch_size", "limit", "seed", "val_fraction"):
            if getattr(old, key) != getattr(spec, key):
                raise KilnError(f"run '{spec.run}' was started with {key}={getattr(old, key)!r}, not "
                                f"{getattr(spec, key)!r}; resume it unchanged or pick a new --run name")
    last = checkpoint.latest(run_dir)
    if last is not None:
        done = checkpoint.state(last)["epoch"]
        if done >= spec.epochs:
            raise KilnError(f"run '{spec.run}' already finished {done}/{spec.epochs} epochs; pass "
                            f"--epochs N (N > {done}) to train it further, or a new --run name")


def train(spec: TrainSpec) -> store_mod.Version:
    """Train ``spec`` (in-process when workers == 0, else on Ray Train), then evaluate and store."""
    info = data.prepare(spec.dataset)
    plugin = models.for_spec(spec, info)  # a plugin rejecting this data fails here, not in every worker
    _check_run(spec, spec.run_dir)
    tracker = begin(spec, plugin)
    say(f"run '{spec.run}': {spec.plugin} on {spec.dataset}, {spec.epochs} epochs, "
        f"{_where(spec)}; "
        f"checkpoints in {spec.run_dir}" + (f"; MLflow run {tracker.run_id} at {tracker.uri}" if tracker else ""))
    try:
        final = _fit(spec, info)
    except BaseException as e:
        if tracker is not None:
            tracker.end("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return finalize(spec, info, final)


def begin(spec: TrainSpec, plugin: Plugin) -> Any:
    """Open the run's folder: its MLflow run (kiln.tracking.Mlflow, or None without MLflow) and
    its run file, which records everything a resume needs (the MLflow run id too)."""
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    if spec.config is None:
        spec.config = plain(vars(plugin.config))
    tracker = start_mlflow(spec, plugin)
    (spec.run_dir / RUN_FILE).write_text(json.dumps(spec.to_dict(), indent=2))
    return tracker


def start_mlflow(spec: TrainSpec, plugin: Plugin) -> Any:
    """The MLflow run of ``spec`` (kiln.tracking.Mlflow), created with its parameters on the
    first start (under ``spec.mlflow["parent"]``, a search's run, if any) and continued on a
    resume; None without MLflow. Records the run id in the spec."""
    if not spec.mlflow:
        return None
    from kiln.tracking import Mlflow

    old = spec.run_dir / RUN_FILE
    if not spec.mlflow.get("run_id") and old.is_file():  # the same run started again: continue its MLflow run
        before = (json.loads(old.read_text()).get("mlflow") or {})
        if before.get("uri") == spec.mlflow["uri"] and before.get("run_id"):
            spec.mlflow["run_id"] = before["run_id"]
    if spec.mlflow.get("run_id"):
        return Mlflow.of(spec.mlflow)
    params = {**vars(plugin.config), "plugin": spec.plugin, "dataset": spec.dataset, "epochs": spec.epochs,
              "batch_size": spec.batch_size, "workers": spec.workers_text, "seed": spec.seed,
              "limit": spec.limit, "val_fraction": spec.val_fraction, "early_stop": spec.early_stop}
    tracker = Mlflow.start(spec.mlflow["uri"], spec.mlflow["experiment"], spec.run, params,
                           {"kiln.plugin": spec.plugin, "kiln.run": spec.run},
                           parent=spec.mlflow.get("parent"))
    spec.mlflow["run_id"] = tracker.run_id
    return tracker


def _fit(spec: TrainSpec, info: DatasetInfo) -> Path:
    """Train in-process or on Ray Train; the folder holding the run's checkpoints."""
    if spec.workers == 0:
        import tensorflow as tf

        from kiln import devices
        from kiln.trainer import LocalContext, train_loop

        devices.configure(None, gpus=True)
        train_loop(spec, info, tf.distribute.get_strategy(), LocalContext(spec.run_dir))
        return spec.run_dir
    from kiln.cluster.train import fit

    return fit(spec, info)


def _where(spec: TrainSpec) -> str:
    if spec.workers:
        return f"{spec.workers_text} Ray Train workers"
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")  # set by Ray for a job that reserved GPUs
    return "in-process" + (f" on GPUs {gpus}" if gpus else "")


def finalize(spec: TrainSpec, info: DatasetInfo, run_dir: Path, extra: dict[str, Any] | None = None,
             pictures: list[Path] = ()) -> store_mod.Version:
    """Rebuild the model from the run's last checkpoint, evaluate it, draw samples, store it.
    ``extra``: more manifest fields (a search's record); ``pictures``: more PNGs for its artifacts."""
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise KilnError(f"run '{spec.run}' left no checkpoint in {run_dir}")
    plugin = models.for_spec(spec, info)
    model = models.build(plugin)
    # with --early-stop, the best epoch's weights (Keras' restore_best_weights)
    state = checkpoint.restore(model, ckpt, with_optimizers=False, best=bool(spec.early_stop))
    test = test_dataset(plugin, spec.dataset, spec.limit)  # re-iterable: each consumer reads it anew
    metrics = plugin.evaluate(model, test)
    cls = type(plugin)
    judged_by = None
    if cls.judged_by:
        try:
            from kiln import quality

            classifier = quality.classifier_for(plugin, None, spec.store)
        except KilnError as e:
            say(f"not judged by a classifier: {e}")
        else:
            metrics.update(quality.judge(plugin, model, classifier, per_class=cls.judge_per_class,
                                          limit=spec.limit))
            judged_by = classifier[2]

    def write(tmp: Path) -> dict[str, Any]:
        model.save_weights(tmp / store_mod.WEIGHTS)
        artifacts = tmp / store_mod.ARTIFACTS
        artifacts.mkdir()
        plugin.samples(model, test, artifacts)
        for picture in [*sorted(spec.progress_dir.glob("*.png")), *pictures]:  # drawn while training
            shutil.copy2(picture, artifacts / picture.name)
        (tmp / store_mod.ASSETS).mkdir()
        plugin.save_assets(model, test, tmp / store_mod.ASSETS)
        return {
            "plugin": spec.plugin, "plugin_path": spec.plugin_path,
            "config": plain(vars(plugin.config)), "dataset": info.to_dict(),
            "metrics": metrics, "headline": cls.headline, "history": state["history"],
            "resumed": state.get("resumed", []),
            "validation": data.validation(spec.dataset, info, spec.limit, spec.val_fraction, spec.seed),
            "early_stop": state.get("early_stop"),
            "judged_by": judged_by,
            "methods": {k: m.describe(info) for k, m in cls.methods().items()},
            "predict": cls.predict,
            "train": {k: getattr(spec, k) for k in ("epochs", "batch_size", "workers",
                                                     "max_workers", "gpus_per_worker", "seed", "limit", "overrides",
                                                     "val_fraction", "early_stop", "precision")},
            "run": spec.run, "kiln_version": __version__,
            "mlflow": {k: spec.mlflow[k] for k in ("uri", "run_id") if k in spec.mlflow} if spec.mlflow else None,
            **(extra or {}),
        }

    version = store_mod.Store(spec.store).save(spec.name, write)
    shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items())
    say(f"test {shown}")
    where = f"{spec.store}/{version.name}/{version.version}" if store_mod.is_uri(spec.store) else version.path
    say(f"stored {version.ref} at {where}")
    from kiln.tracking import Mlflow

    tracker = Mlflow.of(spec.mlflow)
    if tracker is not None:
        tracker.metrics({f"test_{k}": v for k, v in metrics.items()}, step=int(state["epoch"]))
        tracker.files([version.path / "manifest.json"])
        tracker.files([version.path / store_mod.ARTIFACTS], "pictures")
        tracker.tags({"kiln.model": version.ref, "kiln.store": str(spec.store)})
        if spec.mlflow.get("register") is not None:
            _register(spec, plugin, model, version, tracker)
        tracker.end()
    return version


def _register(spec: TrainSpec, plugin: Plugin, model: Any, version: store_mod.Version, tracker: Any) -> None:
    """Register the stored version in MLflow's model registry (``--register``); a failure is one
    line that says the version is stored all the same."""
    from kiln.tracking import register

    name = spec.mlflow["register"] or spec.name
    try:
        network = plugin.export_model(model)
        number = register(tracker.uri, tracker.run_id, name, network, version,
                          raw_example(network, spec.dataset, plugin.info))
    except KilnError as e:
        tracker.end("FAILED")
        raise KilnError(f"stored {version.ref}, but did not register it in MLflow: {e}") from None
    say(f"registered {version.ref} as MLflow model '{name}' version {number} "
        f"(load it with mlflow.pyfunc.load_model('models:/{name}/{number}'))")


def raw_example(network: Any, dataset: str, info: DatasetInfo, n: int = 4) -> Any:
    """``n`` inputs of ``network`` as a user sends them: test examples where an input takes the
    dataset's examples, else random draws (a generator's noise, class numbers); one array for a
    network of one input, else a mapping by input name."""
    import numpy as np

    rng = np.random.default_rng(0)
    out = {}
    for i in network.inputs:
        shape, dtype = tuple(i.shape[1:]), np.dtype(i.dtype)
        if shape == tuple(info.input_shape):
            split = data.load(dataset, "test", limit=n)
            x = np.stack([np.asarray(a) for a, _ in split.ds.take(n).as_numpy_iterator()])
        elif dtype.kind in "iu":
            x = rng.integers(0, max(info.num_classes, 2), size=(n, *shape))
        else:
            x = rng.standard_normal((n, *shape))
        out[i.name] = x.astype(dtype)
    return next(iter(out.values())) if len(out) == 1 else out


def test_dataset(plugin: Plugin, dataset: str, limit: int | None, batch: int = 256) -> Any:
    """The preprocessed test split, batched, as evaluate() and samples() receive it."""
    import tensorflow as tf

    split = data.load(dataset, "test", limit=limit)
    return split.ds.batch(batch).map(plugin.preprocess, num_parallel_calls=tf.data.AUTOTUNE) \
        .prefetch(tf.data.AUTOTUNE)


def evaluate(ref: str, store: str | Path | None = None,
             classifier: str | None = None) -> tuple[store_mod.Version, dict[str, float]]:
    """Re-evaluate a stored model on its dataset's test split (same limit as when it was trained).

    A generative plugin that names a classifier (``judged_by``), or any model with a ``sample``
    method when ``classifier`` is given, is also judged by that stored classifier (kiln.quality);
    a missing classifier is an error then, not a silently shorter report.
    """
    plugin, model, version = models.load(ref, store)
    judge = None
    if classifier or plugin.judged_by:
        from kiln import quality

        judge = quality.classifier_for(plugin, classifier, store)
    m = version.manifest
    dataset = m["dataset"]["name"] if m["dataset"]["name"] else plugin.dataset
    data.prepare(dataset)
    limit = m.get("train", {}).get("limit")
    metrics = plugin.evaluate(model, test_dataset(plugin, dataset, limit))
    if judge is not None:
        metrics.update(quality.judge(plugin, model, judge, limit=limit))
        distance, what = quality.frechet(plugin, model, judge, limit=limit)
        metrics.update(distance)
        say(what)
    return version, metrics


# ------------------------------------------------------------------------------------------ runs


def runs(runs_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every run in ``runs_dir`` with its status, epochs, best validation value of its plugin's
    headline metric and the stored version it made (``kiln runs``)."""
    from kiln.spec import mode_of

    root = Path(runs_dir or settings.runs_dir()).resolve()
    stored: dict[tuple[str, str], str] = {}
    out = []
    for path in sorted(root.glob(f"*/{RUN_FILE}")):
        try:
            spec = TrainSpec.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        last = checkpoint.latest(path.parent)
        state = checkpoint.state(last) if last else {"epoch": 0, "history": []}
        early = state.get("early_stop") or {}
        if state["epoch"] >= spec.epochs or early.get("stopped"):
            status = "stopped early" if early.get("stopped") else "finished"
        else:
            status = "incomplete"
        history = state.get("history", [])
        try:
            headline = registry.get(spec.plugin).headline
        except KilnError:
            headline = "loss"
        key = f"val_{headline}"
        values = [h[key] for h in history if key in h]
        best = None
        if values:
            best = max(values) if mode_of(key) == "max" else min(values)
        if (spec.store, spec.run) not in stored:
            try:
                for v in store_mod.Store(spec.store).list():
                    stored[(spec.store, v.manifest.get("run", ""))] = v.ref
            except KilnError:
                pass
        out.append({"run": spec.run, "plugin": spec.plugin, "status": status,
                    "epochs": f"{state['epoch']}/{spec.epochs}", "metric": key, "best": best,
                    "version": stored.get((spec.store, spec.run)), "history": history})
    return out


def compare(names: list[str], out: str | Path, metric: str | None = None,
            runs_dir: str | Path | None = None) -> Path:
    """The validation curves of runs ``names`` in one PNG (``kiln runs compare``)."""
    from kiln.images import curves

    found = {r["run"]: r for r in runs(runs_dir)}
    missing = [n for n in names if n not in found]
    if missing:
        raise KilnError(f"no run {', '.join(map(repr, missing))} in {Path(runs_dir or settings.runs_dir()).resolve()}; "
                        f"runs: {', '.join(sorted(found)) or 'none'}")
    metric = metric or found[names[0]]["metric"]
    series = {n: [(h["epoch"], h[metric]) for h in found[n]["history"] if metric in h] for n in names}
    if not any(series.values()):
        raise KilnError(f"none of these runs recorded {metric}; try --metric val_loss")
    return curves(series, Path(out), ylabel=metric, title=f"{metric} by epoch")
