"""``kiln-haproxy``: Serve's HAProxy, made to stop when the Ray process that started it dies.

Ray starts its own processes so that they die with their parent (Linux's ``PR_SET_PDEATHSIG``,
``fate_share`` in ``ray._private.services``), but Serve's HAProxyManager actor starts HAProxy as
a plain child: when a server is killed (``kill -9``, the OOM killer) its Ray processes follow it
down and HAProxy stays, listening on the server's port with nothing behind it, so the next
``kiln serve`` there cannot bind. Serve runs this command in HAProxy's place
(``RAY_SERVE_HAPROXY_BINARY_PATH``, set by ``kiln.serve.runtime.data_path_env``): it asks the
kernel for SIGTERM (HAProxy's hard stop) when its parent dies, then becomes the real HAProxy
(``KILN_HAPROXY_BINARY``) in the same process, so Serve's reloads and pids are unchanged.

Standard library only: it runs on every HAProxy start and reload.
"""

from __future__ import annotations

import os
import signal
import sys

BINARY = "KILN_HAPROXY_BINARY"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


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
    # the death signal survives exec (it is cleared only for set-user-ID programs)
    os.execv(binary, [binary, *sys.argv[1:]])


if __name__ == "__main__":
    main()
