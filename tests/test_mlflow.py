"""MLflow tracking against a real `mlflow server` (SQLite backend, local artifact folder) on a
loopback port, read back through MlflowClient as a user's notebook would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from helpers import TEST_PLUGINS, kiln_here, run_kiln, stop_process
from kiln.net import free_port

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = (root / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        # without its job runner: a dozen huey consumer processes polling, which Kiln never uses
        env={**os.environ, "MLFLOW_TRACKING_URI": "", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not start in 120 s:\n" + (root / "server.log").read_text()[-3000:])
        yield url
    finally:
        stop_process(proc)
        log.close()


def client(url: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url)


def runs_named(url: str, experiment: str) -> dict[str, object]:
    c = client(url)
    exp = c.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    return {r.info.run_name: r for r in c.search_runs([exp.experiment_id])}


def artifacts(url: str, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client(url).list_artifacts(run_id, path):
        out |= artifacts(url, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_a_run_logs_params_metrics_pictures_and_its_stored_version(workdir, mlflow_server):
    """MLFLOW_TRACKING_URI alone turns it on, as for any MLflow-aware tool."""
    out = kiln_here("train", "cnn", "--limit", "2000", "--epochs", "2", "--run", "tracked", "--set", "dropout=0.3",
                   cwd=workdir, env={"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "tests-train"})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    run = runs_named(mlflow_server, "tests-train")["tracked"]
    m = json.loads((workdir / "store" / "cnn" / "1" / "manifest.json").read_text())
    assert m["mlflow"] == {"uri": mlflow_server, "run_id": run.info.run_id}
    assert run.info.status == "FINISHED"
    assert run.data.params["dropout"] == "0.3" and run.data.params["plugin"] == "cnn"
    assert run.data.params["epochs"] == "2" and run.data.params["val_fraction"] == "0.1"
    assert run.data.tags["kiln.model"] == "cnn:1"
    # every epoch's metrics, equal to the run's own history
    c = client(mlflow_server)
    for key in ("loss", "val_loss", "val_accuracy"):
        logged = [(h.step, h.value) for h in c.get_metric_history(run.info.run_id, key)]
        assert logged == [(h["epoch"], pytest.approx(h[key])) for h in m["history"]], key
    assert run.data.metrics["test_accuracy"] == pytest.approx(m["metrics"]["accuracy"])
    files = artifacts(mlflow_server, run.info.run_id)
    assert "manifest.json" in files
    assert {f"pictures/{p.name}" for p in (workdir / "store" / "cnn" / "1" / "artifacts").glob("*.png")} <= files


@pytest.mark.ray
def test_a_run_on_ray_train_workers_logs_once_per_epoch_from_rank_0(workdir, mlflow_server, shared_ray):
    out = kiln_here("train", "cnn", "--limit", "512", "--epochs", "2", "--workers", "2", "--run", "two",
                   "--mlflow", mlflow_server, cwd=workdir, env={"MLFLOW_EXPERIMENT_NAME": "tests-workers"})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    run = runs_named(mlflow_server, "tests-workers")["two"]
    assert run.info.status == "FINISHED" and run.data.params["workers"] == "2"
    history = client(mlflow_server).get_metric_history(run.info.run_id, "val_accuracy")
    assert [h.step for h in history] == [1, 2]  # global metrics, logged by rank 0 only
    assert run.data.tags["kiln.model"] == "cnn:1"


def test_pictures_drawn_while_training_reach_mlflow_as_they_are_drawn(workdir, mlflow_server):
    out = kiln_here("train", "dcgan", "--epochs", "2", "--limit", "256", "--set", "sample_every=1",
                   "--run", "gan", "--mlflow", mlflow_server, cwd=workdir, env={"MLFLOW_EXPERIMENT_NAME": "tests-gan"})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    run = runs_named(mlflow_server, "tests-gan")["gan"]
    drawn = sorted(p.name for p in (workdir / "runs" / "gan" / "progress").glob("*.png"))
    assert len(drawn) == 2, drawn
    assert {f"progress/{name}" for name in drawn} <= artifacts(mlflow_server, run.info.run_id)
    steps = [h.step for h in client(mlflow_server).get_metric_history(run.info.run_id, "d_loss")]
    assert steps == [1, 2]


@pytest.mark.ray
def test_a_search_logs_its_trials_as_child_runs_and_registers_the_best(workdir, mlflow_server, shared_ray):
    out = kiln_here("--plugin-path", str(TEST_PLUGINS / "flaky.py"), "tune", "flaky",
                   "--search", "dropout=grid:0.2/0.5", "--limit", "300", "--epochs", "2", "--scheduler", "fifo",
                   "--run", "searched", "--mlflow", mlflow_server, "--register", cwd=workdir,
                   env={"MLFLOW_EXPERIMENT_NAME": "tests-tune"})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = json.loads((workdir / "runs" / "searched" / "search.json").read_text())
    runs = runs_named(mlflow_server, "tests-tune")
    parent = runs["searched"]
    assert parent.data.tags["kiln.model"] == r["version"] == "flaky:1"
    assert parent.data.params["search"] == "dropout=grid:0.2/0.5" and parent.data.params["scheduler"] == "fifo"
    assert parent.data.metrics["best_val_accuracy"] == pytest.approx(r["best"]["value"])
    assert {"trials.csv", "curves.png", "params.png", "search.json"} <= artifacts(mlflow_server, parent.info.run_id)
    children = [runs[t["trial"]] for t in r["trials"]]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert sorted(c.data.params["dropout"] for c in children) == ["0.2", "0.5"]
    assert all(c.info.status == "FINISHED" for c in children)
    best = runs[r["best"]["trial"]]
    assert best.data.tags["kiln.model"] == "flaky:1" and "test_accuracy" in best.data.metrics
    # --register: the best trial's model, under the model's own name
    registered = client(mlflow_server).get_model_version("flaky", "1")
    assert registered.run_id == best.info.run_id and registered.tags["kiln.model"] == "flaky:1"
    for c in children:
        assert [h.step for h in client(mlflow_server).get_metric_history(c.info.run_id, "val_accuracy")] == [1, 2]


def test_an_unreachable_mlflow_is_one_line_before_any_training(workdir):
    port = free_port()  # nothing listens there
    t0 = time.perf_counter()
    out = run_kiln("train", "cnn", "--limit", "500", "--mlflow", f"http://127.0.0.1:{port}", cwd=workdir)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kiln: error: cannot reach an MLflow server at "
                                                   f"http://127.0.0.1:{port}"), lines
    assert "mlflow server" in lines[0] and time.perf_counter() - t0 < 30
    assert not (workdir / "runs").exists()
    bad = run_kiln("train", "cnn", "--mlflow", "ftp://x", cwd=workdir)
    assert bad.returncode == 2 and "bad MLflow tracking URI 'ftp://x'" in bad.stderr


def test_register_alias_load_with_pyfunc_and_serve_from_the_registry(workdir, mlflow_server, tmp_path,
                                                                     monkeypatch):
    """--register puts the stored model in MLflow's registry; `kiln models label --mlflow` moves
    the alias with the Kiln label; mlflow.pyfunc answers what Kiln answers; a store that lacks the
    version imports it from MLflow to serve it."""
    import mlflow
    import numpy as np

    from kiln import data, models
    from kiln.store import Store
    from kiln.tracking import resolve_all

    out = kiln_here("train", "cnn", "--limit", "600", "--epochs", "1", "--run", "reg", "--mlflow", mlflow_server,
                    "--register", "digits", cwd=workdir, env={"MLFLOW_EXPERIMENT_NAME": "tests-register"})
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    assert "registered cnn:1 as MLflow model 'digits' version 1" in out.stderr + out.stdout
    c = client(mlflow_server)
    mv = c.get_model_version("digits", "1")
    run = runs_named(mlflow_server, "tests-register")["reg"]
    assert mv.run_id == run.info.run_id and mv.tags["kiln.model"] == "cnn:1" and run.info.status == "FINISHED"

    out = kiln_here("models", "label", "cnn:1", "champion", "--mlflow", mlflow_server, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert c.get_model_version_by_alias("digits", "champion").version == "1"
    assert Store(workdir / "store").labels("cnn") == {"champion": 1}

    split = data.load("mnist", "test", limit=8)
    x = np.stack([a for a, _ in split.ds.take(8).as_numpy_iterator()]).astype("float32")
    plugin, model, _ = models.load("cnn:1", workdir / "store")
    kiln_probs = np.asarray(plugin.classify(model, x)["probabilities"])
    # as a notebook would; set_tracking_uri also sets MLFLOW_TRACKING_URI for every later test
    # in this process and its children, so both are undone after
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    mlflow.set_tracking_uri(mlflow_server)
    try:
        pyfunc = mlflow.pyfunc.load_model("models:/digits@champion")
    finally:
        mlflow.set_tracking_uri(None)
    assert pyfunc.metadata.get_input_schema().inputs[0].shape == (-1, 28, 28, 1)
    np.testing.assert_allclose(np.asarray(pyfunc.predict(x)), kiln_probs, atol=1e-5)

    # served from the registry: the store it came from serves its own version ...
    assert resolve_all(["models:/digits@champion"], mlflow_server, str(workdir / "store")) == ["cnn:1"]
    # ... and an empty store imports it once, with its weights and record
    elsewhere = tmp_path / "elsewhere"
    assert resolve_all(["models:/digits@champion", "models:/digits/1"], mlflow_server, str(elsewhere)) \
        == ["cnn:1", "cnn:1"]
    imported = Store(elsewhere).get("cnn:1")
    assert imported.manifest["mlflow"]["run_id"] == run.info.run_id
    assert imported.weights.read_bytes() == Store(workdir / "store").get("cnn:1").weights.read_bytes()
    out = kiln_here("serve", "--model", "models:/digits@champion", "--mlflow", mlflow_server,
                    "--build-config", str(tmp_path / "serve.yaml"), "--store", str(elsewhere), cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cnn:1" in (tmp_path / "serve.yaml").read_text()

    out = kiln_here("models", "unlabel", "cnn", "champion", "--mlflow", mlflow_server, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert c.get_registered_model("digits").aliases == {} and Store(workdir / "store").labels("cnn") == {}


def test_registry_mistakes_are_one_line(workdir, mlflow_server):
    cases = [
        (("train", "cnn", "--limit", "100", "--register"), "--register registers the model in MLflow"),
        (("train", "lstm", "--limit", "100", "--register", "--mlflow", mlflow_server), "lstm takes text and runs a loop"),
        (("serve", "--model", "models:/nothing@champion", "--mlflow", mlflow_server, "--build-config", "x.yaml"),
         "models:/nothing@champion: not in the MLflow registry"),
        (("serve", "--model", "models:/nothing@champion", "--build-config", "x.yaml"), "give the server with --mlflow"),
    ]
    for args, expected in cases:
        out = kiln_here(*args, cwd=workdir, env={"MLFLOW_TRACKING_URI": ""})
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and expected in lines[0], (args, out.stderr[-2000:])
    assert not (workdir / "runs").exists() and not (workdir / "x.yaml").exists()
