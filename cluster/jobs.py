"""Ray Jobs: run ``kiln train`` on a Ray cluster, follow it, list and stop jobs; start and stop a
local head to try it out.

A job carries Kiln's own code (the installed ``kiln`` package and its entry points, plus a
``--plugin-path`` file) as its ``working_dir``: a few hundred kB. Data, checkpoints and stores
never go into it; they are paths on the cluster (``--store``, ``--runs-dir``, ``KILN_DATA_DIR``).

Every call talks to the head's dashboard address (``http://HEAD:8265``) and sends Ray's
authentication token when one is configured (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token), so a cluster started with token authentication accepts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import logging
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from kiln import net
from kiln.cluster.train import WORKER_HOOK
from kiln.logs import runtime_env as quiet_runtime_env
from kiln.plugin import KilnError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
_ERROR_LINE = re.compile(r"kiln: error: .*")


def dashboard_address(address: str | None) -> str:
    """``--address``, else $RAY_API_SERVER_ADDRESS, else the local head; ``host:port`` gets http://."""
    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS).strip()
    if "://" not in address:
        address = f"http://{address}"
    url = urlparse(address)
    if url.scheme not in ("http", "https") or not url.hostname or url.port is None and ":" in url.netloc:
        raise KilnError(f"bad jobs address {address!r}: use the head's dashboard, e.g. http://HEAD:8265")
    return address.rstrip("/")


def auth_headers() -> dict[str, str]:
    """The Authorization header for Ray's token, where one is configured."""
    token = net.ray_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _reachable(address: str) -> None:
    """Fail in seconds when nothing listens (Ray's own client retries for a long time)."""
    url = urlparse(address)
    net.reachable(url.hostname or "", url.port or (443 if url.scheme == "https" else 80),
                  f"a Ray cluster's jobs API at {address}",
                  "start one with `kiln cluster up` or pass --address http://HEAD:8265")


