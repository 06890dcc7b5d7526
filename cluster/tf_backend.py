"""The TensorFlow set-up of a Ray Train worker group, as Ray's ``TensorflowConfig`` does it
(``TF_CONFIG`` on each worker, which ``MultiWorkerMirroredStrategy`` reads), from a module that
does not import TensorFlow. Ray's ``ray.train.tensorflow`` package imports TensorFlow when it is
imported, and Ray Train's controller imports the package of the backend it is handed: seconds of
every run's start spent in a process that never trains (docs/design.md, "Ray Train")."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig


def _address() -> str:
    """host:port on which this worker's TensorFlow collective will listen: a free port of its node."""
    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _set_tf_config(addresses: list[str], index: int) -> None:
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses},
                                          "task": {"type": "worker", "index": index}})


class _TensorflowBackend(Backend):
    def on_start(self, worker_group, backend_config) -> None:
        addresses = worker_group.execute(_address)
        ray.get([worker_group.execute_single_async(i, _set_tf_config, addresses=addresses, index=i)
                 for i in range(len(worker_group))])


@dataclass
class TensorflowConfig(BackendConfig):
    @property
    def backend_cls(self):
        return _TensorflowBackend
