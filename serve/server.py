"""A running server, what `kiln serve` runs and a user's own Python can run too:

    from kiln.serve import app
    from kiln.serve.options import ServeOptions
    from kiln.serve.server import Server

    with Server(app.plan(["cnn"], ServeOptions(port=8000))) as server:
        server.wait_ready()
        server.serve_forever()      # until Ctrl-C; leaving the block stops Serve and its Ray

It starts (or joins) Ray and deploys the application, keeps the store's record of what it serves
fresh (so `kiln models rm` refuses to delete a served version), polls the store for new versions,
notices Ray dying under it, and stops cleanly: requests in flight are answered first."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from kiln import KilnError
from kiln.logs import say
from kiln.serve import app
from kiln.serve.app import ServeSpec


class Server:
    """``spec`` served: ``models`` are the names the server was asked for (None: every model, so a
    new model in the store is served too). ``spec.opts`` says which Ray to join (``address``,
    None: a local one) and how often the store is looked at (``poll_seconds``, 0: never)."""

    def __init__(self, spec: ServeSpec, *, models: list[str] | None = None) -> None:
        from kiln.store import Store

        self.spec, self.models = spec, models
        self.address, self.poll_seconds = spec.opts.address, spec.opts.poll_seconds
        self.base = f"http://{spec.opts.host}:{spec.opts.port}"
        self.records = Store(spec.store)
        self.beat = min(self.poll_seconds or 30.0, 30.0)  # how often the store's record is renewed
        self.record: Any = None
        self.recorded: list[str] = []
        self.stopping = threading.Event()
        self.status = 0  # the exit status of a stop that Ray's end finishes (130: Ctrl-C)

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Record what this server serves (before loading: that takes a while), then start Ray and
        Serve and deploy; returns while the models load."""
        if self.address is None:  # HAProxy will run here, under this process's open-files limit
            from kiln.serve.options import ServeOptions
            from kiln.serve.runtime import fit_connections

            opts = self.spec.opts
            opts.max_connections = fit_connections(opts.max_connections,
                                                   named=opts.max_connections != ServeOptions.max_connections)
        say(f"serving {', '.join(self.spec.refs)} from {self.spec.store}; loading...")
        self.recorded = list(self.spec.refs)
        self.record = self.records.record_server(self.recorded, self.base, self.beat)
        app.start(self.spec, address=self.address)

    def wait_ready(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until every model answers; say each route and traffic split. Returns GET /models."""
        spec = self.spec
        models = app.wait_ready(spec.opts.host, spec.opts.port, token=spec.token,
                                timeout=spec.opts.ready_timeout if timeout is None else timeout)
        for m in models["models"]:
            for method in sorted(m.get("methods", {})):
                say(f"{m['ref']:<16} POST {self.base}/models/{m['name']}/{method}")
        for name, entries in spec.traffic.items():
            total = sum(entries.values())
            say(f"{name}: unversioned traffic split "
                + ", ".join(f"{e} {100 * w / total:.0f}%" for e, w in entries.items()))
        say(f"ready: {self.base}/models  {self.base}/docs  (Ctrl-C stops)")
        return models

    def serve_forever(self) -> None:
        """Poll the store and renew the record until interrupted (KeyboardInterrupt, or an
        exception a signal handler raises); exits the process if Ray dies under it."""
        import ray

        gcs_host, _, gcs_port = ray.get_runtime_context().gcs_address.rpartition(":")
        # in a thread of its own: a poll that was redeploying when Ray died waits forever in
        # Ray's client, and must not keep the server from noticing
        threading.Thread(target=_watch_ray, args=(gcs_host, int(gcs_port), self), daemon=True,
                         name="kiln-ray-watch").start()
        next_poll = time.monotonic() + self.poll_seconds
        next_beat = time.monotonic() + self.beat
        while True:
            time.sleep(1)
            if self.poll_seconds and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self.poll_seconds
                self.poll()
            if time.monotonic() >= next_beat or self.spec.refs != self.recorded:
                next_beat, self.recorded = time.monotonic() + self.beat, list(self.spec.refs)
                try:
                    self.records.record_server(self.recorded, self.base, self.beat)
                except KilnError as e:  # a store gone read-only must not stop the serving
                    say(f"warning: {e}")

    def poll(self) -> None:
        """Serve what the store holds now: new versions, moved labels, fixed folders."""
        added, problems = app.refresh(self.spec, self.models)
        for line in problems:
            say(f"{line}; still serving the version before it")
        for ref in added:
            say(f"new version in the store: now serving {ref}")

    def stop(self) -> None:
        """Forget the store's record, answer the requests in flight (at most ``app.DRAIN_S``),
        then stop Serve and the Ray this server started."""
        import ray

        self.stopping.set()
        if self.record is not None:
            self.records.forget_server(self.record)
            self.record = None
        left = app.drain(self.spec)
        if left:
            say(f"stopping with {left} request(s) still unanswered after {app.DRAIN_S:g} s")
        app.stop()
        ray.shutdown()
        say("server stopped")


def _watch_ray(host: str, port: int, server: Server) -> None:
    """Ray dying under the server (stopped, killed, out of memory) would leave a process with
    nothing listening for over a minute, then a GCS error: say so and exit 1. While the server
    stops, Ray going first is part of the stop (systemd's default KillMode signals every process
    of the service at once): the stop is done, exit 0."""
    silent = 0
    while True:
        time.sleep(2)
        silent = 0 if _answers(host, port) else silent + 1
        if silent >= 3:
            from kiln.serve.runtime import remove_haproxy_folders

            stopping = server.stopping.is_set()
            if stopping:
                say("server stopped (its Ray had stopped with it)")
            else:
                print(f"[kiln] error: the Ray cluster under the server stopped (its GCS at {host}:{port} "
                      "does not answer); start `kiln serve` again", file=sys.stderr, flush=True)
            remove_haproxy_folders()
            os._exit(server.status if stopping else 1)  # Ray's shutdown would wait on the dead cluster


def _answers(host: str, port: int) -> bool:
    from kiln.net import reachable

    try:
        reachable(host, port, "Ray's GCS", "")
        return True
    except KilnError:
        return False
