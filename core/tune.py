"""``kiln tune``: hyperparameter search on Ray Tune.

Every trial is a Kiln run through the one training loop (kiln.trainer): in the trial's own Ray
actor by default, or, with ``workers > 0``, as a Ray Train run the trial starts (Ray's Train V2
pattern: a Tune function trainable that runs the trainer, its reports passed up by
``TuneReportCallback``). Trials report their validation metrics after every epoch, so ASHA stops
poor ones early; ASHA counts Kiln's ``epoch``, not Tune's report count, so a resumed trial
stays on its rungs.

A search lives in ``<runs>/<search>/``: ``kiln-search.json`` (what was asked), ``tune/`` (Ray
Tune's experiment state, for ``--resume``), ``trials/<trial id>/`` (each trial's Kiln run folder:
checkpoints, TensorBoard), and the results: ``trials.csv``, ``search.json``, ``curves.png``,
``params.png``. The best trial's model is stored as a new version whose manifest records the
search; its test split is evaluated once, on that model only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln import registry, settings
from kiln.logs import say, table
from kiln.plugin import KilnError, make_config
from kiln.options import option
from kiln.spec import TrainOptions, TrainSpec, known_fields, mode_of

SEARCH_FILE = "kiln-search.json"
RESULTS_FILE = "search.json"
KINDS = {
    "loguniform": "loguniform:LO:HI (floats, sampled evenly in log space)",
    "uniform": "uniform:LO:HI (floats)",
    "randint": "randint:LO:HI (integers, both ends included)",
    "choice": "choice:A/B/C (one of the options, sampled)",
    "grid": "grid:A/B/C (every option, in every sample)",
}
USAGE = "--search KEY=" + " | ".join(k.split(" ")[0] for k in KINDS.values())


@dataclass
class Dimension:
    """One searched config key: ``kind`` and either (low, high) or the options (plain values)."""

    key: str
    kind: str
    values: list[Any]

    def domain(self) -> Any:
        from ray import tune

        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "randint":
            return tune.randint(self.values[0], self.values[1] + 1)  # Tune's upper end is excluded
        if self.kind == "grid":
            return tune.grid_search(self.values)
        return tune.choice(self.values)

    @property
    def text(self) -> str:
        sep = ":" if self.kind in ("loguniform", "uniform", "randint") else "/"
        return f"{self.key}={self.kind}:" + sep.join(_show(v) for v in self.values)


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def parse_search(items: list[str], config_cls: type, fixed: dict[str, Any] | None = None) -> list[Dimension]:
    """``--search KEY=KIND:ARGS`` items -> dimensions, each checked against the plugin's config
    (the key exists, the values have its type and lie in its bounds). KilnError names the item."""
    hints = typing.get_type_hints(config_cls)
    fields = {f.name for f in dataclasses.fields(config_cls)}
    dims: list[Dimension] = []
    for item in items:
        key, sep, rest = item.partition("=")
        key = key.strip()
        kind, _, args = rest.partition(":")
        kind = kind.strip()

        def bad(why: str) -> KilnError:
            return KilnError(f"--search {item!r}: {why}")

        if not sep or not key:
            raise bad(f"write {USAGE}")
        if key not in fields:
            raise bad(f"unknown config key '{key}'; allowed keys: {', '.join(sorted(fields))}")
        if key in (fixed or {}):
            raise bad(f"'{key}' is also fixed by --set; search it or set it, not both")
        if any(d.key == key for d in dims):
            raise bad(f"'{key}' is searched twice")
        if kind not in KINDS:
            raise bad(f"unknown distribution '{kind}'; use one of: {'; '.join(KINDS.values())}")
        ftype = hints[key]
        if kind in ("loguniform", "uniform", "randint"):
            ends = args.split(":")
            want = int if kind == "randint" else float
            if ftype is not want:
                other = "uniform or loguniform" if ftype is float else "choice or grid"
                raise bad(f"'{key}' is {getattr(ftype, '__name__', ftype)}, not "
                          f"{want.__name__}; search it with {other}")
            try:
                low, high = (want(e) for e in ends) if len(ends) == 2 else (None, None)
            except ValueError:
                low = high = None
            if low is None or high is None:
                raise bad(f"write {KINDS[kind]}")
            if not low < high if kind != "randint" else not low <= high:
                raise bad(f"LO must be below HI, got {low:g} and {high:g}")
            if kind == "loguniform" and low <= 0:
                raise bad(f"loguniform needs LO > 0, got {low:g}")
            for end in (low, high):
                _check_value(config_cls, key, end, item)
            dims.append(Dimension(key, kind, [low, high]))
            continue
        is_tuple = typing.get_origin(ftype) is tuple
        raw = args.split("/") if ("/" in args or is_tuple) else args.split(",")
        if not args.strip() or any(not r.strip() for r in raw):
            raise bad(f"write {KINDS[kind]}" + (" (a tuple's items separated by commas)" if is_tuple else ""))
        options = [_check_value(config_cls, key, r.strip(), item) for r in raw]
        dims.append(Dimension(key, kind, options))
    return dims


def _check_value(config_cls: type, key: str, value: Any, item: str) -> Any:
    """``value`` as the config holds it (lists for tuples), or KilnError if the config refuses it."""
    try:
        config = make_config(config_cls, {key: value})
    except KilnError as e:
        raise KilnError(f"--search {item!r}: {e}") from None
    out = getattr(config, key)
    return list(out) if isinstance(out, tuple) else out


@dataclass
class SearchSpec:
    """A search: the base training run every trial starts from, the space and how to search it."""

    base: dict[str, Any]              # a TrainSpec's fields; run is the search's name
    space: list[dict[str, Any]]       # Dimension fields
    samples: int
    metric: str
    mode: str
    scheduler: str = "asha"
    searcher: str = "random"
    grace_epochs: int = 1
    reduction_factor: int = 4
    perturbation_epochs: int = 2
    max_concurrent: int | None = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))

    @property
    def base_spec(self) -> TrainSpec:
        return TrainSpec.from_dict(self.base)

    @property
    def name(self) -> str:
        return self.base["run"]

    @property
    def dir(self) -> Path:
        return Path(self.base["runs_dir"]) / self.name

    @property
    def dims(self) -> list[Dimension]:
        return [Dimension(**d) for d in self.space]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchSpec":
        return cls(**known_fields(cls, d))

    def trial_spec(self, trial_id: str, sampled: dict[str, Any]) -> TrainSpec:
        """The Kiln run of one trial: the base run with the sampled config, in ``trials/``.

        Each trial keeps its best epoch's weights on the search metric (Keras'
        restore_best_weights): with --early-stop as given, else with a patience no run reaches."""
        spec = self.base_spec
        spec.overrides = {**spec.overrides, **sampled}
        spec.run = trial_id
        spec.runs_dir = str(self.dir / "trials")
        if spec.mlflow:  # the trial's own MLflow run is made when it starts, under the search's
            spec.mlflow = {k: v for k, v in spec.mlflow.items() if k != "run_id"}
            spec.mlflow["parent"] = self.base["mlflow"].get("run_id", "")
        if not spec.early_stop:
            spec.early_stop = f"{self.metric}:{spec.epochs + 1}"
        return spec


@dataclass
class SearchOptions:
    """``kiln tune``'s own options (each trial also takes every ``TrainOptions``)."""

    search: list[str] = option([], "a config key to search (repeatable): loguniform:LO:HI, uniform:LO:HI, "
                                   "randint:LO:HI, choice:A/B/C or grid:A/B/C (tuple items: 32,64/64,128)",
                               metavar="KEY=KIND:ARGS")
    samples: int | None = option(None, "configurations sampled (default 8; with grid: 1, each repeating "
                                       "the grid)", low=1)
    metric: str | None = option(None, "validation metric that ranks trials (default val_ of the plugin's "
                                      "headline, e.g. val_accuracy)")
    mode: str | None = option(None, "default: from the metric's name", choices=("max", "min"))
    searcher: str | None = option(None, "random samples the space (default; grid with grid: keys); optuna "
                                        "models it (Optuna's TPE: each trial's config from the results so far)",
                                  choices=("random", "grid", "optuna"))
    scheduler: str = option("asha", "asha stops poor trials early (default); fifo runs every trial to "
                                    "the end; pbt (Population Based Training) runs every trial to the end, "
                                    "and every --perturbation-epochs a poor trial continues from a good "
                                    "one's checkpoint with its config perturbed (search keys that keep the "
                                    "network's shape: learning_rate, dropout)", choices=("asha", "fifo", "pbt"))
    perturbation_epochs: int = option(2, "pbt: epochs between a trial's exploit-and-explore steps", low=1)
    grace_epochs: int = option(1, "asha: epochs every trial gets", low=1)
    reduction_factor: int = option(4, "asha: 1 in N trials goes on at each rung", low=2)
    max_concurrent: int | None = option(None, "trials at a time (default: as many as the cluster's CPUs "
                                              "and GPUs fit)", low=1)


def plan(plugin: str, s: SearchOptions, train: TrainOptions, *, store: str | Path | None = None,
         plugin_path: str | None = None) -> SearchSpec:
    """Validate a search before any work; KilnError names what is wrong."""
    from kiln import options, run

    options.check(s)
    if not s.search:
        raise KilnError(f"name what to search: {USAGE} (repeatable); `kiln plugins -v` lists the keys")
    if train.val_fraction == 0:
        raise KilnError("a search chooses by a validation metric; it needs --val-fraction above 0")
    if train.run is None:
        train = dataclasses.replace(train, run=f"{train.name or plugin}-search-{time.strftime('%Y%m%d-%H%M%S')}")
    base = run.plan(plugin, train, store=store, plugin_path=plugin_path)
    cls = registry.get(plugin)
    metric = s.metric or f"val_{cls.headline}"
    if not metric.startswith("val_"):
        raise KilnError(f"--metric {metric}: a search chooses by validation, never by training or test "
                        f"data; name a val_ metric, e.g. val_{metric.removeprefix('train_')}")
    mode = s.mode or mode_of(metric)
    if base.early_stop and not base.early_stop.startswith(metric):
        raise KilnError(f"--early-stop {base.early_stop} watches another metric than --metric {metric}; "
                        "trials keep their best epoch by the search's metric")
    if (base.run_dir / SEARCH_FILE).exists() or (base.run_dir / run.RUN_FILE).exists():
        raise KilnError(f"'{base.run}' already exists in {base.runs_dir}; continue it with "
                        f"`kiln tune --resume {base.run}` or pick a new --run name")
    dims = parse_search(s.search, cls.Config, base.overrides)
    grid = [d.text for d in dims if d.kind == "grid"]
    searcher = s.searcher or ("grid" if grid else "random")
    if searcher == "optuna" and grid:
        raise KilnError(f"--searcher optuna chooses every value itself; search {', '.join(grid)} with "
                        "choice: instead of grid:")
    if searcher == "grid" and not grid:
        raise KilnError("--searcher grid needs a grid: key, e.g. --search filters=grid:16,32/32,64")
    samples = s.samples or (1 if grid else 8)
    if s.scheduler == "pbt":
        if base.workers:
            raise KilnError("--scheduler pbt hands a trial's checkpoint to another trial's process; it runs "
                            "trials in-process (--workers 0); use asha or fifo with Ray Train workers")
        if grid:
            raise KilnError(f"--scheduler pbt perturbs every searched key; search {', '.join(grid)} with "
                            "choice: instead of grid:")
    return SearchSpec(base=base.to_dict(), space=[dataclasses.asdict(d) for d in dims], samples=samples,
                      metric=metric, mode=mode, scheduler=s.scheduler, searcher=searcher,
                      grace_epochs=s.grace_epochs, perturbation_epochs=s.perturbation_epochs,
                      reduction_factor=s.reduction_factor, max_concurrent=s.max_concurrent)


def load(name: str, runs_dir: str | Path | None = None) -> SearchSpec:
    path = Path(runs_dir or settings.runs_dir()).resolve() / name / SEARCH_FILE
    if not path.is_file():
        raise KilnError(f"no search '{name}' in {path.parent.parent} (looked for {path}); "
                        "`kiln runs` lists runs and searches")
    return SearchSpec.from_dict(json.loads(path.read_text()))


# ------------------------------------------------------------------------------------ trials


def _trial(config: dict[str, Any], search: dict[str, Any], info: dict[str, Any]) -> None:
    """One trial, in its Tune actor: a Kiln run of the sampled config."""
    import ray.tune

    from kiln import logs, models
    from kiln.plugin import DatasetInfo
    from kiln.run import begin

    # a trial that ASHA stops ends at its next report, an epoch later; Tune reuses its actor for
    # the next trial only if it ends within TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default), else
    # it fails that next trial ("Could not re-use actor"). Read by this actor when it is reused.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "600")
    s = SearchSpec.from_dict(search)
    trial_id = ray.tune.get_context().get_trial_id()
    spec = s.trial_spec(trial_id, config)
    data_info = DatasetInfo.from_dict(info)
    begin(spec, models.for_spec(spec, data_info))  # its MLflow run is a child of the search's
    logs.PREFIX = f"trial {trial_id}: "
    say(_config_text(config))
    if spec.workers == 0:
        import tensorflow as tf

        from kiln import devices
        from kiln.trainer import train_loop

        devices.configure(max(1, math.floor(spec.cpus_per_worker)), gpus=spec.gpus_per_worker > 0)
        train_loop(spec, data_info, tf.distribute.get_strategy(),
                   TuneContext(spec.run_dir, through_tune=s.scheduler == "pbt"))
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        from kiln.cluster.train import fit

        fit(spec, data_info, callbacks=[TuneReportCallback()])


