"""Tracking a user can open: the one module that writes a run's TensorBoard event files.

Layout as Keras' own TensorBoard callback writes it, so runs compare with other Keras runs:
``<run>/tensorboard/train`` and ``<run>/tensorboard/validation``, with ``epoch_<metric>`` scalars
at each epoch (validation metrics without their ``val_`` prefix, so the two curves share a chart),
``batch_<metric>`` scalars every ``STEPS_PER_CALL`` steps in a one-process run, the learning
rate, the pictures a plugin draws while training, and the run's config as hparams.
``tensorboard --logdir kiln-runs`` shows every run. Only rank 0 writes.
"""

from __future__ import annotations

import json
import shutil
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


# ------------------------------------------------------------------------------ model registry
#
# A registered version is the plugin's export network (raw inputs in, the predict method's main
# output out: what `kiln export` writes) in MLflow's Keras flavour, whose pyfunc entry loads it
# with `mlflow.pyfunc.load_model("models:/NAME@ALIAS")`. Beside it in the same run, under
# `kiln/`, the stored version's own folder: what a store without it imports. The registered
# version's tags name the Kiln version it came from, so a Kiln label and an MLflow alias name one
# version on both sides.

KILN_ARTIFACT = "kiln"  # the stored version's folder in the MLflow run


def register(uri: str, run_id: str, name: str, network: Any, version: Any, example: Any) -> int:
    """Log ``network`` (the plugin's export network of Kiln version ``version``) in run
    ``run_id`` and register it as a version of MLflow model ``name``; the MLflow version number.
    ``example``: raw inputs of the network (``kiln.run.raw_example``)."""
    import tempfile

    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    x = example
    client = _client(uri)
    with tempfile.TemporaryDirectory(prefix="kiln-mlflow-") as tmp:
        folder = Path(tmp) / "model"
        # made first: mlflow.keras writes the input example before it makes the folder
        folder.mkdir()
        # requirements named, not inferred (MLflow infers them by loading the model again in a
        # subprocess, which costs seconds)
        mlflow.keras.save_model(network, str(folder), signature=infer_signature(x, network.predict(x, verbose=0)),
                                input_example=x,
                                pip_requirements=[f"keras=={keras.__version__}", f"tensorflow=={tf.__version__}"])
        client.log_artifacts(run_id, str(folder), "model")
    client.log_artifacts(run_id, str(version.path), KILN_ARTIFACT)
    try:
        client.create_registered_model(name, tags={"kiln.plugin": version.manifest["plugin"]})
    except Exception as e:  # already there: MLflow answers RESOURCE_ALREADY_EXISTS
        if "RESOURCE_ALREADY_EXISTS" not in str(e) and "already exists" not in str(e):
            raise
    mv = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                     tags={"kiln.model": version.ref, "kiln.run": version.manifest["run"]},
                                     description=f"Kiln {version.ref} ({version.manifest['plugin']})")
    return int(mv.version)


def registered(uri: str, version: Any) -> list[Any]:
    """The MLflow model versions registered from Kiln version ``version`` (found by the MLflow run
    its manifest records)."""
    run_id = (version.manifest.get("mlflow") or {}).get("run_id")
    if not run_id:
        return []
    return [mv for mv in _client(uri).search_model_versions(f"run_id='{run_id}'")
            if mv.tags.get("kiln.model") == version.ref]


def set_alias(uri: str, version: Any, alias: str) -> list[str]:
    """Point MLflow alias ``alias`` at the registered versions of Kiln version ``version``;
    ``NAME/VERSION`` of each. KilnError when it was never registered."""
    found = registered(uri, version)
    if not found:
        from kiln.plugin import KilnError

        raise KilnError(f"{version.ref} has no registered version in the MLflow registry at {uri}; train it "
                        "with --mlflow URI --register to register it")
    client = _client(uri)
    for mv in found:
        client.set_registered_model_alias(mv.name, alias, mv.version)
    return [f"{mv.name}/{mv.version}" for mv in found]


def delete_alias(uri: str, version: Any, alias: str) -> None:
    """Remove ``alias`` from the registered models it names a version of ``version`` in."""
    client = _client(uri)
    for mv in registered(uri, version):
        if alias in (client.get_model_version(mv.name, mv.version).aliases or []):
            client.delete_registered_model_alias(mv.name, alias)


def is_registry_uri(text: str) -> bool:
    return text.startswith("models:/")


def resolve(uri: str, model_uri: str, store: Any) -> str:
    """The Kiln version (``name:version``) behind ``models:/NAME@ALIAS`` or ``models:/NAME/N``:
    the one it was registered from where ``store`` holds it, else that version imported into
    ``store`` from the MLflow run it was logged in."""
    from kiln.plugin import KilnError

    rest = model_uri[len("models:/"):]
    name, at, alias = rest.partition("@")
    if not at:
        name, _, number = rest.partition("/")
    client = _client(uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if at else client.get_model_version(name, number)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise KilnError(f"{model_uri}: not in the MLflow registry at {uri} ({first}); use "
                        "models:/NAME@ALIAS or models:/NAME/VERSION") from None
    ref = mv.tags.get("kiln.model")
    if not ref:
        raise KilnError(f"{model_uri} (MLflow version {mv.version}) was not registered by Kiln; Kiln serves "
                        "the versions `kiln train --register` registered")
    kiln_name = ref.partition(":")[0]
    for version in store.list():
        m = version.manifest
        if version.name == kiln_name and (m.get("mlflow") or {}).get("run_id") == mv.run_id:
            return version.ref
    import tempfile

    with tempfile.TemporaryDirectory(prefix="kiln-import-") as tmp:
        try:
            folder = Path(client.download_artifacts(mv.run_id, KILN_ARTIFACT, tmp))
        except Exception as e:
            raise KilnError(f"{model_uri}: cannot download the Kiln version from MLflow run {mv.run_id}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else type(e).__name__}") from None
        manifest = json.loads((folder / "manifest.json").read_text())

        def write(dest: Path) -> dict[str, Any]:
            for item in folder.iterdir():
                if item.name != "manifest.json":
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, dest / item.name)
            return {k: v for k, v in manifest.items() if k not in ("version", "name", "created")}

        version = store.save(kiln_name, write)
    from kiln.logs import say

    say(f"imported {model_uri} (from {ref} in MLflow run {mv.run_id}) as {version.ref}")
    return version.ref


def resolve_all(models: list[str], uri: str | None, store_root: str | None) -> list[str]:
    """``kiln serve --model`` values with each ``models:/...`` one replaced by its Kiln version."""
    from kiln import settings
    from kiln.plugin import KilnError
    from kiln.store import Store

    uri = uri or settings.mlflow_uri()
    if not uri:
        raise KilnError("--model models:/... names a model in MLflow's registry; give the server with "
                        "--mlflow URI (or MLFLOW_TRACKING_URI)")
    uri = check_mlflow(uri)
    store = Store(store_root)
    return [resolve(uri, m, store) if is_registry_uri(m) else m for m in models]
