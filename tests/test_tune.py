"""kiln tune: a search on real Ray Tune with real trials on real data (HAR and MNIST, small)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TEST_PLUGINS, kiln_here, run_kiln

SEARCH = ["--search", "learning_rate=loguniform:1e-4:1e-2", "--search", "filters=choice:16,32/32,64"]
# a small HAR: 1500 windows of each split, 3 epochs of a few seconds
SMALL = ["--limit", "600", "--epochs", "3"]


def results(root: Path, name: str) -> dict:
    return json.loads((root / "runs" / name / "search.json").read_text())


def manifest(root: Path, ref: str) -> dict:
    name, version = ref.split(":")
    return json.loads((root / "store" / name / version / "manifest.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["har"], "name what to search: --search KEY="),
    (["har", "--search", "nope=uniform:0:1"], "unknown config key 'nope'; allowed keys: dropout, filters"),
    (["har", "--search", "dropout=normal:0:1"], "unknown distribution 'normal'; use one of: loguniform:LO:HI"),
    (["har", "--search", "kernel_size=uniform:2:8"], "'kernel_size' is int, not float; search it with choice or grid"),
    (["har", "--search", "dropout=randint:0:1"], "'dropout' is float, not int; search it with uniform or loguniform"),
    (["har", "--search", "dropout=uniform:0.5:0.1"], "LO must be below HI, got 0.5 and 0.1"),
    (["har", "--search", "dropout=uniform:0.1:1.5"], "bad value 1.5 for config key 'dropout'"),
    (["har", "--search", "learning_rate=loguniform:0:0.1"], "loguniform needs LO > 0"),
    (["har", "--search", "dropout=uniform:0.1"], "write uniform:LO:HI (floats)"),
    (["har", "--search", "filters=choice:16,32/x"], "bad value 'x' for config key 'filters'"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--search", "dropout=uniform:0.2:0.3"], "searched twice"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--set", "dropout=0.2"], "also fixed by --set"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--metric", "accuracy"],
     "--metric accuracy: a search chooses by validation, never by training or test data"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--val-fraction", "0"], "needs --val-fraction above 0"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--samples", "0"], "--samples must be at least 1, got 0"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--reduction-factor", "1"], "--reduction-factor must be at least 2, got 1"),
    (["--resume", "no-such-search"], "no search 'no-such-search' in"),
    (["har", "--search", "filters=grid:16,32/32,64", "--searcher", "optuna"],
     "--searcher optuna chooses every value itself; search filters=grid:16,32/32,64 with choice: instead"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--searcher", "grid"], "--searcher grid needs a grid: key"),
    (["har", "--search", "dropout=uniform:0.1:0.5", "--scheduler", "pbt", "--workers", "2"],
     "--scheduler pbt hands a trial's checkpoint to another trial's process; it runs trials in-process"),
])
def test_bad_searches_are_one_line_before_any_work(workdir, args, message):
    # kiln's main in this process; a fresh `kiln tune` process with a bad search: test_cli_errors
    t0 = time.perf_counter()
    out = kiln_here("tune", *args, cwd=workdir)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kiln: error: ") and message in lines[0], lines
    assert time.perf_counter() - t0 < 30
    assert not (workdir / "runs").exists()  # nothing started


@pytest.mark.slow
def test_an_unknown_metric_is_one_line_naming_the_metrics_there_are(workdir):
    out = run_kiln("tune", "har", *SEARCH, *SMALL, "--metric", "val_f1", "--run", "s", cwd=workdir)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert "--metric val_f1: har reports no such metric; its validation metrics: val_accuracy, val_loss" in lines[0]
    assert "trial" not in out.stdout  # no trial started
    assert not list((workdir / "runs").glob("*/trials/*"))


@pytest.mark.slow
@pytest.mark.ray
def test_asha_stops_poor_trials_and_the_best_trial_is_stored_with_its_search(workdir, shared_ray):
    """6 sampled configs, one at a time (so ASHA's decisions do not depend on timing): trials
    that fall behind at a rung stop early; the best by validation accuracy is stored, and its
    manifest records the search and its test metrics."""
    out = kiln_here("tune", "har", *SEARCH, *SMALL, "--samples", "6", "--max-concurrent", "1",
                    "--run", "search", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = results(workdir, "search")
    assert len(r["trials"]) == 6 and r["scheduler"] == "asha" and r["metric"] == "val_accuracy"
    statuses = [t["status"] for t in r["trials"]]
    assert "stopped by ASHA" in statuses and "finished" in statuses, statuses
    assert r["epochs_run"] < r["epochs_budget"] == 18
    assert r["epochs_run"] == sum(t["epochs"] for t in r["trials"])
    best = max(r["trials"], key=lambda t: t["best"])
    assert r["best"]["trial"] == best["trial"] and r["best"]["value"] == best["best"]
    # every sampled config lies in the space asked for
    for t in r["trials"]:
        assert 1e-4 <= t["config"]["learning_rate"] <= 1e-2 and t["config"]["filters"] in ([16, 32], [32, 64])
    # the printed table: a row per trial, best first
    rows = [line for line in out.stdout.splitlines() if line.split(" ")[0] in {t["trial"] for t in r["trials"]}]
    assert len(rows) == 6 and rows[0].startswith(best["trial"]), out.stdout[-3000:]
    with (workdir / "runs" / "search" / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert {row["trial"] for row in table} == {t["trial"] for t in r["trials"]}
    assert {row["status"] for row in table} == set(statuses)
    for picture in ("curves.png", "params.png"):
        assert (workdir / "runs" / "search" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the stored model: the best trial's config and best epoch, the search, test metrics once
    m = manifest(workdir, r["version"])
    assert r["version"] == "har:1" and m["run"] == best["trial"]
    assert m["train"]["overrides"]["learning_rate"] == best["config"]["learning_rate"]
    assert m["search"]["best"] == r["best"] and m["search"]["space"] == [
        "learning_rate=loguniform:0.0001:0.01", "filters=choice:16,32/32,64"]
    assert len(m["search"]["trials"]) == 6
    assert m["early_stop"]["epoch"] == best["best_epoch"] and m["early_stop"]["value"] == best["best"]
    assert 0 < m["metrics"]["accuracy"] <= 1
    assert {"curves.png", "params.png"} <= {p.name for p in (workdir / "store" / "har" / "1" / "artifacts").iterdir()}
    # every trial is a Kiln run with its own TensorBoard files
    for t in r["trials"]:
        assert list((workdir / "runs" / "search" / "trials" / t["trial"] / "tensorboard").rglob("events.*"))
    listing = kiln_here("runs", cwd=workdir)
    row = next(line for line in listing.stdout.splitlines() if line.startswith("search "))
    assert "search, 6 trials" in row and f"val_accuracy={r['best']['value']:.4f}" in row and "har:1" in row


@pytest.mark.slow
@pytest.mark.ray
def test_trials_train_on_ray_train_workers(workdir, shared_ray, capfd):
    out = kiln_here("tune", "har", "--search", "dropout=grid:0.3", "--workers", "2", "--batch-size", "64",
                    "--limit", "600", "--epochs", "2", "--scheduler", "fifo", "--run", "w", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = results(workdir, "w")
    assert [t["config"]["dropout"] for t in r["trials"]] == [0.3]  # one trial: searches are tested above
    for t in r["trials"]:
        assert t["status"] == "finished" and t["epochs"] == 2, t
        # Tune saw both epochs' validation accuracy, reported by the Ray Train workers
        reported = (workdir / "runs" / "w" / "tune" / t["trial"] / "result.json").read_text().splitlines()
        assert [(json.loads(x)["epoch"], "val_accuracy" in json.loads(x)) for x in reported] == [(1, True), (2, True)]
    # the trial ran a 2-worker Ray Train run (its workers' lines may reach this process after the
    # command returns)
    assert (out.stdout + capfd.readouterr().out).count("worker 1/2") == 1
    assert manifest(workdir, r["version"])["train"]["workers"] == 2


@pytest.mark.slow
@pytest.mark.ray
def test_a_failed_trial_does_not_fail_the_search(workdir, shared_ray):
    out = kiln_here("--plugin-path", str(TEST_PLUGINS / "flaky.py"), "tune", "flaky",
                    "--search", "explode=grid:true/false", "--limit", "300", "--epochs", "2",
                    "--scheduler", "fifo", "--run", "f", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = results(workdir, "f")
    by = {t["config"]["explode"]: t for t in r["trials"]}
    assert by[True]["status"].startswith("failed: ") and "this trial exploded on purpose" in by[True]["status"]
    assert by[False]["status"] == "finished" and r["best"]["trial"] == by[False]["trial"]
    assert manifest(workdir, r["version"])["train"]["overrides"]["explode"] is False


@pytest.mark.slow
@pytest.mark.ray
def test_an_interrupted_search_resumes_where_its_trials_stopped(workdir, shared_ray, capfd):
    """Optuna's TPE chooses each trial's config from the results so far: a resumed search restores
    its state with Tune's, so it asks for no trial beyond the two it was given."""
    # every epoch lasts at least a second (nap), so the search is still running when Ctrl-C comes
    cmd = [sys.executable, "-m", "kiln.cli", "--plugin-path", str(TEST_PLUGINS / "flaky.py"), "tune", "flaky",
           "--search", "learning_rate=loguniform:0.001:0.003", "--searcher", "optuna", "--samples", "2",
           "--set", "nap=1", "--limit", "300", "--epochs", "4", "--scheduler", "fifo", "--run", "r"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if list((workdir / "runs" / "r" / "trials").glob("*/checkpoint_00002")):
                break
            time.sleep(0.5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2, err[-3000:]
    assert "continue it with `kiln tune --resume r`" in err.strip().splitlines()[-1], err[-3000:]
    assert not (workdir / "runs" / "r" / "search.json").exists()
    out = kiln_here("--plugin-path", str(TEST_PLUGINS / "flaky.py"), "tune", "--resume", "r", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = results(workdir, "r")
    assert [t["status"] for t in r["trials"]] == ["finished", "finished"] and r["epochs_run"] == 8
    assert r["searcher"] == "optuna" and all(0.001 <= t["config"]["learning_rate"] <= 0.003 for t in r["trials"])
    # at least the trial that had a checkpoint went on from it instead of starting again
    assert "resuming from checkpoint at epoch" in out.stdout + capfd.readouterr().out
    again = kiln_here("tune", "--resume", "r", cwd=workdir)
    assert again.returncode == 2 and "already finished; its best model is flaky:1" in again.stderr


@pytest.mark.slow
@pytest.mark.ray
def test_population_based_training_continues_poor_trials_from_good_ones(workdir, shared_ray):
    """PBT: every trial runs to the end; at each perturbation a trial in the bottom quarter takes
    a top trial's checkpoint (weights, optimizer and its history) and a perturbed config."""
    out = kiln_here("tune", "har", "--search", "learning_rate=loguniform:1e-4:1e-2", "--search",
                    "dropout=uniform:0.1:0.6", "--scheduler", "pbt", "--perturbation-epochs", "1",
                    "--samples", "4", *SMALL, "--run", "pbt", cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:] + out.stdout[-3000:]
    r = results(workdir, "pbt")
    assert r["scheduler"] == "pbt" and [t["status"] for t in r["trials"]] == ["finished"] * 4
    exploits = [line for line in out.stdout.splitlines() if "continues from trial" in line]
    assert exploits, out.stdout[-3000:]
    assert all("'s checkpoint at epoch" in line and "with a perturbed config" in line for line in exploits)
    ids = {t["trial"] for t in r["trials"]}
    assert all(line.split("continues from trial ")[1].split("'")[0] in ids for line in exploits), exploits


def test_trials_at_a_time_are_bounded_by_what_each_reserves():
    """--max-concurrent N is what each trial reserves, a share of the cluster that lets N fit,
    never Tune's searcher limit (which left a search waiting 600 s for a trial it never handed
    out, with nothing running)."""
    from kiln.tune import _limited

    cluster = {"CPU": 2.0, "GPU": 0.0, "memory": 8e9}
    assert _limited({"cpu": 1.0, "gpu": 0.0}, 1, cluster) == {"cpu": 2.0, "gpu": 0.0}
    assert _limited({"cpu": 1.0, "gpu": 0.0}, 2, cluster) == {"cpu": 1.0, "gpu": 0.0}
    three = _limited({"cpu": 0.5}, 3, cluster)["cpu"]
    assert 3 * three <= 2.0 < 4 * three  # three fit, a fourth does not
    # a trial that drives Ray Train workers reserves no CPU: a share of memory bounds it
    assert _limited({"cpu": 0, "memory": 1}, 2, cluster) == {"cpu": 0, "memory": 4e9}
