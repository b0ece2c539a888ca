"""Training-time masking: exact counts, the count distribution implied by the schedule,
uniform positions, and the independent process."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.diffusion.masking import mask_exact_count, mask_image_codes, mask_independent

MASK_ID = 99


def count_probabilities(n):
    """P(k) for k = max(1, round(N cos(pi u / 2))), u ~ U(0,1), from the inverse
    u = (2/pi) arccos(m): k owns m in [(k-1/2)/N, (k+1/2)/N), k = 1 also owns [0, 1/(2N))."""
    k = np.arange(1, n + 1)
    lo = np.clip((k - 0.5) / n, 0, 1)
    hi = np.clip((k + 0.5) / n, 0, 1)
    lo[0], hi[-1] = 0.0, 1.0
    u = lambda m: (2 / np.pi) * np.arccos(m)
    return u(lo) - u(hi)


def test_exact_count_structure_and_distribution():
    b, n = 20000, 8
    codes = jnp.asarray(np.random.default_rng(0).integers(0, 16, size=(b, n)), jnp.int32)
    fn = jax.jit(functools.partial(mask_exact_count, mask_id=MASK_ID, schedule="cosine"))
    out, masked, ratio = fn(jax.random.PRNGKey(0), codes)
    out, masked, ratio = map(np.asarray, (out, masked, ratio))
    counts = masked.sum(-1)
    assert counts.min() >= 1 and counts.max() <= n
    np.testing.assert_allclose(ratio, counts / n)  # realised fraction
    np.testing.assert_array_equal(out, np.where(masked, MASK_ID, np.asarray(codes)))
    freq = np.bincount(counts, minlength=n + 1)[1:] / b
    p = count_probabilities(n)
    assert np.abs(freq - p).max() < 0.015, (freq, p)
    # positions uniform: every place masked with the same frequency E[k]/N
    per_pos = masked.mean(0)
    np.testing.assert_allclose(per_pos, (p * np.arange(1, n + 1)).sum() / n, atol=0.015)


def test_exact_count_linear_schedule_counts():
    b, n = 20000, 5
    codes = jnp.zeros((b, n), jnp.int32)
    _, masked, _ = mask_exact_count(jax.random.PRNGKey(1), codes, mask_id=MASK_ID,
                                    schedule="linear")
    freq = np.bincount(np.asarray(masked).sum(-1), minlength=n + 1)[1:] / b
    # m = 1 - u uniform: k = max(1, round(5 m)) -> P = [0.3, 0.2, 0.2, 0.2, 0.1]
    np.testing.assert_allclose(freq, [0.3, 0.2, 0.2, 0.2, 0.1], atol=0.015)


def test_independent_masking_rate():
    b, n = 4000, 64
    codes = jnp.zeros((b, n), jnp.int32)
    out, masked, m = jax.jit(functools.partial(mask_independent, mask_id=MASK_ID))(
        jax.random.PRNGKey(2), codes)
    masked, m = np.asarray(masked), np.asarray(m)
    assert np.all((m > 0) & (m <= 1))
    np.testing.assert_array_equal(np.asarray(out) == MASK_ID, masked)
    assert abs(m.mean() - 2 / np.pi) < 0.02  # E[cos(pi u / 2)] = 2/pi
    # count ~ Binomial(N, m) given m: standardised residuals have mean 0 and variance 1
    k = masked.sum(-1)
    var = n * m * (1 - m)
    ok = var > 1
    z = (k - n * m)[ok] / np.sqrt(var[ok])
    assert abs(z.mean()) < 0.1 and abs(z.var() - 1) < 0.1


def test_stratified_masking_covers_every_stratum():
    """One row per stratum [b/B, (b+1)/B) of u, m = cos(pi u / 2), and masks drawn with prob m."""
    b, n = 16, 4096
    codes = jnp.zeros((b, n), jnp.int32)
    out, masked, m = mask_image_codes(jax.random.PRNGKey(5), codes, mask_id=MASK_ID,
                                      mode="stratified")
    u = np.arccos(np.clip(np.asarray(m, np.float64), 0, 1)) * 2 / np.pi
    np.testing.assert_array_equal(np.sort(np.floor(u * b)), np.arange(b))
    rate = np.asarray(masked).mean(-1)
    np.testing.assert_allclose(rate, np.asarray(m), atol=4 * np.sqrt(0.25 / n))
    np.testing.assert_array_equal(np.asarray(out) == MASK_ID, np.asarray(masked))


def test_mode_dispatch_and_errors():
    codes = jnp.zeros((2, 4), jnp.int32)
    a = mask_image_codes(jax.random.PRNGKey(3), codes, mask_id=MASK_ID, mode="count")
    b = mask_exact_count(jax.random.PRNGKey(3), codes, mask_id=MASK_ID)
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
    with pytest.raises(UserError, match="masking mode"):
        mask_image_codes(jax.random.PRNGKey(3), codes, mask_id=MASK_ID, mode="bogus")
    with pytest.raises(UserError, match=r"\[B, N\]"):
        mask_exact_count(jax.random.PRNGKey(3), codes[0], mask_id=MASK_ID)
