"""What Kiln's processes print: Kiln's own lines, real warnings and real errors, nothing else.

TensorFlow's C++ libraries print notices on stderr while they load, before absl's logging is set
up, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them. Which notices depends on the CPU: on
AVX-512 machines ``oneDNN custom operations are on ...`` twice, each after absl's ``WARNING: All
log messages before absl::InitializeLog() ...``. ``TF_ENABLE_ONEDNN_OPTS=0`` hides them but turns
oneDNN off, which changes speed; so instead the first ``import tensorflow`` of a process runs
with file descriptor 2 captured, and what TensorFlow printed is written back less the records
below ``TF_CPP_MIN_LOG_LEVEL`` (Kiln's default 2: info and warnings; 3 hides errors too).
Anything else printed while it loads (a Python warning, a real error) is written back as it was.
TensorFlow's CUDA build (the ``tensorflow`` package) also looks for a GPU when devices are first
listed, and on a machine without NVIDIA's driver says so twice: an info record ("Could not find
cuda drivers on your machine") and an error record ("failed call to cuInit"). The quiet import
lists the devices while stderr is captured, and drops that error only where the info record
says there is no driver: a failed cuInit on a machine with a driver stays an error.

``quiet_process()`` runs first in every process Kiln owns: the CLI calls it, and Ray starts it in
each of Kiln's workers, Serve replicas and job drivers through ``runtime_env()``'s
``worker_process_setup_hook``. ``KILN_VERBOSE=1`` (or ``kiln --verbose``) turns all of it off, and
variables the user set are kept as they are. See docs/design.md, "Machines differ".
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import os
import re
import sys
import time
import tempfile
from typing import Any, Iterator

from kiln import settings

# absl's record prefix: severity, date, time, thread, file:line]
_RECORD = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ [^\]]+\] "
                     # TensorFlow's older format: date, time, severity, file
                     r"|^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ([IWEF]) ")
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
# Python's own lines (warnings.showwarning, a traceback) are never the tail of a C++ record
_PYTHON = re.compile(r"^\S[^:]*:\d+: \w*(Warning|Error)\b|^Traceback ")
_NO_DRIVER = "Could not find cuda drivers on your machine"
_NO_DRIVER_ERROR = re.compile(r"failed call to cuInit")
SETUP_HOOK = "kiln.logs.quiet_process"


PREFIX = ""  # set by a process that trains for someone else: a search's trial names itself


def say(message: str) -> None:
    """One Kiln progress line on stdout (not print: Ray Train workers patch print into a logger)."""
    sys.stdout.write(f"[kiln] {PREFIX}{message}\n")
    sys.stdout.flush()


class Progress:
    """A bar within each epoch (steps, examples/s, ETA, loss) when stderr is a terminal; nothing
    in logs, Ray jobs or Ray Train workers, whose output is not one, where the epoch line is all."""

    def __init__(self, epochs: int, steps: int, batch: int) -> None:
        self.on = sys.stderr.isatty()
        self.epochs, self.steps, self.batch = epochs, steps, batch
        self.width = 0

    def start(self, epoch: int) -> None:
        self.epoch, self.t0 = epoch, time.perf_counter()

    def update(self, done: int, logs: dict[str, float]) -> None:
        if not self.on:
            return
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        rate = done * self.batch / seconds
        eta = (self.steps - done) * seconds / done
        filled = int(24 * done / self.steps)
        shown = "  ".join(f"{k} {v:.4f}" for k, v in list(logs.items())[:2])
        line = (f"[kiln] epoch {self.epoch}/{self.epochs} [{'#' * filled}{'.' * (24 - filled)}] {done}/{self.steps} "
                f"steps  {rate:,.0f} examples/s  ETA {eta:.0f}s  {shown}")
        sys.stderr.write("\r" + line.ljust(self.width))
        sys.stderr.flush()
        self.width = len(line)

    def clear(self) -> None:
        """Wipe the bar before the epoch's line."""
        if self.on and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows (the first is the header) as aligned text columns; the last column is not padded."""
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(f"{c:<{w}}" for c, w in zip(r, width)) + "  " + r[-1] for r in rows]


def filter_notices(text: str, min_level: int) -> str:
    """``text`` less absl records whose severity is below ``min_level`` (with their continuation
    lines) and, when any level is hidden, absl's pre-initialisation preamble."""
    out: list[str] = []
    dropping = False
    no_driver = min_level > 0 and _NO_DRIVER in text
    for line in text.splitlines(keepends=True):
        record = _RECORD.match(line)
        if record:
            dropping = _SEVERITY[record.group(1) or record.group(2)] < min_level \
                or bool(no_driver and _NO_DRIVER_ERROR.search(line))
        elif line.rstrip("\n") == _ABSL_PREAMBLE:
            dropping = min_level > 0
        elif not dropping or not line.strip() or _PYTHON.match(line):
            dropping = False  # a line of its own (a Python warning, an error): always kept
        if not dropping:
            out.append(line)
    return "".join(out)


@contextlib.contextmanager
def _filtered_stderr(min_level: int) -> Iterator[None]:
    """Capture file descriptor 2 (C++ and Python alike) and write it back filtered afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = filter_notices(tmp.read().decode("utf-8", "replace"), min_level)
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """Wraps tensorflow's own loader: its package runs with stderr filtered."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: Any) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        with _filtered_stderr(min_level()):
            self._loader.exec_module(module)
            if module.test.is_built_with_cuda():  # its GPU search, while stderr is captured
                module.config.list_physical_devices("GPU")

    def __getattr__(self, name: str) -> Any:  # resources, get_code, ...: the real loader's
        return getattr(self._loader, name)


class _QuietTensorFlow(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` as the path finder does and hands out a quiet loader, once."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "tensorflow":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one import per process; never in the way afterwards
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def min_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def quiet_process() -> None:
    """Keep this process's output to Kiln's lines (see the module docstring). Idempotent."""
    if settings.verbose():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlow) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlow())


def runtime_env(env_vars: dict[str, str] | None = None, hook: str = SETUP_HOOK) -> dict[str, Any]:
    """A Ray runtime environment whose worker processes start with ``quiet_process()`` (or
    ``hook``, which calls it); the user's own logging variables travel with it, so a joined
    cluster's workers respect them."""
    env = dict(env_vars or {})
    for name in ("TF_CPP_MIN_LOG_LEVEL", settings.VERBOSE):
        if name in os.environ:
            env.setdefault(name, os.environ[name])
    out: dict[str, Any] = {"worker_process_setup_hook": hook}
    if env:
        out["env_vars"] = env
    return out


def in_ray_job() -> bool:
    """True in the driver of a Ray job: its workers already get the job's runtime environment,
    and Ray refuses a ``ray.init`` that sets the same fields again."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ
