"""D3Diff loss (docs/DESIGN.md §6): every listed property, against numpy and exact enumeration."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.diffusion import SCHEDULES
from unif2ace_jax.losses import (
    d3diff_loss,
    log_scores,
    score_entropy,
    score_entropy_per_sequence,
)
from unif2ace_jax.diffusion.masking import mask_independent

PARAMS = ("free", "normalized")


# ----------------------------------------------------------------------------- numpy references


def np_log_softmax(f):
    f = np.asarray(f, np.float64)
    mx = f.max(-1, keepdims=True)
    return f - mx - np.log(np.exp(f - mx).sum(-1, keepdims=True))


def np_ce(logits, targets):
    lp = np_log_softmax(logits)
    return -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]


def np_dse_definition(logits, targets, m, param):
    """docs/DESIGN.md §6's definition, literally: sum_y exp(l_y) - r l_x0 + r (log r - 1)."""
    f = np.asarray(logits, np.float64)
    k = f.shape[-1]
    r = ((1 - m) / m)[:, None]
    if param == "free":
        ell = f + np.log(r)[..., None] - np.log(k)
    else:
        ell = np_log_softmax(f) + np.log(r)[..., None]
    ell_t = np.take_along_axis(ell, np.asarray(targets)[..., None], -1)[..., 0]
    return np.exp(ell).sum(-1) - r * ell_t + r * (np.log(r) - 1)


def random_batch(seed, b=4, n=6, k=5, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(b, n, k)) * scale
    targets = rng.integers(0, k, size=(b, n))
    masked = rng.random((b, n)) < 0.5
    masked[:, 0] = True
    m = rng.uniform(0.05, 0.95, size=(b,))
    return logits.astype(np.float32), targets, masked, m.astype(np.float32)


# ----------------------------------------------------------------------------- basic identities


@pytest.mark.parametrize("param", PARAMS)
def test_alpha_zero_is_plain_masked_ce(param):
    logits, targets, masked, m = random_batch(0)
    loss, aux = d3diff_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked),
                            jnp.asarray(m), alpha=0.0, score_parameterization=param)
    ref = np_ce(logits, targets)[masked].mean()  # one global mean over masked positions
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    np.testing.assert_allclose(float(aux["mask_ce"]), ref, rtol=1e-6)


def test_loss_combines_terms_and_only_score_switch():
    logits, targets, masked, m = random_batch(1)
    args = tuple(map(jnp.asarray, (logits, targets, masked, m)))
    loss, aux = d3diff_loss(*args, alpha=0.3)
    np.testing.assert_allclose(float(loss), float(aux["mask_ce"] + 0.3 * aux["score_entropy"]),
                               rtol=1e-6)
    jitted = jax.jit(lambda *a: d3diff_loss(*a, alpha=0.3, schedule="cosine"))(*args)
    np.testing.assert_allclose(float(jitted[0]), float(loss), rtol=1e-6)
    only_score, aux2 = d3diff_loss(*args, alpha=1.0, mask_weight=0.0)
    np.testing.assert_allclose(float(only_score), float(aux2["score_entropy"]), rtol=1e-6)
    np.testing.assert_allclose(float(aux["nelbo_bits_per_token"]),
                               float(aux["nelbo_per_token"]) / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(aux["nelbo_per_token"]),
                               float(aux["score_entropy"]) / logits.shape[1], rtol=1e-6)


@pytest.mark.parametrize("param", PARAMS)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_score_entropy_matches_definition(param, schedule):
    """Stable form == the literal formula (float64 numpy) for moderate r and logits."""
    logits, targets, masked, m = random_batch(2)
    dse = score_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(m), param)
    ref = np_dse_definition(logits, targets, m.astype(np.float64), param)
    np.testing.assert_allclose(np.asarray(dse), ref, rtol=2e-5, atol=1e-5)
    # L_score per sequence = (dsigma/dtau) * sum over masked of DSE, then the batch mean.
    s = SCHEDULES.get(schedule)
    m64 = m.astype(np.float64)
    per_seq_ref = s.dsigma_dtau(m64, xp=np) * np.where(masked, ref, 0).sum(-1)
    per_seq = score_entropy_per_sequence(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(masked), jnp.asarray(m), schedule=schedule,
                                         score_parameterization=param)
    np.testing.assert_allclose(np.asarray(per_seq), per_seq_ref, rtol=3e-5)
    _, aux = d3diff_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked),
                         jnp.asarray(m), schedule=schedule, score_parameterization=param)
    np.testing.assert_allclose(float(aux["score_entropy"]), per_seq_ref.mean(), rtol=3e-5)


def test_log_scores_follow_parameterizations():
    logits, _, _, m = random_batch(3)
    k = logits.shape[-1]
    r = (1 - m.astype(np.float64)) / m
    free = np.asarray(log_scores(jnp.asarray(logits), jnp.asarray(m), "free"))
    np.testing.assert_allclose(free, logits + np.log(r)[:, None, None] - np.log(k), rtol=1e-5,
                               atol=1e-5)
    # zero logits: the free scores sum to r
    zero = np.asarray(log_scores(jnp.zeros_like(logits), jnp.asarray(m), "free"))
    np.testing.assert_allclose(np.exp(zero).sum(-1), np.broadcast_to(r[:, None], zero.shape[:2]),
                               rtol=1e-5)
    norm = np.asarray(log_scores(jnp.asarray(logits), jnp.asarray(m), "normalized"))
    np.testing.assert_allclose(np.exp(norm).sum(-1), np.broadcast_to(r[:, None], norm.shape[:2]),
                               rtol=1e-5)


def test_normalized_identity():
    """`normalized`: DSE_i = r CE_i and L_score = (pi/2)(sqrt(1-m^2)/m) sum_{i in M} CE_i."""
    logits, targets, masked, m = random_batch(4, b=6, n=8, k=7, scale=3.0)
    m64 = m.astype(np.float64)
    ce = np_ce(logits, targets)
    dse = score_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(m), "normalized")
    np.testing.assert_allclose(np.asarray(dse), ((1 - m64) / m64)[:, None] * ce, rtol=1e-5)
    per_seq = score_entropy_per_sequence(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked), jnp.asarray(m),
        schedule="cosine", score_parameterization="normalized")
    ref = (np.pi / 2) * np.sqrt(1 - m64**2) / m64 * np.where(masked, ce, 0).sum(-1)
    np.testing.assert_allclose(np.asarray(per_seq), ref, rtol=1e-5)


# ----------------------------------------------------------------------------- DSE >= 0, = 0 at the truth


@pytest.mark.parametrize("param", PARAMS)
def test_dse_nonnegative_and_accurate_over_extreme_ranges(param):
    """r from ~1e6 to ~1e-6 and logits from near-constant to peaked and shifted: the float32
    stable form is >= 0 and matches the float64 literal formula (which in float32 would cancel:
    its terms are ~r |log r| while DSE can be ~r * 1e-4). Logit levels stay where the true value
    fits in float32 (the free DSE contains exp(logsumexp(f) - log K), e^88 overflows)."""
    rng = np.random.default_rng(5)
    b, n, k = 64, 4, 6
    logits = rng.normal(size=(b, n, k)) * rng.choice([0.01, 1, 10, 40], size=(b, 1, 1))
    logits += rng.choice([-30.0, 0.0, 30.0], size=(b, 1, 1))
    logits = np.minimum(logits, 60.0)
    targets = rng.integers(0, k, size=(b, n))
    m = 10.0 ** rng.uniform(-6, 0, size=(b,))
    m = np.minimum(m, 1 - 1e-6).astype(np.float32)
    logits = logits.astype(np.float32)
    dse = np.asarray(score_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(m),
                                   param))
    assert np.all(np.isfinite(dse))
    assert np.all(dse >= 0)
    ref = np_dse_definition(logits, targets, m.astype(np.float64), param)
    # Floor: CE = lse - f_x0 itself carries float32 rounding of the logit scale, scaled by r.
    r = ((1 - m.astype(np.float64)) / m)[:, None]
    floor = r * 4 * np.finfo(np.float32).eps * (1 + np.abs(logits).max(-1))
    assert np.all(np.abs(dse - ref) <= 1e-4 * ref + floor)


