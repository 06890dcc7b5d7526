"""Plugin discovery: built-ins and third-party packages through entry points, broken plugins,
name clashes, and --plugin-path files."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import TEST_PLUGINS, run_kiln


def make_package(root: Path, dist: str, module: str, files: dict[str, str], eps: dict[str, str]) -> Path:
    """Write a minimal installable package with entry points in the kiln.plugins group."""
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / module / "__init__.py").write_text("")
    for name, text in files.items():
        (pkg / module / name).write_text(textwrap.dedent(text))
    ep_lines = "\n".join(f'{k} = "{v}"' for k, v in eps.items())
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "0.0.1"
        [tool.setuptools]
        packages = ["{module}"]
        [project.entry-points."kiln.plugins"]
        """) + ep_lines + "\n")
    return pkg


def pip_install(pkg: Path, target: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                          "--no-build-isolation", "--no-index", "--target", str(target), str(pkg)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def third_party(tmp_path_factory) -> Path:
    """A separately installed package: a CNN subclass plugin and a plugin that fails to import."""
    root = tmp_path_factory.mktemp("thirdparty")
    pkg = make_package(root, "kiln-extra", "kiln_extra", {
        "smallcnn.py": '''
            from kiln.plugins.cnn import CNN
            class SmallCNN(CNN):
                name = "smallcnn"
                description = "A narrower CNN from a third-party package"
                epochs = 1
        ''',
        "broken.py": "import a_module_that_does_not_exist\n",
    }, {"smallcnn": "kiln_extra.smallcnn:SmallCNN", "broken": "kiln_extra.broken:Broken"})
    site = root / "site"
    pip_install(pkg, site)
    return site


def test_builtin_plugins_listed():
    out = run_kiln("plugins")
    assert out.returncode == 0, out.stderr
    line = next(l for l in out.stdout.splitlines() if l.startswith("cnn "))
    assert "mnist" in line and "classify" in line and "convolutional" in line.lower()


def test_plugins_verbose_lists_config_keys():
    out = run_kiln("plugins", "-v")
    assert "dropout: float" in out.stdout and "(default 0.5)" in out.stdout


def test_third_party_package_is_listed_and_broken_one_reported(third_party):
    out = run_kiln("plugins", env={"PYTHONPATH": str(third_party)})
    assert out.returncode == 0, out.stderr
    lines = {l.split()[0]: l for l in out.stdout.splitlines()[1:]}
    assert "smallcnn" in lines and "classify" in lines["smallcnn"]
    assert "BROKEN" in lines["broken"] and "a_module_that_does_not_exist" in lines["broken"]
    assert "cnn" in lines and "BROKEN" not in lines["cnn"]  # one broken plugin harms no other


@pytest.mark.slow
def test_third_party_plugin_trains_without_changing_kiln(third_party, workdir):
    env = {"PYTHONPATH": str(third_party)}
    out = run_kiln("train", "smallcnn", "--set", "filters=8,16", "--limit", "1024", "--epochs", "1",
                   env=env, cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stored smallcnn:1" in out.stdout
    models = run_kiln("models", env=env)
    assert "smallcnn" in models.stdout and "accuracy=" in models.stdout


def test_broken_plugin_fails_clearly_when_used(third_party):
    out = run_kiln("train", "broken", env={"PYTHONPATH": str(third_party)})
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "plugin 'broken' is broken" in out.stderr


def test_two_packages_claiming_one_name(tmp_path, third_party):
    pkg = make_package(tmp_path, "kiln-rival", "kiln_rival",
                       {"other.py": "from kiln.plugins.cnn import CNN\nclass Other(CNN):\n    name = 'smallcnn'\n"},
                       {"smallcnn": "kiln_rival.other:Other"})
    site = tmp_path / "site"
    pip_install(pkg, site)
    env = {"PYTHONPATH": f"{third_party}:{site}"}
    listing = run_kiln("plugins", env=env)
    assert listing.returncode == 0 and "cnn " in listing.stdout  # the others keep working
    out = run_kiln("train", "smallcnn", env=env)
    assert out.returncode == 2
    assert "kiln_extra.smallcnn:SmallCNN" in out.stderr and "kiln_rival.other:Other" in out.stderr


def test_plugin_path_file(tmp_path):
    out = run_kiln("--plugin-path", str(TEST_PLUGINS / "probe.py"), "plugins")
    assert out.returncode == 0 and any(l.startswith("probe ") for l in out.stdout.splitlines())
    clash = tmp_path / "clash.py"
    clash.write_text("from kiln.plugins.cnn import CNN\nclass Again(CNN):\n    name = 'cnn'\n")
    out = run_kiln("--plugin-path", str(clash), "plugins")
    assert out.returncode == 2 and str(clash) in out.stderr and "kiln.plugins.cnn:CNN" in out.stderr