class TuneContext:
    """A trial in its own process: checkpoints in the trial's run folder, metrics to Tune. With
    ``through_tune`` (PBT) each checkpoint also goes to Tune, which hands a good trial's to a poor
    one: the trial then starts from the checkpoint Tune gives it, not from its own latest."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: Path, through_tune: bool = False) -> None:
        from kiln.trainer import LocalContext

        self.local, self.through_tune = LocalContext(run_dir), through_tune

    def restore_dir(self) -> Any:
        import ray.tune

        given = ray.tune.get_checkpoint() if self.through_tune else None
        if given is None:
            yield from self.local.restore_dir()
            return
        with given.as_directory() as folder:
            source = Path(folder)
            if self.local.run_dir.name not in str(source):  # exploit: another trial's checkpoint
                from kiln import checkpoint

                # Tune's folder of a trial is named by its id (trial_dirname_creator)
                donor = next((p for p in source.parents if p.parent.name == "tune"), source).name
                epoch = checkpoint.state(source)["epoch"]
                say(f"continues from trial {donor}'s checkpoint at epoch {epoch} with a perturbed config")
                # the trial's own folder holds what it goes on from: a donor's last epoch leaves it
                # nothing to train, and its record (history, best epoch) is then the donor's
                source = checkpoint.keep(self.local.run_dir, source, epoch)
            yield source

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.tune

        self.local.report(metrics, checkpoint_dir)
        to_tune = None
        if self.through_tune and checkpoint_dir is not None:
            from ray.tune import Checkpoint

            to_tune = Checkpoint.from_directory(str(checkpoint_dir))
        ray.tune.report(dict(metrics), checkpoint=to_tune)


def _config_text(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_fmt(v)}" for k, v in config.items())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return _show(value)


# ------------------------------------------------------------------------------------ search


def _resources(base: TrainSpec) -> tuple[dict[str, float], float, float]:
    """What Tune reserves for one trial, and the CPUs and GPUs one trial really uses."""
    if base.workers == 0:
        need = {"cpu": base.cpus_per_worker, "gpu": base.gpus_per_worker}
        return need, base.cpus_per_worker, base.gpus_per_worker
    # The trial only drives a Ray Train run whose workers ask for their own resources; a trial
    # that reserved a CPU too would leave a 2-core machine one short for 2 workers.
    # (Tune refuses an empty request: a byte of memory stands for "nothing")
    return {"cpu": 0, "memory": 1}, base.workers * base.cpus_per_worker, base.workers * base.gpus_per_worker


def _mlflow_parent(s: SearchSpec) -> str:
    """The MLflow run that holds the search's trials as its children; its id."""
    from kiln.tracking import Mlflow

    base = s.base_spec
    parent = Mlflow.start(base.mlflow["uri"], base.mlflow["experiment"], s.name,
                          {"search": "; ".join(d.text for d in s.dims), "scheduler": s.scheduler,
                           "searcher": s.searcher,
                           "samples": s.samples, "metric": s.metric, "mode": s.mode,
                           "plugin": base.plugin, "dataset": base.dataset, "epochs": base.epochs,
                           **{f"set.{k}": v for k, v in base.overrides.items()}},
                          {"kiln.plugin": base.plugin, "kiln.search": s.name})
    return parent.run_id


