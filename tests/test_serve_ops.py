"""What an operations team runs a server with, against a real `kiln serve` on 127.0.0.1 (its own
Ray, a token, 2 replicas each): the versions of `m` in shared replicas (Serve's multiplexing) and
`other` in replicas of its own; a canary split by weight that a label move shifts under load
without a failed request or a restarted replica; `kiln models rm` refusing what the server
serves; Prometheus metrics that count known traffic across every replica."""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests

from helpers import HYMENOPTERA, NOISY_TF, kiln_here, server_processes, start_serve, stop_process, stop_server_and_check
from helpers import copy_models, copy_version, replicas, wait_for
from kiln.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]
TOKEN = "ops-token"
READY_AT: list[float] = []  # when the module's server answered ready
AUTH = {"Authorization": f"Bearer {TOKEN}"}
IMAGE = {"images": np.zeros((1, 28, 28, 1)).tolist()}
HEAD_TIMEOUT_S = 2  # the ops server's --head-timeout-s: how long a flood can hold a connection


@pytest.fixture(scope="module")
def ops(tmp_path_factory, trained):
    root = tmp_path_factory.mktemp("ops")
    store = copy_models(trained, root / "store", "cnn", "photos")  # photos: a user's ants and bees
    copy_version(store, "cnn:1", "m")    # m:1
    copy_version(store, "m:1", "m")      # m:2
    shutil.rmtree(store / "cnn")         # served here as m only
    copy_version(store, "m:1", "other")  # other:1, outside any split
    assert kiln_here("models", "label", "m:1", "stable", "--store", str(store)).returncode == 0
    assert kiln_here("models", "label", "m:2", "canary", "--store", str(store)).returncode == 0
    port = free_port()
    proc, lines, reader = start_serve("--store", str(store), "--port", str(port), "--poll-seconds", "1",
                                      "--replicas", "2", "--shared-replicas", "--own-replicas", "other",
                                      "--traffic", "m@stable=3", "--traffic", "m@canary=1",
                                      "--max-connections", "512", "--max-per-source", "64",
                                      "--head-timeout-s", str(HEAD_TIMEOUT_S),
                                      env={"KILN_API_TOKEN": TOKEN, **NOISY_TF})
    READY_AT.append(time.time())
    try:
        yield f"http://127.0.0.1:{port}", store, proc, lines, reader
    finally:
        stop_process(proc, timeout=120)


def test_a_canary_split_answers_by_weight_on_every_protocol(ops):
    """--traffic m@stable=3 --traffic m@canary=1: the unversioned routes of every protocol answer
    3 of 4 requests from the stable version and 1 from the canary, each saying which in its
    Kiln-Version header; a versioned route is never split; GET /models shows the split."""
    base, _, proc, lines, _ = ops
    assert any("m: unversioned traffic split m@stable 75%, m@canary 25%" in line for line in lines), lines
    session = requests.Session()
    session.headers.update(AUTH)
    answered = Counter()
    for _ in range(40):
        r = session.post(f"{base}/models/m/classify", json=IMAGE, timeout=30)
        assert r.status_code == 200, r.text
        answered[r.headers["Kiln-Version"]] += 1
    # smooth weighted round robin: exact shares, whatever came before (one cycle of 4 at most off)
    assert abs(answered["m:1"] - 30) <= 1 and answered["m:1"] + answered["m:2"] == 40, answered
    tf = Counter(session.post(f"{base}/v1/models/m:predict", json={"instances": IMAGE["images"]}, timeout=30)
                 .headers["Kiln-Version"] for _ in range(8))
    v2 = Counter(session.post(f"{base}/v2/models/m/infer", timeout=30, json={"inputs": [
        {"name": "images", "shape": [1, 28, 28, 1], "datatype": "FP32",
         "data": np.zeros(784).tolist()}]}).headers["Kiln-Version"] for _ in range(8))
    assert abs(tf["m:1"] - 6) <= 1 and abs(v2["m:1"] - 6) <= 1 and tf["m:2"] and v2["m:2"], (tf, v2)
    pinned = {session.post(f"{base}/models/m/versions/2/classify", json=IMAGE, timeout=30).headers["Kiln-Version"]
              for _ in range(4)}
    assert pinned == {"m:2"}
    listing = session.get(f"{base}/models", timeout=30).json()
    assert {m["ref"]: m["shared"] for m in listing["models"]} == {"m:1": True, "m:2": True, "other:1": False,
                                                                   "photos:1": True}
    # two versions, one shared set of replicas: no process per version
    assert len(replicas(proc, "model-pool")) == 2 and not replicas(proc, "model-m-") and len(replicas(proc, "model-other-v1")) == 2
    split = listing["traffic"]
    assert split == {"m": [{"to": "m@stable", "answering": "m:1", "weight": 3, "percent": 75.0},
                           {"to": "m@canary", "answering": "m:2", "weight": 1, "percent": 25.0}]}


