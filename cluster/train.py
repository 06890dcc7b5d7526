"""Ray Train: run Kiln's one training loop in N workers with MultiWorkerMirroredStrategy.

Checkpoints go to ``<runs>/<run>`` through Ray Train's storage, so rerunning the same run name
resumes from the last one (Ray Train V2 restores by RunConfig name + storage_path), and a worker
that dies is restarted from it (FailureConfig).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from kiln import logs, net
from kiln.plugin import DatasetInfo, KilnError
from kiln.spec import TrainSpec
from kiln.logs import say


def connect(address: str | None, *, dashboard: bool = True) -> None:
    """Join the Ray cluster at ``address`` (or start a local one, with Ray's dashboard unless
    ``dashboard`` is False: training needs it, as the note on ``worker_setup`` says, and
    starting it is about half of a local Ray's start); KilnError if unreachable."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        # ERROR: Ray's start-up warnings (e.g. about its default token auth) would otherwise be
        # mixed into Kiln's one-line errors; worker output still reaches the driver.
        target = net.ray_address(address)
        # include_dashboard only where this process starts the Ray: joining one, Ray refuses it
        ray.init(address=target, logging_level=logging.ERROR,
                 runtime_env=None if logs.in_ray_job() else logs.runtime_env(hook=WORKER_HOOK),
                 **({} if dashboard or target != "local" else {"include_dashboard": False}))
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KilnError(f"cannot reach a Ray cluster at {address!r}: {first}; check the address "
                        "(e.g. 127.0.0.1:6379 or ray://host:10001) or start one with `ray start --head`") \
            from None


WORKER_HOOK = "kiln.cluster.train.worker_setup"


def worker_setup() -> None:
    """The setup hook of the Ray worker processes of training (Kiln's quiet output), which also
    points Ray's state API at the worker's own cluster. Ray Train's placement-group cleaner asks
    that API, through the dashboard, whether the run's controller is alive; without an address
    the API takes the last `ray start` head recorded on this machine (and, when that head is
    gone, waits on it, holding the end of every run until the cleaner's stop timeout) or fails
    where two local Rays run."""
    import ray

    logs.quiet_process()
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


class RayContext:
    """The loop's view of a Ray Train worker."""

    def __init__(self, resume: bool = True) -> None:
        import ray.train

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.resume = resume  # False: a run after the group's first (fit's ``then``) starts fresh

    def restore_dir(self) -> Iterator[Path | None]:
        import ray.train

        # once a run in the group has reported, Ray hands its newest checkpoint to the next
        ckpt = ray.train.get_checkpoint() if self.resume else None
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def _quiet_worker_logs() -> None:
    """Keep a worker's output to Kiln's progress lines: tfds and Ray Train log every step at INFO."""
    import absl.logging

    absl.logging.set_verbosity(absl.logging.WARNING)
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # Ray Train V2 logs each report at INFO on a logger named after its file
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass


def _worker(config: dict[str, Any]) -> None:
    """Body of each Ray Train worker: set TF up, create the strategy, run the shared loop."""
    from kiln import devices
    from kiln.trainer import train_loop

    runs = [(TrainSpec.from_dict(s), DatasetInfo.from_dict(i)) for s, i in config["runs"]]
    spec = runs[0][0]
    devices.configure(max(1, math.floor(spec.cpus_per_worker)), gpus=spec.gpus_per_worker > 0)
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    _quiet_worker_logs()
    # the backend (kiln.cluster.tf_backend) has set TF_CONFIG; the strategy must exist before any op.
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    ctx = RayContext()
    import ray

    say(f"worker {ctx.rank}/{ctx.world_size} on node {ray.util.get_node_ip_address()}, "
        f"GPUs {ray.get_gpu_ids() or 'none'}")
    for i, (spec, info) in enumerate(runs):
        train_loop(spec, info, strategy, ctx if i == 0 else RayContext(resume=False))


def fit(spec: TrainSpec, info: DatasetInfo, callbacks: list[Any] | None = None,
        then: Sequence[tuple[TrainSpec, DatasetInfo]] = ()) -> Path:
    """Train on ``spec.workers`` Ray Train workers (elastic up to ``spec.max_workers``); returns
    the run folder holding checkpoints. A failed worker or lost node restarts the group from the
    last checkpoint, up to ``spec.max_failures`` times. ``callbacks``: Ray Train callbacks (a Tune
    trial passes Tune's, which hands each epoch's report up to the search). ``then``: runs the
    same worker group trains after ``spec``, each with its own model, data and run folder, for
    checks that cover several plugins at the price of one group's start (its processes import
    TensorFlow and set up the collective). Such a group is never restarted: its checkpoints,
    in ``spec``'s run folder, each belong to one of its models."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from kiln.cluster.tf_backend import TensorflowConfig

    joined = bool(spec.address or os.environ.get("RAY_ADDRESS"))  # else a cluster on this machine
    if not joined:
        # One machine has no node to drain; Ray Train's preemption watcher (for spot nodes) would
        # only print a core-worker ERROR about its restart policy in every run (ray#53727).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    connect(spec.address)
    import ray

    resources = ray.cluster_resources()
    need_cpu = spec.workers * spec.cpus_per_worker
    need_gpu = spec.workers * spec.gpus_per_worker
    if resources.get("CPU", 0) < need_cpu or resources.get("GPU", 0) < need_gpu:
        have = f"{resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs"
        if not joined:
            raise KilnError(f"{spec.workers} workers need {need_cpu:g} CPUs and {need_gpu:g} GPUs but "
                            f"the Ray cluster has {have}; lower --workers/--cpus-per-worker/"
                            "--gpus-per-worker or add nodes")
        # A cluster with an autoscaler (ray up, KubeRay) adds nodes when Ray Train asks for them.
        say(f"{spec.workers} workers need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the cluster has "
            f"{have} now: waiting for it to scale up")
    per_worker: dict[str, float] = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        per_worker["GPU"] = spec.gpus_per_worker
    trainer = DataParallelTrainer(  # what TensorflowTrainer is, with a backend that spares the controller TensorFlow
        _worker, backend_config=TensorflowConfig(),
        train_loop_config={"runs": [(s.to_dict(), i.to_dict()) for s, i in [(spec, info), *then]]},
        scaling_config=ScalingConfig(num_workers=(spec.workers, spec.max_workers) if spec.elastic
                                     else spec.workers, use_gpu=spec.gpus_per_worker > 0,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=spec.run, storage_path=spec.runs_dir,
            failure_config=FailureConfig(max_failures=0 if then else spec.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # the workers' traceback was already printed by Ray
        raise KilnError(f"Ray Train run '{spec.run}' failed: {_root_cause(e)}") from None
    return spec.run_dir


def _root_cause(e: BaseException) -> str:
    seen = e
    while seen.__cause__ is not None:
        seen = seen.__cause__
    text = str(seen).strip().splitlines()
    for line in reversed(text):
        if "KilnError" in line or "Error" in line:
            return line.strip()
    return (text[-1] if text else type(seen).__name__).strip()


@contextlib.contextmanager
def local_cluster(num_cpus: int | None = None, num_gpus: int | None = None) -> Iterator[None]:
    """Start (and afterwards stop) a local Ray cluster, for tests and benchmarks; its own even
    where a `ray start` head runs on this machine (which ``ray.init()`` would join)."""
    import ray

    from kiln.net import free_port

    # the dashboard answers the state API that Ray Train's placement-group cleaner asks; on a port
    # of its own, since 8265 is where `kiln cluster up` and `kiln submit` expect a head
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=True,
             dashboard_port=free_port(), logging_level=logging.WARNING,
             runtime_env=logs.runtime_env(hook=WORKER_HOOK))
    try:
        yield
    finally:
        ray.shutdown()
