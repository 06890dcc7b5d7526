"""The one training loop. It knows nothing about any model: it runs ``model.train_step`` (Keras'
own, or a plugin's GAN/VAE step) under a ``tf.distribute`` strategy, in-process (the default
strategy) or inside Ray Train workers (MultiWorkerMirroredStrategy).

Why not ``model.fit``: Keras 3's fit breaks under MultiWorkerMirroredStrategy (docs/design.md:
tensorflow/tensorflow#72388, keras-team/keras#20585). Owning the loop with public APIs
(``strategy.run`` over ``distribute_datasets_from_function``) works for compiled models and custom
steps alike, and is the same code for 1 process and N workers.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

from kiln import checkpoint, data, models
from kiln.logs import say
from kiln.plugin import DatasetInfo, KilnError
from kiln.spec import TrainSpec, parse_early_stop

STEPS_PER_CALL = 50


class Context(Protocol):
    """Where the loop runs: rank/world size, the checkpoint to resume from, and how to report."""

    rank: int
    world_size: int

    def restore_dir(self) -> Iterator[Path | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


class Batches:
    """How a run's examples are cut into steps: the global batch (rounded down to a multiple of the
    replicas), the steps per epoch, and the validation batches, the same on every worker."""

    def __init__(self, spec: TrainSpec, info: DatasetInfo, per_class: int | None, n_rep: int,
                 world_size: int) -> None:
        self.spec, self.per_class, self.n_rep = spec, per_class, n_rep
        # An elastic run may restart with a worker count that does not divide --batch-size: the
        # global batch is then rounded down to a multiple of it (fixed sizes are checked by run.plan).
        self.per_replica = spec.batch_size // n_rep
        self.global_batch = self.per_replica * n_rep
        if self.per_replica < 1:
            raise KilnError(f"--batch-size {spec.batch_size} is smaller than the {n_rep} replicas")
        self.held = dict(limit=spec.limit, val_fraction=spec.val_fraction, seed=spec.seed)
        train_size = data.split_size(spec.dataset, info, "train", per_class=per_class, **self.held)
        self.steps = (train_size // world_size) // (self.global_batch // world_size)
        if self.steps < 1:
            raise KilnError(f"{train_size} training examples cannot fill one batch of {spec.batch_size} "
                            f"per step; lower --batch-size")
        val_size = data.split_size(spec.dataset, info, "val", **self.held) if spec.val_fraction else 0
        self.val_per_replica = min(self.per_replica, val_size // n_rep) if val_size else 0
        per_worker = max(1, self.val_per_replica * n_rep // world_size)
        self.val_steps = (val_size // world_size) // per_worker if self.val_per_replica else 0
        if spec.val_fraction and self.val_steps < 1:
            raise KilnError(f"the validation split holds {val_size} examples, too few for {n_rep} "
                            "replicas; raise --val-fraction or --limit, or pass --val-fraction 0")

    def iterators(self, strategy: Any, preprocess: Any) -> tuple[Any, Any]:
        """The distributed training iterator (shuffled, endless) and the validation one (the same
        batches every epoch, or None without a validation split)."""
        import tensorflow as tf

        spec = self.spec

        def train_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            shard = (input_context.input_pipeline_id, input_context.num_input_pipelines)
            split = data.load(spec.dataset, "train", shard=shard, per_class=self.per_class, **self.held)
            batch = input_context.get_per_replica_batch_size(self.global_batch)
            ds = split.ds.shuffle(min(split.size, 20000), seed=spec.seed + shard[0])
            ds = ds.batch(batch, drop_remainder=True).repeat()
            ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
            return ds.prefetch(tf.data.AUTOTUNE)

        def val_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
            shard = (input_context.input_pipeline_id, input_context.num_input_pipelines)
            split = data.load(spec.dataset, "val", shard=shard, **self.held)
            batch = self.val_per_replica * self.n_rep // input_context.num_input_pipelines
            ds = split.ds.batch(batch, drop_remainder=True).take(self.val_steps)
            ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).cache().repeat()
            return ds.prefetch(tf.data.AUTOTUNE)

        train = iter(strategy.distribute_datasets_from_function(train_fn))
        val = iter(strategy.distribute_datasets_from_function(val_fn)) if self.val_steps else None
        return train, val


class EarlyStop:
    """--early-stop METRIC[:PATIENCE]: the best epoch so far (its value and weights), and whether
    the run has stopped; both are kept in the checkpoint so a resumed run goes on where it was."""

    def __init__(self, rule: str | None) -> None:
        self.rule = rule
        self.watch = parse_early_stop(rule) if rule else None
        self.best: dict[str, Any] | None = None

    def restore(self, state: dict[str, Any], restore: Path) -> None:
        if state.get("early_stop") and self.watch:
            self.best = {**state["early_stop"], "weights": checkpoint.best_weights(restore)}

    @property
    def stopped(self) -> int | None:
        return self.best.get("stopped") if self.best else None

    def update(self, epoch: int, metrics: dict[str, float], model: Any, loud: bool) -> bool:
        """Record ``epoch``; True when the run should stop now."""
        if not self.watch:
            return False
        name, patience, mode = self.watch
        if name not in metrics:
            raise KilnError(f"--early-stop {self.rule}: this run reports no {name}; its validation "
                            f"metrics: {', '.join(k for k in metrics if k.startswith('val_'))}")
        value, best = metrics[name], self.best
        if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
            self.best = {"metric": name, "mode": mode, "epoch": epoch, "value": value,
                         "weights": model.get_weights()}
            return False
        if epoch - best["epoch"] < patience:
            return False
        best["stopped"] = epoch
        if loud:
            say(f"early stop: {name} has not improved on epoch {best['epoch']} "
                f"({best['value']:.4f}) for {patience} epochs; keeping epoch {best['epoch']}'s weights")
        return True

    def state(self) -> dict[str, Any] | None:
        return {k: v for k, v in self.best.items() if k != "weights"} if self.best else None

    def weights(self) -> Any:
        return self.best["weights"] if self.best else None


class Tracking:
    """Rank 0's record of a run: TensorBoard always, MLflow with --mlflow; the other ranks' is
    empty."""

    def __init__(self, spec: TrainSpec, config: dict[str, Any], world_size: int, on: bool) -> None:
        self.board = self.mlflow = None
        if not on:
            return
        from kiln.tracking import Board, Mlflow

        self.mlflow = Mlflow.of(spec.mlflow)
        self.board = Board(spec.run_dir, spec.run, {**config, "plugin": spec.plugin,
                                                    "dataset": spec.dataset, "batch_size": spec.batch_size,
                                                    "epochs": spec.epochs, "workers": world_size,
                                                    "seed": spec.seed, "val_fraction": spec.val_fraction})

    def steps(self, step: int, logs: dict[str, Any]) -> None:
        if self.board is not None:
            self.board.steps(step, {k: float(v) for k, v in logs.items()})

    def epoch(self, epoch: int, metrics: dict[str, float], model: Any, pictures: Path) -> None:
        if self.board is None:
            return
        from kiln.tracking import learning_rate

        lr = learning_rate(model)
        self.board.epoch(epoch, metrics, lr)
        self.board.pictures(epoch, pictures)
        if self.mlflow is not None:
            self.mlflow.metrics({**metrics, **({"learning_rate": lr} if lr is not None else {})}, step=epoch)
            self.mlflow.pictures(pictures)

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


class _OwnRetracing:
    """A logging filter: TensorFlow counts traces by a function's code, so a process that trains
    again (a reused Tune trial actor, runs one after another) hears that ``repeated``'s one
    function per run "triggered tf.function retracing". Only that warning about it is dropped."""

    def filter(self, record: Any) -> bool:
        return not ("triggered tf.function retracing" in record.getMessage()
                    and "repeated.<locals>.run" in record.getMessage())


def repeated(strategy: Any, step: Any) -> Any:
    """``step`` run ``n`` times in one compiled call. Many steps per call keep Python out of the
    hot path; logs are reduced across workers once per epoch (a collective per logged value per
    step would cost more than the step itself). One per run: it holds that run's model.

    The step appears once in the graph: the loop carries its logs in an ``Optional`` whose type
    is known only once the step is traced inside the loop, as Keras' own multi-step function
    does (keras/src/backend/tensorflow/trainer.py). Giving the loop a first step of its own to
    type the logs would trace and optimise the step twice (docs/design.md)."""
    import tensorflow as tf

    logger = tf.get_logger()
    if not any(isinstance(f, _OwnRetracing) for f in logger.filters):
        logger.addFilter(_OwnRetracing())

    @tf.function
    def run(iterator: Any, n: Any) -> dict[str, Any]:
        empty = tf.experimental.Optional.empty(None)

        def body(i: Any, _: Any) -> tuple[Any, Any]:
            logs = tf.experimental.Optional.from_value(strategy.run(step, args=(next(iterator),)))
            empty._element_spec = logs.element_spec  # the loop's type, learnt while tracing
            return i + 1, logs

        _, last = tf.while_loop(lambda i, _: i < n, body, [tf.constant(0), empty])
        last._element_spec = empty.element_spec
        return last.get_value()

    return run


def build_metrics(model: Any, strategy: Any, element_spec: Any) -> None:
    """Create a compiled model's metric variables before its step is traced, as Keras' fit does
    before its first step (``Trainer._symbolic_build``, on symbolic tensors: nothing runs). A
    ``tf.function`` that creates variables on its first call is traced twice, and with more than
    one replica in a worker that first call fails ("You must feed a value for placeholder")."""
    import tensorflow as tf

    if getattr(model, "_compile_metrics", None) is None and getattr(model, "_compile_loss", None) is None:
        return  # a plugin's own step: its trackers made their variables when it was built
    # one replica's batch: a worker with several replicas describes each of them
    one = tf.nest.map_structure(lambda s: s._value_specs[0] if hasattr(s, "_value_specs") else s,
                                element_spec)
    with strategy.scope():
        model._symbolic_build(data_batch=one)


def reduced(strategy: Any, logs: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Each replica's metric over its share, averaged: the global figure on every worker."""
    n_rep = strategy.num_replicas_in_sync
    return {prefix + k: float(strategy.reduce("SUM", v, axis=None)) / n_rep for k, v in logs.items()}


