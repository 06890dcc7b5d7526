"""What tests share besides fixtures (those are in conftest.py): running the CLI (as a
subprocess where the process is the behaviour, in this process elsewhere), starting and stopping
`kiln serve`, copying stored versions, load generators, and the checks several modules make.
Test modules import from here, never from each other."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
TEST_PLUGINS = Path(__file__).resolve().parent / "plugins"
# the ants and bees photos of ../shared/data (MANIFEST.md there): a user's own image folder
HYMENOPTERA = ROOT.parent / "shared" / "data" / "hymenoptera"


def run_kiln(*args: str, cwd: Path | None = None, env: dict | None = None,
             timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the kiln CLI as a user would; returns the finished process (text output)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def kiln_here(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """The kiln CLI's ``main`` in this process: the same parsing, work, output and exit status as
    ``run_kiln``, without starting a new Python that imports TensorFlow again (seconds a call).
    For whatever a command does rather than what its process does: its work, what it stores and
    prints, errors found before any work; commands that need Ray join the test's ``shared_ray``;
    what a fresh process prints while TensorFlow loads is tested with ``run_kiln``."""
    import contextlib
    import io

    from kiln import cli

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update(env or {})
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as e:  # argparse's errors and --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["kiln", *args], code, out.getvalue(), err.getvalue())


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM (what a service manager sends), then SIGKILL if it has not exited in ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def start_serve(*args: str, env: dict | None = None, timeout: float = 300, session: bool = False):
    """`kiln serve ARGS` as a user starts it, its output appended to ``lines`` by ``reader`` (a
    thread); returns (proc, lines, reader) once it prints that it is ready. A server that exits
    or is not ready within ``timeout`` is killed and fails the test with its output. ``session``:
    in a process group of its own, as a terminal or a service manager starts it, so that a signal
    can go to the whole group as theirs do."""
    import signal

    # SIGINT as a terminal leaves it to a command it starts: a pytest worker may have it ignored,
    # and an ignored SIGINT is inherited, so Ctrl-C would never reach the server
    proc = subprocess.Popen([sys.executable, "-m", "kiln.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
                            start_new_session=session,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not any("[kiln] ready:" in line for line in lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            reader.join(timeout=30)
            raise AssertionError("kiln serve did not get ready:\n" + "".join(lines)[-3000:])
        time.sleep(0.5)
    return proc, lines, reader


# (what, check): a check returning what is still wrong, run when the test process is done
# (conftest's late_checks); a test puts here what only a long wait would settle, so that the
# others run meanwhile
LATE_CHECKS: list = []


# What TensorFlow prints while it loads on AVX-512 CPUs; TF_ENABLE_ONEDNN_OPTS=1 forces it on any
# x86-64 machine, so the tests that check Kiln's output is its own force it (machines differ).
TF_NOTICES = ("oneDNN custom operations are on", "absl::InitializeLog()")
NOISY_TF = {"TF_ENABLE_ONEDNN_OPTS": "1"}


def assert_no_tf_notices(text: str) -> None:
    noise = [line for line in text.splitlines() if any(n in line for n in TF_NOTICES)]
    assert not noise, noise[:4]


def ray_processes() -> dict[str, str]:
    """Running Ray processes (and Serve's HAProxy), pid -> command line. Compare pids: an actor's
    title changes with the task it runs (``ray::ServeController.listen_for_change``)."""
    out = subprocess.run(["pgrep", "-af", "raylet|gcs_server|ray::|haproxy"], capture_output=True, text=True)
    # a <defunct> entry is a process that has exited and waits for its parent to reap it
    return {line.split()[0]: line for line in out.stdout.splitlines()
            if "pgrep" not in line and "<defunct>" not in line}


def haproxy_folders(command_lines) -> set[Path]:
    """The folders of the HAProxy processes among ``command_lines`` (Serve runs it as
    ``haproxy ... -f FOLDER/<node id>/haproxy.cfg``), and the per-node folder under Ray's default
    path for any of its files left unset (/tmp/haproxy-serve/<node id>): what a stopped server
    must not leave behind."""
    import re

    found = [m.groups() for line in command_lines
             for m in [re.search(r" -f (\S+)/([0-9a-f]+)/haproxy\.cfg", line)] if m]
    return {Path(folder) for folder, _ in found} | {Path("/tmp/haproxy-serve", node) for _, node in found}


def server_processes(proc: subprocess.Popen) -> dict[str, str]:
    """The Ray processes (and HAProxy) a running `kiln serve` started, pid -> command line: its
    descendants, so that another test's Ray running beside it (the suite runs Ray tests in two
    processes) is never taken for the server's."""
    import psutil

    try:
        mine = {str(p.pid) for p in psutil.Process(proc.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return {}
    return {pid: line for pid, line in ray_processes().items() if pid in mine}


def shared_listeners(mine) -> dict[int, set[int]]:
    """The TCP ports that processes ``mine`` (pids) listen on where a process outside them listens
    too (SO_REUSEPORT lets several bind one port; the kernel then shares its connections out
    among them): port -> the other pids. Two servers on one machine must share none."""
    import psutil

    mine = {int(p) for p in mine}
    listeners: dict[int, set[int]] = {}
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid:
            listeners.setdefault(c.laddr.port, set()).add(c.pid)
    return {port: pids - mine for port, pids in listeners.items() if pids & mine and pids - mine}


def kill_ray_under(folder) -> None:
    """Stop a Ray started with ``--temp-dir=folder`` as `kiln cluster down` stops a head; a test's
    Ray gets no grace (`ray stop` would stop every Ray on the machine, a neighbouring test's too)."""
    from kiln.cluster.jobs import stop_ray_under

    stop_ray_under(folder, grace_s=0)


def stop_server_and_check(proc: subprocess.Popen, lines: list[str], reader, stop: str,
                          mine: dict[str, str] | None = None, group: bool = False) -> None:
    """Send ``stop`` (SIGINT: Ctrl-C; SIGTERM: what systemd, Docker and Kubernetes send) to a
    running `kiln serve` whose output ``reader`` (a thread) appends to ``lines``, and check it
    stops as a user expects: its exit status, one closing line, no stack dump, no TensorFlow
    notice from any of its processes, none of the Ray processes it started left behind, and no
    folder of its HAProxy's left in /tmp. ``mine``: the caller sent the signal already, and took
    ``server_processes`` before it. ``group``: the signal goes to the server's whole process
    group (started with ``session``), as Ctrl-C in a terminal and systemd's default KillMode
    send it: Ray's GCS and raylet get it too."""
    import signal

    sent = mine is not None
    mine = mine if sent else server_processes(proc)
    folders = haproxy_folders(mine.values())
    assert folders, "no HAProxy of this server found"
    if not sent and group:
        os.killpg(proc.pid, getattr(signal, stop))
    elif not sent:
        proc.send_signal(getattr(signal, stop))
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)  # kiln serve prints every thread's stack (faulthandler)
        time.sleep(3)
        proc.kill()
        reader.join(timeout=30)
        raise AssertionError("kiln serve did not stop within 120 s; where its threads were:\n"
                             + "".join(lines)[-8000:]) from None
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)  # the reader owns the output: it ends at the last line
    text = "".join(lines)
    assert proc.returncode == (130 if stop == "SIGINT" else 0) and "[kiln] server stopped" in text, text[-2000:]
    assert "SIGTERM received" not in text and "Traceback" not in text, text[-2000:]
    # Serve's shutdown call was reported as a failed task ("Task ServeController.graceful_shutdown
    # failed ... killed by `ray.kill`") on every stop: a clean stop reports nothing failed
    assert not [line for line in lines if "failed" in line and "ServeController" in line], text[-2000:]
    assert_no_tf_notices(text)  # the replicas load TensorFlow quietly too
    deadline = time.time() + 30
    while set(mine) & set(ray_processes()) and time.time() < deadline:
        time.sleep(0.5)
    left = [line for pid, line in ray_processes().items() if pid in mine]
    assert not left, left
    assert not [f for f in folders if f.exists()], folders


