"""TrainSpec: everything one training run needs, as a plain value that travels to Ray workers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


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
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    seed: int = 0
    limit: int | None = None
    plugin_path: str | None = None
    max_failures: int = 1
    address: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
