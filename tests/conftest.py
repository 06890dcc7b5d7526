"""Shared fixtures: every test gets its own store and runs folder; `kiln` runs as a real
subprocess (what a user types); the session checks that no Ray process outlives the suite."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder holding this test's store and runs (also set as KILN_STORE/KILN_RUNS)."""
    monkeypatch.setenv("KILN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("KILN_RUNS", str(tmp_path / "runs"))
    return tmp_path


def run_kiln(*args: str, cwd: Path | None = None, env: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the kiln CLI as a user would; returns the finished process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def kiln_here(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The kiln CLI's ``main`` in this process: the same parsing, work, output and exit status as
    ``run_kiln``, without starting a new Python that imports TensorFlow again (seconds a call).
    For errors raised before any work and for fixtures that need only what a command stores;
    what a fresh process prints while TensorFlow loads is tested with ``run_kiln``."""
    import contextlib
    import io

    from kiln import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse's errors and --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["kiln", *args], code, out.getvalue(), err.getvalue())


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (what a service manager sends), then SIGKILL if it has not exited in ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_serve(*args: str, env: dict | None = None, timeout: float = 300):
    """`kiln serve ARGS` as a user starts it, its output appended to ``lines`` by ``reader`` (a
    thread); returns (proc, lines, reader) once it prints that it is ready. A server that exits
    or is not ready within ``timeout`` is killed and fails the test with its output."""
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not any("[kiln] ready:" in line for line in lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            reader.join(timeout=30)
            raise AssertionError("kiln serve did not get ready:\n" + "".join(lines)[-3000:])
        time.sleep(0.5)
    return proc, lines, reader


# What TensorFlow prints while it loads on AVX-512 CPUs; TF_ENABLE_ONEDNN_OPTS=1 forces it on any
# x86-64 machine, so the tests that check Kiln's output is its own force it (machines differ).
TF_NOTICES = ("oneDNN custom operations are on", "absl::InitializeLog()")
NOISY_TF = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def assert_no_tf_notices(text: str) -> None:
    noise = [line for line in text.splitlines() if any(n in line for n in TF_NOTICES)]
    assert not noise, noise[:4]


def ray_processes() -> dict[str, str]:
    """Running Ray processes (and Serve's HAProxy), pid -> command line. Compare pids: an actor's
    title changes with the task it runs (``ray::ServeController.listen_for_change``)."""
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server|ray::|haproxy"], capture_output=True, text=True)
    # a <defunct> entry is a process that has exited and waits for its parent to reap it
    return {line.split()[0]: line for line in out.stdout.splitlines()
            if "pgrep" not in line and "<defunct>" not in line}


def haproxy_folders(command_lines) -> set[Path]:
    """The folders of the HAProxy processes among ``command_lines`` (Serve runs it as
    ``haproxy ... -f FOLDER/<node id>/haproxy.cfg``), and the per-node folder under Ray's default
    path for any of its files left unset (/tmp/haproxy-serve/<node id>): what a stopped server
    must not leave behind."""
    import re

    found = [m.groups() for line in command_lines
             for m in [re.search(r" -f (\S+)/([0-9a-f]+)/haproxy\.cfg", line)] if m]
    return {Path(folder) for folder, _ in found} | {Path("/tmp/haproxy-serve", node) for _, node in found}


def stop_server_and_check(proc: subprocess.Popen, lines: list[str], reader, before: set[str], stop: str,
                          sent: bool = False) -> None:
    """Send ``stop`` (SIGINT: Ctrl-C; SIGTERM: what systemd, Docker and Kubernetes send; ``sent``:
    the caller sent it already) to a
    running `kiln serve` whose output ``reader`` (a thread) appends to ``lines``, and check it
    stops as a user expects: its exit status, one closing line, no stack dump, no TensorFlow
    notice from any of its processes, none of the Ray processes it started (``before``: those
    running before it) left behind, and no folder of its HAProxy's left in /tmp. SIGTERM once
    printed a Ray stack dump and left Ray's agents running; every server left a folder."""
    import signal
    import time

    folders = haproxy_folders(line for pid, line in ray_processes().items() if pid not in before)
    assert folders or sent, "no HAProxy of this server found"  # sent: it may be stopping already
    if not sent:
        proc.send_signal(getattr(signal, stop))
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)  # the reader owns the output: it ends at the last line
    text = "".join(lines)
    assert proc.returncode == (130 if stop == "SIGINT" else 0) and "[kiln] server stopped" in text, text[-2000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-2000:]
    # Serve's shutdown call was reported as a failed task ("Task ServeController.graceful_shutdown
    # failed ... killed by `ray.kill`") on every stop: a clean stop reports nothing failed
    assert not [line for line in lines if "failed" in line and "ServeController" in line], text[-2000:]
    assert_no_tf_notices(text)  # the replicas load TensorFlow quietly too
    deadline = time.time() + 30
    while set(ray_processes()) - before and time.time() < deadline:
        time.sleep(0.5)
    left = {pid: line for pid, line in ray_processes().items() if pid not in before}
    assert not left, list(left.values())
    assert not [f for f in folders if f.exists()], folders


@pytest.fixture(scope="session", autouse=True)
def no_ray_left_behind():
    before = set(ray_processes())
    yield
    left = [line for pid, line in ray_processes().items() if pid not in before]
    if left:
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       capture_output=True)
        pytest.fail("Ray processes outlived the test suite:\n" + "\n".join(left))
