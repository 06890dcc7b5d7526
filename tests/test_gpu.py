"""On a machine with GPUs (deselected elsewhere, tests/conftest.py): training uses them, and four
serving replicas share one within the memory each is given."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.ray]


def test_the_gpu_check_trains_on_gpus_and_four_replicas_share_one():
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--limit", "20000",
                           "--seconds", "5", "--gpu-memory-mb", "1024"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert re.search(r"train cnn, 1 GPU worker: +[\d,]+ images/s", out), out
    assert re.search(r"serve cnn, 4 replicas x 0.25 GPU .*: [\d,]+ images/s", out), out
    used = [int(m) for m in re.findall(r"process \d+: (\d+) MiB", out)]
    # each replica stays near its cap (TensorFlow's own context takes a few hundred MiB beside it)
    assert len(used) >= 4 and max(used) <= 1024 + 600, out
