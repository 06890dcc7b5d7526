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


def setup_tensorflow(threads: int | None, gpus: bool) -> None:
    """Limit CPU threads per worker and stop TF from grabbing the whole GPU. Call before any op.
    A process that runs a second training (a reused Tune trial actor, in-process runs one after
    another) keeps the settings of its first: TF refuses to change them once it is initialised."""
    import tensorflow as tf

    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        for gpu in tf.config.list_physical_devices("GPU") if gpus else []:
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as e:  # "... after initialization" (threads), "... after being initialized" (GPUs)
        if "initializ" not in str(e):
            raise


def train_loop(spec: TrainSpec, info: DatasetInfo, strategy: Any, ctx: Context) -> None:
    """Train ``spec`` under ``strategy``; report metrics and a checkpoint after every epoch."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(spec.seed)
    plugin = models.for_spec(spec, info)
    if ctx.rank == 0:
        plugin.progress_dir = spec.progress_dir
        plugin.progress_dir.mkdir(parents=True, exist_ok=True)
    n_rep = strategy.num_replicas_in_sync
    # An elastic run may restart with a worker count that does not divide --batch-size: the
    # global batch is then rounded down to a multiple of it (fixed sizes are checked by run.plan).
    per_replica = spec.batch_size // n_rep
    global_batch = per_replica * n_rep
    if per_replica < 1:
        raise KilnError(f"--batch-size {spec.batch_size} is smaller than the {n_rep} replicas")
    if global_batch != spec.batch_size and ctx.rank == 0:
        say(f"global batch {global_batch}: --batch-size {spec.batch_size} rounded down to a multiple "
            f"of {n_rep} replicas")
    per_class = plugin.train_per_class()
    held = dict(limit=spec.limit, val_fraction=spec.val_fraction, seed=spec.seed)
    train_size = data.split_size(spec.dataset, info, "train", per_class=per_class, **held)
    steps = (train_size // ctx.world_size) // (global_batch // ctx.world_size)
    if steps < 1:
        raise KilnError(f"{train_size} training examples cannot fill one batch of {spec.batch_size} "
                        f"per step; lower --batch-size")
    # Validation: the same number of whole batches on every worker, the same batches every epoch
    val_size = data.split_size(spec.dataset, info, "val", **held) if spec.val_fraction else 0
    val_per_replica = min(per_replica, val_size // n_rep) if val_size else 0
    val_steps = (val_size // ctx.world_size) // max(1, val_per_replica * n_rep // ctx.world_size) if val_per_replica else 0
    if spec.val_fraction and val_steps < 1:
        raise KilnError(f"the validation split holds {val_size} examples, too few for {n_rep} replicas; "
                        "raise --val-fraction or --limit, or pass --val-fraction 0")
    watch = parse_early_stop(spec.early_stop) if spec.early_stop else None

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        shard = (input_context.input_pipeline_id, input_context.num_input_pipelines)
        split = data.load(spec.dataset, "train", shard=shard, per_class=per_class, **held)
        batch = input_context.get_per_replica_batch_size(global_batch)
        ds = split.ds.shuffle(min(split.size, 20000), seed=spec.seed + shard[0])
        ds = ds.batch(batch, drop_remainder=True).repeat()
        ds = ds.map(plugin.preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    def val_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        shard = (input_context.input_pipeline_id, input_context.num_input_pipelines)
        split = data.load(spec.dataset, "val", shard=shard, **held)
        batch = val_per_replica * n_rep // input_context.num_input_pipelines
        ds = split.ds.batch(batch, drop_remainder=True).take(val_steps)
        ds = ds.map(plugin.preprocess, num_parallel_calls=tf.data.AUTOTUNE).cache().repeat()
        return ds.prefetch(tf.data.AUTOTUNE)

    plugin.total_steps = spec.epochs * steps
    with strategy.scope():
        model = models.build(plugin)

    history: list[dict[str, float]] = []
    resumed: list[dict[str, Any]] = []  # each restart: the epoch it resumed from, on how many workers
    start = 0
    best: dict[str, Any] | None = None  # --early-stop: the best epoch so far, its value and weights
    for restore in ctx.restore_dir():
        if restore is not None:
            state = checkpoint.restore(model, restore)
            start, history = state["epoch"], state["history"]
            resumed = state.get("resumed", []) + [{"epoch": start, "workers": ctx.world_size}]
            if state.get("early_stop") and watch:
                best = {**state["early_stop"], "weights": checkpoint.best_weights(restore)}
            if ctx.rank == 0:
                say(f"resuming from checkpoint at epoch {start} on {ctx.world_size} worker(s) ({restore})")
    if best and best.get("stopped"):
        if ctx.rank == 0:
            say(f"this run stopped early at epoch {best['stopped']}: {best['metric']} had not improved "
                f"on epoch {best['epoch']} for {watch[1]} epochs")
        return

    board = mlflow = None
    if ctx.rank == 0:
        from kiln.tracking import Board, Mlflow

        mlflow = Mlflow.of(spec.mlflow)

        board = Board(spec.run_dir, spec.run, {**vars(plugin.config), "plugin": spec.plugin,
                                               "dataset": spec.dataset, "batch_size": spec.batch_size,
                                               "epochs": spec.epochs, "workers": ctx.world_size,
                                               "seed": spec.seed, "val_fraction": spec.val_fraction})

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))
    val_iterator = iter(strategy.distribute_datasets_from_function(val_fn)) if val_steps else None

    # Many steps per call keep Python out of the hot path; logs are reduced across workers once
    # per epoch (a collective per logged value per step would cost more than the step itself).
    def repeated(step: Any) -> Any:
        @tf.function
        def run(iterator: Any, n: Any) -> dict[str, Any]:
            logs = strategy.run(step, args=(next(iterator),))
            for _ in tf.range(n - 1):
                logs = strategy.run(step, args=(next(iterator),))
            return logs

        return run

    run_steps, run_val = repeated(model.train_step), repeated(model.test_step)
    from kiln.logs import Progress

    bar = Progress(spec.epochs, steps, global_batch)
    bar.on = bar.on and ctx.rank == 0 and ctx.world_size == 1 and n_rep == 1
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
            if board is not None and ctx.world_size == 1 and n_rep == 1:
                # one process: the step's logs are already global (N workers would need a
                # collective per call, so they log per epoch only)
                board.steps((epoch - 1) * steps + done, {k: float(v) for k, v in logs.items()})
        metrics = {k: float(strategy.reduce("SUM", v, axis=None)) / n_rep for k, v in logs.items()}
        seconds = time.perf_counter() - t0
        if val_iterator is not None:
            # global, as the training metrics are: each replica's metric over its share, averaged
            model.reset_metrics()
            val_logs = run_val(val_iterator, tf.constant(val_steps))
            metrics.update({f"val_{k}": float(strategy.reduce("SUM", v, axis=None)) / n_rep
                            for k, v in val_logs.items()})
        metrics.update(epoch=epoch, examples_per_s=steps * global_batch / seconds, seconds=seconds,
                       workers=ctx.world_size)
        history.append(metrics)
        bar.clear()
        if ctx.rank == 0:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                              if k not in ("epoch", "examples_per_s", "seconds", "workers"))
            say(f"epoch {epoch}/{spec.epochs}  {shown}  "
                f"{metrics['examples_per_s']:.0f} examples/s  {seconds:.1f}s")
        stop = False
        if watch:
            name, patience, mode = watch
            if name not in metrics:
                raise KilnError(f"--early-stop {spec.early_stop}: this run reports no {name}; its "
                                f"validation metrics: {', '.join(k for k in metrics if k.startswith('val_'))}")
            value = metrics[name]
            if best is None or (value > best["value"] if mode == "max" else value < best["value"]):
                best = {"metric": name, "mode": mode, "epoch": epoch, "value": value,
                        "weights": model.get_weights()}
            elif epoch - best["epoch"] >= patience:
                stop = True
                best["stopped"] = epoch
                if ctx.rank == 0:
                    say(f"early stop: {name} has not improved on epoch {best['epoch']} "
                        f"({best['value']:.4f}) for {patience} epochs; keeping epoch {best['epoch']}'s weights")
        plugin.on_epoch_end(model, epoch, metrics, ctx.rank)
        if board is not None:
            from kiln.tracking import learning_rate

            lr = learning_rate(model)
            board.epoch(epoch, metrics, lr)
            board.pictures(epoch, plugin.progress_dir)
            if mlflow is not None:
                mlflow.metrics({**metrics, **({"learning_rate": lr} if lr is not None else {})}, step=epoch)
                mlflow.pictures(plugin.progress_dir)
        tmp = Path(tempfile.mkdtemp(prefix="kiln-ckpt-"))
        try:
            if ctx.rank == 0:
                state = {"epoch": epoch, "history": history, "resumed": resumed, "spec": spec.to_dict()}
                if best is not None:
                    state["early_stop"] = {k: v for k, v in best.items() if k != "weights"}
                checkpoint.save(model, tmp, state, best=best["weights"] if best else None)
            ctx.report(metrics, tmp if ctx.rank == 0 else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if stop:
            break
    if board is not None:
        board.close()


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
