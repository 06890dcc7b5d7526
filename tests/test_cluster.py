"""Ray Jobs, as a user runs them: `kiln cluster up` starts a real head (`ray start --head`) on
loopback with two logical GPUs; `kiln submit` sends real training jobs through the Jobs API, and
`kiln jobs` lists, follows and stops them. Models trained by jobs land in the named store."""

from __future__ import annotations

import json
import time

import numpy as np
import psutil
import pytest

from helpers import NOISY_TF, TEST_PLUGINS, assert_no_tf_notices, run_kiln
from helpers import assert_same_weights, kill_ray_under, weights
from kiln.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head started in its own folder: jobs that name no store use its ./kiln-store."""
    home = tmp_path_factory.mktemp("head")
    gcs, dash = free_port(), free_port()
    out = run_kiln("cluster", "up", "--port", str(gcs), "--dashboard-port", str(dash),
                   "--num-cpus", "2", "--num-gpus", "2", cwd=home, env=NOISY_TF)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"http://127.0.0.1:{dash}" in out.stdout
    try:
        yield f"http://127.0.0.1:{dash}", dash, home, f"127.0.0.1:{gcs}"
    finally:
        down = run_kiln("cluster", "down")
        assert down.returncode == 0, down.stderr


def test_the_head_serves_jobs_on_loopback_only_and_reports_its_resources(head):
    address, port, *_ = head
    listening = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
    assert listening == {"127.0.0.1"}, listening
    out = run_kiln("cluster", "status", "--address", address)
    assert out.returncode == 0, out.stderr
    assert "head" in out.stdout and "ALIVE" in out.stdout
    assert "1 alive node(s): 2 CPUs, 2 GPUs" in out.stdout


def test_a_submitted_job_trains_on_ray_train_workers_and_stores_the_model(head, tmp_path):
    """The job ships a plugin file (--plugin-path) and an environment variable (--env) with Kiln's
    code; its 2 Ray Train workers get one (logical) GPU each; the model lands in the store."""
    address, *_ = head
    probe = tmp_path / "probe"
    probe.mkdir()
    out = run_kiln("submit", "--address", address, "--follow", "--env", f"KILN_PROBE_DIR={probe}",
                   "--plugin-path", str(TEST_PLUGINS / "probe.py"), "train", "probe", "--epochs", "2",
                   "--limit", "512", "--workers", "2", "--gpus-per-worker", "1",
                   "--store", f"file://{tmp_path}/bucket/kiln", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    job_id = out.stdout.splitlines()[0].strip()
    assert job_id.startswith("kiln-probe-"), out.stdout[:500]
    assert "[kiln] epoch 2/2" in out.stdout and f"job {job_id} SUCCEEDED" in out.stderr
    assert_no_tf_notices(out.stdout + out.stderr)  # the job's driver and workers: oneDNN forced on
    # the shipped plugin ran in both workers, which end every epoch with identical weights
    assert_same_weights(probe, 1)
    assert_same_weights(probe, 2)
    first, second = weights(probe / "rank0-epoch1.npz"), weights(probe / "rank0-epoch2.npz")
    assert any(not np.array_equal(x, y) for x, y in zip(first, second))  # and they did train
    assert out.stdout.count("[kiln] epoch 2/2") == 1  # rank 0 reports, once
    # --gpus-per-worker reached Ray Train's ScalingConfig: the two workers got GPUs 0 and 1
    assert "GPUs [0]" in out.stdout and "GPUs [1]" in out.stdout, out.stdout[-3000:]
    # the model is in the store named at submission, here a URI (the code path of s3:// and gs://)
    uri = f"file://{tmp_path}/bucket/kiln"
    models = run_kiln("models", "--store", uri)
    assert models.returncode == 0 and "probe" in models.stdout, models.stdout
    manifest = json.loads((tmp_path / "bucket" / "kiln" / "probe" / "1" / "manifest.json").read_text())
    assert manifest["run"] == job_id and manifest["train"]["workers"] == 2
    assert 0 <= manifest["metrics"]["accuracy"] <= 1  # evaluated; how well: bench/quality.py
    pictures = run_kiln("samples", "probe", "--store", uri, "--out", str(tmp_path / "pictures"),
                        env={"KILN_CACHE": str(tmp_path / "cache")})  # the version is downloaded
    assert pictures.returncode == 0 and (tmp_path / "pictures" / "probe-1-confusion.png").is_file(), \
        pictures.stdout + pictures.stderr
    assert (tmp_path / "cache" / "stores").is_dir()
    listing = run_kiln("jobs", "list", "--address", address)
    assert listing.returncode == 0
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "kiln --store" in row


def test_a_submitted_search_runs_its_trials_on_the_cluster(head, tmp_path):
    """`kiln submit tune`: the job's driver runs Ray Tune on the cluster; the job id names the
    search, whose results and best model land in the folders named at submission."""
    address, *_ = head
    out = run_kiln("submit", "--address", address, "--follow", "tune", "cnn", "--search", "dropout=grid:0.2/0.5",
                   "--limit", "300", "--epochs", "2", "--scheduler", "fifo",
                   "--runs-dir", str(tmp_path / "runs"), "--store", str(tmp_path / "store"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    job_id = out.stdout.splitlines()[0].strip()
    assert job_id.startswith("kiln-cnn-") and f"job {job_id} SUCCEEDED" in out.stderr
    results = json.loads((tmp_path / "runs" / job_id / "search.json").read_text())
    assert sorted(t["config"]["dropout"] for t in results["trials"]) == [0.2, 0.5]
    assert all(t["status"] == "finished" for t in results["trials"]) and results["version"] == "cnn:1"
    assert json.loads((tmp_path / "store" / "cnn" / "1" / "manifest.json").read_text())["search"]["name"] == job_id
    bad = run_kiln("submit", "--address", address, "tune", "cnn", "--search", "nope=uniform:0:1", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown config key 'nope'" in bad.stderr


def test_a_job_with_an_unknown_plugin_fails_with_the_plugin_error_in_its_logs(head, tmp_path):
    address, *_ = head
    out = run_kiln("submit", "--address", address, "train", "nope", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    follow = run_kiln("jobs", "logs", job_id, "--follow", "--address", address)
    assert follow.returncode != 0
    error = follow.stderr.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(f"kiln: error: job {job_id} FAILED: unknown plugin 'nope'")
    logs = run_kiln("jobs", "logs", job_id, "--address", address)
    assert logs.returncode == 0 and "kiln: error: unknown plugin 'nope'" in logs.stdout
    assert f"job {job_id} FAILED" in logs.stderr


def test_a_running_job_can_be_stopped(head, tmp_path):
    """An in-process training job (no Ray Train workers) reserves --gpus-per-worker for its own
    process; it is stopped mid-training and stores nothing."""
    address, *_ = head
    out = run_kiln("submit", "--address", address, "train", "cnn", "--epochs", "200", "--limit", "1000",
                   "--gpus-per-worker", "1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip()
    from kiln.cluster import jobs

    deadline = time.time() + 120
    while "[kiln] epoch 1/200" not in jobs.logs(address, job_id) and time.time() < deadline:
        time.sleep(0.5)
    assert jobs.status_text(jobs.info(address, job_id)) == "RUNNING"
    assert "in-process on GPUs " in jobs.logs(address, job_id)  # Ray gave the job a GPU of its own
    stop = run_kiln("jobs", "stop", job_id, "--address", address)
    assert stop.returncode == 0 and f"job {job_id} STOPPED" in stop.stdout, stop.stdout + stop.stderr
    assert not (head[2] / "kiln-store" / "cnn").exists()  # nothing half-stored
    # without --store the job checkpointed into the head's ./kiln-runs, where --resume finds it
    assert list((head[2] / "kiln-runs" / job_id).glob("checkpoint_*"))


def test_train_and_serve_join_the_head_with_its_token(head, tmp_path, monkeypatch):
    """The README's `kiln train ... --address HEAD:6379` and `kiln serve --address`, against the
    head `kiln cluster up` starts: Ray's clients send the token only with RAY_AUTH_MODE=token in
    their environment, which Kiln did not set. Both failed with twenty "InvalidAuthToken" lines;
    serve then printed a traceback, train said it could not reach the cluster."""
    import requests

    from helpers import start_serve, stop_process

    *_, gcs = head
    # as a user's shell has it (a Ray started in this process sets it here when a token exists)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    store = tmp_path / "store"
    out = run_kiln("train", "cnn", "--workers", "1", "--epochs", "1", "--limit", "500", "--store", str(store),
                   "--runs-dir", str(tmp_path / "runs"), "--address", gcs)
    assert out.returncode == 0 and "InvalidAuthToken" not in out.stderr, out.stderr[-3000:]
    assert "stored cnn:1" in out.stdout, out.stdout[-2000:]
    port = free_port()
    proc, lines, reader = start_serve("--store", str(store), "--port", str(port), "--address", gcs,
                                      "--poll-seconds", "0")
    try:
        assert not [line for line in lines if "InvalidAuthToken" in line or "Traceback" in line], "".join(lines)
        models = requests.get(f"http://127.0.0.1:{port}/models", timeout=30)
        assert models.status_code == 200 and "cnn" in models.text, models.text
    finally:
        stop_process(proc, timeout=120)  # SIGTERM, as a service manager stops it
        reader.join(timeout=30)
    assert proc.returncode == 0 and "[kiln] server stopped" in "".join(lines), "".join(lines)[-2000:]


@pytest.mark.parametrize("args, message", [
    (["jobs", "logs", "no-such-job"], "no job 'no-such-job' on this cluster"),
    (["jobs", "stop", "no-such-job"], "no job 'no-such-job' on this cluster"),
    (["jobs", "logs"], "needs a job id"),
    (["submit", "cnn"], "kiln submit runs a training job"),
    (["submit", "train", "cnn", "--runs-dir", "s3://bucket/runs"], "--runs-dir must be a folder"),
    (["submit", "train", "cnn", "--workers", "3-1"], "need 1 <= MIN <= MAX"),
])
def test_bad_job_requests_get_one_line(head, args, message):
    address, *_ = head
    out = run_kiln(*args, "--address", address) if args[0] == "jobs" else \
        run_kiln(args[0], "--address", address, *args[1:])
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and message in out.stderr, out.stderr


@pytest.mark.parametrize("command", [["jobs"], ["jobs", "logs", "x"], ["cluster", "status"],
                                     ["submit", "ADDRESS", "train", "cnn"]])
def test_an_unreachable_cluster_is_one_line(command):
    """``ADDRESS``: where --address goes (after `submit train`, it is the training's own flag)."""
    port = free_port()  # nothing listens there
    address = ["--address", f"http://127.0.0.1:{port}"]
    args = [a for c in command for a in (address if c == "ADDRESS" else [c])]
    out = run_kiln(*args, *([] if "ADDRESS" in command else address), timeout=60)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "cannot reach a Ray cluster" in out.stderr, out.stderr


def test_cluster_down_stops_its_own_head_and_no_other_ray(tmp_path, monkeypatch):
    """Before: `kiln cluster down` ran `ray stop`, which stopped every Ray on the machine (another
    user's `kiln serve` with it); and `kiln cluster up` said the head was up while its jobs API
    failed every submission ("No available agent": another Ray held the agent's fixed port).
    Here a bystander Ray holds Ray's default ports; Kiln's head still takes jobs, and stopping
    it leaves the bystander running. The head is the machine's first: no Ray token exists yet."""
    from kiln.cluster.jobs import _ray

    import tempfile
    from pathlib import Path

    other = Path(tempfile.mkdtemp(prefix="other-ray-"))  # short: Ray's socket paths must fit 107 bytes
    started = _ray("start", "--head", f"--port={free_port()}", "--include-dashboard=false",
                   f"--temp-dir={other}", "--num-cpus=1", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr[-2000:]

    def bystander() -> list[psutil.Process]:
        return [p for p in psutil.process_iter(["cmdline", "name"])
                if p.info["name"] == "gcs_server" and any(str(other) in a for a in p.info["cmdline"] or [])]

    try:
        assert len(bystander()) == 1
        for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # where Ray keeps its token: none yet
        gcs, dash = free_port(), free_port()
        up = run_kiln("cluster", "up", "--port", str(gcs), "--dashboard-port", str(dash), "--num-cpus", "1",
                      cwd=tmp_path)
        assert up.returncode == 0, up.stderr[-2000:]
        assert (tmp_path / "home" / ".ray" / "auth_token").read_text().strip()  # made by `cluster up`
        # the head's HAProxy folder, as its processes got it (the GCS's temp dir names its port)
        from kiln.serve.runtime import HAPROXY_FOLDER

        gcs_server = [p for p in psutil.process_iter(["cmdline", "name"]) if p.info["name"] == "gcs_server"
                      and any(f"kiln-ray-{gcs}-" in a for a in p.info["cmdline"] or [])]
        assert len(gcs_server) == 1
        folder = Path(gcs_server[0].environ()[HAPROXY_FOLDER])
        assert folder.is_dir(), folder
        ran = run_kiln("submit", "--address", f"http://127.0.0.1:{dash}", "--follow", "train", "nope",
                       cwd=tmp_path)  # the job runs (and fails on its unknown plugin): the API works
        assert "No available agent" not in ran.stderr + ran.stdout and "unknown plugin 'nope'" in ran.stdout + ran.stderr, \
            ran.stderr[-2000:]
        down = run_kiln("cluster", "down", "--port", str(gcs))
        assert down.returncode == 0 and f"stopped the Ray head on 127.0.0.1:{gcs}" in down.stdout, down.stderr
        assert not [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port in (gcs, dash)]
        assert len(bystander()) == 1 and bystander()[0].is_running()  # the other Ray goes on
        # the head's HAProxy folder goes with it (every head and server left one in /tmp)
        assert folder.name.startswith("kiln-haproxy-") and not folder.exists(), folder
        again = run_kiln("cluster", "down", "--port", str(gcs))
        assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
        assert "no Ray head started by `kiln cluster up` on port" in again.stderr
    finally:
        kill_ray_under(other)