@pytest.mark.parametrize("m", [1e-5, 0.3, 0.9, 1 - 1e-5])
def test_dse_zero_only_at_true_ratio(m):
    """exp(l_y) = r [y = x0] gives DSE = 0 (free: f_x0 = log K, others -inf); any other score
    pattern gives DSE > 0, with the closed form r (c - 1 - log c) when exp(l_x0) = c r."""
    k, x0 = 5, 2
    m = float(np.float32(m))
    r = (1 - m) / m
    mr = jnp.full((1,), m, jnp.float32)
    tgt = jnp.full((1, 1), x0)

    def dse(logits):
        return float(score_entropy(jnp.asarray(logits, jnp.float32)[None, None], tgt, mr,
                                   "free")[0, 0])

    truth = np.full(k, -np.inf)
    truth[x0] = np.log(k)
    ell = np.asarray(log_scores(jnp.asarray(truth, jnp.float32)[None, None], mr, "free"))[0, 0]
    np.testing.assert_allclose(np.exp(ell), r * (np.arange(k) == x0), rtol=1e-5)
    assert dse(truth) == pytest.approx(0.0, abs=1e-6 * max(r, 1.0))
    for c in (0.5, 0.9, 1.1, 2.0):  # wrong total mass on the true code
        wrong = truth.copy()
        wrong[x0] += np.log(c)
        expected = r * (c - 1 - np.log(c))
        assert dse(wrong) == pytest.approx(expected, rel=1e-3)
        assert dse(wrong) > 0
    leak = truth.copy()
    leak[(x0 + 1) % k] = 0.0  # mass on a wrong code
    assert dse(leak) > 0
    # normalized: scores always sum to r, so DSE = r CE is 0 exactly when all mass is on x0
    norm = lambda lg: float(score_entropy(jnp.asarray(lg, jnp.float32)[None, None], tgt, mr,
                                          "normalized")[0, 0])
    assert norm(truth - 7.0) == pytest.approx(0.0, abs=1e-7)
    assert norm(leak) == pytest.approx(r * np.log1p(1 / k), rel=1e-4)
    # the minimum over a scan of exp(l_x0) sits at r
    grid = np.exp(np.linspace(-3, 3, 601))
    vals = [dse(np.where(np.arange(k) == x0, np.log(k * g), -np.inf)) for g in grid[::20]]
    assert int(np.argmin(vals)) == 15  # grid[300] = 1, i.e. exp(l_x0) = r


# ----------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("param", PARAMS)
def test_no_masked_positions_gives_zero_not_nan(param):
    logits, targets, _, _ = random_batch(6)
    masked = np.zeros(targets.shape, bool)
    m = np.zeros((logits.shape[0],), np.float32)  # even a 0 ratio is harmless without masks

    def f(lg):
        return d3diff_loss(lg, jnp.asarray(targets), jnp.asarray(masked), jnp.asarray(m),
                           score_parameterization=param)

    (loss, aux), grad = jax.value_and_grad(f, has_aux=True)(jnp.asarray(logits))
    assert float(loss) == 0.0
    assert all(np.isfinite(float(v)) for v in aux.values())
    assert np.all(np.asarray(grad) == 0)


def test_huge_unmasked_logits_and_bf16():
    logits, targets, masked, m = random_batch(7)
    logits = np.where(masked[..., None], logits, 500.0).astype(np.float32)

    def f(lg):
        return d3diff_loss(lg, jnp.asarray(targets), jnp.asarray(masked), jnp.asarray(m))[0]

    g = jax.grad(f)(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(g)))
    assert np.all(np.asarray(g)[~masked] == 0)
    # bf16 logits: computed in float32, equal to the float32 result of the rounded values
    lb = jnp.asarray(random_batch(8)[0], jnp.bfloat16)
    out_b = d3diff_loss(lb, jnp.asarray(targets), jnp.asarray(masked), jnp.asarray(m))
    out_f = d3diff_loss(lb.astype(jnp.float32), jnp.asarray(targets), jnp.asarray(masked),
                        jnp.asarray(m))
    assert out_b[0].dtype == jnp.float32
    np.testing.assert_allclose(float(out_b[0]), float(out_f[0]), rtol=1e-6)