def client(address: str | None) -> Any:
    """A JobSubmissionClient for the cluster at ``address``; KilnError if unreachable or refused."""
    address = dashboard_address(address)
    _reachable(address)
    from ray.job_submission import JobSubmissionClient

    # Ray's SDK logs each upload and websocket close at INFO; Kiln prints what matters itself.
    for name in ("ray.dashboard.modules.job.sdk", "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(address, headers=auth_headers() or None)
    except Exception as e:  # ConnectionError, or an HTTP error for a non-Ray server
        raise KilnError(f"no Ray jobs API at {address}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _call(what: str, fn: Callable[[], Any], job_id: str | None = None) -> Any:
    """Run a JobSubmissionClient call; a missing job or a refused request becomes one line."""
    try:
        return fn()
    except RuntimeError as e:
        text = str(e)
        if job_id and ("404" in text or "does not exist" in text):
            raise KilnError(f"no job '{job_id}' on this cluster; `kiln jobs` lists them") from None
        if "401" in text or "403" in text or "nauthorized" in text or "orbidden" in text:
            raise KilnError(f"the cluster refused to {what}: {_first_line(e)}; set RAY_AUTH_TOKEN to "
                            "its token (`ray get-auth-token` on the head)") from None
        raise KilnError(f"cannot {what}: {_first_line(e)}") from None


# ----------------------------------------------------------------------------------- submit


def stage(dest: Path, plugin_path: str | None = None) -> Path:
    """Copy the installed ``kiln`` package (with its entry points) into ``dest``: the job's code.

    The copy is what ``pip install`` puts into site-packages, so a cluster with Kiln's dependencies
    but without Kiln itself runs the submitter's exact version, built-in plugins included.
    """
    import kiln

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so")
    shutil.copytree(Path(kiln.__file__).parent, dest / "kiln", ignore=ignore)
    for sub in ("plugins", "serve", "cluster"):
        src = Path(importlib.import_module(f"kiln.{sub}").__path__[0])
        target = dest / "kiln" / sub
        if target.exists():  # a regular install nests subpackages already
            continue
        shutil.copytree(src, target, ignore=ignore)
    dist = importlib.metadata.distribution("kiln")
    info = dest / f"kiln-{dist.version}.dist-info"
    info.mkdir()
    for name in ("METADATA", "entry_points.txt"):
        text = dist.read_text(name)
        if text is not None:
            (info / name).write_text(text)
    if plugin_path:
        extra = dest / "kiln_job_plugins"
        extra.mkdir()
        shutil.copy2(plugin_path, extra / Path(plugin_path).name)
    return dest


def job_id_for(plugin: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "-", plugin)[:32]
    return f"kiln-{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def entrypoint(train_args: list[str], *, store: str | None, runs_dir: str | None, run: str | None,
               plugin_path: str | None, command: str = "train") -> str:
    """The job's shell command: the same ``kiln train`` (or ``kiln tune``) a user types, with
    cluster-side paths (without a store or runs folder, the cluster's $KILN_STORE and $KILN_RUNS
    apply)."""
    cmd = ["python", "-m", "kiln.cli"]
    if store:
        cmd += ["--store", store]
    if plugin_path:
        cmd += ["--plugin-path", f"kiln_job_plugins/{Path(plugin_path).name}"]
    cmd += [command, *train_args]
    if runs_dir:
        cmd += ["--runs-dir", runs_dir]
    if run:
        cmd += ["--run", run]
    return shlex.join(cmd)


def submit(train_args: list[str], *, plugin: str, address: str | None, store: str | None, runs_dir: str | None,
           plugin_path: str | None = None, workers: int = 0, gpus_per_worker: float = 0.0,
           cpus_per_worker: float = 1.0, resume: bool = False, env: dict[str, str] | None = None,
           job_id: str | None = None, command: str = "train") -> str:
    """Submit ``kiln <command> <train_args>`` as a Ray job; returns its id (also the run's or
    search's name).

    With ``workers == 0`` a training job's own process trains, so it reserves the CPUs and GPUs
    (the entrypoint resources); with Ray Train workers the entrypoint only coordinates and
    reserves nothing, and the workers ask for ``gpus_per_worker`` through their ScalingConfig. A
    search's driver never trains: its trials reserve their own resources.
    """
    c = client(address)
    job_id = job_id or job_id_for(plugin)
    with tempfile.TemporaryDirectory(prefix="kiln-job-") as tmp:
        working_dir = stage(Path(tmp), plugin_path)
        size = sum(p.stat().st_size for p in working_dir.rglob("*") if p.is_file())
        # the job's workers start as quietly as its driver (kiln.logs)
        runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": ["__pycache__"],
                                       **quiet_runtime_env(env, hook=WORKER_HOOK)}
        kwargs: dict[str, Any] = {}
        if workers == 0 and command == "train":
            kwargs = {"entrypoint_num_cpus": cpus_per_worker, "entrypoint_num_gpus": gpus_per_worker}
        _call("submit the job", lambda: c.submit_job(
            entrypoint=entrypoint(train_args, store=store, runs_dir=runs_dir,
                                  run=None if resume else job_id, plugin_path=plugin_path, command=command),
            submission_id=job_id, runtime_env=runtime_env,
            metadata={"kiln": command, "store": store or "$KILN_STORE", "code_bytes": str(size)},
            **kwargs))
    return job_id


# ------------------------------------------------------------------------------------- jobs


def list_jobs(address: str | None) -> list[Any]:
    c = client(address)
    jobs = _call("list jobs", c.list_jobs)
    return sorted(jobs, key=lambda j: j.start_time or 0)


def info(address: str | None, job_id: str) -> Any:
    c = client(address)
    return _call("read the job", lambda: c.get_job_info(job_id), job_id)


def logs(address: str | None, job_id: str) -> str:
    c = client(address)
    return _call("read the job's logs", lambda: c.get_job_logs(job_id), job_id)


def follow(address: str | None, job_id: str, out: Callable[[str], None]) -> Any:
    """Stream a job's logs to ``out`` until it ends; returns its final JobInfo."""
    c = client(address)
    _call("read the job", lambda: c.get_job_info(job_id), job_id)

    async def tail() -> None:
        async for chunk in c.tail_job_logs(job_id):
            out(chunk)

    asyncio.run(tail())
    for _ in range(50):  # the log stream closes a moment before the status is final
        job = _call("read the job", lambda: c.get_job_info(job_id), job_id)
        if status_text(job) in TERMINAL:
            return job
        time.sleep(0.2)
    return job


