"""What one training run is asked for (``TrainOptions``, the options of ``kiln train``, declared
once) and what it is once planned (``TrainSpec``: everything the run needs, as a plain value that
travels to Ray workers)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.options import option
from kiln.plugin import KilnError


# Keras' dtype policies a run may train under (keras.mixed_precision)
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")

@dataclass
class TrainOptions:
    """Every option of one training run (``kiln train``; ``kiln tune`` takes them for each
    trial); ``kiln.run.plan`` turns them into a ``TrainSpec``."""

    epochs: int | None = option(None, "epochs (default: the plugin's)", low=1)
    batch_size: int | None = option(None, "global batch size (default: the plugin's)", low=1)
    workers: str = option("0", "Ray Train workers; MIN-MAX scales elastically between the two; 0 trains "
                               "in-process (default)", metavar="N|MIN-MAX")
    gpus_per_worker: float = option(0.0, "GPUs Ray gives each worker", low=0)
    cpus_per_worker: float = option(1.0, "CPUs Ray gives each worker", above=0)
    overrides: dict[str, Any] = option({}, "override a config value of the plugin (repeatable; `kiln "
                                           "plugins -v` lists keys)", flag="set", metavar="KEY=VALUE")
    dataset: str | None = option(None, "a tfds name, a folder of pictures in class subfolders (or its "
                                       "name under $KILN_DATA_DIR), an .npz, a text file or a HAR folder "
                                       "(default: the plugin's)")
    limit: int | None = option(None, "use only the first N examples of each split", low=1)
    seed: int = option(0)
    val_fraction: float | None = option(None, "training data held out for validation (default: the "
                                              "plugin's, 0.1; 0: none)", low=0, below=1, metavar="F")
    early_stop: str | None = option(None, "stop when a validation metric stops improving (e.g. "
                                          "val_accuracy:3); the best epoch's weights are stored",
                                    metavar="METRIC[:PATIENCE]")
    name: str | None = option(None, "model name in the store (default: the plugin name)")
    run: str | None = option(None, "run name (a search's, with kiln tune); rerunning an interrupted run "
                                   "resumes it")
    runs_dir: str | None = option(None, "checkpoints folder (default $KILN_RUNS or ./kiln-runs)")
    address: str | None = option(None, "Ray cluster address to join (default: start a local one)")
    max_failures: int = option(1, "worker failures Ray Train may recover from", low=0)
    precision: str = option("float32", "Keras' dtype policy: mixed_bfloat16 or mixed_float16 compute in 16 "
                                       "bits and keep weights, losses and outputs in float32 (float16 with "
                                       "loss scaling); the stored model serves float32",
                            choices=PRECISIONS)
    mlflow: str | None = option(None, "also log to this MLflow tracking server (default "
                                      "$MLFLOW_TRACKING_URI; the experiment is $MLFLOW_EXPERIMENT_NAME "
                                      "or 'kiln')", metavar="URI")
    register: str | None = option(None, "with MLflow: register the stored model in MLflow's model registry "
                                        "as NAME (default: the model's name); kiln tune registers the "
                                        "best trial's", metavar="NAME", const="")


@dataclass
class TrainSpec:
    """One training run. ``overrides`` are the plugin config's ``--set`` values (validated)."""

    plugin: str
    dataset: str
    epochs: int
    batch_size: int
    run: str
    name: str
    store: str
    runs_dir: str
    overrides: dict[str, Any] = field(default_factory=dict)
    workers: int = 0
    max_workers: int = 0  # > workers: elastic, Ray Train runs between workers and max_workers
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    seed: int = 0
    limit: int | None = None
    plugin_path: str | None = None
    max_failures: int = 1
    address: str | None = None
    val_fraction: float = 0.0   # of the training data, held out for validation (0: none)
    early_stop: str | None = None  # "val_METRIC:PATIENCE": stop when it stops improving
    precision: str = "float32"  # Keras' dtype policy while training (kiln.models.build)
    # MLflow tracking: {"uri", "experiment"}, and once the run exists its "run_id" (a search's
    # trials also carry their search's run as "parent"; with --register, "register": the MLflow
    # registered model's name, "" for the model's)
    mlflow: dict[str, str] | None = None
    # the plugin's whole config as the run started (kiln.run.begin): a resume builds the network
    # it checkpointed, even where a default has changed since
    config: dict[str, Any] | None = None

    @property
    def run_dir(self) -> Path:
        """Checkpoints and kiln-run.json of this run."""
        return Path(self.runs_dir) / self.run

    @property
    def progress_dir(self) -> Path:
        """Pictures plugins draw while training (copied into the stored version's artifacts)."""
        return self.run_dir / "progress"

    @property
    def elastic(self) -> bool:
        return self.max_workers > self.workers

    @property
    def workers_text(self) -> str:
        """'2' or '1-4' (elastic), as --workers takes it."""
        return f"{self.workers}-{self.max_workers}" if self.elastic else str(self.workers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSpec":
        return cls(**known_fields(cls, d))


def known_fields(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``d`` that are fields of dataclass ``cls``: a file written by another Kiln
    version reads back, its unknown keys dropped and its missing ones at their defaults."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


def parse_span(text: str | int, flag: str, least: int = 1) -> tuple[int, int]:
    """``flag`` N (fixed, N >= least) or MIN-MAX (a range to scale in) -> (min, max)."""
    lo, sep, hi = str(text).strip().partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()) or (not sep and int(lo) < least):
        raise KilnError(f"{flag} takes N or MIN-MAX (e.g. 2 or 1-4), N >= {least}; got {text!r}")
    low, high = int(lo), int(hi) if sep else int(lo)
    if sep and not 1 <= low <= high:
        raise KilnError(f"{flag} takes N or MIN-MAX: need 1 <= MIN <= MAX, got {text!r}")
    return low, high


# metrics where higher is better (Keras' EarlyStopping "auto" mode reads names the same way)
HIGHER_IS_BETTER = ("acc", "psnr", "auc", "precision", "recall", "f1", "d_real")


def mode_of(metric: str) -> str:
    """"max" where a higher ``metric`` is better, else "min": the one rule early stopping, a
    search and a run's summary all use."""
    return "max" if any(h in metric for h in HIGHER_IS_BETTER) else "min"


def parse_early_stop(text: str) -> tuple[str, int, str]:
    """``--early-stop METRIC[:PATIENCE]`` -> (val_METRIC, patience, "max" or "min")."""
    metric, _, patience = str(text).strip().partition(":")
    metric = metric.strip()
    if not metric or not metric.replace("_", "").isalnum() or (patience and not patience.isdigit()) \
            or (patience and int(patience) < 1):
        raise KilnError(f"--early-stop takes METRIC[:PATIENCE], e.g. val_accuracy:3 or val_loss; "
                        f"got {text!r}")
    metric = metric if metric.startswith("val_") else f"val_{metric}"
    return metric, int(patience or 3), mode_of(metric)
