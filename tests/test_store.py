"""The model store: integer versions, atomic writes, clear errors for missing or corrupt entries."""

import json

import pytest

from kiln import KilnError
from kiln.store import Store, parse_ref


def write_ok(tmp):
    (tmp / "model.weights.h5").write_bytes(b"w")
    return {"plugin": "cnn", "config": {}}


def test_versions_increment_and_latest(tmp_path):
    s = Store(tmp_path)
    assert [s.save("m", write_ok).version for _ in range(3)] == [1, 2, 3]
    assert s.get("m").version == 3 and s.get("m:2").version == 2
    assert s.get("m:1").manifest["name"] == "m"


def test_crash_mid_save_leaves_no_half_version(tmp_path):
    s = Store(tmp_path)
    s.save("m", write_ok)

    def crash(tmp):
        (tmp / "model.weights.h5").write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        s.save("m", crash)
    assert s.versions("m") == [1]
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1"]


def test_missing_and_bad_refs(tmp_path):
    s = Store(tmp_path)
    with pytest.raises(KilnError, match="no model 'nope'"):
        s.get("nope")
    s.save("m", write_ok)
    with pytest.raises(KilnError, match="no version 7"):
        s.get("m:7")
    with pytest.raises(KilnError, match="bad version"):
        parse_ref("m:x")
    with pytest.raises(KilnError, match="bad model name"):
        parse_ref("../etc")


def test_corrupt_manifest(tmp_path):
    s = Store(tmp_path)
    v = s.save("m", write_ok)
    (v.path / "manifest.json").write_text("{not json")
    with pytest.raises(KilnError, match="corrupt manifest"):
        s.get("m")
    (v.path / "manifest.json").write_text(json.dumps({"plugin": "cnn"}))
    with pytest.raises(KilnError, match="config missing"):
        s.get("m:1")


# --------------------------------------------------------------------------- URI stores


def test_a_uri_store_uploads_with_the_manifest_last_and_downloads_once(tmp_path, monkeypatch):
    """file:// goes through the same pyarrow filesystem code as s3:// and gs://."""
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache"))
    remote = tmp_path / "bucket" / "kiln"
    uri = f"file://{remote}"
    s = Store(uri)
    assert s.spec == uri and s.names() == [] and s.versions("m") == []

    def write(tmp):
        (tmp / "model.weights.h5").write_bytes(b"weights")
        (tmp / "artifacts").mkdir()
        (tmp / "artifacts" / "samples.png").write_bytes(b"png")
        return {"plugin": "cnn", "config": {}}

    assert [s.save("m", write).version for _ in range(2)] == [1, 2]
    assert (remote / "m" / "2" / "manifest.json").is_file() and (remote / "m" / "2" / "artifacts" / "samples.png").is_file()
    # another machine (a fresh cache) lists versions reading manifests only, then fetches one whole
    monkeypatch.setenv("KILN_CACHE", str(tmp_path / "cache2"))
    other = Store(uri)
    assert [(v.name, v.version) for v in other.list()] == [("m", 1), ("m", 2)]
    assert not (other.root / "m" / "1" / "model.weights.h5").exists()  # listing downloads no weights
    v1 = other.get("m:1")
    assert v1.weights.read_bytes() == b"weights" and [a.name for a in v1.artifacts()] == ["samples.png"]
    assert other.get("m").version == 2
    # a crashed upload (files without a manifest) is invisible, and the next version skips it
    (remote / "m" / "3").mkdir()
    (remote / "m" / "3" / "model.weights.h5").write_bytes(b"partial")
    assert other.versions("m") == [1, 2]

    def crash(tmp):
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        other.save("m", crash)
    assert other.versions("m") == [1, 2] and other.save("m", write).version == 4
    with pytest.raises(KilnError, match=f"no model 'nope' in store {uri}"):
        other.get("nope")


def test_an_unknown_store_scheme_is_one_clear_error(tmp_path):
    with pytest.raises(KilnError, match="cannot open the store nosuch://bucket"):
        Store("nosuch://bucket/kiln").names()


