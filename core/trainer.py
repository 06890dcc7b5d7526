"""The one training loop. It knows nothing about any model: it runs ``model.train_step`` (Keras'
own, or a plugin's GAN/VAE step) under a ``tf.distribute`` strategy, in-process (the default
strategy) or inside Ray Train workers (MultiWorkerMirroredStrategy).

Why not ``model.fit``: Keras 3's fit breaks under MultiWorkerMirroredStrategy (DESIGN.md section 3:
tensorflow/tensorflow#72388, keras-team/keras#20585). Owning the loop with public APIs
(``strategy.run`` over ``distribute_datasets_from_function``) works for compiled models and custom
steps alike, and is the same code for 1 process and N workers.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from kiln import data, registry
from kiln.plugin import DatasetInfo, KilnError, Plugin
from kiln.spec import TrainSpec

STATE = "state.json"
OPTIMIZERS = "optimizers.npz"
STEPS_PER_CALL = 50


class Context(Protocol):
    """Where the loop runs: rank/world size, the checkpoint to resume from, and how to report."""

    rank: int
    world_size: int

    def restore_dir(self) -> Iterator[Path | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None: ...


def say(message: str) -> None:
    """One progress line on stdout (not print: Ray Train workers patch print into a logger)."""
    sys.stdout.write(f"[kiln] {message}\n")
    sys.stdout.flush()


def replicas() -> int:
    """Replicas training in sync; divide hand-written mean losses by this (DESIGN.md section 3)."""
    import tensorflow as tf

    return tf.distribute.get_strategy().num_replicas_in_sync


def setup_tensorflow(threads: int | None, gpus: bool) -> None:
    """Limit CPU threads per worker and stop TF from grabbing the whole GPU. Call before any op."""
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
    for gpu in tf.config.list_physical_devices("GPU") if gpus else []:
        tf.config.experimental.set_memory_growth(gpu, True)


def make_plugin(spec: TrainSpec, info: DatasetInfo) -> Plugin:
    if spec.plugin_path:
        registry.load_file(spec.plugin_path)
    plugin = registry.get(spec.plugin)(**spec.overrides)
    plugin.store = spec.store
    plugin.setup(info)
    return plugin


def optimizers(model: Any) -> list[Any]:
    """The model's optimizers: ``model.optimizer`` and any attribute holding one (GANs keep two)."""
    import keras

    found: dict[int, Any] = {}
    opt = getattr(model, "optimizer", None)
    if isinstance(opt, keras.optimizers.Optimizer):
        found[id(opt)] = opt
    for key in sorted(vars(model)):
        value = vars(model)[key]
        if isinstance(value, keras.optimizers.Optimizer):
            found.setdefault(id(value), value)
    return list(found.values())


def build_model(plugin: Plugin) -> Any:
    """Build and compile the plugin's model and create its optimizer state (call under a scope)."""
    model = plugin.build()
    if not model.built:
        # keras-io style GANs/VAEs have no call(): their sub-models (already built) own every
        # variable, so the model is complete; Keras only needs to be told before save_weights.
        model.built = True
    for opt in optimizers(model):
        if not opt.built:  # a GAN's compile() builds each optimizer on its own sub-model
            opt.build(model.trainable_variables)
    return model