def status_text(job: Any) -> str:
    return getattr(job.status, "value", str(job.status))


def command(job: Any) -> str:
    """A job's entrypoint as the user would type it (`kiln ...`)."""
    return job.entrypoint.replace("python -m kiln.cli", "kiln")


def failure(job: Any, log_text: str) -> str:
    """Why a job failed, in one line: Kiln's own error line if it printed one, else Ray's."""
    found = _ERROR_LINE.findall(log_text)
    if found:
        return found[-1].removeprefix("kiln: error: ")
    lines = [line for line in (job.message or "").splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"job {status_text(job)}"


def stop(address: str | None, job_id: str, timeout: float = 30) -> str:
    """Stop a job and wait until it has stopped; returns its final status."""
    c = client(address)
    job = _call("read the job", lambda: c.get_job_info(job_id), job_id)
    if status_text(job) in TERMINAL:
        return status_text(job)
    _call("stop the job", lambda: c.stop_job(job_id), job_id)
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = _call("read the job", lambda: c.get_job_info(job_id), job_id)
        if status_text(job) in TERMINAL:
            break
        time.sleep(0.5)
    return status_text(job)


# ---------------------------------------------------------------------------------- cluster


def _ray(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The ``ray`` command of this Python environment (the one Kiln is installed in)."""
    exe = Path(sys.executable).parent / "ray"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, env=env)


def cluster_up(*, port: int = 6379, dashboard_port: int = 8265, dashboard_host: str = "127.0.0.1",
               num_cpus: int | None = None, num_gpus: int | None = None) -> tuple[str, str]:
    """Start a Ray head on this machine (``ray start --head``) with token authentication and
    Kiln's Python first on PATH, so jobs run with the same interpreter; returns (gcs, dashboard)."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("RAY_AUTH_MODE", "token")
    from kiln import settings, store

    # Jobs on this machine read the same raw dataset files, and store models and checkpoints where
    # `kiln models` and `kiln train --resume` run here look (not in the job's temporary folder).
    if settings.data_dir() is not None:
        env.setdefault("KILN_DATA_DIR", str(settings.data_dir()))
    env["KILN_STORE"] = store.resolve_root(None)
    env["KILN_RUNS"] = str(settings.runs_dir().resolve())
    from kiln.serve.runtime import HAPROXY_FOLDER, data_path_env

    data_path = data_path_env()
    for k, v in data_path.items():  # `kiln serve --address` here gets Serve's fast data path
        env.setdefault(k, v)
    if env["RAY_AUTH_MODE"] == "token" and not net.ray_token():
        made = _ray("get-auth-token", "--generate", env=env)
        if made.returncode != 0:
            raise KilnError(f"cannot create Ray's auth token: {made.stderr.strip().splitlines()[-1:]}")
    # Its own temporary folder marks this head's processes, so that `kiln cluster down` stops it
    # and no other Ray on the machine (`ray stop` stops them all). Its agents get free ports: on
    # Ray's fixed defaults, another Ray's agent made every submission fail with "No available
    # agent" while `ray start` reported success.
    from kiln.net import free_port

    temp_dir = tempfile.mkdtemp(prefix=f"kiln-ray-{port}-")
    args = ["start", "--head", f"--port={port}", f"--dashboard-host={dashboard_host}",
            f"--dashboard-port={dashboard_port}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    if num_cpus is not None:
        args.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        args.append(f"--num-gpus={num_gpus}")
    out = _ray(*args, env=env)
    if out.returncode != 0:
        shutil.rmtree(data_path[HAPROXY_FOLDER], ignore_errors=True)
        text = (out.stderr + out.stdout).strip().splitlines()
        reason = next((line for line in text if "already" in line.lower() or "Error" in line),
                      text[-1] if text else "ray start failed")
        raise KilnError(f"cannot start a Ray head: {reason.strip()}; `kiln cluster down` stops one "
                        "that is running")
    gcs, dashboard = f"127.0.0.1:{port}", f"http://{net.local_host(dashboard_host)}:{dashboard_port}"
    heads = _heads()
    heads[str(port)] = {"temp_dir": temp_dir, "dashboard": dashboard, "haproxy_dir": data_path[HAPROXY_FOLDER]}
    _save_heads(heads)
    try:
        _probe_jobs(dashboard)
    except KilnError:
        cluster_down(port)
        raise
    return gcs, dashboard


def _probe_jobs(dashboard: str, timeout: float = 90) -> None:
    """KilnError unless the head's jobs API runs a job: the dashboard answering is not enough
    (its agent may be missing), so a one-line job runs to its end."""
    c = client(dashboard)
    try:
        job = c.submit_job(entrypoint="python -c \"print('kiln probe')\"",
                           submission_id=f"kiln-probe-{secrets.token_hex(4)}")
    except Exception as e:  # noqa: BLE001 - whatever the Jobs API says, the head cannot take jobs
        raise KilnError(f"the Ray head started but its jobs API at {dashboard} refused a probe job: "
                        f"{_first_line(e)}; it was stopped again") from None
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = str(c.get_job_status(job))
        if status.endswith("SUCCEEDED"):
            return
        if status.endswith(("FAILED", "STOPPED")):
            break
        time.sleep(0.5)
    raise KilnError(f"the Ray head started but a probe job on its jobs API at {dashboard} ended "
                    f"{status}; it was stopped again")


def _heads_file() -> Path:
    from kiln import settings

    return settings.cache_dir() / "heads.json"


def _heads() -> dict[str, dict[str, str]]:
    """The Ray heads `kiln cluster up` started on this machine, by GCS port."""
    import json

    try:
        return json.loads(_heads_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_heads(heads: dict[str, dict[str, str]]) -> None:
    import json

    path = _heads_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(heads, indent=1))
    tmp.replace(path)


def cluster_down(port: int | None = None) -> list[str]:
    """Stop the heads `kiln cluster up` started here (the one on ``port``, else all of them):
    their processes are those whose command line names the head's own temporary folder, and
    whatever they started (workers, job drivers). Other Ray instances on the machine go on.
    Returns the GCS addresses stopped; KilnError when there is none to stop."""
    import psutil

    heads = _heads()
    chosen = [str(port)] if port is not None else list(heads)
    if port is not None and str(port) not in heads:
        raise KilnError(f"no Ray head started by `kiln cluster up` on port {port} here; started: "
                        f"{', '.join(heads) or 'none'} (`ray stop` stops every Ray on this machine)")
    if not chosen:
        raise KilnError("no Ray head started by `kiln cluster up` is running here (`ray stop` "
                        "stops every Ray on this machine)")
    stopped = []
    for key in chosen:
        stop_ray_under(heads[key]["temp_dir"])
        if heads[key].get("haproxy_dir"):
            shutil.rmtree(heads[key]["haproxy_dir"], ignore_errors=True)
        del heads[key]
        stopped.append(f"127.0.0.1:{key}")
    _save_heads(heads)
    return stopped


def stop_ray_under(folder: str | Path, grace_s: float = 10.0) -> None:
    """Stop the Ray started with ``--temp-dir=folder``: the processes whose command line names
    the folder, and whatever they started (workers, job drivers), SIGTERM first and SIGKILL after
    ``grace_s``; then remove the folder. Other Ray instances on the machine go on (`ray stop`
    would stop them all)."""
    import psutil

    procs: dict[int, Any] = {}
    for p in psutil.process_iter(["cmdline"]):
        if any(str(folder) in arg for arg in p.info["cmdline"] or []):
            for q in [p, *_children(p)]:
                procs[q.pid] = q
    for q in procs.values():
        with contextlib.suppress(psutil.Error):
            q.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace_s)
    for q in alive:
        with contextlib.suppress(psutil.Error):
            q.kill()
    psutil.wait_procs(alive, timeout=30)
    shutil.rmtree(folder, ignore_errors=True)


def _children(p: Any) -> list[Any]:
    import psutil

    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def nodes(address: str | None) -> list[dict[str, Any]]:
    """The cluster's nodes: id, address, head or not, state, resources."""
    address = dashboard_address(address)
    _reachable(address)
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    headers = {"Content-Type": "application/json", **auth_headers()}
    try:
        found = StateApiClient(address=address, headers=headers).list(
            StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False)
    except Exception as e:
        raise KilnError(f"cannot list the nodes at {address}: {_first_line(e)}") from None
    return [n if isinstance(n, dict) else vars(n) for n in found]