def _write_versions(root: str, writer: str, n: int, cache: str, start_at: float) -> list[int]:
    import os
    import time

    os.environ["KILN_CACHE"] = cache
    store = Store(root)
    time.sleep(max(0.0, start_at - time.time()))  # both writers start together
    made = []
    for i in range(n):
        def write(tmp, i=i):
            (tmp / "model.weights.h5").write_text(f"{writer}-{i}")
            return {"plugin": "p", "config": {}, "writer": writer, "i": i}
        made.append(store.save("m", write).version)
    return made


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_concurrent_writers_get_distinct_versions(tmp_path, kind):
    """Two processes storing versions of one name at once (two `kiln train` runs ending together):
    every save gets its own number, and each version holds exactly what its writer wrote."""
    import multiprocessing
    import time

    root = str(tmp_path / "store") if kind == "folder" else f"file://{tmp_path}/bucket/kiln"
    n = 12
    ctx = multiprocessing.get_context("spawn")
    start_at = time.time() + 3
    with ctx.Pool(2) as pool:
        results = pool.starmap(_write_versions, [(root, w, n, str(tmp_path / f"cache-{w}"), start_at)
                                                 for w in ("a", "b")])
    numbers = sorted(v for r in results for v in r)
    assert numbers == list(range(1, 2 * n + 1)), results
    reader = Store(root)
    assert reader.versions("m") == numbers
    for v in numbers:
        version = reader.get(f"m:{v}")
        assert version.weights.read_text() == f"{version.manifest['writer']}-{version.manifest['i']}"
    assert {(reader.get(f"m:{v}").manifest["writer"]) for v in numbers} == {"a", "b"}


def _set_labels(root: str, writer: str, n: int, cache: str, start_at: float) -> None:
    import os
    import time

    os.environ["KILN_CACHE"] = cache
    store = Store(root)
    time.sleep(max(0.0, start_at - time.time()))
    for i in range(n):
        store.label(f"m:{1 + i % 2}", f"{writer}{i}")


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_two_processes_labelling_at_once_lose_no_label(tmp_path, kind):
    """Two `kiln models label` at once on one model (a deploy script and a person): labels.json
    is read, changed and written whole, so without a lock one writer's label would vanish."""
    import multiprocessing
    import time

    root = str(tmp_path / "store") if kind == "folder" else f"file://{tmp_path}/bucket/kiln"
    s = Store(root)
    for _ in range(2):
        s.save("m", write_ok)
    n = 15
    start_at = time.time() + 3
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        pool.starmap(_set_labels, [(root, w, n, str(tmp_path / f"cache-{w}"), start_at) for w in ("a", "b")])
    assert Store(root).labels("m") == {f"{w}{i}": 1 + i % 2 for w in "ab" for i in range(n)}


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_labels_name_versions_move_and_go(tmp_path, kind):
    """Like MLflow's aliases (models:/m@stable): a label names one version, moving it is one
    atomic write, and every ref 'name@label' reads the version it names now."""
    root = str(tmp_path / "store") if kind == "folder" else f"file://{tmp_path}/bucket/kiln"
    s = Store(root)
    for _ in range(3):
        s.save("m", write_ok)
    assert s.label("m:2", "stable").version == 2 and s.label("m", "canary").version == 3
    assert s.labels("m") == {"stable": 2, "canary": 3}
    assert s.get("m@stable").version == 2 and parse_ref("m@stable") == ("m", None)
    s.label("m:3", "stable")  # moved
    assert Store(root).get("m@stable").version == 3  # a fresh reader sees the move
    assert s.unlabel("m", "stable") == 3 and s.labels("m") == {"canary": 3}
    with pytest.raises(KilnError, match=r"model 'm' has no label 'stable'.*labels: canary \(m:3\).*kiln models label m:VERSION stable"):
        s.get("m@stable")
    with pytest.raises(KilnError, match="model 'm' has no version 9"):
        s.label("m:9", "stable")
    for bad in ("9lives", "latest", "a b", ""):
        with pytest.raises(KilnError, match="bad label"):
            s.label("m:1", bad)
    with pytest.raises(KilnError, match="no model 'ghost'"):
        s.unlabel("ghost", "stable")
    assert s.versions("m") == [1, 2, 3]  # the labels file is no version
    leftovers = [p.name for p in (tmp_path / ("store" if kind == "folder" else "bucket/kiln") / "m").iterdir()
                 if p.name.startswith(".labels-")]
    assert not leftovers


