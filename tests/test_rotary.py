"""Partial rotary embedding vs a numpy pairwise-rotation reference (HF Phi convention)."""

import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.rotary import apply_rotary, rotary_dim_for


def _numpy_rotary(x, positions, rotary_dim, theta):
    """Rotates dim i with dim i + rotary_dim/2 by angle pos * theta^(-2i/rotary_dim)."""
    out = np.array(x, np.float64)
    half = rotary_dim // 2
    b, l, h, _ = x.shape
    for bi in range(b):
        for li in range(l):
            for i in range(half):
                ang = positions[bi, li] * theta ** (-2.0 * i / rotary_dim)
                c, s = np.cos(ang), np.sin(ang)
                a, bb = x[bi, li, :, i], x[bi, li, :, i + half]
                out[bi, li, :, i] = a * c - bb * s
                out[bi, li, :, i + half] = bb * c + a * s
    return out


def test_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    positions = np.array([[0, 1, 2, 3, 4], [0, 0, 7, 8, 300]])
    rd = rotary_dim_for(8, 0.5)
    assert rd == 4
    got = np.asarray(apply_rotary(x, positions, rotary_dim=rd, theta=1e4))
    np.testing.assert_allclose(got, _numpy_rotary(x, positions, rd, 1e4), atol=2e-5)
    np.testing.assert_array_equal(got[..., 4:], x[..., 4:])  # pass-through half untouched


def test_relative_positions():
    """q·k of rotated vectors depends only on the position difference."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 1, 1, 16)).astype(np.float32)
    k = rng.standard_normal((1, 1, 1, 16)).astype(np.float32)

    def dot(pq, pk):
        rq = np.asarray(apply_rotary(q, np.array([[pq]]), rotary_dim=16, theta=100.0))
        rk = np.asarray(apply_rotary(k, np.array([[pk]]), rotary_dim=16, theta=100.0))
        return float((rq * rk).sum())

    assert dot(5, 2) == pytest.approx(dot(13, 10), rel=1e-4, abs=1e-4)
    assert abs(dot(5, 2) - dot(5, 4)) > 1e-3


def test_zero_dim_and_bad_fraction():
    x = np.ones((1, 2, 1, 4), np.float32)
    np.testing.assert_array_equal(np.asarray(apply_rotary(x, np.array([[3, 4]]), rotary_dim=0)), x)
    with pytest.raises(UserError, match="rotary"):
        rotary_dim_for(6, 0.5)  # 3 is odd
