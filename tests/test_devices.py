"""What TensorFlow may use and what Kiln sees (kiln.devices, `kiln doctor`). This machine has no
GPU: the GPU settings are checked where TensorFlow is asked to make them, with TensorFlow's list
of GPUs made to name two; bench/gpu_check.py checks them on real GPUs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import copy_models, kiln_here
from kiln import devices

FAKE_GPUS = """
import json, sys
import tensorflow as tf
calls = []
fake = [tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(2)]
listed = tf.config.list_physical_devices
tf.config.list_physical_devices = lambda kind=None: fake if kind == "GPU" else listed(kind)
tf.config.experimental.set_memory_growth = lambda d, on: calls.append(["growth", d.name, on])
tf.config.set_logical_device_configuration = \\
    lambda d, cfg: calls.append(["limit", d.name, [c.memory_limit for c in cfg]])
from kiln import devices, models
loading = models.load
def load(*a, **k):
    calls.append(["load"])
    return loading(*a, **k)
models.load = load
"""


@pytest.mark.slow
def test_a_serving_replica_sets_gpu_memory_before_its_model_loads(trained, tmp_path):
    """Four replicas at --gpus-per-replica 0.25 share a GPU: each must cap (--gpu-memory-mb) or
    grow its memory, set on every GPU it sees before TensorFlow allocates anything."""
    store = copy_models(trained, tmp_path / "store", "cnn")
    code = FAKE_GPUS + """
from kiln.serve.replica import ModelServer
out = []
for mb in (512, 0):
    devices._applied.clear()  # a fresh replica process each time
    calls.clear()
    server = ModelServer(sys.argv[1], "cnn:1", mb)
    out.append({"calls": calls[:], "described": server.describe()["tensorflow"]})
print(json.dumps(out))
"""
    done = subprocess.run([sys.executable, "-c", code, str(store)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    capped, grown = json.loads(done.stdout.splitlines()[-1])
    gpus = ["/physical_device:GPU:0", "/physical_device:GPU:1"]
    assert capped["calls"] == [["limit", g, [512]] for g in gpus] + [["load"]]
    assert capped["described"] == {"gpus": 2, "threads": None, "memory_growth": False, "gpu_memory_mb": 512}
    assert grown["calls"] == [["growth", g, True] for g in gpus] + [["load"]]
    assert grown["described"]["memory_growth"] is True and grown["described"]["gpu_memory_mb"] is None


def test_a_second_configuration_in_one_process_keeps_the_first():
    """A reused Tune trial actor trains again in its process, a shared replica loads a second
    model: TF refuses new settings once it has run an op, and the first ones stand; a process
    whose TensorFlow ran before Kiln configured it says so instead of failing."""
    code = ("import tensorflow as tf; from kiln import devices\n"
            "first = devices.configure(1); tf.constant(1.0) + 1\n"
            "again = devices.configure(2)\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(), first == again)\n"
            "devices._applied.clear(); late = devices.configure(3)\n"
            "print(tf.config.threading.get_intra_op_parallelism_threads(), late['note'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["1 True", "1 TensorFlow was initialised before Kiln could configure it"]


TWO_REPLICAS = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from pathlib import Path
from kiln import checkpoint, data, run
from kiln.trainer import LocalContext, train_loop
root = Path(sys.argv[1])
out = {}
for name, strategy in [("one", tf.distribute.OneDeviceStrategy("/cpu:0")),
                       ("two", tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))]:
    spec = run.plan("cnn", run=name, epochs=1, limit=2048, runs_dir=root / "runs", store=root / "store")
    spec.run_dir.mkdir(parents=True)
    train_loop(spec, data.prepare("mnist"), strategy, LocalContext(spec.run_dir))
    out[name] = json.loads((checkpoint.latest(spec.run_dir) / "state.json").read_text())["history"][-1]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_worker_with_two_gpus_trains_as_one_with_one_gpu(tmp_path):
    """--gpus-per-worker 2 gives each Ray Train worker two replicas (a MirroredStrategy inside
    the worker); two logical CPUs stand in for the GPUs. A compiled model's metrics made on its
    first step failed there ("You must feed a value for placeholder"); the same global batches
    on two replicas must give about the figures one replica gives."""
    done = subprocess.run([sys.executable, "-c", TWO_REPLICAS, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    # the replicas draw their own dropout masks, so the figures are near, not equal; a loss summed
    # instead of averaged over the replicas would be twice as large
    assert got["two"]["val_accuracy"] > 0.5 and got["one"]["val_accuracy"] > 0.5, got
    for key in ("loss", "val_loss"):
        assert got["two"][key] == pytest.approx(got["one"][key], rel=0.1), (key, got)
    for key in ("accuracy", "val_accuracy"):
        assert got["two"][key] == pytest.approx(got["one"][key], abs=0.05), (key, got)


@pytest.mark.parametrize("tf_gpus, cuda, driver, words", [
    (0, False, ["NVIDIA H100 80GB HBM3"], "nvidia-smi lists 1 GPU(s) (NVIDIA H100 80GB HBM3) but this "
                                         "TensorFlow was built without CUDA: install kiln[gpu]"),
    (0, True, ["A", "B"], "nvidia-smi lists 2 GPU(s) but TensorFlow sees none: its CUDA libraries did not load"),
])
def test_doctor_names_the_fix_when_tensorflow_misses_the_drivers_gpus(tf_gpus, cuda, driver, words):
    report = devices.Report()
    devices.gpu_problems(report, tf_gpus, cuda, driver)
    assert [line for line, _ in report.problems][0].startswith(words)
    assert report.ok  # Kiln still trains, on CPUs


def test_doctor_finds_no_problem_without_a_gpu_or_its_driver():
    report = devices.Report()
    devices.gpu_problems(report, 0, False, None)
    devices.ray_facts(report, {"CPU": 2.0}, 0, "local")
    assert report.problems == [] and report.facts == [("Ray cluster (local)", "2 CPUs, 0 GPUs")]


@pytest.mark.slow
@pytest.mark.ray
def test_kiln_doctor_shows_what_tensorflow_and_ray_see(shared_ray):
    """In a Python session with a Ray of its own, doctor inspects that Ray and leaves it running."""
    import ray
    import tensorflow as tf

    done = kiln_here("doctor")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    facts = {line.split("  ")[0]: line.split("  ", 1)[1].strip() for line in lines if "  " in line}
    assert facts["tensorflow"] == tf.__version__ and facts["built with CUDA"] in ("yes", "no")
    cpus = ray.cluster_resources()["CPU"]
    assert facts["Ray cluster (local)"] == f"{cpus:g} CPUs, {ray.cluster_resources().get('GPU', 0):g} GPUs"
    assert "device" in facts and ray.is_initialized()
    assert lines[-1] == "no problem found" or lines[-1].startswith("warning: "), lines
    # a cluster that is not there blocks training: exit 1 and the fix
    gone = kiln_here("doctor", "--address", "127.0.0.1:9")
    assert gone.returncode == 1, gone.stdout + gone.stderr[-2000:]
    assert gone.stdout.splitlines()[-1].startswith("problem: cannot reach a Ray cluster at '127.0.0.1:9'")