# one blank MNIST-sized picture: a valid classify request for any model of the session's cnn
IMAGE = {"images": np.zeros((28, 28, 1)).tolist()}


def store_copy(store, version: int, broken: bool = False, name: str = "cnn") -> None:
    """cnn:1 stored again as ``name:version`` (as a save does: a hidden folder, renamed);
    ``broken``: its weights file is a valid HDF5 file holding no weights, which passes the
    server's cheap check and fails only when the model loads."""
    (store / name).mkdir(exist_ok=True)
    tmp = store / name / f".incoming-{version}"
    shutil.copytree(store / "cnn" / "1", tmp)
    manifest = json.loads((tmp / "manifest.json").read_text())
    (tmp / "manifest.json").write_text(json.dumps({**manifest, "name": name, "version": version}))
    if broken:
        import h5py

        (tmp / "model.weights.h5").unlink()
        h5py.File(tmp / "model.weights.h5", "w").close()
    tmp.rename(store / name / str(version))


# The session's models: the smallest runs of the real plugins on real data that still give a
# model a test can tell apart from noise (the cnn classifies MNIST digits, the photos model reads
# the hymenoptera JPEGs), one epoch each. Quality is measured in bench/quality.py, not here.
TRAINED = {"cnn": dict(limit=2000),
           "autoencoder": dict(limit=1024),
           "lstm": dict(limit=300, overrides={"units": "32"}),
           "gpt": dict(limit=300, overrides={"layers": "2", "width": "32", "heads": "2"}),
           "cgan": dict(limit=1280, overrides={"sample_every": "0"}),
           "vae": dict(limit=1024),
           "diffusion": dict(limit=256, overrides={"width": "8", "blocks": "1"}),
           # trained in mixed precision: served, it must answer float32 as the others do
           "photos": dict(plugin="cnn", dataset=str(HYMENOPTERA), overrides={"image_size": "32"},
                          precision="mixed_bfloat16")}


