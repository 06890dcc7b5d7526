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

from helpers import copy_models, kill_ray_under, kiln_here
from kiln.serve.runtime import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent


def test_build_config_deploys_on_a_ray_head(tmp_path, trained):
    env = {"KILN_STORE": str(tmp_path / "store"), "KILN_RUNS": str(tmp_path / "runs")}
    copy_models(trained, tmp_path / "store", "cnn")
    port, gcs, dash = free_port(), free_port(), free_port()
    config = tmp_path / "serve.yaml"
    out = kiln_here("serve", "--model", "cnn", "--port", str(port), "--replicas", "1-2",
                    "--build-config", str(config), cwd=tmp_path, env=env)
    assert out.returncode == 0 and "serve deploy" in out.stdout, out.stderr
    doc = yaml.safe_load(config.read_text())
    application = doc["applications"][0]
    assert application["import_path"] == "kiln.serve.app:app_builder"
    assert application["args"]["models"] == ["cnn:1"] and Path(application["args"]["store"]).is_dir()
    assert application["deployments"][0]["name"] == "model-cnn-v1"
    # --replicas MIN-MAX: Ray Serve autoscaling (validated for real when the head deploys it)
    assert application["deployments"][0]["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2.0}
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
            except requests.ConnectionError:
                pass
            time.sleep(1)
        r = requests.post(f"{base}/models/cnn/classify", json={"images": np.zeros((28, 28, 1)).tolist()}, timeout=60)
        assert r.status_code == 200 and len(r.json()["probabilities"][0]) == 10
    finally:
        kill_ray_under(temp)