def test_a_photo_model_answers_with_class_names_for_a_photo_of_any_size(ops):
    """A cnn trained on a folder of photos: a JPEG as the camera took it (hundreds of pixels a
    side) sent the way TF Serving's clients send pictures is resized to the model's 32x32 RGB,
    and the answer names the class by its folder's name."""
    import base64

    base, *_ = ops
    session = requests.Session()
    session.headers.update(AUTH)
    bee = next((HYMENOPTERA / "val" / "bees").glob("*.jpg"))
    sent = {"instances": [{"b64": base64.b64encode(bee.read_bytes()).decode()}]}
    r = session.post(f"{base}/v1/models/photos:predict", json=sent, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0]["labels"] in ("ants", "bees")
    meta = session.get(f"{base}/models", timeout=30).json()["models"]
    photos = next(m for m in meta if m["ref"] == "photos:1")
    assert photos["class_names"] == ["ants", "bees"]
    assert photos["methods"]["classify"]["inputs"]["images"]["x-shape"] == [None, 32, 32, 3]
    wrong = session.post(f"{base}/models/photos/classify", json=IMAGE, timeout=30)
    assert wrong.status_code == 400 and "32, 32, 3" in wrong.json()["error"], wrong.text


def test_moving_a_label_moves_its_traffic_under_load_without_a_failed_request(ops):
    """A new version labelled canary while 4 clients keep calling the unversioned route: the
    canary's share moves to it once it is ready (the old canary answers until then), no request
    fails, and the stable share never moves."""
    base, store, proc, *_ = ops
    seen: list[str] = []
    failed: list[tuple] = []
    stop = threading.Event()

    def client() -> None:
        session = requests.Session()
        session.headers.update(AUTH)
        deadline = time.time() + 240
        for _ in range(20_000):
            if stop.is_set() or time.time() > deadline:
                return
            try:
                r = session.post(f"{base}/models/m/classify", json=IMAGE, timeout=30)
                (seen.append(r.headers["Kiln-Version"]) if r.status_code == 200
                 else failed.append((r.status_code, r.text[:200])))
            except requests.RequestException as e:
                failed.append(("exception", str(e)[:200]))
            time.sleep(0.02)

    pool = replicas(proc, "model-pool")
    threads = [threading.Thread(target=client, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        new = copy_version(store, "m:1", "m")  # m:3
        assert kiln_here("models", "label", new, "canary", "--store", str(store)).returncode == 0

        def moved() -> bool:
            split = requests.get(f"{base}/models", headers=AUTH, timeout=30).json()["traffic"]["m"]
            return split[1]["answering"] == new
        assert wait_for(moved, 180)
        mark = len(seen)
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failed, failed[:5]
    after = Counter(seen[mark:])
    assert set(after) == {"m:1", new} and after["m:1"] > after[new], after
    assert "m:2" in seen[:mark] and proc.poll() is None
    assert replicas(proc, "model-pool") == pool  # the new version joined the running shared replicas


def test_rm_refuses_a_version_the_server_serves_and_deletes_a_free_one(ops):
    """`kiln models rm` on what the running server serves (other:1), or what a label names (m:1):
    one line, exit 2, nothing deleted. The canary's old version, no longer served once its label
    moved, goes."""
    base, store, *_ = ops
    served = kiln_here("models", "rm", "other:1", "--store", str(store))
    assert served.returncode == 2 and "other:1 is served by `kiln serve`" in served.stderr, served.stderr
    labelled = kiln_here("models", "rm", "m:1", "--store", str(store))
    assert labelled.returncode == 2 and "m:1 has label stable" in labelled.stderr
    assert (store / "other" / "1").is_dir() and (store / "m" / "1").is_dir()

    def freed() -> bool:  # the server's record follows what it serves within a poll
        return kiln_here("models", "rm", "m:2", "--store", str(store)).returncode == 0
    assert wait_for(freed, 60) and not (store / "m" / "2").exists()
    assert requests.post(f"{base}/models/m/classify", json=IMAGE, headers=AUTH, timeout=30).status_code == 200


def series(text: str, family: str, **labels: str) -> list[float]:
    """The values of a family's samples whose labels include ``labels`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name == family and all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_count_known_traffic_across_replicas(ops):
    """GET /metrics (token needed) after known traffic to a model nobody else calls: exact request
    counts by protocol and status, a latency histogram with as many observations, errors by class,
    batch sizes, and load times from both of the model's replicas."""
    base, *_ = ops
    denied = requests.get(f"{base}/metrics", timeout=30)
    assert denied.status_code == 401 and "token" in denied.json()["error"]
    session = requests.Session()
    session.headers.update(AUTH)
    for _ in range(7):
        assert session.post(f"{base}/models/other/classify", json=IMAGE, timeout=30).status_code == 200
    for _ in range(3):
        assert session.post(f"{base}/v1/models/other:predict", json={"instances": IMAGE["images"]},
                            timeout=30).status_code == 200
    for _ in range(2):
        assert session.post(f"{base}/models/other/classify", json={"images": [[1, 2]]}, timeout=30).status_code == 400
    assert session.post(f"{base}/models/made-up-{time.time()}/classify", json=IMAGE, timeout=30).status_code == 404
    want = {"protocol": "kiln", "model": "other", "version": "1", "method": "classify"}
    # A model loads once, but its load and warm-up times are still there in a scrape long after:
    # Ray's metrics agent drops a gauge not re-exported within two 10 s report intervals.
    time.sleep(max(0.0, READY_AT[0] + 25 - time.time()))

    seen: list[tuple] = []

    def counted() -> bool:
        # on a loaded machine a replica's export can come late, so wait for both replicas
        text = session.get(f"{base}/metrics", timeout=30).text
        seen[:] = [(sum(series(text, "ray_kiln_requests_total", **want, status="200")),
                    sum(series(text, "ray_kiln_requests_total", **{**want, "protocol": "tfserving"}, status="200")),
                    sum(series(text, "ray_kiln_requests_total", **want, status="400")),
                    len(series(text, "ray_kiln_model_load_seconds", model="other", version="1")),
                    sum(series(text, "ray_kiln_batch_size_count", model="other", version="1")))]
        return seen[0] == (7, 3, 2, 2, 10)
    # what was counted last (kiln 200s, tfserving 200s, kiln 400s, replicas reporting a load, the
    # model's calls: the model replicas export theirs apart from the ingress's) if not
    assert wait_for(counted, 90), seen
    r = session.get(f"{base}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sum(series(text, "ray_kiln_request_ms_count", **want, status="200")) == 7
    assert sum(series(text, "ray_kiln_request_ms_bucket", **want, status="200", le="+Inf")) == 7
    assert sum(series(text, "ray_kiln_errors_total", **want, status="400")) == 2
    assert sum(series(text, "ray_kiln_errors_total", **want, status="400", **{"class": "bad_request"})) == 2
    # a made-up model is counted, but under no series of its own
    assert "made-up" not in text
    assert sum(series(text, "ray_kiln_requests_total", model="", status="404")) >= 1
    # model calls (10 good requests, one at a time; the 2 bad ones never reached the model) and
    # their batch sizes (Ray estimates a histogram's _sum from bucket midpoints: counts are exact)
    assert sum(series(text, "ray_kiln_batch_size_count", model="other", version="1")) == 10
    assert sum(series(text, "ray_kiln_batch_size_bucket", model="other", version="1", le="1.0")) == 10
    assert sum(series(text, "ray_kiln_model_ms_count", model="other", version="1")) >= 1
    # each of the model's two replicas reports its own load and warm-up
    loads = series(text, "ray_kiln_model_load_seconds", model="other", version="1")
    warmups = series(text, "ray_kiln_model_warmup_seconds", model="other", version="1")
    assert len(loads) == 2 and all(v > 0 for v in loads + warmups), (loads, warmups)
    # Serve's own per-replica series come along
    assert series(text, "ray_serve_deployment_request_counter_total", deployment="model-other-v1")


def test_one_flooding_address_cannot_take_the_server_from_the_others(ops):
    """Slowloris: one client opened 4,200 connections, sent an incomplete request head on each
    and waited; every other client's request timed out for as long as it held them. Here one
    address (127.0.0.2) opens more connections than the server's --max-connections (512) with
    half a head each: past --max-per-source (64) they are refused as they connect, the ones
    held are closed once --head-timeout-s (2 s) passes, and 127.0.0.1 is answered throughout."""
    base, *_ = ops
    host, port = base.removeprefix("http://").split(":")
    flood: list[socket.socket] = []
    refused = 0
    started = time.monotonic()
    try:
        for _ in range(600):  # bounded in count and time: more than --max-connections
            if time.monotonic() - started > 20:
                break
            s = socket.socket()
            s.bind(("127.0.0.2", 0))
            s.settimeout(5)
            try:
                s.connect((host, int(port)))
                s.sendall(b"POST /models/m/classify HTTP/1.1\r\nHost: x\r\nContent-")
            except OSError:
                refused += 1
                s.close()
                continue
            flood.append(s)
        # held or not, the others are answered while the flood lasts
        answered = []
        for _ in range(5):
            t = time.monotonic()
            r = requests.post(f"{base}/models/m/classify", json=IMAGE, headers=AUTH, timeout=10)
            answered.append((r.status_code, time.monotonic() - t))
        assert all(code == 200 for code, _ in answered), answered
        # none waited for the flood's heads to expire: each within the head deadline plus a second
        assert max(seconds for _, seconds in answered) <= HEAD_TIMEOUT_S + 1, answered
        # what the server did with the flood: refused beyond the cap, closed the rest by the deadline
        closed = 0
        deadline = started + 30
        for s in flood:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                data = s.recv(4096)  # b"" (refused after accept: reset or closed) or HAProxy's 408
                closed += not data or data.startswith(b"HTTP/1.1 408") or data.startswith(b"HTTP/1.0 408")
            except (ConnectionResetError, BrokenPipeError):
                closed += 1
            except TimeoutError:
                pass
        assert closed == len(flood), (closed, len(flood), refused)
        assert time.monotonic() - started < 30
        # and counts what it refused where Prometheus looks
        text = requests.get(f"{base}/metrics", headers=AUTH, timeout=30).text
        counted = [line for line in text.splitlines() if line.startswith("kiln_connections_refused_total")]
        assert counted and float(counted[0].split()[-1]) >= 1, counted
    finally:
        for s in flood:
            s.close()


def test_sigterm_stops_the_server_and_its_ray_cleanly(ops):
    """What systemd, Docker and Kubernetes send: the server (shared and own replicas, a token)
    answers the request it is reading, refuses new ones with a JSON 503 and says it is not ready,
    then says it stopped, exits 0, and leaves no Ray process behind. Before: the requests in flight
    lost their connections without an answer. Last in this module: it ends the server. (Ctrl-C:
    test_serve.)"""
    import json
    import signal
    import socket

    base, _, proc, lines, reader = ops
    assert any(f"POST {base}/models/m/classify" in line for line in lines), lines
    assert proc.poll() is None
    # the route the stopping server drains through exists only for the process that started it
    outsider = requests.post(f"{base}/-/drain", headers={**AUTH, "Kiln-Drain-Key": "guess"}, timeout=30)
    assert outsider.status_code == 404 and requests.get(f"{base}/v2/health/ready", timeout=30).status_code == 200
    # a request in flight: its body half sent when SIGTERM comes, the rest 3 s later
    body = json.dumps({"images": np.zeros((4, 28, 28, 1)).tolist()}).encode()
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /models/other/classify HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body[:len(body) // 2])
    time.sleep(1)
    mine = server_processes(proc)  # before they start to stop
    proc.send_signal(signal.SIGTERM)
    time.sleep(1)
    new = requests.post(f"{base}/models/other/classify", json=IMAGE, headers=AUTH, timeout=30)
    assert new.status_code == 503 and "stopping" in new.json()["error"] and new.headers["Retry-After"], new.text
    ready = requests.get(f"{base}/v2/health/ready", timeout=30)
    assert ready.status_code == 503, ready.text
    time.sleep(1)
    sock.sendall(body[len(body) // 2:])
    answer = b""
    while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < 20:
        chunk = sock.recv(65536)
        if not chunk:
            break
        answer += chunk
    sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and b'"classes"' in answer, answer[:500]
    stop_server_and_check(proc, lines, reader, "SIGTERM", mine)
