"""Test plugin: the CNN with a config key that makes a run fail at the end of its first epoch,
as a bad hyperparameter value does in a real search (kiln tune must go on without that trial)."""

from dataclasses import dataclass

from kiln import param
from kiln.plugins.cnn import CNN, CNNConfig


@dataclass
class FlakyConfig(CNNConfig):
    explode: bool = param(False, help="raise at the end of epoch 1")


class Flaky(CNN):
    name = "flaky"
    description = "CNN that fails on purpose when explode=true"
    Config = FlakyConfig

    def on_epoch_end(self, model, epoch, logs, rank):
        if self.config.explode:
            raise RuntimeError("this trial exploded on purpose")
        super().on_epoch_end(model, epoch, logs, rank)
