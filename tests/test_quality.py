"""The Fréchet distance (FID's formula) that judges generated images in a classifier's features."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.quality import frechet_distance


def test_the_frechet_distance_matches_the_textbook_formula():
    """Against the formula as FID's reference code writes it (scipy's sqrtm of the product), on
    correlated features; zero between a set and itself; the squared shift of the means alone for
    a shifted copy."""
    from scipy import linalg

    rng = np.random.default_rng(0)
    a = rng.normal(size=(2000, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(1500, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu = a.mean(0) - b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    textbook = mu @ mu + np.trace(ca + cb - 2 * linalg.sqrtm(ca @ cb).real)
    assert frechet_distance(a, b) == pytest.approx(textbook, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0, 0, 0, -2.0])
    assert frechet_distance(a, a + shift) == pytest.approx(9.0, rel=1e-6)