def save_checkpoint(model: Any, directory: Path, state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    model.save_weights(directory / "model.weights.h5")
    arrays = {f"{i}/{j}": np.asarray(v.numpy()) for i, opt in enumerate(optimizers(model))
              for j, v in enumerate(opt.variables)}
    np.savez(directory / OPTIMIZERS, **arrays)
    (directory / STATE).write_text(json.dumps(state, indent=2))


def restore_checkpoint(model: Any, directory: Path, *, with_optimizers: bool = True) -> dict[str, Any]:
    """Load weights (and optimizer state) saved by save_checkpoint; returns the saved state."""
    model.load_weights(directory / "model.weights.h5")
    if with_optimizers:
        with np.load(directory / OPTIMIZERS) as f:
            for i, opt in enumerate(optimizers(model)):
                for j, v in enumerate(opt.variables):
                    v.assign(f[f"{i}/{j}"])
    return json.loads((directory / STATE).read_text())


def train_loop(spec: TrainSpec, info: DatasetInfo, strategy: Any, ctx: Context) -> None:
    """Train ``spec`` under ``strategy``; report metrics and a checkpoint after every epoch."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(spec.seed)
    plugin = make_plugin(spec, info)
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
    train_size = data.split_size(info, "train", spec.limit, per_class)
    steps = (train_size // ctx.world_size) // (global_batch // ctx.world_size)
    if steps < 1:
        raise KilnError(f"{train_size} training examples cannot fill one batch of {spec.batch_size} "
                        f"per step; lower --batch-size")

    def dataset_fn(input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        shard = (input_context.input_pipeline_id, input_context.num_input_pipelines)
        split = data.load(spec.dataset, "train", shard=shard, limit=spec.limit, per_class=per_class)
        batch = input_context.get_per_replica_batch_size(global_batch)
        ds = split.ds.shuffle(min(split.size, 20000), seed=spec.seed + shard[0])
        ds = ds.batch(batch, drop_remainder=True).repeat()
        ds = ds.map(plugin.preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.prefetch(tf.data.AUTOTUNE)

    plugin.total_steps = spec.epochs * steps
    with strategy.scope():
        model = build_model(plugin)

    history: list[dict[str, float]] = []
    resumed: list[dict[str, Any]] = []  # each restart: the epoch it resumed from, on how many workers
    start = 0
    for restore in ctx.restore_dir():
        if restore is not None:
            state = restore_checkpoint(model, restore)
            start, history = state["epoch"], state["history"]
            resumed = state.get("resumed", []) + [{"epoch": start, "workers": ctx.world_size}]
            if ctx.rank == 0:
                say(f"resuming from checkpoint at epoch {start} on {ctx.world_size} worker(s) ({restore})")

    iterator = iter(strategy.distribute_datasets_from_function(dataset_fn))

    # Many steps per call keep Python out of the hot path; logs are reduced across workers once
    # per epoch (a collective per logged value per step would cost more than the step itself).
    @tf.function
    def run_steps(iterator: Any, n: Any) -> dict[str, Any]:
        logs = strategy.run(model.train_step, args=(next(iterator),))
        for _ in tf.range(n - 1):
            logs = strategy.run(model.train_step, args=(next(iterator),))
        return logs

    for epoch in range(start + 1, spec.epochs + 1):
        model.reset_metrics()
        t0 = time.perf_counter()
        done = 0
        while done < steps:
            n = min(STEPS_PER_CALL, steps - done)
            logs = run_steps(iterator, tf.constant(n))
            done += n
        metrics = {k: float(strategy.reduce("SUM", v, axis=None)) / n_rep for k, v in logs.items()}
        seconds = time.perf_counter() - t0
        metrics.update(epoch=epoch, examples_per_s=steps * global_batch / seconds, seconds=seconds,
                       workers=ctx.world_size)
        history.append(metrics)
        if ctx.rank == 0:
            shown = "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                              if k not in ("epoch", "examples_per_s", "seconds", "workers"))
            say(f"epoch {epoch}/{spec.epochs}  {shown}  "
                f"{metrics['examples_per_s']:.0f} examples/s  {seconds:.1f}s")
        plugin.on_epoch_end(model, epoch, metrics, ctx.rank)
        tmp = Path(tempfile.mkdtemp(prefix="kiln-ckpt-"))
        try:
            if ctx.rank == 0:
                save_checkpoint(model, tmp, {"epoch": epoch, "history": history, "resumed": resumed,
                                             "spec": spec.to_dict()})
            ctx.report(metrics, tmp if ctx.rank == 0 else None)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


class LocalContext:
    """In-process run: checkpoints go to ``<runs>/<run>/checkpoint_<epoch>``."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: Path, keep: int = 2) -> None:
        self.run_dir, self.keep = run_dir, keep

    def restore_dir(self) -> Iterator[Path | None]:
        yield latest_checkpoint(self.run_dir)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        assert checkpoint_dir is not None
        target = self.run_dir / f"checkpoint_{int(metrics['epoch']):05d}"
        tmp = self.run_dir / f".tmp-{target.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        for old in checkpoints(self.run_dir)[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run (Kiln's or Ray Train's folders), oldest first by epoch."""
    found = []
    for d in run_dir.glob("checkpoint_*"):
        try:
            found.append((json.loads((d / STATE).read_text())["epoch"], d.stat().st_mtime, d))
        except (OSError, ValueError, KeyError):
            continue
    return [d for _, _, d in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None
