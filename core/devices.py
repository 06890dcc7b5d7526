"""What TensorFlow may use in a process, and what it sees: the one place that sets TensorFlow's
device configuration (CPU threads, GPU memory growth or a per-process memory cap). Training
workers (kiln.trainer), serving replicas (kiln.serve.replica) and ``kiln doctor`` call it, before
TensorFlow allocates anything: TensorFlow refuses to change these settings once it has
initialised its devices, and by default it takes nearly all of a GPU's memory in the first
process that touches it. Ray schedules fractions of a GPU (``--gpus-per-replica 0.25``) but does
not partition its memory, so without growth or a cap the first replica on a GPU starves the
others (docs/design.md, "GPUs").
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any

# what configure() did in this process, for GET /models/{name} and the tests: TensorFlow keeps
# the first process-wide settings, so a second call reports the first's
_applied: dict[str, Any] = {}


def configure(threads: int | None = None, *, gpus: bool = True, gpu_memory_mb: int = 0) -> dict[str, Any]:
    """Limit TensorFlow's CPU threads (``threads``) and set every visible GPU to grow its memory as
    needed or, with ``gpu_memory_mb``, to a logical device of that much memory at most. A process
    that configured TensorFlow before (a reused Tune actor, a replica holding several models) keeps
    its first settings. Returns what applies in this process."""
    import tensorflow as tf

    if _applied:
        return dict(_applied)
    found = tf.config.list_physical_devices("GPU") if gpus else []
    try:
        if threads:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(max(2, threads))
        for gpu in found:
            if gpu_memory_mb:
                # a memory limit makes a logical device; growth cannot be set beside it
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=gpu_memory_mb)])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as e:  # "... after initialization" (threads), "... after being initialized" (GPUs)
        if "initializ" not in str(e):
            raise
        return {"gpus": len(found), "threads": None, "memory_growth": None, "gpu_memory_mb": None,
                "note": "TensorFlow was initialised before Kiln could configure it"}
    _applied.update(gpus=len(found), threads=threads or None,
                    memory_growth=bool(found) and not gpu_memory_mb, gpu_memory_mb=gpu_memory_mb or None)
    return dict(_applied)


# ------------------------------------------------------------------------------------ doctor


@dataclass
class Report:
    """What ``kiln doctor`` found: facts as (name, value) lines, and problems with their fix;
    ``blocking`` problems stop training (exit status 1)."""

    facts: list[tuple[str, str]] = field(default_factory=list)
    problems: list[tuple[str, bool]] = field(default_factory=list)  # (line with its fix, blocking)

    @property
    def ok(self) -> bool:
        return not any(blocking for _, blocking in self.problems)


def nvidia_smi_gpus() -> list[str] | None:
    """The GPUs the NVIDIA driver lists (names), or None when nvidia-smi is not installed."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def tensorflow_facts(report: Report) -> list[Any]:
    """TensorFlow's and Keras' versions, its build and the devices it sees; its GPUs."""
    import keras
    import tensorflow as tf

    import platform
    from importlib.metadata import version

    build = tf.sysconfig.get_build_info()
    report.facts += [("kiln", version("kiln")), ("python", platform.python_version()),
                     ("tensorflow", tf.__version__), ("keras", keras.__version__),
                     ("built with CUDA", "yes" if tf.test.is_built_with_cuda() else "no")]
    if build.get("cuda_version"):
        report.facts.append(("CUDA / cuDNN (built for)", f"{build.get('cuda_version')} / {build.get('cudnn_version')}"))
    gpus = tf.config.list_physical_devices("GPU")
    for device in tf.config.list_physical_devices():
        shown = device.name.removeprefix("/physical_device:")
        if device.device_type == "GPU":
            details = tf.config.experimental.get_device_details(device)
            cc = details.get("compute_capability")
            shown += f" {details.get('device_name', '')}".rstrip()
            if cc:
                shown += f" (compute capability {cc[0]}.{cc[1]})"
        report.facts.append(("device", shown))
    return gpus


def gpu_problems(report: Report, tf_gpus: int, built_with_cuda: bool, driver_gpus: list[str] | None) -> None:
    """A line per GPU problem, with its fix. None of them blocks training: Kiln trains on CPUs."""
    if driver_gpus and not tf_gpus:
        if not built_with_cuda:
            report.problems.append((f"nvidia-smi lists {len(driver_gpus)} GPU(s) ({', '.join(driver_gpus)}) but this "
                                    "TensorFlow was built without CUDA: install kiln[gpu] "
                                    "(pip install -e '.[gpu]')", False))
        else:
            report.problems.append((f"nvidia-smi lists {len(driver_gpus)} GPU(s) but TensorFlow sees none: its CUDA "
                                    "libraries did not load (run with --verbose for TensorFlow's reason; "
                                    "reinstall kiln[gpu] so that pip brings CUDA and cuDNN)", False))
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1") and driver_gpus:
        report.problems.append(("CUDA_VISIBLE_DEVICES hides every GPU from this process: unset it", False))


def ray_facts(report: Report, resources: dict[str, float], tf_gpus: int, where: str) -> None:
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    report.facts.append((f"Ray cluster ({where})", f"{cpus:g} CPUs, {gpus:g} GPUs"))
    if cpus < 1:
        report.problems.append(("the Ray cluster offers no CPU: training needs at least one; start its "
                                "nodes with --num-cpus", True))
    if tf_gpus and not gpus and where == "local":
        report.problems.append((f"TensorFlow sees {tf_gpus} GPU(s) but Ray offers none: Ray found no "
                                "GPU at start; start it with --num-gpus", False))
