"""Reaching other processes: the one "is anything listening there" check before a slow client."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

from kiln.plugin import KilnError


def local_host(host: str) -> str:
    """The address this machine connects to for a server listening on ``host``: a wildcard
    (all interfaces) is reached on the loopback address."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def reachable(host: str, port: int, what: str, hint: str) -> None:
    """KilnError within seconds when nothing listens at ``host:port``: Ray's own clients retry an
    unreachable address for minutes. ``what`` names it ("a Ray cluster at 'x'"), ``hint`` the fix."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise KilnError(f"cannot reach {what}: {e.strerror or e}; {hint}") from None


def port_taken(host: str, port: int) -> str:
    """The one-line error for a listener that cannot have ``host:port``."""
    return (f"port {port} on {host} is in use by another process (another kiln serve?); stop it "
            f"or pass another --port (`ss -ltnp 'sport = :{port}'` shows which process holds it)")


def check_port_free(host: str, port: int) -> None:
    """KilnError when a server could not listen on ``host:port`` because another process does.
    With SO_REUSEADDR, as servers bind: a closed connection still in TIME_WAIT does not count."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise KilnError(port_taken(host, port)) from None
            raise KilnError(f"cannot listen on {host}:{port}: {e.strerror or e}; check --host") from None


def ray_address(address: str | None) -> str:
    """What ``ray.init`` gets: ``address``, else ``$RAY_ADDRESS`` (a Ray job's driver has it),
    else "local", a Ray of this process's own. ``ray.init()`` without an address would join the
    last `ray start` head recorded in /tmp/ray/ray_current_cluster instead, and wait minutes on
    that address when the head has died without `ray stop`."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def check_ray_address(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at a Ray address (host:port or
    ray://host:port); Ray itself retries an unreachable GCS for a long time."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise KilnError(f"bad Ray address {address!r}: use host:port (e.g. 127.0.0.1:6379), "
                        "ray://host:10001 or 'auto'")
    reachable(host, int(port), f"a Ray cluster at {address!r}",
                  "check the address or start one with `ray start --head`")


def ray_token() -> str | None:
    """Ray's token for clusters with token authentication, from where Ray itself looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def join_with_token() -> None:
    """Before this process joins a Ray cluster: Ray's client sends the token only with
    ``RAY_AUTH_MODE=token`` in its environment, so joining the head `kiln cluster up` starts
    failed with twenty "InvalidAuthToken" lines. Where a token exists and the mode is unset, turn
    it on; a cluster without token authentication ignores the token (Ray 2.60). Ray reads the
    mode once, when it is imported: call this first."""
    if "RAY_AUTH_MODE" not in os.environ and ray_token():
        os.environ["RAY_AUTH_MODE"] = "token"


def free_port() -> int:
    """A TCP port that nothing listens on now, for a listener that starts a little later.

    It is drawn from below the kernel's ephemeral range (and above Ray's worker ports, 10002-19999),
    where no process binding port 0 can take it in the meantime: Ray's processes do that while
    they start, and once took HAProxy's stats port between the choice and HAProxy's bind. The
    draw is the operating system's, not Python's global random, which training seeds: processes
    that trained with one seed would draw the same ports."""
    import random
    import socket

    draw = random.SystemRandom()

    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768  # Linux's default; macOS's range starts at 49152
    for _ in range(100 if ephemeral > 20100 else 0):
        port = draw.randint(20000, ephemeral - 1)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no room below the ephemeral range: any free port
        s.bind(("", 0))
        return s.getsockname()[1]
