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
