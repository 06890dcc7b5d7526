"""Fixtures and the hooks that place tests (shared helpers are in helpers.py): every test gets
its own store and runs folder; the session trains one small model of each kind the tests serve,
export or judge with, once, for modules to copy; the session checks that no Ray process outlives
the suite."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Kiln's commands run in this process print their workers' lines as `kiln tune` does in its own
# process, which turns Ray's log deduplication off before Ray is imported (Ray reads it then):
# tests count those lines.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from helpers import ray_processes  # noqa: E402  (after the environment above)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty folder holding this test's store and runs (also set as KILN_STORE/KILN_RUNS)."""
    monkeypatch.setenv("KILN_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("KILN_RUNS", str(tmp_path / "runs"))
    return tmp_path


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
    """The session's store of cnn:1, autoencoder:1, lstm:1, gpt:1, cgan:1, vae:1, diffusion:1 and
    photos:1 (a cnn on the ants and bees photos at 32 px; helpers.TRAINED), one for both pytest-xdist
    workers. Read-only for tests: helpers.copy_models trains what a test asks for on first use and
    copies it."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained"
    root.mkdir(exist_ok=True)
    return root / "store"


_shared_ray = contextlib.ExitStack()


@pytest.fixture
def shared_ray(tmp_path_factory) -> Path:
    """A local Ray (2 CPUs) in this process for tests that only need a Ray to run on, started on
    first use and kept for the next test that needs one, as Ray's own suites share one
    (ray_start_regular_shared). Kiln's commands run in this process join it instead of starting
    their own. A module that must own its cluster takes ``own_ray``, which stops this one.

    Yields the folder where the test plugins' probes (tests/plugins) write from its workers: its
    workers took their environment when it started, so KILN_PROBE_DIR is set then, once."""
    import ray

    if not ray.is_initialized():
        from kiln.cluster.train import local_cluster

        os.environ["KILN_PROBE_DIR"] = str(tmp_path_factory.mktemp("probes"))
        _shared_ray.enter_context(reaped())
        _shared_ray.enter_context(local_cluster(num_cpus=2))
    yield Path(os.environ["KILN_PROBE_DIR"])


@pytest.fixture(scope="module")
def own_ray():
    """For a module that starts its own Ray in this process (a multi-node cluster, or Ray as
    `kiln serve` starts it): the shared Ray is stopped before it and the module's after it."""
    import ray

    _shared_ray.close()
    ray.shutdown()
    with reaped():
        yield
        ray.shutdown()


@contextlib.contextmanager
def reaped(grace_s: float = 15.0):
    """Stops what a Ray started inside it leaves behind once it is shut down. Its processes
    inherit a mark from this process's environment; a worker whose node a test killed, or one still
    busy when its raylet went, can outlive the cluster, so those still running on the way out get
    ``grace_s`` to exit and are then killed, as `ray stop` would."""
    import psutil

    mark = os.urandom(6).hex()
    os.environ[CLUSTER] = mark
    try:
        yield
    finally:
        del os.environ[CLUSTER]
        left = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if p.pid != os.getpid() and p.environ().get(CLUSTER) == mark:
                    left.append(p)
        _, alive = psutil.wait_procs(left, timeout=grace_s)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(alive, timeout=10)


CLUSTER = "KILN_TEST_CLUSTER"


@pytest.fixture(scope="session", autouse=True)
def late_checks():
    """helpers.LATE_CHECKS, once this test process's tests are done: each may take up to 120 s
    more to come right."""
    import time

    from helpers import LATE_CHECKS

    yield
    deadline = time.time() + 120
    while time.time() < deadline and any(check() for _, check in LATE_CHECKS):
        time.sleep(1)
    wrong = {what: check() for what, check in LATE_CHECKS if check()}
    assert not wrong, wrong


@pytest.fixture(scope="session", autouse=True)
def close_shared_ray():
    yield
    _shared_ray.close()


# Under pytest-xdist (`make test` runs two workers) the tests marked `ray` run in two groups,
# each in one worker, one test after another: "ray-here", the tests on a Ray in the test
# process (``shared_ray``, ``own_ray``), and "ray", those that start Ray in processes of their
# own (servers, heads, jobs) and check which processes those leave behind: a check looks at the
# processes its own server or head started, never at all of the machine's. The two groups run
# first, side by side; the other tests go module by module (a module's fixtures are set up
# once) to whichever worker is free.
def xdist_group(item: pytest.Item) -> str:
    if not item.get_closest_marker("ray"):
        return item.module.__name__
    return "ray-here" if {"shared_ray", "own_ray"} & set(item.fixturenames) else "ray"


def gpu_machine() -> bool:
    """Whether the NVIDIA driver lists a GPU (asked without importing TensorFlow)."""
    import shutil
    import subprocess

    exe = shutil.which("nvidia-smi")
    return bool(exe) and subprocess.run([exe, "-L"], capture_output=True, timeout=30).returncode == 0


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tests marked gpu are deselected, and counted as such, where there is no GPU: never skipped
    # silently, never failed for want of one
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu and not gpu_machine():
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    groups = {item.nodeid: xdist_group(item) for item in items}
    # xdist hands out groups in the order of their first test (`make test` turns its reordering
    # off): the two Ray groups first, then the groups with the most slow tests, so that no long
    # module is left to start when the other process has nothing more to do
    slow: dict[str, int] = {}
    for item in items:
        slow[groups[item.nodeid]] = slow.get(groups[item.nodeid], 0) + bool(item.get_closest_marker("slow"))
    rank = {"ray-here": 0, "ray": 1}
    items.sort(key=lambda item: (rank.get(groups[item.nodeid], 2), -slow[groups[item.nodeid]]))
    for item in items:
        item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """A pytest that xdist cannot tag (9.2: pytest-dev/pytest-xdist#1386) would run Ray tests
    side by side, whose failures would say nothing of the cause: stop here instead."""
    if os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup") \
            and any("@" not in item.nodeid for item in session.items):
        raise pytest.UsageError("pytest-xdist did not group the tests (--dist loadgroup): install "
                                "the pytest that pyproject.toml's dev extra names")


# No Ray process outlives the suite: checked by the process that runs the session (xdist's
# controller, once its workers are done), after every fixture is torn down. The session marks the
# environment that every process it starts inherits, Ray's included, so that the check looks at
# this session's processes only, and stops those, never another session's Ray on the machine.
SESSION = "KILN_TEST_SESSION"
os.environ.setdefault(SESSION, os.urandom(8).hex())


def _this_sessions(pids) -> list:
    import psutil

    mine = []
    for pid in pids:
        try:
            p = psutil.Process(int(pid))
            if p.environ().get(SESSION) == os.environ[SESSION]:
                mine.append(p)
        except psutil.Error:  # gone meanwhile, or not ours to read
            pass
    return mine


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    import psutil

    running = ray_processes()
    left = _this_sessions(running)
    if left:
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line("Ray processes outlived the test suite:\n" +
                            "\n".join(running[str(p.pid)] for p in left), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
