"""``kiln-haproxy``: Serve's HAProxy, made to stop when the Ray process that started it dies.

Ray starts its own processes so that they die with their parent (Linux's ``PR_SET_PDEATHSIG``,
``fate_share`` in ``ray._private.services``), but Serve's HAProxyManager actor starts HAProxy as
a plain child: when a server is killed (``kill -9``, the OOM killer) its Ray processes follow it
down and HAProxy stays, listening on the server's port with nothing behind it, so the next
``kiln serve`` there cannot bind. Serve runs this command in HAProxy's place
(``RAY_SERVE_HAPROXY_BINARY_PATH``, set by ``kiln.serve.runtime.data_path_env``): it asks the
kernel for SIGTERM (HAProxy's hard stop) when its parent dies, then becomes the real HAProxy
(``KILN_HAPROXY_BINARY``) in the same process, so Serve's reloads and pids are unchanged.

It also adds to Serve's generated configuration the front-door limits Ray offers no setting
for (``with_front_door_limits``): a deadline for a request's head (``timeout http-request``) and
a cap on one client address's open connections. Serve writes the file and then runs this
command on every start and reload, so the limits hold across reloads; the file is rewritten
under Serve's own lock.

Standard library only: it runs on every HAProxy start and reload.
"""

from __future__ import annotations

import os
import re
import signal
import sys

BINARY = "KILN_HAPROXY_BINARY"
HEAD_TIMEOUT = "KILN_HAPROXY_HEAD_TIMEOUT_S"   # kiln serve --head-timeout-s
PER_SOURCE = "KILN_HAPROXY_MAX_PER_SOURCE"     # kiln serve --max-per-source
MARK = "# kiln:"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def with_front_door_limits(config: str, head_timeout_s: float, per_source: int) -> str:
    """Serve's HAProxy ``config`` with Kiln's limits: the request head must arrive within
    ``head_timeout_s`` (HAProxy then answers 408 and closes), idle keep-alive connections keep
    the client timeout (HAProxy would otherwise apply the head deadline to them too), and one
    client address holds at most ``per_source`` connections (0: no cap); further ones are
    refused as they are accepted, before any request is read. A config already marked is
    returned as it is."""
    if MARK in config:
        return config
    client = re.search(r"^\s*timeout client (\S+)", config, re.M)
    out, section = [], ""
    for line in config.splitlines():
        out.append(line)
        if line and not line[0].isspace():
            section = line.strip()
            if section == "defaults" and head_timeout_s:
                out.append(f"    {MARK} --head-timeout-s")
                out.append(f"    timeout http-request {int(head_timeout_s * 1000)}ms")
                if client:
                    out.append(f"    timeout http-keep-alive {client.group(1)}")
        elif section == "frontend http_frontend" and line.strip().startswith("bind ") and per_source:
            out += [f"    {MARK} --max-per-source",
                    "    stick-table type ip size 100k expire 60s store conn_cur",
                    "    tcp-request connection track-sc0 src",
                    f"    tcp-request connection reject if {{ sc0_conn_cur gt {per_source} }}"]
    return "\n".join(out) + "\n"


def _add_limits(argv: list[str]) -> None:
    """Rewrite the config HAProxy is about to read (``-f FILE``) with the limits this Ray's
    environment names, under the lock Serve writes it with."""
    head, per_source = os.environ.get(HEAD_TIMEOUT), os.environ.get(PER_SOURCE)
    if "-f" not in argv or not (head or per_source):
        return
    path = argv[argv.index("-f") + 1]
    import fcntl

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        with open(path) as f:
            config = f.read()
        limited = with_front_door_limits(config, float(head or 0), int(per_source or 0))
        if limited != config:
            with open(path + ".kiln", "w") as f:
                f.write(limited)
            os.replace(path + ".kiln", path)


def main() -> None:
    binary = os.environ.get(BINARY)
    if not binary:
        sys.exit(f"kiln-haproxy: {BINARY} is not set; it names the HAProxy binary to run")
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
            sys.exit(f"kiln-haproxy: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}")
        if os.getppid() != parent:  # the parent died before the request took effect
            sys.exit("kiln-haproxy: the process that started HAProxy has exited")
    _add_limits(sys.argv[1:])
    # the death signal survives exec (it is cleared only for set-user-ID programs)
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
