"""The cluster configurations Kiln ships (cluster/*.yaml, cluster/kuberay/*.yaml, cluster/Dockerfile)
stay runnable as the code changes: their structure, image, Ray version, resource requests, security
settings, and every Kiln command they run or document, parsed and planned by Kiln's own CLI."""

from __future__ import annotations

import dataclasses

import re
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from kiln import cli, registry, run
from kiln.serve import app as serve_app

CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
CONFIGS = sorted(CLUSTER.glob("*.yaml")) + sorted(KUBERAY.glob("*.yaml"))
GUIDE = (ROOT / "docs" / "cluster.md").read_text()  # the cluster page of the docs


def ray_version() -> str:
    import importlib.metadata

    return importlib.metadata.version("ray")


def kiln_image() -> str:
    """The tag cluster/Dockerfile documents building; every config must run that image."""
    found = re.search(r"docker build -f cluster/Dockerfile -t (\S+) \.", (CLUSTER / "Dockerfile").read_text())
    assert found, "cluster/Dockerfile must document its build command"
    return found.group(1)


def docs(path: Path) -> list[str]:
    return [line.lstrip("# ").strip() for line in path.read_text().splitlines() if line.startswith("#")]


def containers(doc: dict) -> list[dict]:
    """Every container of every pod template in a KubeRay resource."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_spec(doc: dict) -> dict:
    spec = doc["spec"]
    return spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec


def check_kiln_command(command: str) -> None:
    """A Kiln command line from a config: it parses, and a training run plans (plugin, config keys,
    worker counts) exactly as `kiln train` would."""
    argv = shlex.split(command)
    argv = argv[argv.index("kiln.cli") + 1:] if "kiln.cli" in argv else argv[argv.index("kiln") + 1:]
    args = cli.parser().parse_args(argv)
    if args.command == "submit":
        assert args.train_args[0] == "train"
        args = cli.parser().parse_args(args.train_args)
    if args.command == "train":
        opts = dataclasses.replace(cli._train_options(args), runs_dir="/mnt/kiln/runs")
        run.plan(args.plugin, opts, store="/mnt/kiln/store")


def test_the_image_is_rays_own_at_the_pinned_ray_and_python_versions():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{ray_version()}-py311-gpu"
    # Kiln's GPU extra brings TensorFlow's CUDA libraries; nothing is uninstalled first
    assert 'pip install --no-cache-dir ".[gpu]"' in text and "uninstall" not in text
    for folder in ("core", "plugins", "serve", "cluster"):
        assert f"COPY --chown=ray:users {folder} ./{folder}" in text
    assert kiln_image().endswith(f":{__import__('kiln').__version__}-gpu")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_is_documented_with_its_command(path):
    rel = path.relative_to(ROOT).as_posix()
    assert rel in GUIDE, f"docs/cluster.md must show the command that uses {rel}"
    yaml.safe_load_all(path.read_text())  # parses
    commands = [line for line in docs(path) if re.match(r"(KILN_URL=\S+ )?kiln ", line)]
    for command in commands:
        check_kiln_command(command.split(" ", 1)[1] if command.startswith("KILN_URL=") else command)


def test_the_cluster_launcher_config():
    doc = yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands", "docker"):
        assert key in doc, key
    assert doc["provider"]["type"] in ("aws", "gcp", "azure")
    types = doc["available_node_types"]
    assert doc["head_node_type"] in types
    head = types[doc["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for n, t in types.items() if n != doc["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] <= doc["max_workers"]
    assert doc["docker"]["image"] == kiln_image()
    head_start = " ".join(doc["head_start_ray_commands"])
    # no unauthenticated job submission: loopback dashboard (SSH tunnel) and token auth everywhere
    assert "--dashboard-host=127.0.0.1" in head_start and "RAY_AUTH_MODE=token" in head_start
    assert all("RAY_AUTH_MODE=token" in c for c in doc["worker_start_ray_commands"] if "ray start" in c)
    assert any("/mnt/kiln" in o for o in doc["docker"]["run_options"])
    assert "~/.ray/auth_token" in doc["file_mounts"].values()
    assert any("ray dashboard cluster/ray-cluster.yaml" in line for line in docs(CLUSTER / "ray-cluster.yaml"))


@pytest.mark.parametrize("name, kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"),
                                        ("rayservice.yaml", "RayService")])
def test_kuberay_resources(name, kind):
    doc = yaml.safe_load((KUBERAY / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = cluster_spec(doc)
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"] == {"mode": "token"}  # KubeRay makes a token and requires it
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    claim = yaml.safe_load((KUBERAY / "storage.yaml").read_text())["metadata"]["name"]
    for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]:
        pod = group["template"]["spec"]
        assert {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]} == {claim}
        for c in pod["containers"]:
            assert c["image"] == kiln_image()
            assert {m["mountPath"] for m in c["volumeMounts"]} == {"/mnt/kiln"}
            assert c["resources"]["requests"] == c["resources"]["limits"]
    for group in spec.get("workerGroupSpecs", []):
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_the_rayjob_runs_a_training_kiln_plans():
    doc = yaml.safe_load((KUBERAY / "rayjob.yaml").read_text())
    entry = doc["spec"]["entrypoint"]
    assert entry.startswith("python -m kiln.cli train ")
    check_kiln_command(entry)
    args = cli.parser().parse_args(shlex.split(entry)[3:])
    workers, _ = run.parse_workers(args.workers)
    gpu_group = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    container = gpu_group["template"]["spec"]["containers"][0]
    # the worker pods have room for the Ray Train workers the command asks for
    assert gpu_group["minReplicas"] * int(container["resources"]["limits"]["nvidia.com/gpu"]) \
        >= workers * args.gpus_per_worker
    assert float(container["resources"]["limits"]["cpu"]) >= args.cpus_per_worker


def test_the_rayservice_serves_kiln_with_its_api_token():
    doc = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    expected = serve_app.serve_config(serve_app.ServeSpec(store="/mnt/kiln/store", refs=["cnn:1"]))
    application, want = config["applications"][0], expected["applications"][0]
    assert application["import_path"] == want["import_path"]
    assert set(application["args"]) <= set(want["args"]) and application["args"]["store"] == "/mnt/kiln/store"
    # its options are kiln serve's, as the builder reads them
    from kiln import options
    from kiln.serve.options import ServeOptions

    assert options.from_dict(ServeOptions, application["args"]["options"], "args.options").max_items == 1024
    names = {e.name for e in registry.entries()}
    assert set(application["args"]["models"]) <= names
    for c in containers(doc):
        env = {e["name"]: e for e in c.get("env", [])}
        assert env["KILN_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "kiln-api"
