"""`kiln serve --colocate`: the models loaded in the ingress's own replicas, so that a request
skips the hop to a model replica (the one-connection target of the serving-reliability issue;
BENCHMARKS.md, "Serving speed"). Under load against a real server on 127.0.0.1 (its own Ray, 2
ingress replicas): a version whose load fails, a new version stored, an ingress replica killed.
None may take the server down or restart the ingress; only a killed replica may cost requests:
the connections of those it held."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest
import requests

from helpers import Load, copy_models, copy_version, models, replicas, start_serve, stop_process, store_copy, wait_for
from kiln.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("colocate")
    copy_models(trained, root / "store", "cnn")
    copy_version(root / "store", "cnn:1", "other")
    store_copy(root / "store", 1, broken=True, name="broken")  # its load fails while the server starts
    port = free_port()
    proc, lines, _ = start_serve("--store", str(root / "store"), "--port", str(port), "--poll-seconds", "1",
                                 "--replicas", "2", "--colocate")
    try:
        yield f"http://127.0.0.1:{port}", root / "store", proc, lines
    finally:
        stop_process(proc, timeout=120)


def ingress_replicas(proc) -> list[int]:
    return replicas(proc, "KilnIngress")


def test_colocated_models_answer_from_the_ingress_replicas(colocated):
    base, store, proc, lines = colocated
    assert len(ingress_replicas(proc)) == 2  # --replicas sets the ingress's
    assert replicas(proc, "model-") == []  # no model deployment: no hop
    r = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((2, 28, 28, 1)).tolist()}, timeout=30)
    assert r.status_code == 200 and len(r.json()["labels"]) == 2 and r.headers["Kiln-Version"] == "cnn:1"
    v2 = requests.post(f"{base}/v2/models/other/infer", timeout=30, json={"inputs": [
        {"name": "images", "shape": [1, 28, 28, 1], "datatype": "FP32", "data": [0.0] * 784}]})
    assert v2.status_code == 200 and v2.json()["model_version"] == "1"
    listed = models(base)
    assert listed["cnn:1"]["state"] == "READY" and listed["cnn:1"]["class_names"][0] == "0"
    bad = requests.post(f"{base}/models/cnn/classify", json={"images": [[1] * 5]}, timeout=30)
    assert bad.status_code == 400 and "error" in bad.json()
    # a version whose load failed at start: the server got ready without it, and says why once
    assert wait_for(lambda: any("cannot serve broken:1" in line for line in lines), 60), lines[-10:]
    assert listed["broken:1"]["state"] == "FAILED" and "failed to load" in listed["broken:1"]["error"]
    answer = requests.post(f"{base}/models/broken/classify", json={"images": np.zeros((1, 28, 28, 1)).tolist()},
                           timeout=30)
    assert answer.status_code in (404, 503) and "broken" in answer.json()["error"]


def test_a_version_that_fails_to_load_fails_alone_and_a_new_one_switches_under_load(colocated):
    base, store, proc, lines = colocated
    started = ingress_replicas(proc)
    with Load(base, ["cnn", "other"]) as load:
        store_copy(store, 100, broken=True)
        assert wait_for(lambda: models(base).get("cnn:100", {}).get("state") == "FAILED", 120)
        time.sleep(3)  # more polls: reported once, the version before it still answers
        store_copy(store, 101)
        assert wait_for(lambda: models(base).get("cnn:101", {}).get("state") == "READY", 180)
        assert wait_for(lambda: requests.get(f"{base}/v1/models/cnn").json()["model_version_status"][-1]["version"] == "101")
        time.sleep(3)
    assert proc.poll() is None, "".join(lines)[-3000:]
    assert ingress_replicas(proc) == started  # loading, failing and switching restarted no replica
    assert "failed to load" in models(base)["cnn:100"]["error"]
    assert requests.get(f"{base}/v2/models/cnn/versions/100/ready", timeout=30).status_code == 503
    assert sum("cannot serve cnn:100" in line for line in lines) == 1, lines[-20:]
    assert load.ok > 50 and not load.failed, load.failed[:5]


def test_a_killed_ingress_replica_loses_only_the_connections_it_held(colocated):
    """What --colocate gives up (docs/serving.md, "--colocate"): a killed ingress replica's
    requests in flight are lost (HAProxy retried none of them in runs here: 1-5 per kill at 8
    clients), where the default layout's ingress sends them to a live model replica. The other
    replica answers everything else; the replacement takes requests only once its models are
    loaded (before it did, it answered 503 "loading" for a while)."""
    base, store, proc, lines = colocated
    pids = ingress_replicas(proc)
    assert len(pids) == 2, pids
    with Load(base, ["cnn", "other"], clients=8, seconds=120) as load:
        time.sleep(2)
        before = load.ok
        subprocess.run(["kill", "-9", str(pids[0])], check=True)
        assert wait_for(lambda: len(ingress_replicas(proc)) == 2 and pids[0] not in ingress_replicas(proc), 180)
        assert wait_for(lambda: requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 200, 120)
        replaced = load.ok
        time.sleep(5)  # the new replica takes its share
    assert proc.poll() is None
    assert load.ok > replaced + 20 > before + 40
    # a held connection ends without an answer, or mid-answer when the replica had begun it; or
    # Serve's proxy, which had sent the request on, answers its own plain-text 500 (README)
    assert all((status == "exception" and ("closed connection" in text or "IncompleteRead" in text))
               or (status == 500 and "Internal Server Error" in text)
               for _, status, text in load.failed), load.failed
    assert len(load.failed) <= 8, load.failed
