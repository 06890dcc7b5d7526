"""The README and the pages of docs/ are executed: the plugin example trains, and every
`kiln ...` command they show parses with the real CLI (so the docs cannot drift from the flags)."""

from __future__ import annotations

import re
import shlex

import pytest

from helpers import ROOT, run_kiln

README = (ROOT / "README.md").read_text()
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}


def example(name: str) -> str:
    found = [m.group(1) for text in PAGES.values()
             for m in re.finditer(rf"<!-- example: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)]
    assert len(found) == 1, f"example {name} found {len(found)} times in README.md and docs/"
    return found[0]


def readme_commands() -> list[str]:
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", "".join(PAGES.values()), re.S):
        block = re.sub(r"\\\n\s*", " ", block)  # a command continued on the next line
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("kiln "):
                cmds.append(line)
    return cmds


def test_readme_shows_the_two_main_commands():
    assert "make demo" in README and "make test" in README
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_readme_is_a_door_whose_links_lead_somewhere():
    """The README introduces, installs and tours (the rest is in docs/), and every relative link
    in it and in docs/ names a file that exists."""
    assert len(README.splitlines()) <= 250
    for page, text in PAGES.items():
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
            assert ((ROOT / page).parent / target).exists(), f"{page} links to {target}, which is missing"


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_parses(command):
    from kiln.cli import parser

    parser().parse_args(shlex.split(command)[1:])  # SystemExit (a usage error) fails the test


@pytest.mark.slow
def test_readme_plugin_example_trains_and_infers(workdir):
    path = workdir / "mlp_plugin.py"
    path.write_text(example("mlp_plugin.py"))
    listing = run_kiln("--plugin-path", str(path), "plugins")
    assert listing.returncode == 0 and any(l.startswith("mlp ") for l in listing.stdout.splitlines())
    out = run_kiln("--plugin-path", str(path), "train", "mlp", "--epochs", "2", "--limit", "4096",
                   cwd=workdir)
    assert out.returncode == 0, out.stderr[-3000:]
    import numpy as np

    from kiln import data, models

    plugin, model, version = models.load("mlp", workdir / "store")
    assert version.manifest["metrics"]["accuracy"] > 0.85
    test = data.load("mnist", "test", limit=32)
    images = np.stack([x.numpy() for x, _ in test.ds])
    labels = [int(y) for _, y in test.ds]
    classes = plugin.infer(model, "classify", {"images": images})["classes"]
    assert np.mean(np.array(classes) == labels) > 0.75
