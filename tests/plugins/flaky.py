"""Test plugin: the CNN with a config key that makes a run fail at the end of its first epoch,
as a bad hyperparameter value does in a real search (kiln tune must go on without that trial),
and one that makes every epoch last at least a while (a search slow enough to interrupt on any
machine), and one that kills the process that first classifies a batch (a batch-prediction actor
lost mid-job: Ray Data must restart it and retry its batch)."""

import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln import param
from kiln.plugins.cnn import CNN, CNNConfig


@dataclass
class FlakyConfig(CNNConfig):
    explode: bool = param(False, help="raise at the end of epoch 1")
    nap: float = param(0.0, min=0.0, max=10.0, help="seconds to sleep at the end of each epoch")
    die_once: bool = param(False, help="SIGKILL the process that first preprocesses a served batch")


class Flaky(CNN):
    name = "flaky"
    description = "CNN that fails on purpose when explode=true"
    Config = FlakyConfig

    def on_epoch_end(self, model, epoch, logs, rank):
        if self.config.explode:
            raise RuntimeError("this trial exploded on purpose")
        time.sleep(self.config.nap)
        super().on_epoch_end(model, epoch, logs, rank)

    def preprocess(self, x, y):
        if self.config.die_once and isinstance(x, np.ndarray):  # inference, not training
            mark = Path(os.environ.get("KILN_PROBE_DIR", tempfile.gettempdir())) / "flaky-died"
            if not mark.exists():
                mark.write_text(str(os.getpid()))
                os.kill(os.getpid(), signal.SIGKILL)
        return super().preprocess(x, y)
