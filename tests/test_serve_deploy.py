"""`kiln serve --build-config` writes a Ray Serve config; `serve deploy` puts it on a separately
started head (`ray start --head` on loopback), and the deployed application answers over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml

from helpers import copy_models, copy_version, kill_ray_under, kiln_here
from kiln.net import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent


def test_build_config_deploys_on_a_ray_head(tmp_path, trained):
    env = {"KILN_STORE": str(tmp_path / "store"), "KILN_RUNS": str(tmp_path / "runs")}
    copy_models(trained, tmp_path / "store", "cnn")
    copy_version(tmp_path / "store", "cnn:1", "cnn")  # cnn:2, the canary
    port, gcs, dash = free_port(), free_port(), free_port()
    config = tmp_path / "serve.yaml"
    # a canary split: the option --build-config dropped (the server then answered from cnn:2 only)
    out = kiln_here("serve", "--model", "cnn", "--port", str(port), "--replicas", "1-2",
                    "--traffic", "cnn:1=1", "--traffic", "cnn:2=1",
                    "--build-config", str(config), cwd=tmp_path, env=env)
    assert out.returncode == 0 and "serve deploy" in out.stdout, out.stderr
    doc = yaml.safe_load(config.read_text())
    application = doc["applications"][0]
    assert application["import_path"] == "kiln.serve.app:app_builder"
    assert sorted(application["args"]["models"]) == ["cnn:1", "cnn:2"] and Path(application["args"]["store"]).is_dir()
    assert sorted(d["name"] for d in application["deployments"]) == ["model-cnn-v1", "model-cnn-v2"]
    # --replicas MIN-MAX: Ray Serve autoscaling (validated for real when the head deploys it)
    assert all(d["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2.0}
               for d in application["deployments"])
    assert doc["http_options"] == {"host": "127.0.0.1", "port": port}

    # Token authentication on both sides, as the README tells users to run a head: whether Ray
    # turns it on by itself depends on whether ~/.ray/auth_token exists on this machine already.
    ray_env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], capture_output=True, env=ray_env)
    # its own temporary folder marks the head's processes, to stop them and no other Ray
    temp = tempfile.mkdtemp(prefix="kr-")  # short: Ray's socket paths must fit 107 bytes
    start = subprocess.run([str(BIN / "ray"), "start", "--head", f"--port={gcs}", "--num-cpus=2", f"--temp-dir={temp}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                            "--disable-usage-stats"], capture_output=True, text=True, env=ray_env)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        deploy = subprocess.run([str(BIN / "serve"), "deploy", str(config), "--address",
                                 f"http://127.0.0.1:{dash}"], capture_output=True, text=True,
                                env=ray_env, timeout=120)
        assert deploy.returncode == 0, deploy.stderr[-2000:]
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                if requests.get(f"{base}/v2/health/ready", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or the proxy not answering yet
                pass
            time.sleep(1)
        answered = []
        for _ in range(8):  # the split is 1:1, in a smooth round robin
            r = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=60)
            assert r.status_code == 200 and len(r.json()["probabilities"][0]) == 10, r.text[:300]
            answered.append(r.headers["Kiln-Version"])
        assert sorted(answered) == ["cnn:1"] * 4 + ["cnn:2"] * 4, answered
    finally:
        kill_ray_under(temp)


def describe(application) -> dict:
    """What Serve deploys for an application: each deployment's options and arguments."""
    from ray.serve import Application

    found: dict = {}

    def value(v):
        if isinstance(v, Application):
            d = v._bound_deployment
            found[d.name] = {"user_config": d.user_config, "version": d.version,
                             "replicas": d.num_replicas, "actor": d.ray_actor_options,
                             "max_ongoing_requests": d.max_ongoing_requests,
                             "autoscaling": repr(d._deployment_config.autoscaling_config),
                             "args": value(list(d.init_args)), "kwargs": value(d.init_kwargs)}
            return d.name
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [value(x) for x in v]
        return v

    value(application)
    return found


@pytest.mark.parametrize("layout", [{}, dict(shared_replicas=True, own_replicas=["other"], models_per_replica=2),
                                    dict(colocate=True)], ids=["own", "shared", "colocate"])
def test_a_built_config_builds_the_application_kiln_serve_builds(tmp_path, trained, layout):
    """Every `kiln serve` option reaches the config --build-config writes: deployed, it builds
    the application that `kiln serve` with the same flags deploys (a deployed app has no
    `kiln serve` process to drain it, so no drain key)."""
    from kiln.serve import app

    store = copy_models(trained, tmp_path / "store", "cnn")
    copy_version(store, "cnn:1", "cnn")
    copy_version(store, "cnn:1", "other")
    assert kiln_here("models", "label", "cnn:2", "canary", "--store", str(store)).returncode == 0
    flags = dict(replicas="1-3", target_ongoing_requests=3.0, cpus_per_replica=0.5, max_ongoing_requests=7,
                 batch_size=8, batch_wait_ms=5.0, max_body_mb=3.0, max_items=99, max_chars=777,
                 max_response_mb=9.0, body_timeout_s=11.0, client_timeout_s=13, max_connections=55,
                 access_log=True, traffic=["cnn:1=3", "cnn@canary=1"], gpu_memory_mb=512, **layout)
    from kiln.serve.options import ServeOptions

    spec = app.plan(None, ServeOptions(**flags), store=str(store))
    spec.drain_key = None
    config = yaml.safe_load(yaml.safe_dump(app.serve_config(spec)))  # through the file
    built = app.app_builder(config["applications"][0]["args"])
    deployed = describe(built)
    assert deployed == describe(app.build_app(spec))
    # the GPU memory cap reaches whatever loads a model: its replicas, or the ingress with --colocate
    loaders = [d["args"][-1] for name, d in deployed.items() if name != "KilnIngress"]
    assert loaders == [512] * len(loaders) and deployed["KilnIngress"]["args"][1]["gpu_memory_mb"] == 512
