"""Kiln's settings from the environment: every ``KILN_*`` variable is read here, nowhere else.

| variable | default | what |
|---|---|---|
| ``KILN_STORE`` | ``./kiln-store`` | the model store: a folder or a URI (s3://, gs://, file://) |
| ``KILN_RUNS`` | ``./kiln-runs`` | checkpoints of runs in progress |
| ``KILN_DATA_DIR`` | ``../shared/data`` beside the checkout, if there | raw dataset files |
| ``KILN_TFDS_DIR`` | ``~/.cache/kiln/tfds`` | datasets prepared by tensorflow-datasets |
| ``KILN_CACHE`` | ``~/.cache/kiln`` | downloaded versions of URI stores (``stores/``) |
| ``KILN_API_TOKEN`` | none | the server's bearer token; the client sends it |
| ``KILN_URL`` | ``http://127.0.0.1:8000`` | the server ``kiln predict`` / ``kiln generate`` talk to |
| ``KILN_VERBOSE`` | off | show TensorFlow's and Ray's start-up notices |
| ``MLFLOW_TRACKING_URI`` | none | MLflow's own variable: log runs there (as ``--mlflow URI``) |
| ``MLFLOW_EXPERIMENT_NAME`` | ``kiln`` | MLflow's own variable: the experiment runs go to |
"""

from __future__ import annotations

import os
from pathlib import Path

VERBOSE = "KILN_VERBOSE"
# what a Ray process that serves or trains for Kiln needs from the environment it was started in
FORWARDED = ("KILN_DATA_DIR", "KILN_TFDS_DIR")


def verbose() -> bool:
    """``KILN_VERBOSE=1`` (``kiln --verbose`` sets it): show TensorFlow's and Ray's start-up notices."""
    return os.environ.get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no")


def store() -> str:
    """``$KILN_STORE`` as given (a folder or a URI), else ``kiln-store``."""
    return os.environ.get("KILN_STORE") or "kiln-store"


def store_named() -> str | None:
    """``$KILN_STORE`` only when the user set it."""
    return os.environ.get("KILN_STORE") or None


def runs_dir() -> Path:
    """``$KILN_RUNS``, else ``./kiln-runs``."""
    return Path(os.environ.get("KILN_RUNS") or "kiln-runs").expanduser()


def runs_dir_named() -> str | None:
    return os.environ.get("KILN_RUNS") or None


def data_dir() -> Path | None:
    """Raw dataset files: ``$KILN_DATA_DIR``, else ``../shared/data`` beside this checkout."""
    env = os.environ.get("KILN_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    here = Path(__file__).resolve().parents[2] / "shared" / "data"
    return here if here.is_dir() else None


def tfds_dir() -> Path:
    return Path(os.environ.get("KILN_TFDS_DIR") or "~/.cache/kiln/tfds").expanduser()


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE") or "~/.cache/kiln").expanduser()


def api_token() -> str | None:
    return os.environ.get("KILN_API_TOKEN") or None


def url() -> str:
    return os.environ.get("KILN_URL") or "http://127.0.0.1:8000"


def mlflow_uri() -> str | None:
    return os.environ.get("MLFLOW_TRACKING_URI") or None


def mlflow_experiment() -> str:
    return os.environ.get("MLFLOW_EXPERIMENT_NAME") or "kiln"


def forwarded() -> dict[str, str]:
    """The settings a Ray process started for Kiln must see as this one does."""
    return {k: os.environ[k] for k in FORWARDED if k in os.environ}