def save(ctx: Context, model: Any, state: dict[str, Any], stop: EarlyStop,
         metrics: dict[str, float]) -> None:
    """Every worker reports; rank 0 alone writes the checkpoint (checkpoint.py owns its format)."""
    tmp = Path(tempfile.mkdtemp(prefix="kiln-ckpt-"))
    try:
        if ctx.rank == 0:
            if stop.best is not None:
                state = {**state, "early_stop": stop.state()}
            checkpoint.save(model, tmp, state, best=stop.weights())
        ctx.report(metrics, tmp if ctx.rank == 0 else None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resume(ctx: Context, model: Any, stop: EarlyStop) -> tuple[int, list[dict[str, float]], list[dict[str, Any]]]:
    """Restore the latest checkpoint, if any, into ``model`` and ``stop``: the epoch to go on from,
    the history so far, and each restart's epoch and worker count."""
    start, history, resumed = 0, [], []
    for restore in ctx.restore_dir():
        if restore is not None:
            state = checkpoint.restore(model, restore)
            start, history = state["epoch"], state["history"]
            resumed = state.get("resumed", []) + [{"epoch": start, "workers": ctx.world_size}]
            stop.restore(state, restore)
            if ctx.rank == 0:
                say(f"resuming from checkpoint at epoch {start} on {ctx.world_size} worker(s) ({restore})")
    return start, history, resumed


def train_loop(spec: TrainSpec, info: DatasetInfo, strategy: Any, ctx: Context) -> None:
    """Train ``spec`` under ``strategy``; report metrics and a checkpoint after every epoch."""
    import keras
    import tensorflow as tf

    from kiln.logs import Progress

    keras.utils.set_random_seed(spec.seed)
    plugin = models.for_spec(spec, info)
    if ctx.rank == 0:
        plugin.progress_dir = spec.progress_dir
        plugin.progress_dir.mkdir(parents=True, exist_ok=True)
    n_rep, loud = strategy.num_replicas_in_sync, ctx.rank == 0
    sizes = Batches(spec, info, plugin.train_per_class(), n_rep, ctx.world_size)
    if sizes.global_batch != spec.batch_size and loud:
        say(f"global batch {sizes.global_batch}: --batch-size {spec.batch_size} rounded down to a "
            f"multiple of {n_rep} replicas")
    steps, stop = sizes.steps, EarlyStop(spec.early_stop)
    plugin.total_steps = spec.epochs * steps
    with strategy.scope():
        model = models.build(plugin, spec.precision)

    start, history, resumed = resume(ctx, model, stop)
    if stop.stopped:
        if loud:
            say(f"this run stopped early at epoch {stop.stopped}: {stop.best['metric']} had not "
                f"improved on epoch {stop.best['epoch']} for {stop.watch[1]} epochs")
        return

    track = Tracking(spec, vars(plugin.config), ctx.world_size, on=loud)
    iterator, val_iterator = sizes.iterators(strategy, plugin.preprocess)
    build_metrics(model, strategy, iterator.element_spec)
    run_steps, run_val = repeated(strategy, model.train_step), repeated(strategy, model.test_step)
    one_process = ctx.world_size == 1 and n_rep == 1
    bar = Progress(spec.epochs, steps, sizes.global_batch)
    bar.on = bar.on and loud and one_process
    # on a terminal the bar moves about 20 times an epoch; elsewhere Python stays out of the way
    per_call = max(1, min(STEPS_PER_CALL, steps // 20)) if bar.on else STEPS_PER_CALL

    for epoch in range(start + 1, spec.epochs + 1):
        model.reset_metrics()
        t0 = time.perf_counter()
        bar.start(epoch)
        done = 0
        while done < steps:
            n = min(per_call, steps - done)
            logs = run_steps(iterator, tf.constant(n))
            done += n
            if bar.on:
                bar.update(done, {k: float(v) for k, v in logs.items()})
            if one_process:  # the step's logs are already global; N workers log per epoch only
                track.steps((epoch - 1) * steps + done, logs)
        metrics = reduced(strategy, logs)
        seconds = time.perf_counter() - t0
        if val_iterator is not None:
            model.reset_metrics()
            metrics.update(reduced(strategy, run_val(val_iterator, tf.constant(sizes.val_steps)), "val_"))
        metrics.update(epoch=epoch, examples_per_s=steps * sizes.global_batch / seconds,
                       seconds=seconds, workers=ctx.world_size)
        history.append(metrics)
        bar.clear()
        if loud:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                              if k not in ("epoch", "examples_per_s", "seconds", "workers"))
            say(f"epoch {epoch}/{spec.epochs}  {shown}  "
                f"{metrics['examples_per_s']:.0f} examples/s  {seconds:.1f}s")
        stopping = stop.update(epoch, metrics, model, loud)
        plugin.on_epoch_end(model, epoch, metrics, ctx.rank)
        track.epoch(epoch, metrics, model, plugin.progress_dir)
        state = {"epoch": epoch, "history": history, "resumed": resumed, "spec": spec.to_dict()}
        save(ctx, model, state, stop, metrics)
        if stopping:
            break
    track.close()


def metric_names(spec: TrainSpec, info: DatasetInfo) -> list[str]:
    """The metrics ``spec``'s model reports, from one test step on a few training examples:
    Keras knows a compiled model's metric names only once it has run (kiln tune checks its
    --metric with this before starting any trial)."""
    plugin = models.for_spec(spec, info)
    model = models.build(plugin)
    split = data.load(spec.dataset, "train", limit=spec.limit, val_fraction=spec.val_fraction,
                      seed=spec.seed, per_class=plugin.train_per_class())
    batch = next(iter(split.ds.batch(min(8, spec.batch_size)).take(1).map(plugin.preprocess)))
    return sorted(model.test_step(batch))


class LocalContext:
    """In-process run: checkpoints go to ``<runs>/<run>/checkpoint_<epoch>``."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.run_dir, self.keep = run_dir, keep

    def restore_dir(self) -> Iterator[Path | None]:
        yield checkpoint.latest(self.run_dir)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        assert checkpoint_dir is not None
        checkpoint.keep(self.run_dir, checkpoint_dir, int(metrics["epoch"]), self.keep)
