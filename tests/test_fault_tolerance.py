"""Ray Train runs survive losing a node: `ray.cluster_utils.Cluster` simulates a head and two
worker nodes on this machine; a node is killed mid-training and the run must finish every epoch,
restarting from its last checkpoint (not from epoch 0), with fixed and elastic worker counts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from kiln import run

pytestmark = [pytest.mark.slow, pytest.mark.ray]
EPOCHS = 5


@pytest.fixture(scope="module")
def cluster(own_ray):
    from ray.cluster_utils import Cluster

    # After a node dies, an elastic run may first ask for the old worker count (the node is not
    # yet marked dead) and waits this long before settling for fewer (default 60 s).
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "10")

    # Fast node-death detection (Ray's default takes ~30 s to declare a node dead).
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
              "health_check_failure_threshold": 3}
    c = Cluster(initialize_head=True, connect=True,
                head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": system})
    # Logical GPUs: Ray schedules and assigns them; TensorFlow (CPU build) simply finds none.
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, nodes
    import ray

    ray.shutdown()
    c.shutdown()
    mp.undo()


def _committed_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has committed, 0 if none. A checkpoint folder
    exists on disk before the controller registers it (it polls workers every couple of seconds,
    slower on a loaded machine); a node lost in between restarts the group from the committed one,
    so the node is taken away only once the checkpoint to resume from is committed."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
        return json.loads((run_dir / latest["checkpoint_dir_name"] / "state.json").read_text())["epoch"]
    except (OSError, ValueError, TypeError, KeyError):  # not written yet, or mid-write
        return 0


def _train_while(spec, action) -> tuple[object, int]:
    """Train ``spec`` in a thread; once Ray Train has committed its second checkpoint, call
    ``action``; returns the stored version and the epoch of that committed checkpoint."""
    result: dict = {}

    def target() -> None:
        try:
            result["version"] = run.train(spec)
        except BaseException as e:  # surfaced below with the test's assertion
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive() and _committed_epoch(Path(spec.run_dir)) < 2:
        time.sleep(0.1)
    at = _committed_epoch(Path(spec.run_dir))
    if "error" in result:  # the run failed before the node was taken away
        raise result["error"]
    assert 2 <= at < EPOCHS, f"the node was to be removed after a committed epoch 2 of {EPOCHS}, at {at}"
    action()
    thread.join(timeout=420)
    assert not thread.is_alive(), "the run did not finish after the node was removed"
    if "error" in result:
        raise result["error"]
    return result["version"], at


def _wait_for_cpus(n: float) -> None:
    """An elastic run starts on whatever is free when it starts: let a previous test's workers
    and a replacement node settle first."""
    import ray

    deadline = time.time() + 60
    while time.time() < deadline and ray.available_resources().get("CPU", 0) < n:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) >= n, ray.available_resources()


def test_a_run_survives_losing_a_node_and_resumes_from_its_last_checkpoint(cluster, tmp_path, capfd):
    """Fixed size: 2 workers; a node dies after epoch 2 and a replacement joins."""
    c, nodes = cluster
    spec = run.plan("cnn", workers=2, gpus_per_worker=1, epochs=EPOCHS, limit=3000, batch_size=64,
                    store=tmp_path / "store", runs_dir=tmp_path / "runs", max_failures=2,
                    address=c.address, run="node-loss")

    def lose_a_node() -> None:
        c.remove_node(nodes[1], allow_graceful=False)
        nodes[1] = c.add_node(num_cpus=1, num_gpus=1)  # a replacement joins, as an autoscaler would

    version, at = _train_while(spec, lose_a_node)
    m = version.manifest
    assert [h["epoch"] for h in m["history"]] == list(range(1, EPOCHS + 1))
    # one restart, or two when the first new worker group was placed on the dying node before Ray
    # marked it dead (max_failures=2 allows for that); every restart resumes from a checkpoint
    assert 1 <= len(m["resumed"]) <= 2, m["resumed"]
    resumed = m["resumed"][0]
    assert at <= resumed["epoch"] < EPOCHS, (at, m["resumed"])  # its last committed checkpoint
    assert all(r["workers"] == 2 and r["epoch"] >= resumed["epoch"] for r in m["resumed"]), m["resumed"]
    assert m["metrics"]["accuracy"] > 0.8
    log = capfd.readouterr().out
    assert f"resuming from checkpoint at epoch {resumed['epoch']} on 2 worker(s)" in log
    # --gpus-per-worker reached Ray Train: each worker was given one (logical) GPU of its own
    gpus = [line.split("GPUs ")[-1].strip() for line in log.splitlines() if "[kiln] worker " in line]
    # 2 workers, started twice; the lost node's own lines may die with its log monitor
    assert len(gpus) >= 2 and "none" not in gpus, gpus

    # a finished run trains further when rerun by name (`kiln train --resume RUN --epochs N`)
    more = run.resume_spec("node-loss", tmp_path / "runs", epochs=EPOCHS + 1)
    assert (more.workers, more.gpus_per_worker) == (2, 1)
    again = run.train(more)
    assert [h["epoch"] for h in again.manifest["history"]] == list(range(1, EPOCHS + 2))
    assert again.manifest["resumed"][-1] == {"epoch": EPOCHS, "workers": 2}
    log = capfd.readouterr().out
    assert f"resuming from checkpoint at epoch {EPOCHS}" in log and f"epoch 1/{EPOCHS + 1}" not in log


def test_an_elastic_run_continues_on_fewer_workers(cluster, tmp_path, capfd):
    c, nodes = cluster
    spec = run.plan("cnn", workers="1-2", epochs=EPOCHS, limit=3000, batch_size=64,
                    store=tmp_path / "store", runs_dir=tmp_path / "runs", address=c.address,
                    run="elastic")
    assert (spec.workers, spec.max_workers) == (1, 2)
    _wait_for_cpus(2)
    version, at = _train_while(spec, lambda: c.remove_node(nodes[1], allow_graceful=False))
    m = version.manifest
    assert [h["epoch"] for h in m["history"]] == list(range(1, EPOCHS + 1))
    assert m["history"][0]["workers"] == 2 and m["history"][-1]["workers"] == 1
    assert [r["workers"] for r in m["resumed"]] == [1] and at <= m["resumed"][0]["epoch"], (at, m["resumed"])
    assert "on 1 worker(s)" in capfd.readouterr().out
