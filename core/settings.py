"""Kiln's settings from the environment: every ``KILN_*`` variable is read here, nowhere else."""

from __future__ import annotations

import os

VERBOSE = "KILN_VERBOSE"


def verbose() -> bool:
    """``KILN_VERBOSE=1`` (``kiln --verbose`` sets it): show TensorFlow's and Ray's start-up notices."""
    return os.environ.get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no")
