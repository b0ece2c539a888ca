"""T2I samplers (MaskGIT, ancestral): invariants, schedules, exactness, marginals, CFG."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.sampling import (
    T2I_SAMPLERS,
    ancestral_sample,
    guided_logits,
    maskgit_sample,
    paired_forward,
    remask_count_table,
)

K = 6
MASK_ID = K  # as in the unified vocabulary: the mask directly follows the codes


def canvas_fn(seed, scale=2.0):
    """A logits_fn whose output depends on the whole canvas (mask places included)."""
    emb = jnp.asarray(np.random.default_rng(seed).normal(size=(K + 1, K)) * scale, jnp.float32)

    def fn(codes):
        e = emb[codes]
        return e + 0.5 * jnp.roll(e, 1, axis=1) + 0.1 * (codes == MASK_ID).sum(-1)[:, None, None]

    return fn


def run(sampler, fn, init, seed=0, **kw):
    f = jax.jit(lambda rng, init: sampler(rng, fn, init, mask_id=MASK_ID, return_trace=True,
                                          **kw))
    codes, trace = f(jax.random.PRNGKey(seed), init)
    return np.asarray(codes), np.asarray(trace)


def partial_canvas(b, n, seed, known_frac=0.4):
    rng = np.random.default_rng(seed)
    given = rng.integers(0, K, size=(b, n))
    known = rng.random((b, n)) < known_frac
    known[0] = False  # one row fully masked
    known[1, :] = True  # one row with nothing to do
    return jnp.asarray(np.where(known, given, MASK_ID), jnp.int32), known, given


def maskgit_reference_counts(u0, n_steps):
    """Masks left after each MaskGIT step (docs/DESIGN.md §7), a plain python loop in float64."""
    left, out = u0, []
    for k in range(n_steps):
        if k == n_steps - 1:
            left = 0
        else:
            # +1e-9: cos(pi/3) = 1/2 exactly, which float64 cos returns a hair above or below
            target = math.floor(u0 * math.cos(math.pi / 2 * (k + 1) / n_steps) + 1e-9)
            left = min(max(1, min(left - 1, target)), left)
        out.append(left)
    return out


@pytest.mark.parametrize("n,steps", [(16, 6), (10, 16), (7, 3), (5, 1)])
def test_maskgit_counts_follow_cosine_schedule(n, steps):
    b = 3
    init = jnp.full((b, n), MASK_ID, jnp.int32)
    codes, trace = run(maskgit_sample, canvas_fn(0), init, num_steps=steps, noise_temperature=4.5)
    ref = maskgit_reference_counts(n, steps)
    np.testing.assert_array_equal(trace, np.tile(np.array(ref)[:, None], (1, b)))
    assert np.all((codes >= 0) & (codes < K))


def test_remask_table_tie():
    assert remask_count_table(16, 6)[3, 16] == 8  # floor(16 cos(pi/3)) = 8
    assert np.all(remask_count_table(16, 6)[-1] == 0)


@pytest.mark.parametrize("name", ["maskgit", "ancestral"])
def test_inpainting_known_tokens_never_change_and_no_mask_left(name):
    b, n, steps = 5, 12, 7
    init, known, given = partial_canvas(b, n, 1)
    fn = canvas_fn(1)
    pair = lambda c: (fn(c), canvas_fn(2)(c))
    codes, trace = run(T2I_SAMPLERS.get(name), pair, init, num_steps=steps, guidance=1.75)
    np.testing.assert_array_equal(codes[known], given[known])
    assert not np.any(codes == MASK_ID)
    assert np.all((codes >= 0) & (codes < K))
    assert np.all(trace[-1] == 0)
    assert np.all(np.diff(trace, axis=0) <= 0)
    if name == "maskgit":  # the schedule is scaled by each row's initial number of unknowns
        u0 = (np.asarray(init) == MASK_ID).sum(-1)
        for row in range(b):
            np.testing.assert_array_equal(trace[:, row], maskgit_reference_counts(u0[row], steps))


@pytest.mark.parametrize("name", ["maskgit", "ancestral"])
def test_peaked_logits_return_the_target(name):
    b, n = 4, 9
    target = jnp.asarray(np.random.default_rng(3).integers(0, K, size=(b, n)), jnp.int32)
    noise = canvas_fn(4, scale=1.0)
    cond = lambda c: 30.0 * jax.nn.one_hot(target, K) + 0.0 * noise(c)
    pair = lambda c: (cond(c), noise(c))
    init = jnp.full((b, n), MASK_ID, jnp.int32)
    for fn, w in ((cond, 0.0), (pair, 1.75)):
        codes, _ = run(T2I_SAMPLERS.get(name), fn, init, num_steps=5, guidance=w)
        np.testing.assert_array_equal(codes, np.asarray(target))


@pytest.mark.parametrize("name", ["maskgit", "ancestral"])
def test_guidance_zero_equals_cond_only(name):
    b, n = 3, 10
    cond, uncond = canvas_fn(5), canvas_fn(6)
    init, _, _ = partial_canvas(b, n, 7)
    sampler = T2I_SAMPLERS.get(name)
    a, ta = run(sampler, cond, init, seed=9, num_steps=6)
    p, tp = run(sampler, lambda c: (cond(c), uncond(c)), init, seed=9, num_steps=6, guidance=0.0)
    np.testing.assert_array_equal(a, p)
    np.testing.assert_array_equal(ta, tp)
    g, _ = run(sampler, lambda c: (cond(c), uncond(c)), init, seed=9, num_steps=6, guidance=3.0)
    assert np.any(g != a)  # guidance does change the draws


def test_guided_logits_and_paired_forward():
    b, n = 2, 5
    codes = jnp.asarray(np.random.default_rng(8).integers(0, K + 1, size=(b, n)), jnp.int32)
    emb = jnp.asarray(np.random.default_rng(9).normal(size=(K + 1, K)), jnp.float32)
    seen = []

    def forward(c2):  # rows 0..B-1 conditional, B..2B-1 unconditional (offset by +1)
        seen.append(c2.shape)
        return emb[c2] + (jnp.arange(c2.shape[0]) >= b)[:, None, None].astype(jnp.float32)

    cond, uncond = paired_forward(forward)(codes)
    assert seen == [(2 * b, n)]  # one forward pass for both branches
    np.testing.assert_allclose(np.asarray(cond), np.asarray(emb[codes]))
    np.testing.assert_allclose(np.asarray(uncond), np.asarray(emb[codes]) + 1)
    w = 1.75
    np.testing.assert_allclose(np.asarray(guided_logits((cond, uncond), w)),
                               (1 + w) * np.asarray(cond) - w * np.asarray(uncond), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(guided_logits((cond, uncond), 0.0)),
                                  np.asarray(cond))


def test_ancestral_marginals_and_reveal_rate():
    """A fixed factorised distribution is sampled with its marginals, and the expected number
    of masks left after step j is N m(tau_{j+1}) (each token survives with m_s / m_t)."""
    b, n, steps = 4000, 4, 8
    table = jnp.asarray(np.random.default_rng(10).normal(size=(n, K)) * 1.5, jnp.float32)
    fn = lambda c: jnp.broadcast_to(table, (c.shape[0], n, K))
    init = jnp.full((b, n), MASK_ID, jnp.int32)
    codes, trace = run(ancestral_sample, fn, init, seed=11, num_steps=steps)
    probs = np.asarray(jax.nn.softmax(table, -1))
    freq = np.stack([np.bincount(codes[:, i], minlength=K) / b for i in range(n)])
    assert np.abs(freq - probs).max() < 0.035, np.abs(freq - probs).max()
    tau_next = 1 - np.arange(1, steps + 1) / steps
    expected = n * np.sin(np.pi / 2 * tau_next)
    np.testing.assert_allclose(trace.mean(-1), expected, atol=0.08)


def test_bad_arguments():
    init = jnp.full((2, 4), MASK_ID, jnp.int32)
    for sampler in (maskgit_sample, ancestral_sample):
        with pytest.raises(UserError, match="num_steps"):
            sampler(jax.random.PRNGKey(0), canvas_fn(0), init, mask_id=MASK_ID, num_steps=0)
        with pytest.raises(UserError, match="init_codes"):
            sampler(jax.random.PRNGKey(0), canvas_fn(0), init[0], mask_id=MASK_ID, num_steps=2)
    with pytest.raises(UserError, match="t2i sampler"):
        T2I_SAMPLERS.get("nope")
