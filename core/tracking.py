"""Tracking a user can open: the one module that writes a run's TensorBoard event files.

Layout as Keras' own TensorBoard callback writes it, so runs compare with other Keras runs:
``<run>/tensorboard/train`` and ``<run>/tensorboard/validation``, with ``epoch_<metric>`` scalars
at each epoch (validation metrics without their ``val_`` prefix, so the two curves share a chart),
``batch_<metric>`` scalars every ``STEPS_PER_CALL`` steps in a one-process run, the learning
rate, the pictures a plugin draws while training, and the run's config as hparams.
``tensorboard --logdir kiln-runs`` shows every run. Only rank 0 writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# what a history entry holds besides metrics
NOT_METRICS = ("epoch", "seconds", "workers")


class Board:
    def __init__(self, run_dir: Path, run: str, hparams: dict[str, Any]) -> None:
        import tensorflow as tf

        self.root = run_dir / "tensorboard"
        self.train = tf.summary.create_file_writer(str(self.root / "train"))
        self.validation = tf.summary.create_file_writer(str(self.root / "validation"))
        self.pictures_seen: set[str] = set()
        from tensorboard.plugins.hparams import api as hp

        with self.train.as_default():
            hp.hparams({k: _hparam(v) for k, v in hparams.items()}, trial_id=run)

    def steps(self, step: int, logs: dict[str, float]) -> None:
        import tensorflow as tf

        with self.train.as_default(step=step):
            for k, v in logs.items():
                tf.summary.scalar(f"batch_{k}", v)

    def epoch(self, epoch: int, metrics: dict[str, float], learning_rate: float | None) -> None:
        import tensorflow as tf

        with self.train.as_default(step=epoch):
            for k, v in metrics.items():
                if k not in NOT_METRICS and not k.startswith("val_"):
                    tf.summary.scalar(f"epoch_{k}", v)
            if learning_rate is not None:
                tf.summary.scalar("epoch_learning_rate", learning_rate)
        with self.validation.as_default(step=epoch):
            for k, v in metrics.items():
                if k.startswith("val_"):
                    tf.summary.scalar(f"epoch_{k[4:]}", v)
        self.train.flush()
        self.validation.flush()

    def pictures(self, epoch: int, folder: Path | None) -> None:
        """The PNGs a plugin drew into ``folder`` since the last call, as images at ``epoch``."""
        import tensorflow as tf

        if folder is None or not folder.is_dir():
            return
        with self.train.as_default(step=epoch):
            for png in sorted(folder.glob("*.png")):
                if png.name not in self.pictures_seen:
                    self.pictures_seen.add(png.name)
                    image = tf.io.decode_png(png.read_bytes(), channels=3)
                    tf.summary.image(png.stem.split("_epoch")[0], image[None], step=epoch)
        self.train.flush()

    def close(self) -> None:
        self.train.close()
        self.validation.close()


def _hparam(value: Any) -> bool | int | float | str:
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def learning_rate(model: Any) -> float | None:
    """The optimizer's current learning rate (a schedule's value at its step), if it has one."""
    opt = getattr(model, "optimizer", None)
    try:
        return float(opt.learning_rate)
    except (AttributeError, TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------- MLflow
#
# Through the tracking API (MlflowClient) with explicit run ids, not mlflow's Keras autolog: that
# hooks only model.fit, which Kiln's loop does not call, and declares Keras <= 3.13. A run's id
# travels in its TrainSpec, so Ray Train's rank 0, a Tune trial's actor and the driver that
# stores the model all log into the same MLflow run, and a resumed run continues it.

MLFLOW_HINT = "start one with `mlflow server --host 127.0.0.1 --port 5000`, or check --mlflow / MLFLOW_TRACKING_URI"


def _client(uri: str) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError:
        from kiln.plugin import KilnError

        raise KilnError("--mlflow needs the MLflow client: pip install 'kiln[mlflow]' "
                        "(or mlflow-skinny)") from None
    return MlflowClient(tracking_uri=uri)


def check_mlflow(uri: str) -> str:
    """``uri`` as MLflow takes it, or one KilnError line: not installed, nothing listening, or a
    server that refuses. Called before any training."""
    from urllib.parse import urlparse

    from kiln import net
    from kiln.plugin import KilnError

    uri = uri.strip()
    url = urlparse(uri)
    if url.scheme in ("http", "https"):
        if not url.hostname:
            raise KilnError(f"bad MLflow tracking URI {uri!r}: use http://HOST:PORT")
        net.reachable(url.hostname, url.port or (443 if url.scheme == "https" else 80),
                      f"an MLflow server at {uri}", MLFLOW_HINT)
    elif url.scheme not in ("", "file", "sqlite", "postgresql", "mysql", "databricks"):
        raise KilnError(f"bad MLflow tracking URI {uri!r}: use http://HOST:PORT, a folder or sqlite:///FILE")
    client = _client(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as e:  # whatever the server answered: one line that names it
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise KilnError(f"the MLflow tracking server at {uri} refused a request: {first}") from None
    return uri


class Mlflow:
    """One Kiln run (or search) as an MLflow run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self.client = _client(uri)
        self.pictures_seen: set[str] = set()

    @classmethod
    def of(cls, record: dict[str, str] | None) -> "Mlflow | None":
        """The MLflow run a ``TrainSpec.mlflow`` record names, once it has a run id."""
        return cls(record["uri"], record["run_id"]) if record and record.get("run_id") else None

    @classmethod
    def start(cls, uri: str, experiment: str, name: str, params: dict[str, Any],
              tags: dict[str, str], parent: str | None = None) -> "Mlflow":
        from mlflow.entities import Param

        client = _client(uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        out = cls(uri, run.info.run_id)
        # MLflow caps a param's value at 6000 characters
        client.log_batch(out.run_id, params=[Param(k, str(_hparam(v))[:6000]) for k, v in params.items()])
        return out

    def metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()
                                                    if k not in ("epoch", "workers")])

    def pictures(self, folder: Path | None, artifact_path: str = "progress") -> None:
        """The PNGs a plugin drew into ``folder`` since the last call."""
        if folder is None or not folder.is_dir():
            return
        for png in sorted(folder.glob("*.png")):
            if png.name not in self.pictures_seen:
                self.pictures_seen.add(png.name)
                self.client.log_artifact(self.run_id, str(png), artifact_path)

    def files(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for path in paths:
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)
