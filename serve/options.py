"""Every option of ``kiln serve``, declared once (``kiln.options``): its flags, checks, the
``--build-config`` file and the Serve config's builder all come from ``ServeOptions``. The model
names and the store are the command's arguments, not options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.options import option

MIB = 1024 * 1024


@dataclass
class ServeOptions:
    host: str = option("127.0.0.1", "address to bind (default loopback only)")
    port: int = option(8000, low=1, high=65535)
    address: str | None = option(None, "Ray cluster address to join (default: start a local one)",
                                 process=True)
    # the model deployments (with --colocate: the ingress's)
    replicas: str = option("1", "replicas per model; MIN-MAX lets Ray Serve autoscale between the two",
                           metavar="N|MIN-MAX")
    target_ongoing_requests: float = option(
        2.0, "with --replicas MIN-MAX: requests per replica that autoscaling aims at", above=0)
    cpus_per_replica: float = option(0.25, low=0)
    gpus_per_replica: float = option(0.0, low=0)
    gpu_memory_mb: int = option(
        0, "cap each replica's TensorFlow at N MiB of GPU memory, so that replicas sharing a GPU "
           "(--gpus-per-replica below 1) fit on it by construction (0: each grows as it needs)", low=0)
    max_ongoing_requests: int = option(16, "per replica", low=1)
    batch_size: int = option(32, "requests merged into one model call (0: no batching)", low=0)
    batch_wait_ms: float = option(2.0, "how long a batch waits to fill", low=0)
    # what one request may ask (the ingress's checks, HAProxy's settings)
    max_body_mb: float = option(16.0, "larger request bodies get 413, chunked ones as soon as they pass it",
                                above=0)
    max_items: int = option(1024, "images/windows per request and samples asked for (more: 400)", above=0)
    max_chars: int = option(100_000, "characters of a text argument (more: 400)", above=0)
    max_response_mb: float = option(64.0, "answers that would be larger get 400 before they are built",
                                    above=0)
    body_timeout_s: float = option(60.0, "a request body must arrive within this (else 408)", above=0)
    request_timeout_s: float = option(
        0.0, "a model that has not answered within this gets 504; the call itself runs on (0: no limit)",
        low=0)
    client_timeout_s: int = option(60, "HAProxy drops a client silent this long", above=0)
    max_connections: int = option(4096, "HAProxy's open connections at most", above=0)
    head_timeout_s: float = option(5.0, "a client must send a request's head (its line and headers) "
                                        "within this, else HAProxy answers 408 and closes", above=0)
    max_per_source: int = option(1024, "open connections one client address may hold; more are refused "
                                       "as they connect (0: no cap; raise it behind a proxy that "
                                       "sends everyone's requests from one address)", low=0)
    # the kiln serve process
    ready_timeout: float = option(300.0, "seconds to wait for models to load", above=0, process=True)
    poll_seconds: float = option(10.0, "look for new model versions in the store this often (0: never)",
                                 low=0, process=True)
    mlflow: str | None = option(None, "the MLflow tracking server a --model models:/NAME@ALIAS names "
                                      "(default $MLFLOW_TRACKING_URI)", metavar="URI", process=True)
    # which versions, in which replicas
    traffic: list[str] = option(
        [], "split a model's unversioned traffic by weight, e.g. --traffic cnn:3=90 --traffic cnn:4=10 "
            "(a canary), or by label, cnn@stable=90; repeatable", metavar="NAME:VERSION=WEIGHT")
    shared_replicas: bool = option(
        False, "serve the models in one shared set of replicas (Ray Serve's model multiplexing): each "
               "extra small model costs tens of MB instead of a TensorFlow process")
    own_replicas: list[str] = option(
        [], "with --shared-replicas: this model keeps replicas of its own (a hot model; repeatable)",
        metavar="NAME")
    models_per_replica: int = option(
        0, "with --shared-replicas: versions loaded in one replica at most, least recently used "
           "unloaded beyond (0: no limit)", low=0)
    colocate: bool = option(
        False, "load the models in the ingress's own replicas: a request skips the hop to a model "
               "replica (lower latency at low load); --replicas and --cpus-per-replica then set the "
               "ingress's, and a model whose load crashes its process takes the server's replica with it")
    access_log: bool = option(
        False, "log every request (Serve's access log; off by default: it costs time per request)")

    def deployment_options(self) -> dict[str, Any]:
        """Serve's options for each model deployment (or, with --colocate, the ingress's)."""
        from kiln.spec import parse_span

        low, high = parse_span(self.replicas, "--replicas")
        out: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.cpus_per_replica,
                                                     "num_gpus": self.gpus_per_replica},
                               "max_ongoing_requests": self.max_ongoing_requests}
        if "-" in str(self.replicas):
            out["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                         "target_ongoing_requests": self.target_ongoing_requests}
        else:
            out["num_replicas"] = low
        return out
