"""Which version answers a request (serve/routing.py), without Ray: how names parse, what a route
resolves to while versions load or fail, and how a traffic split shares requests."""

from __future__ import annotations

import pytest

from kiln import KilnError
from kiln.serve import routing
from kiln.serve.codecs import ProtocolError
from kiln.store import Ref

SERVED = ["cnn:1", "cnn:2", "cnn:10", "lstm:3"]


@pytest.mark.parametrize("text, ref", [
    ("cnn", Ref("cnn")), ("cnn:3", Ref("cnn", 3)), ("cnn:latest", Ref("cnn")),
    ("cnn@stable", Ref("cnn", label="stable")),
])
def test_a_ref_parses_in_one_place_and_prints_back(text, ref):
    assert Ref.parse(text) == ref
    assert str(ref) == text.replace(":latest", "")


@pytest.mark.parametrize("text, words", [("cnn:0", "versions are integers >= 1"), ("cnn:x", "bad version 'x'"),
                                         ("cnn@latest", "not 'latest'"), ("Bad Name", "bad model name 'Bad Name'")])
def test_a_bad_ref_says_what_is_wrong(text, words):
    with pytest.raises(KilnError, match=words):
        Ref.parse(text)


def test_versions_sort_by_number_not_text():
    assert routing.versions(SERVED, "cnn") == ["cnn:1", "cnn:2", "cnn:10"]
    assert routing.versions(SERVED, "vae") == []


def test_an_unversioned_route_gets_the_newest_ready_version():
    refs = routing.versions(SERVED, "cnn")
    loading = {"cnn:1": "HEALTHY", "cnn:2": "HEALTHY", "cnn:10": "UPDATING"}
    assert routing.resolve("cnn", None, refs, SERVED, {}, loading) == "cnn:2"
    assert routing.resolve("cnn", None, refs, SERVED, {}, {**loading, "cnn:10": "HEALTHY"}) == "cnn:10"
    assert routing.resolve("cnn", "1", refs, SERVED, {}, {}) == "cnn:1"


@pytest.mark.parametrize("model, version, failed, status, words", [
    ("vae", None, {}, 404, "model 'vae' is not served; served models: cnn, lstm"),
    ("cnn", "7", {}, 404, "has no served version '7'; served versions: 1, 2, 10"),
    ("cnn", "abc", {}, 404, "has no served version 'abc'"),
    ("cnn", "3", {"cnn:3": "its weights file does not open"}, 503, "cnn:3 cannot be served: its weights"),
])
def test_a_route_nothing_answers_says_what_is_served(model, version, failed, status, words):
    with pytest.raises(ProtocolError) as e:
        routing.resolve(model, version, routing.versions(SERVED, model), SERVED, failed, {})
    assert e.value.status == status and words in e.value.message


def test_a_label_names_its_version_or_says_why_not():
    refs = routing.versions(SERVED, "cnn")
    assert routing.by_label("cnn", None, "stable", {"stable": 2}, refs) == "2"
    assert routing.by_label("cnn", "2", "stable", {"stable": 2}, refs) == "2"
    cases = [(None, "canary", {"stable": 2}, 404, "no label 'canary' on this server; labels: stable (cnn:2)"),
             ("1", "stable", {"stable": 2}, 400, "label 'stable' names version 2, not 1"),
             (None, "old", {"old": 5}, 404, "names cnn:5, which this server does not serve; served versions: 1, 2, 10")]
    for version, label, labels, status, words in cases:
        with pytest.raises(ProtocolError) as e:
            routing.by_label("cnn", version, label, labels, refs)
        assert e.value.status == status and words in e.value.message


def test_a_split_shares_requests_exactly_by_weight_interleaved():
    split = [("cnn:1", "cnn:1", 9), ("cnn:2", "cnn:2", 1)]
    turns: dict[str, int] = {}
    picks = [routing.pick(split, turns) for _ in range(20)]
    assert picks.count("cnn:1") == 18 and picks.count("cnn:2") == 2
    assert picks[:10].count("cnn:2") == 1  # one in every ten, not two in a row
    assert routing.pick([("cnn:1", None, 1)], {}) is None


def test_a_moved_label_answers_with_the_version_before_until_the_new_one_is_ready():
    rows = [("cnn@canary", "cnn:10", 1, "cnn:2"), ("cnn:1", "cnn:1", 3, None)]
    loading = {"cnn:1": "HEALTHY", "cnn:2": "HEALTHY", "cnn:10": "UPDATING"}
    assert routing.split_now(rows, loading) == [("cnn@canary", "cnn:2", 1), ("cnn:1", "cnn:1", 3)]
    ready = {**loading, "cnn:10": "HEALTHY"}
    assert routing.split_now(rows, ready)[0] == ("cnn@canary", "cnn:10", 1)
    gone = {"cnn:1": "HEALTHY"}
    assert routing.split_now(rows, gone)[0] == ("cnn@canary", None, 1)