def test_leftovers_of_interrupted_saves_are_removed_by_the_next_save(tmp_path):
    """A save killed mid-write (Ctrl-C, OOM, a lost machine) left its hidden folder with full
    weights behind, forever. The next save removes those whose writer is gone, never one that
    another writer on this machine is still filling."""
    import os
    import socket
    import subprocess
    import sys
    import time

    s = Store(tmp_path)
    s.save("m", write_ok)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = socket.gethostname()
    gone = tmp_path / "m" / f".tmp-{host}-{dead}-abc"
    alive = tmp_path / "m" / f".tmp-{host}-{os.getpid()}-def"  # a writer still at work
    old = tmp_path / "m" / ".tmp-0123456789abcdef"            # written before writers were named
    for folder in (gone, alive, old):
        folder.mkdir()
        (folder / "model.weights.h5").write_bytes(b"x" * 1000)
    hour_ago = time.time() - 2 * 3600
    os.utime(old, (hour_ago, hour_ago))
    assert s.save("m", write_ok).version == 2
    left = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert left == [alive.name, "1", "2"], left


@pytest.mark.parametrize("kind", ["folder", "uri"])
def test_rm_deletes_a_free_version_and_refuses_a_labelled_or_served_one(tmp_path, kind):
    """`kiln models rm`: a version that a label names or a running server serves stays, with a
    line that says which and how to free it; a free one goes, and the version numbers after it
    keep theirs."""
    import subprocess
    import sys

    root = str(tmp_path / "store") if kind == "folder" else f"file://{tmp_path}/bucket/kiln"
    s = Store(root)
    for _ in range(4):
        s.save("m", write_ok)
    s.label("m:2", "stable")
    with pytest.raises(KilnError, match=r"m:2 has label stable; move or remove it first \(`kiln models unlabel m stable`\)"):
        s.remove("m:2")
    key = s.record_server(["m:3", "other:1"], "http://127.0.0.1:8000", 30)  # this process serves m:3
    with pytest.raises(KilnError, match=r"m:3 is served by `kiln serve` \(pid \d+ on .*http://127.0.0.1:8000\); stop that server"):
        s.remove("m:3")
    for bad, why in (("m", "takes NAME:VERSION"), ("m@stable", "takes NAME:VERSION"), ("m:9", "no version 9")):
        with pytest.raises(KilnError, match=why):
            s.remove(bad)
    assert s.remove("m:1").ref == "m:1"
    assert Store(root).versions("m") == [2, 3, 4] and s.get("m").version == 4
    assert s.save("m", write_ok).version == 5  # numbers are never reused
    # the server stopped: its record goes, and what it served can be deleted
    s.forget_server(key)
    assert s.remove("m:3").ref == "m:3" and s.versions("m") == [2, 4, 5]
    # a record left by a server that died on this machine does not protect anything
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    s.backend.write_record("ghost", {"host": __import__("socket").gethostname(), "pid": dead, "refs": ["m:4"],
                                     "updated": 0, "heartbeat_s": 30})
    assert s.servers() == [] and "ghost" not in s.backend.read_records()
    # another machine's server counts while it refreshes its record, not after three missed beats
    import time

    s.backend.write_record("far", {"host": "elsewhere", "pid": 1, "refs": ["m:4"], "address": "x",
                                   "updated": time.time(), "heartbeat_s": 30})
    with pytest.raises(KilnError, match="m:4 is served"):
        s.remove("m:4")
    s.backend.write_record("far", {"host": "elsewhere", "pid": 1, "refs": ["m:4"], "address": "x",
                                   "updated": time.time() - 200, "heartbeat_s": 30})
    assert s.remove("m:4").ref == "m:4"
    assert s.names() == ["m"]  # the records' folder is no model
