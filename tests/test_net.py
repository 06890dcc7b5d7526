"""Ports and addresses a server or head takes on a shared machine (kiln.net, kiln.serve.runtime)."""

from __future__ import annotations

import random
import socket

import pytest

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


def test_the_default_connection_limit_is_lowered_to_fit_and_said(capsys):
    from kiln import KilnError
    from kiln.serve.runtime import fit_connections, haproxy_fds

    assert fit_connections(4096, named=True, hard_limit=1 << 20) == 4096
    lowered = fit_connections(4096, named=False, hard_limit=8192)
    assert 3000 < lowered < 4096 and haproxy_fds(lowered) <= 8192 < haproxy_fds(lowered + 1)
    assert f"--max-connections lowered to {lowered}" in capsys.readouterr().out
    with pytest.raises(KilnError, match="needs .* open files"):
        fit_connections(4096, named=True, hard_limit=8192)


SERVE_CONFIG = """global
    maxconn 512
defaults
    mode http
    timeout connect 10s
    timeout client 60s
    timeout server 60s
    log global
frontend prometheus
    bind :9101
frontend http_frontend
    bind 127.0.0.1:8000
    acl healthcheck path -i /-/healthz
backend default_backend
    server s1 127.0.0.1:9000
"""


def test_kiln_haproxy_adds_the_front_door_limits_ray_has_no_setting_for():
    from kiln.serve.haproxy import with_front_door_limits

    out = with_front_door_limits(SERVE_CONFIG, 2.5, 64)
    defaults = out.split("defaults\n")[1].split("frontend prometheus")[0]
    assert "timeout http-request 2500ms" in defaults and "timeout http-keep-alive 60s" in defaults
    front = out.split("frontend http_frontend\n")[1].split("backend")[0]
    assert "tcp-request connection reject if { sc0_conn_cur gt 64 }" in front
    assert "sc0" not in out.split("frontend http_frontend")[0]  # not on the metrics frontend
    assert with_front_door_limits(out, 2.5, 64) == out  # a reload's second pass changes nothing
    assert "tcp-request" not in with_front_door_limits(SERVE_CONFIG, 2.5, 0)  # 0: no cap