def _limited(reserve: dict[str, float], concurrent: int, cluster: dict[str, float]) -> dict[str, float]:
    """What each trial reserves so that at most ``concurrent`` trials fit in ``cluster`` at once.
    Trials are limited by what they reserve, never by Tune's searcher: BasicVariantGenerator's
    max_concurrent can leave Tune's loop waiting 600 s for a trial it never hands out."""
    limited = {}
    for key, need in reserve.items():
        have = cluster.get(key.upper() if key in ("cpu", "gpu") else key, 0)
        # Ray counts resources in steps of 1e-4: a share rounded up could fit one trial fewer
        limited[key] = max(need, math.floor(have / concurrent * 1e4) / 1e4) if need and have else need
    return limited


def _new_tuner(s: SearchSpec, trainable: Any) -> Any:
    """A fresh Tuner for ``s``: its sampler, scheduler and storage under the search's folder."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    base = s.base_spec
    if s.scheduler == "asha":
        scheduler: Any = ASHAScheduler(time_attr="epoch", max_t=base.epochs, grace_period=s.grace_epochs,
                                       reduction_factor=s.reduction_factor)
    elif s.scheduler == "pbt":
        # Kiln's epoch is the clock, as with ASHA: a trial restored from a checkpoint keeps it
        scheduler = PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_epochs,
                                            hyperparam_mutations={d.key: d.domain() for d in s.dims},
                                            synch=False)
    else:
        scheduler = FIFOScheduler()
    if s.searcher == "optuna":
        import optuna
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        # Tune hands a model-based searcher's trials out one at a time as results come in; its
        # state is saved with the experiment, so --resume goes on from what it learnt
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # Kiln prints a line per trial
        import warnings

        # about saving a choice of tuples (filters=choice:16,32/32,64) to an RDB storage, which
        # this in-memory study never does
        warnings.filterwarnings("ignore", message="Choices for a categorical distribution should be")
        search: Any = OptunaSearch(sampler=TPESampler(seed=base.seed))
    else:
        search = BasicVariantGenerator(random_state=base.seed)
    return tune.Tuner(
        trainable,
        param_space={d.key: d.domain() for d in s.dims},
        tune_config=tune.TuneConfig(
            metric=s.metric, mode=s.mode, num_samples=s.samples, scheduler=scheduler,
            search_alg=search,
            trial_dirname_creator=lambda t: t.trial_id,
            # a trial's process is kept for the next one: TensorFlow and Kiln are imported
            # once per concurrent trial instead of once per trial
            reuse_actors=True),
        run_config=tune.RunConfig(name="tune", storage_path=str(s.dir), verbose=0,
                                  callbacks=[_Lines(s)]),
    )


def run(s: SearchSpec, *, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) search ``s`` on Ray Tune, store its best trial's model; the results."""
    # Kiln prints a line per trial and the table; Tune's own reporter would repeat them, and Ray's
    # log deduplication would fold the trials' epoch lines into "[repeated Nx across cluster]"
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from ray import tune

    from kiln import data, models
    from kiln.cluster.train import connect

    base = s.base_spec
    if resume and (s.dir / RESULTS_FILE).is_file():
        version = json.loads((s.dir / RESULTS_FILE).read_text()).get("version")
        raise KilnError(f"search '{s.name}' already finished; its best model is {version} "
                        f"(results in {s.dir / RESULTS_FILE})")
    info = data.prepare(base.dataset)
    models.for_spec(base, info)  # a plugin refusing this data fails here, not in every trial
    if not resume:
        check_metric(s, info)
        s.dir.mkdir(parents=True, exist_ok=True)
        if base.mlflow:
            s.base["mlflow"]["run_id"] = _mlflow_parent(s)
        (s.dir / SEARCH_FILE).write_text(json.dumps(s.to_dict(), indent=2))
    connect(base.address)
    import ray

    reserve, cpus, gpus = _resources(base)
    have_cpu, have_gpu = ray.cluster_resources().get("CPU", 0), ray.cluster_resources().get("GPU", 0)
    if cpus > have_cpu or gpus > have_gpu:
        raise KilnError(f"one trial needs {cpus:g} CPUs and {gpus:g} GPUs but the Ray cluster has "
                        f"{have_cpu:g} and {have_gpu:g}; lower --workers/--cpus-per-worker/--gpus-per-worker")
    fits = int(min(have_cpu // cpus if cpus else s.samples, have_gpu // gpus if gpus else s.samples))
    concurrent = max(1, min(s.max_concurrent or fits, fits))
    reserve = _limited(reserve, concurrent, ray.cluster_resources())
    trainable = tune.with_resources(tune.with_parameters(_trial, search=s.to_dict(), info=info.to_dict()),
                                    reserve)
    path = s.dir / "tune"
    say(f"search '{s.name}': {base.plugin} on {base.dataset}, {s.samples} sample(s) of "
        f"{'; '.join(d.text for d in s.dims)} ({s.searcher}), {s.scheduler.upper()} on {s.metric} ({s.mode}), "
        f"{base.epochs} epochs at most, {concurrent} trial(s) at a time; in {s.dir}")
    if resume:
        if not tune.Tuner.can_restore(str(path)):
            raise KilnError(f"search '{s.name}' left no Ray Tune state in {path} to resume from")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True,
                                   restart_errored=False)
    else:
        tuner = _new_tuner(s, trainable)
    grid = tuner.fit()
    # Tune returns (it does not raise) when Ctrl-C stopped it; its state is saved for a resume
    expected = s.samples * math.prod(len(d.values) for d in s.dims if d.kind == "grid")
    # a trial that ran to its end, or that the scheduler stopped, has Tune's done flag on its last
    # result; one Ctrl-C stopped has not (Tune may still call it terminated)
    unfinished = max(expected - len(grid), 0) + sum(
        1 for r in grid if r.error is None and not (r.metrics or {}).get("done"))
    if unfinished:
        raise KilnError(f"search '{s.name}' was interrupted with {unfinished} trial(s) unfinished; "
                        f"continue it with `kiln tune --resume {s.name}`")
    return finish(s, info, trials(s, grid))


class _Lines:
    """Tune callback: one Kiln line as each trial ends (Tune's own status table is off)."""

    def __new__(cls, s: SearchSpec) -> Any:
        from ray.tune import Callback

        class Lines(Callback):
            def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                result = trial.last_result or {}
                epochs = int(result.get("epoch", 0))
                value = result.get(s.metric)
                why = "finished" if epochs >= s.base["epochs"] else "stopped"
                shown = f"{s.metric}={value:.4f}" if isinstance(value, float) else ""
                say(f"trial {trial.trial_id} {why} after {epochs} epoch(s): {shown}")

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                say(f"trial {trial.trial_id} failed; the search goes on without it")

        return Lines()


def trials(s: SearchSpec, grid: Any) -> list[dict[str, Any]]:
    """A row per trial of a finished search: id, sampled config, epochs run, best metric and its
    epoch, status, curve. The history comes from the trial's Kiln run, which outlives Tune."""
    rows = []
    for result in grid:
        trial_id = Path(result.path).name  # the trial's folder is named by its id (trial_dirname_creator)
        state = _last_state(s.dir / "trials" / trial_id)
        history = _history(state)
        values = [(h["epoch"], h[s.metric]) for h in history if s.metric in h]
        best = (max if s.mode == "max" else min)(values, key=lambda p: p[1]) if values else None
        epochs = int(history[-1]["epoch"]) if history else 0
        if result.error is not None:
            status = "failed: " + _first_line(result.error)
        elif epochs >= s.base["epochs"]:
            status = "finished"
        elif history and history[-1].get("stopped"):
            status = "stopped early"
        else:
            status = f"stopped by {s.scheduler.upper()}"
        # a trial's config is the one it trained with (PBT perturbs it): its Kiln run has it
        config = state.get("spec", {}).get("overrides") or result.config or {}
        rows.append({"trial": trial_id, "config": {d.key: config.get(d.key) for d in s.dims},
                     "epochs": epochs, "best": best[1] if best else None,
                     "best_epoch": best[0] if best else None, "status": status, "curve": values})
    return sorted(rows, key=lambda r: r["trial"])


def _first_line(error: BaseException) -> str:
    """The line of a trial's error that names it (Ray wraps it in its own traceback)."""
    text = str(error).strip().splitlines()
    for line in reversed(text):
        if "Error" in line:
            return line.strip()[:300]
    return (text[-1] if text else type(error).__name__).strip()[:300]


def _last_state(run_dir: Path) -> dict[str, Any]:
    """A trial's last checkpoint's state: its spec (the config it trained with), history, early
    stop; {} before its first."""
    from kiln import checkpoint

    last = checkpoint.latest(run_dir) if run_dir.is_dir() else None
    return checkpoint.state(last) if last else {}


def _history(state: dict[str, Any]) -> list[dict[str, Any]]:
    """A trial's per-epoch metrics from its last checkpoint's state; the last entry marks an early
    stop."""
    history = list(state.get("history", []))
    if (state.get("early_stop") or {}).get("stopped") and history:
        history[-1] = {**history[-1], "stopped": True}
    return history


def finish(s: SearchSpec, info: Any, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Write the table and pictures, store the best trial's model; the results."""
    from kiln import images
    from kiln.run import finalize

    ranked = [r for r in rows if r["best"] is not None]
    if not ranked:
        why = next((r["status"] for r in rows if r["status"].startswith("failed")), "no trial reported")
        raise KilnError(f"search '{s.name}': no trial reported {s.metric} ({why})")
    best = (max if s.mode == "max" else min)(ranked, key=lambda r: r["best"])
    write_table(s, rows, s.dir / "trials.csv")
    pictures = [
        images.curves({r["trial"]: r["curve"] for r in rows}, s.dir / "curves.png", ylabel=s.metric,
                      title=f"{s.metric} of every trial ({s.scheduler.upper()})"),
        images.params([(r["config"], r["best"]) for r in ranked], [(d.key, d.kind) for d in s.dims],
                      s.dir / "params.png", ylabel=f"best {s.metric}", mode=s.mode),
    ]
    epochs_run = sum(r["epochs"] for r in rows)
    summary = {
        "name": s.name, "space": [d.text for d in s.dims], "scheduler": s.scheduler, "searcher": s.searcher,
        "metric": s.metric,
        "mode": s.mode, "samples": s.samples, "epochs_run": epochs_run,
        "epochs_budget": len(rows) * s.base["epochs"],
        "trials": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
        "best": {"trial": best["trial"], "config": best["config"], "value": best["best"],
                 "epoch": best["best_epoch"]},
    }
    for line in table_lines(summary, s.metric):
        print(line, flush=True)
    say(f"best trial {best['trial']}: {s.metric}={best['best']:.4f} at epoch {best['best_epoch']} "
        f"with {_config_text(best['config'])}; {epochs_run} of {summary['epochs_budget']} epochs run")
    spec = s.trial_spec(best["trial"], best["config"])
    spec.name = s.base["name"]
    spec.mlflow = _trial_mlflow(s, best["trial"]) or spec.mlflow
    version = finalize(spec, info, spec.run_dir, extra={"search": summary}, pictures=pictures)
    summary["version"] = version.ref
    (s.dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2, default=str))
    if s.base.get("mlflow"):
        _log_search(s, rows, summary, version)
    return summary


def _trial_mlflow(s: SearchSpec, trial_id: str) -> dict[str, str] | None:
    """The MLflow record of a trial, as its run file keeps it."""
    from kiln.run import RUN_FILE

    path = s.dir / "trials" / trial_id / RUN_FILE
    return json.loads(path.read_text()).get("mlflow") if path.is_file() else None


def _log_search(s: SearchSpec, rows: list[dict[str, Any]], summary: dict[str, Any], version: Any) -> None:
    """The search's MLflow run: best and test metrics, table and pictures, the stored version;
    each trial's run closed as it ended (ASHA stops a trial by ending its process)."""
    from kiln.tracking import Mlflow

    for r in rows:
        if r["trial"] == summary["best"]["trial"]:
            continue  # finalize closed it
        child = Mlflow.of(_trial_mlflow(s, r["trial"]))
        if child is not None:
            child.end("FAILED" if r["status"].startswith("failed") else "FINISHED")
    parent = Mlflow.of(s.base["mlflow"])
    parent.metrics({f"best_{s.metric}": summary["best"]["value"], "epochs_run": summary["epochs_run"],
                    **{f"test_{k}": v for k, v in version.manifest["metrics"].items()}}, step=0)
    parent.files([s.dir / n for n in ("trials.csv", RESULTS_FILE, "curves.png", "params.png")])
    parent.tags({"kiln.model": version.ref, "kiln.best_trial": summary["best"]["trial"]})
    parent.end()


def write_table(s: SearchSpec, rows: list[dict[str, Any]], path: Path) -> None:
    keys = [d.key for d in s.dims]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *keys, "epochs", f"best_{s.metric}", "best_epoch", "status"])
        for r in rows:
            w.writerow([r["trial"], *(_show(r["config"][k]) for k in keys), r["epochs"],
                        "" if r["best"] is None else f"{r['best']:.6f}", r["best_epoch"] or "", r["status"]])


