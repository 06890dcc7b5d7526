"""Layering: the core and every plugin import without Ray (DESIGN.md section 7)."""

import subprocess
import sys


def test_core_and_plugins_import_without_ray():
    code = (
        "import sys, importlib\n"
        "import kiln, kiln.cli, kiln.data, kiln.registry, kiln.run, kiln.store, kiln.trainer\n"
        "for e in kiln.registry.entries():\n"
        "    assert e.cls is not None, (e.name, e.error)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not bad, bad\n"
        "print('ok', len(kiln.registry.entries()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")


def test_importing_kiln_is_light():
    code = "import sys, kiln, kiln.store, kiln.registry; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr
