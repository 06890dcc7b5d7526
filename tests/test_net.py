"""Ports and addresses a server or head takes on a shared machine (kiln.net, kiln.serve.runtime)."""

from __future__ import annotations

import random
import socket

from kiln.net import free_port


def test_free_ports_differ_between_processes_that_seeded_python_random_alike():
    """Training seeds Python's global random (keras.utils.set_random_seed), and free_port drew from
    it: two processes that had trained with the same seed drew the same "free" ports, so a test's
    port that nothing listened on became another process's Ray dashboard a moment later."""
    random.seed(0)
    first = [free_port() for _ in range(5)]
    random.seed(0)
    assert [free_port() for _ in range(5)] != first
    for port in first:  # and each was free when drawn: bindable on every interface
        with socket.socket() as s:
            s.bind(("", port))