def table_lines(summary: dict[str, Any], metric: str) -> list[str]:
    """The trials as aligned text, best first."""
    trials_ = summary["trials"]
    keys = list(trials_[0]["config"]) if trials_ else []
    sign = -1 if summary["mode"] == "max" else 1
    ordered = sorted(trials_, key=lambda r: (r["best"] is None, sign * (r["best"] or 0)))
    rows = [("TRIAL", *(k.upper() for k in keys), "EPOCHS", f"BEST {metric}", "STATUS")]
    for r in ordered:
        rows.append((r["trial"], *(_fmt(r["config"][k]) for k in keys), str(r["epochs"]),
                     "-" if r["best"] is None else f"{r['best']:.4f}", r["status"]))
    return table(rows)


def check_metric(s: SearchSpec, info: Any) -> None:
    """Fail before the search when no trial could report ``s.metric``: one validation step of the
    base config shows the metrics the plugin reports."""
    from kiln.trainer import metric_names

    names = [f"val_{n}" for n in metric_names(s.base_spec, info)]
    if s.metric not in names:
        raise KilnError(f"--metric {s.metric}: {s.base['plugin']} reports no such metric; its validation "
                        f"metrics: {', '.join(names)}")


def searches(runs_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every search in ``runs_dir`` (for ``kiln runs``)."""
    root = Path(runs_dir or settings.runs_dir()).resolve()
    out = []
    for path in sorted(root.glob(f"*/{SEARCH_FILE}")):
        try:
            s = SearchSpec.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue
        results = path.parent / RESULTS_FILE
        summary = json.loads(results.read_text()) if results.is_file() else None
        started = len([p for p in (path.parent / "trials").glob("*") if p.is_dir()])
        out.append({"run": s.name, "plugin": s.base["plugin"], "metric": s.metric,
                    "status": (f"search, {len(summary['trials'])} trials" if summary
                               else f"search incomplete, {started} trials started"),
                    "epochs": (f"{summary['epochs_run']}/{summary['epochs_budget']}" if summary else "-"),
                    "best": summary["best"]["value"] if summary else None,
                    "version": summary.get("version") if summary else None})
    return out