def test_example_mask_ignores_rows():
    logits, targets, masked, m = random_batch(9)
    keep = np.array([True, False, True, False])
    full = d3diff_loss(jnp.asarray(logits[keep]), jnp.asarray(targets[keep]),
                       jnp.asarray(masked[keep]), jnp.asarray(m[keep]))
    m_bad = m.copy()
    m_bad[~keep] = 0.0
    part = d3diff_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked),
                       jnp.asarray(m_bad), example_mask=jnp.asarray(keep))
    np.testing.assert_allclose(float(part[0]), float(full[0]), rtol=1e-6)
    for key in full[1]:
        np.testing.assert_allclose(float(part[1][key]), float(full[1][key]), rtol=1e-6)


def test_bad_input_is_user_error():
    logits, targets, masked, m = map(jnp.asarray, random_batch(10))
    with pytest.raises(UserError, match="score_parameterization"):
        d3diff_loss(logits, targets, masked, m, score_parameterization="bogus")
    with pytest.raises(UserError, match="mask_ratio"):
        d3diff_loss(logits, targets, masked, m[:2])
    with pytest.raises(UserError, match="targets"):
        d3diff_loss(logits, targets[:, :2], masked, m)
    with pytest.raises(UserError, match="mask schedule"):
        d3diff_loss(logits, targets, masked, m, schedule="nope")


# ----------------------------------------------------------------------------- uniform predictor


@pytest.mark.parametrize("param", PARAMS)
def test_uniform_predictor_nelbo_is_log_k_per_batch_linear(param):
    """Zero logits make every DSE_i = r log K in both parameterizations (free: the scores sum
    to r exactly, so the exp(A)-1-A term vanishes). With the linear schedule m' = 1, and with the
    realised fraction as mask ratio (m = |M|/N) one draw already gives
    L_score / N = (1/m) |M| log K / N = log K, for any mask pattern."""
    rng = np.random.default_rng(11)
    b, n, k = 8, 10, 7
    masked = rng.random((b, n)) < rng.uniform(0.1, 1.0, size=(b, 1))
    masked[:, 0] = True
    m = masked.mean(-1).astype(np.float32)
    targets = rng.integers(0, k, size=(b, n))
    _, aux = d3diff_loss(jnp.zeros((b, n, k)), jnp.asarray(targets), jnp.asarray(masked),
                         jnp.asarray(m), schedule="linear", score_parameterization=param)
    np.testing.assert_allclose(float(aux["nelbo_per_token"]), np.log(k), rtol=1e-6)
    np.testing.assert_allclose(float(aux["nelbo_bits_per_token"]), np.log2(k), rtol=1e-6)
    if param == "free":  # a constant shift c breaks calibration: adds N (e^c - 1 - c) / N per token
        _, aux_c = d3diff_loss(jnp.full((b, n, k), 0.5), jnp.asarray(targets), jnp.asarray(masked),
                               jnp.asarray(m), schedule="linear", score_parameterization=param)
        np.testing.assert_allclose(float(aux_c["nelbo_per_token"]),
                                   np.log(k) + (np.exp(0.5) - 1.5), rtol=1e-5)
    else:  # normalized is shift invariant
        _, aux_c = d3diff_loss(jnp.full((b, n, k), 0.5), jnp.asarray(targets), jnp.asarray(masked),
                               jnp.asarray(m), schedule="linear", score_parameterization=param)
        np.testing.assert_allclose(float(aux_c["nelbo_per_token"]), np.log(k), rtol=1e-6)


# ----------------------------------------------------------------------------- exact enumeration


def random_joint(n, k, seed):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(k**n, 0.6)).reshape((k,) * n)


