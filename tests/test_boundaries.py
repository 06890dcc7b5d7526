"""Layering (docs/design.md, "Layers"): the core and every plugin import without Ray, no Kiln
module imports one of a higher layer, and no import cycle joins Kiln's modules. Imports inside
functions count: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import ROOT

PACKAGES = {"kiln": ROOT / "core", "kiln.plugins": ROOT / "plugins", "kiln.serve": ROOT / "serve",
            "kiln.cluster": ROOT / "cluster"}
# lowest first; a module may import its own layer or lower ones
LAYERS = [
    {"kiln", "kiln.plugin", "kiln.settings", "kiln.spec", "kiln.images", "kiln.values", "kiln.options"},
    {"kiln.logs", "kiln.store", "kiln.registry", "kiln.sensors", "kiln.checkpoint", "kiln.client", "kiln.net",
     "kiln.tracking", "kiln.devices"},
    {"kiln.data", "kiln.models"},
    {"kiln.plugins", "kiln.plugins.*"},
    {"kiln.quality", "kiln.trainer", "kiln.export"},
    {"kiln.cluster", "kiln.cluster.train", "kiln.cluster.tf_backend", "kiln.cluster.predict", "kiln.serve", "kiln.serve.runtime", "kiln.serve.haproxy",
     "kiln.serve.codecs", "kiln.serve.options", "kiln.serve.routing", "kiln.serve.openapi", "kiln.serve.replica",
     "kiln.serve.metrics"},
    {"kiln.run", "kiln.serve.app", "kiln.serve.ingress"},
    {"kiln.cluster.jobs", "kiln.tune", "kiln.serve.server"},
    {"kiln.cli"},
]


def modules() -> dict[str, Path]:
    found = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.glob("*.py"):
            found[pkg if path.stem == "__init__" else f"{pkg}.{path.stem}"] = path
    return found


def layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if module in names or any(n.endswith(".*") and module.startswith(n[:-1]) for n in names):
            return i
    raise AssertionError(f"{module} has no layer in tests/test_boundaries.py and docs/design.md")


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The Kiln modules ``module`` imports anywhere in its file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and not (module.startswith(name + ".") and name in PACKAGES):
                out.add(name)
    return out


def test_no_upward_import_and_no_cycle():
    found = modules()
    graph = {m: imports(m, p, set(found)) for m, p in found.items()}
    upward = [f"{m} (layer {layer(m)}) imports {d} (layer {layer(d)})"
              for m, deps in graph.items() for d in deps if layer(d) > layer(m)]
    assert not upward, upward

    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles


def test_serving_never_imports_training_code():
    """The store is the only contract between training and serving (docs/design.md)."""
    found = modules()
    graph = {m: imports(m, p, set(found)) for m, p in found.items()}
    for m in (m for m in graph if m.startswith("kiln.serve")):
        seen, todo = set(), [m]
        while todo:
            for d in graph[todo.pop()] - seen:
                seen.add(d)
                todo.append(d)
        assert not seen & {"kiln.run", "kiln.trainer", "kiln.cluster.train", "kiln.cluster.jobs"}, (m, sorted(seen))


def test_core_and_plugins_import_without_ray():
    code = (
        "import sys, importlib\n"
        "import kiln, kiln.cli, kiln.data, kiln.registry, kiln.run, kiln.store, kiln.trainer, kiln.models\n"
        "for e in kiln.registry.entries():\n"
        "    assert e.cls is not None, (e.name, e.error)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
        "print('ok', len(kiln.registry.entries()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_cluster_up_does_not_import_ray_serve():
    code = "import sys, kiln.cluster.jobs, kiln.serve.runtime; print('ray.serve' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_importing_kiln_is_light():
    code = "import sys, kiln, kiln.store, kiln.registry; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
