"""Test plugin: the CNN with a config key that makes a run fail at the end of its first epoch,
as a bad hyperparameter value does in a real search (kiln tune must go on without that trial),
and one that makes every epoch last at least a while (a search slow enough to interrupt on any
machine)."""

import time
from dataclasses import dataclass

from kiln import param
from kiln.plugins.cnn import CNN, CNNConfig


@dataclass
class FlakyConfig(CNNConfig):
    explode: bool = param(False, help="raise at the end of epoch 1")
    nap: float = param(0.0, min=0.0, max=10.0, help="seconds to sleep at the end of each epoch")


class Flaky(CNN):
    name = "flaky"
    description = "CNN that fails on purpose when explode=true"
    Config = FlakyConfig

    def on_epoch_end(self, model, epoch, logs, rank):
        if self.config.explode:
            raise RuntimeError("this trial exploded on purpose")
        time.sleep(self.config.nap)
        super().on_epoch_end(model, epoch, logs, rank)