def trained_model(source: Path, name: str) -> None:
    """Train the session's model ``name`` into the store ``source`` unless it is there: once per
    run, by the first test process that asks (the other waits for that one model, and trains
    another meanwhile if it needs one), so that no process idles while models it never reads
    are trained."""
    from filelock import FileLock

    from kiln import registry, run

    root = Path(source).parent
    kw = dict(TRAINED[name])
    plugin = kw.pop("plugin", name)
    if registry.get(plugin).judged_by:  # judged as it is stored: its judge first
        trained_model(source, "cnn")
    with FileLock(root / f"{name}.lock"):
        if not (root / f"{name}.complete").is_file():
            run.train(run.plan(plugin, name=name, epochs=1, store=source, runs_dir=root / "runs", **kw))
            (root / f"{name}.complete").touch()


def copy_models(source, store, *names: str) -> Path:
    """The folders of models ``names`` (every version) copied from the store ``source`` (the
    session's ``trained`` store, which trains each on first use) into ``store``: a module gets
    models it may change, label or break without training its own."""
    store = Path(store)
    for name in names:
        trained_model(Path(source), name)
        shutil.copytree(Path(source) / name, store / name)
    return store


def copy_version(store, src: str, name: str) -> str:
    """Store a new version of ``name`` holding ``src``'s files (what a second training run would
    store, without the minutes)."""
    from kiln.store import Store

    s = Store(store)
    old = s.get(src)

    def write(tmp):
        for p in old.path.iterdir():
            if p.is_dir():
                shutil.copytree(p, tmp / p.name)
            elif p.name != "manifest.json":
                shutil.copy(p, tmp / p.name)
        return {k: v for k, v in old.manifest.items() if k not in ("name", "version", "created")}
    return s.save(name, write).ref


def write_folder(root, classes=("cats", "dogs"), n=6, broken: str | None = None):
    """Real picture files: per class, RGB JPEGs and grayscale PNGs of different sizes in that
    class's colour (cats red, dogs blue), plus ``broken`` (a file named like a JPEG that is not
    one) and a text file that is no picture."""
    from PIL import Image

    colours = {"cats": (220, 30, 30), "dogs": (30, 30, 220), "owls": (30, 200, 30)}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            size = (40 + 7 * i, 30 + 5 * i)
            if i % 3 == 2:  # grayscale PNG
                Image.new("L", size, 60 if c == "cats" else 200).save(root / c / f"{i}.png")
            else:
                Image.new("RGB", size, colours[c]).save(root / c / f"{i}.jpg", quality=95)
        (root / c / "notes.txt").write_text("not a picture")
    if broken:
        (root / broken).write_bytes(b"\xff\xd8\xff\xe0 this is no JPEG")
    return root


class Load:
    """Clients sending classify requests in a loop, bounded in count and time; every answer that
    is not 200 is kept."""

    def __init__(self, base: str, models: list[str], clients: int = 4, seconds: float = 240) -> None:
        self.base, self.models, self.seconds = base, models, seconds
        self.ok, self.failed = 0, []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(k,), daemon=True) for k in range(clients)]

    def run(self, k: int) -> None:
        session = requests.Session()
        deadline = time.time() + self.seconds
        for i in range(100_000):
            if self.stop.is_set() or time.time() > deadline:
                return
            model = self.models[(i + k) % len(self.models)]
            try:
                r = session.post(f"{self.base}/models/{model}/classify", json=IMAGE, timeout=30)
                if r.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append((model, r.status_code, r.text[:200]))
            except requests.RequestException as e:
                self.failed.append((model, "exception", str(e)[:200]))
            time.sleep(0.02)

    def __enter__(self) -> "Load":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def models(base: str) -> dict[str, dict]:
    return {m["ref"]: m for m in requests.get(f"{base}/models", timeout=30).json()["models"]}


def replicas(server: subprocess.Popen, deployment: str) -> list[int]:
    """The process ids of the replicas of a deployment of ``server`` (a running `kiln serve`):
    Serve names them ray::ServeReplica:APP:DEPLOYMENT; another server's are not its."""
    found = subprocess.run(["pgrep", "-f", f"ServeReplica:kiln:{deployment}"], capture_output=True, text=True)
    mine = server_processes(server)
    return sorted(int(p) for p in found.stdout.split() if p in mine)


def wait_for(check, seconds: float = 120) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def weights(path):
    with np.load(path) as f:
        return [f[k] for k in sorted(f.files, key=lambda k: int(k.split("_")[1]))]


def assert_same_weights(probe, epoch, prefix=""):
    a, b = weights(probe / f"{prefix}rank0-epoch{epoch}.npz"), weights(probe / f"{prefix}rank1-epoch{epoch}.npz")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