def entropy(p):
    p = p.ravel()
    return float(-(p * np.log(p)).sum())


def posterior_table(p):
    """``logp[x, mb, i, y] = log p(x^i = y | x at the unmasked places)`` for masked i (bit i of
    mb set), computed by brute-force marginalisation of the joint; 0 at unmasked i."""
    n, k = p.ndim, p.shape[0]
    states = list(itertools.product(range(k), repeat=n))
    out = np.zeros((len(states), 2**n, n, k))
    for xi, x in enumerate(states):
        for mb in range(1, 2**n):
            masked = [i for i in range(n) if mb >> i & 1]
            sub = p[tuple(slice(None) if i in masked else x[i] for i in range(n))]
            sub = sub / sub.sum()
            for j, i in enumerate(masked):
                others = tuple(a for a in range(len(masked)) if a != j)
                out[xi, mb, i] = np.log(sub.sum(axis=others) if others else sub)
    return np.array(states), out


def expected_score(p, logits_table, schedule, param, nodes=48):
    """``E_{tau ~ U(0,1)} E_{x ~ p} E_M [L_score]`` with each place masked independently with
    probability m(tau): mask patterns enumerated with their exact probability, tau integrated by
    Gauss-Legendre. Calls the library on every (node, x, mask) row (float64 under x64)."""
    n = p.ndim
    states = np.array(list(itertools.product(range(p.shape[0]), repeat=n)))
    px = p[tuple(states.T)]
    rows = [(xi, mb) for xi in range(len(states)) for mb in range(1, 2**n)]
    xi = np.array([r[0] for r in rows])
    mb = np.array([r[1] for r in rows])
    bits = (mb[:, None] >> np.arange(n)[None, :]) & 1
    t, w = np.polynomial.legendre.leggauss(nodes)
    tau, w = (t + 1) / 2, w / 2
    s = SCHEDULES.get(schedule)
    m = s.mask_ratio(tau, xp=np)
    r, q = len(rows), len(tau)
    logits = np.tile(logits_table[xi, mb], (q, 1, 1))
    targets = np.tile(states[xi], (q, 1))
    masked = np.tile(bits.astype(bool), (q, 1))
    ratio = np.repeat(m, r)
    per_seq = score_entropy_per_sequence(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked), jnp.asarray(ratio),
        schedule=schedule, score_parameterization=param)
    per_seq = np.asarray(per_seq).reshape(q, r)
    k_masked = bits.sum(-1)
    pattern_prob = m[:, None] ** k_masked[None] * (1 - m[:, None]) ** (n - k_masked[None])
    inner = (per_seq * pattern_prob * px[xi][None]).sum(-1)
    return float((w * inner).sum())


def context_noise(states, rng, scale):
    """Noise for a perturbed denoiser: a function of (visible context, mask) only. A table
    indexed by the full state x would let the "denoiser" see the masked truth and beat H."""
    n_states, n = states.shape
    k = int(states.max()) + 1
    noise = {}
    out = np.zeros((n_states, 2**n, n, k))
    for xi in range(n_states):
        for mb in range(1, 2**n):
            key = (mb,) + tuple(-1 if mb >> i & 1 else int(states[xi, i]) for i in range(n))
            if key not in noise:
                noise[key] = rng.normal(size=(n, k)) * scale
            out[xi, mb] = noise[key]
    return out


CASES = [(3, 3, 0), (2, 4, 1), (3, 4, 2)]


@pytest.mark.parametrize("n,k,seed", CASES)
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("param", PARAMS)
def test_exact_posterior_attains_entropy(n, k, seed, schedule, param):
    """The heart of D3Diff: with the exact posterior as denoiser, E[L_score] = H(p_data).

    Masking: independent per place with prob m(tau), tau ~ U(0,1) (the continuous-time ELBO's
    forward process). Exact posterior: `normalized` logits log p(y | visible) (any shift);
    `free` logits log p(y | visible) + log K, so exp(l_y) = r p(y | visible), the true score.
    """
    p = random_joint(n, k, seed)
    _, logp = posterior_table(p)
    logits = logp + (np.log(k) if param == "free" else 3.7)
    with jax.enable_x64(True):
        e = expected_score(p, logits, schedule, param)
    assert e == pytest.approx(entropy(p), abs=1e-9)


@pytest.mark.parametrize("n,k,seed", CASES[:2])
def test_other_denoisers_give_more(n, k, seed):
    p = random_joint(n, k, seed)
    h = entropy(p)
    states, logp = posterior_table(p)
    rng = np.random.default_rng(seed + 100)
    with jax.enable_x64(True):
        for param in PARAMS:
            shift = np.log(k) if param == "free" else 0.0
            for _ in range(3):
                noisy = logp + shift + context_noise(states, rng, 0.3)
                assert expected_score(p, noisy, "cosine", param) > h + 1e-3
        # context-blind denoiser (the per-place marginals): exactly sum_i H(X_i) >= H(X)
        marg = np.stack([p.sum(axis=tuple(a for a in range(n) if a != i)) for i in range(n)])
        blind = np.broadcast_to(np.log(marg), logp.shape)
        sum_marg_h = float(-(marg * np.log(marg)).sum())
        assert sum_marg_h > h + 1e-3
        e_blind = expected_score(p, blind, "cosine", "normalized")
        assert e_blind == pytest.approx(sum_marg_h, abs=1e-9)
        # free scores with a wrong total mass c: exactly H + N (e^c - 1 - c)
        c = 0.4
        e_shift = expected_score(p, logp + np.log(k) + c, "linear", "free")
        assert e_shift == pytest.approx(h + n * (np.exp(c) - 1 - c), abs=1e-9)
        # uniform predictor: N log K, i.e. NELBO = log K per token, in both parameterizations
        for param in PARAMS:
            e_uni = expected_score(p, np.zeros_like(logp), "cosine", param)
            assert e_uni / n == pytest.approx(np.log(k), abs=1e-9)


def test_loglinear_bound_is_slightly_below_entropy():
    """loglinear stops at m(1) = 1 - eps: its ELBO misses the prior term, within H (1-eps)^N."""
    n, k = 3, 3
    p = random_joint(n, k, 0)
    _, logp = posterior_table(p)
    h = entropy(p)
    with jax.enable_x64(True):
        e = expected_score(p, logp, "loglinear", "normalized")
    eps = 1e-3
    assert h * (1 - eps) ** n - 1e-9 <= e < h


def test_float32_enumeration_close():
    """The same bound in float32 (the training dtype) holds to float32 tolerance."""
    p = random_joint(3, 3, 0)
    _, logp = posterior_table(p)
    e = expected_score(p, logp + np.log(3), "cosine", "free")
    assert e == pytest.approx(entropy(p), rel=1e-5)


def test_monte_carlo_with_independent_masking():
    """mask_independent + d3diff_loss (mask_ratio = the drawn m) estimate H without bias."""
    n, k, b = 3, 3, 40000
    p = random_joint(n, k, 0)
    states, logp = posterior_table(p)
    rng = np.random.default_rng(12)
    xi = rng.choice(len(states), size=b, p=p.ravel())
    codes = jnp.asarray(states[xi])
    masked_codes, masked, m = mask_independent(jax.random.PRNGKey(0), codes, mask_id=k)
    masked = np.asarray(masked)
    np.testing.assert_array_equal(np.asarray(masked_codes) == k, masked)
    mb = (masked * (1 << np.arange(n))).sum(-1)
    logits = logp[xi, mb] + np.log(k)
    per_seq = np.asarray(score_entropy_per_sequence(
        jnp.asarray(logits, jnp.float32), codes, jnp.asarray(masked), m))
    _, aux = d3diff_loss(jnp.asarray(logits, jnp.float32), codes, jnp.asarray(masked), m)
    np.testing.assert_allclose(float(aux["score_entropy"]), per_seq.mean(), rtol=1e-5)
    se = per_seq.std() / np.sqrt(b)
    assert abs(per_seq.mean() - entropy(p)) < 4 * se, (per_seq.mean(), entropy(p), se)
