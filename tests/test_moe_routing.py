"""Pure functions of the token MoE: router math (routing.py) and dispatch/combine (dispatch.py).

References are independent: numpy for the router math, python loops over tokens and their
chosen experts for dispatch.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.models.moe import dispatch, routing

E = 4  # routed experts per group in these tests


def _np_softmax(v):
    v = np.asarray(v, np.float64)
    e = np.exp(v - v.max())
    return e / e.sum()


def _random_routing(seed=0, T=10, k=2):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, 2 * E)).astype(np.float32) * 2
    group = rng.integers(0, 2, size=T).astype(np.int32)
    valid = rng.random(T) > 0.25
    return logits, group, valid


# ----------------------------------------------------------------------------- routing


def test_router_probs_is_softmax_over_own_group():
    logits, group, _ = _random_routing()
    probs = np.asarray(routing.router_probs(jnp.asarray(logits), jnp.asarray(group), E))
    for t in range(len(group)):
        g = group[t]
        want = np.zeros(2 * E)
        want[g * E:(g + 1) * E] = _np_softmax(logits[t, g * E:(g + 1) * E])
        np.testing.assert_allclose(probs[t], want, rtol=1e-5, atol=1e-7)
        assert np.all(probs[t, (1 - g) * E:(2 - g) * E] == 0.0)


@pytest.mark.parametrize("renormalize", [True, False])
def test_top_k_routing_matches_numpy(renormalize):
    k = 3
    logits, group, _ = _random_routing(seed=1, T=9)
    probs = routing.router_probs(jnp.asarray(logits), jnp.asarray(group), E)
    w, idx = routing.top_k_routing(probs, jnp.asarray(group), E, k, renormalize)
    w, idx = np.asarray(w), np.asarray(idx)
    for t in range(len(group)):
        g = group[t]
        p = _np_softmax(logits[t, g * E:(g + 1) * E])
        order = np.argsort(-p)[:k]
        np.testing.assert_array_equal(idx[t], order + g * E)
        want = p[order] / (p[order].sum() if renormalize else 1.0)
        np.testing.assert_allclose(w[t], want, rtol=1e-5)


def test_top_k_never_leaves_the_group_even_when_probs_underflow():
    # In-group probabilities below float32's range would tie with the other group's zeros.
    logits = np.full((2, 2 * E), -100.0, np.float32)
    logits[0, 0] = 100.0  # und token: one dominant expert, the others underflow to 0
    logits[1, E] = 100.0  # gen token
    logits[0, E:] = 50.0  # large other-group logits must not matter
    group = jnp.array([0, 1], jnp.int32)
    probs = routing.router_probs(jnp.asarray(logits), group, E)
    _, idx = routing.top_k_routing(probs, group, E, 3)
    idx = np.asarray(idx)
    assert np.all((idx[0] >= 0) & (idx[0] < E)), idx
    assert np.all((idx[1] >= E) & (idx[1] < 2 * E)), idx


def _np_balance(probs, idx, group, valid):
    out = np.zeros(2)
    for g in range(2):
        toks = [t for t in range(len(group)) if valid[t] and group[t] == g]
        if not toks:
            continue
        f = np.zeros(E)
        p = np.zeros(E)
        for t in toks:
            for e in idx[t]:
                f[e - g * E] += 1
            p += probs[t, g * E:(g + 1) * E]
        out[g] = E * np.sum(f / len(toks) * p / len(toks))
    return out


def test_load_balance_loss_matches_loop_reference():
    logits, group, valid = _random_routing(seed=2, T=12)
    probs = routing.router_probs(jnp.asarray(logits), jnp.asarray(group), E)
    _, idx = routing.top_k_routing(probs, jnp.asarray(group), E, 2)
    got = routing.load_balance_loss(probs, idx, jnp.asarray(group), jnp.asarray(valid), E)
    want = _np_balance(np.asarray(probs), np.asarray(idx), group, valid)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_uniform_routing_gives_k_and_collapse_gives_E(k):
    T = 2 * E
    group = np.array([0] * E + [1] * E, np.int32)
    probs = np.zeros((T, 2 * E), np.float32)
    idx = np.zeros((T, k), np.int32)
    for t in range(T):
        g = group[t]
        probs[t, g * E:(g + 1) * E] = 1.0 / E
        idx[t] = g * E + (t + np.arange(k)) % E  # every expert picked equally often
    valid = jnp.ones((T,), bool)
    got = routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(idx), jnp.asarray(group),
                                    valid, E)
    np.testing.assert_allclose(np.asarray(got), [k, k], rtol=1e-6)

    # Collapse: every token puts all its mass on the same k experts.
    probs = np.zeros((T, 2 * E), np.float32)
    for t in range(T):
        g = group[t]
        probs[t, g * E:g * E + k] = 1.0 / k
        idx[t] = g * E + np.arange(k)
    got = routing.load_balance_loss(jnp.asarray(probs), jnp.asarray(idx), jnp.asarray(group),
                                    valid, E)
    np.testing.assert_allclose(np.asarray(got), [E, E], rtol=1e-6)


def test_pad_tokens_do_not_affect_losses():
    logits, group, valid = _random_routing(seed=3, T=12)
    assert (~valid).any() and valid.any()
    rng = np.random.default_rng(0)
    other = logits.copy()
    other[~valid] = rng.normal(size=other[~valid].shape) * 50
    other_group = group.copy()
    other_group[~valid] = 1 - group[~valid]

    def losses(lg, gr):
        lg, gr = jnp.asarray(lg), jnp.asarray(gr)
        probs = routing.router_probs(lg, gr, E)
        _, idx = routing.top_k_routing(probs, gr, E, 2)
        return (np.asarray(routing.load_balance_loss(probs, idx, gr, jnp.asarray(valid), E)),
                float(routing.router_z_loss(lg, gr, jnp.asarray(valid), E)))

    a, b = losses(logits, group), losses(other, other_group)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-6)


def test_empty_group_gives_zero_balance_loss():
    logits, _, _ = _random_routing(seed=4, T=6)
    group = jnp.zeros((6,), jnp.int32)
    probs = routing.router_probs(jnp.asarray(logits), group, E)
    _, idx = routing.top_k_routing(probs, group, E, 2)
    got = np.asarray(routing.load_balance_loss(probs, idx, group, jnp.ones((6,), bool), E))
    assert got[1] == 0.0 and got[0] > 0.0


def test_router_z_loss_matches_numpy():
    logits, group, valid = _random_routing(seed=5, T=11)
    got = float(routing.router_z_loss(jnp.asarray(logits), jnp.asarray(group),
                                      jnp.asarray(valid), E))
    zs = []
    for t in range(len(group)):
        if valid[t]:
            v = logits[t, group[t] * E:(group[t] + 1) * E].astype(np.float64)
            zs.append((v.max() + np.log(np.exp(v - v.max()).sum())) ** 2)
    np.testing.assert_allclose(got, np.mean(zs), rtol=1e-5)


def test_expert_counts():
    idx = np.array([[0, 3], [3, 1], [2, 3]], np.int32)
    keep = np.array([[True, True], [True, False], [False, True]])
    got = np.asarray(routing.expert_counts(jnp.asarray(idx), jnp.asarray(keep), 5))
    want = np.zeros(5, int)
    for t in range(3):
        for j in range(2):
            want[idx[t, j]] += keep[t, j]
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- dispatch


def _loop_positions(idx, keep, X):
    """Slots by priority: all first choices in token order, then all second choices, ..."""
    T, k = idx.shape
    fill = [0] * X
    pos = -np.ones((T, k), int)
    for j in range(k):
        for t in range(T):
            if keep[t, j]:
                pos[t, j] = fill[idx[t, j]]
                fill[idx[t, j]] += 1
    return pos


def test_capacity_positions_matches_loop():
    rng = np.random.default_rng(0)
    T, k, X = 13, 3, 5
    idx = np.stack([rng.permutation(X)[:k] for _ in range(T)]).astype(np.int32)
    keep = rng.random((T, k)) > 0.2
    got = np.asarray(dispatch.capacity_positions(jnp.asarray(idx), jnp.asarray(keep), X))
    np.testing.assert_array_equal(got, _loop_positions(idx, keep, X))


def test_compute_capacity():
    assert dispatch.compute_capacity(2048, 4, 16, 1.0) == 512
    assert dispatch.compute_capacity(2048, 4, 16, 1.25) == 640
    assert dispatch.compute_capacity(10, 1, 1, 1.1) == 10  # no float round-off slot; <= T
    assert dispatch.compute_capacity(10, 2, 8, 1.0) == math.ceil(20 / 8)
    assert dispatch.compute_capacity(3, 1, 16, 0.1) == 1
    with pytest.raises(ValueError):
        dispatch.compute_capacity(8, 1, 2, 0.0)


def _ffn(v, p, e):
    h = v @ p.wi[e]
    if p.bi is not None:
        h = h + p.bi[e]
    out = jax.nn.gelu(h, approximate=True) @ p.wo[e]
    return out + p.bo[e] if p.bo is not None else out


def _loop_moe(x, weights, params, idx, kept):
    """Independent reference: a python loop over experts; expert e is applied to every token
    and its output counted with the weight of the copies routed (and kept) to it.
    Fixed shapes, so eager op compilations are reused across experts and tests."""
    y = jnp.zeros_like(x)
    for e in range(params.wi.shape[0]):
        gate = jnp.sum(jnp.where(jnp.asarray((idx == e) & kept), weights, 0.0), axis=1)
        y = y + gate[:, None] * _ffn(x, params, e)
    return y


def _problem(seed=0, T=12, d=6, h=5, X=6, k=2, bias=True):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(T, d)), jnp.float32)
    idx = np.stack([rng.permutation(X)[:k] for _ in range(T)]).astype(np.int32)
    weights = jnp.asarray(rng.random((T, k)), jnp.float32)
    keep = rng.random((T, k)) > 0.15
    p = dispatch.ExpertParams(
        wi=jnp.asarray(rng.normal(size=(X, d, h)) / np.sqrt(d), jnp.float32),
        wo=jnp.asarray(rng.normal(size=(X, h, d)) / np.sqrt(h), jnp.float32),
        bi=jnp.asarray(rng.normal(size=(X, h)) * 0.1, jnp.float32) if bias else None,
        bo=jnp.asarray(rng.normal(size=(X, d)) * 0.1, jnp.float32) if bias else None)
    r = jnp.asarray(rng.normal(size=(T, d)), jnp.float32)  # cotangent for the gradient checks
    return x, idx, weights, keep, p, r


def _value_and_vjp(f, r, *args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(r)


def _check_against_loop(fn, x, idx, weights, kept_ref, p, r):
    """Outputs and gradients (x, combine weights, every expert weight) vs the loop."""
    got = jax.jit(lambda *a: _value_and_vjp(fn, r, *a))(x, weights, p)
    want = _value_and_vjp(lambda x, w, p: _loop_moe(x, w, p, idx, kept_ref), r, x, weights, p)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl,block_size,bias", [
    ("ragged_dot", 128, True), ("ragged_dot", 128, False), ("blocked", 1, True),
    ("blocked", 3, True), ("blocked", 64, False)])  # 64: capped to 4 for these 24 copies
def test_ragged_dispatch_matches_loop(impl, block_size, bias):
    x, idx, weights, keep, p, r = _problem(seed=1, bias=bias)

    def fn(x, w, p):
        return dispatch.ragged_dispatch_combine(x, jnp.asarray(idx), w, jnp.asarray(keep), p,
                                                impl=impl, block_size=block_size)

    _check_against_loop(fn, x, idx, weights, keep, p, r)


@pytest.mark.parametrize("method", ["einsum", "gather"])
@pytest.mark.parametrize("capacity", [1, 3, 12])
def test_capacity_dispatch_matches_loop(method, capacity):
    x, idx, weights, keep, p, r = _problem(seed=2)
    X = p.wi.shape[0]
    ref_pos = _loop_positions(idx, keep, X)
    kept_ref = keep & (ref_pos >= 0) & (ref_pos < capacity)

    def fn(x, w, p):
        return dispatch.capacity_dispatch_combine(x, jnp.asarray(idx), w, jnp.asarray(keep), p,
                                                  capacity=capacity, method=method)[0]

    _, kept = dispatch.capacity_dispatch_combine(x, jnp.asarray(idx), weights, jnp.asarray(keep), p,
                                                 capacity=capacity, method=method)
    np.testing.assert_array_equal(np.asarray(kept), kept_ref)
    _check_against_loop(fn, x, idx, weights, kept_ref, p, r)


@pytest.mark.parametrize("method", ["einsum", "gather"])
def test_capacity_drops_exactly_the_hand_computed_copies(method):
    # 4 tokens, top-2 over 2 experts, capacity 2. Slots go to first choices in token order,
    # then second choices:
    #   1st: t0->e0 (slot 0), t1->e0 (slot 1), t2->e1 (slot 0), t3->e0 (full: dropped)
    #   2nd: t0->e1 (slot 1), t1->e1 (full), t2->e0 (full), t3->e1 (full)
    idx = np.array([[0, 1], [0, 1], [1, 0], [0, 1]], np.int32)
    want_kept = np.array([[True, True], [True, False], [True, False], [False, False]])
    x, _, weights, _, p, _ = _problem(seed=3, T=4, X=2)
    y, kept = dispatch.capacity_dispatch_combine(
        x, jnp.asarray(idx), weights, jnp.ones((4, 2), bool), p, capacity=2, method=method)
    np.testing.assert_array_equal(np.asarray(kept), want_kept)
    np.testing.assert_array_equal(np.asarray(y[3]), np.zeros(x.shape[1]))  # nothing reaches t3
    want_t1 = weights[1, 0] * _ffn(x[1], p, 0)
    np.testing.assert_allclose(np.asarray(y[1]), np.asarray(want_t1), rtol=1e-5, atol=1e-6)


def test_ragged_and_capacity_agree_when_capacity_suffices():
    x, idx, weights, keep, p, _ = _problem(seed=4)
    args = (x, jnp.asarray(idx), weights, jnp.asarray(keep), p)
    a = dispatch.ragged_dispatch_combine(*args, impl="blocked", block_size=4)
    b = dispatch.ragged_dispatch_combine(*args, impl="ragged_dot")
    c, kept = dispatch.capacity_dispatch_combine(*args, capacity=x.shape[0], method="gather")
    d, _ = dispatch.capacity_dispatch_combine(*args, capacity=x.shape[0], method="einsum")
    np.testing.assert_array_equal(np.asarray(kept), keep)
    for other in (b, c, d):
        np.testing.assert_allclose(np.asarray(other), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_dispatch_rejects_unknown_modes():
    x, idx, weights, keep, p, _ = _problem(seed=5)
    args = (x, jnp.asarray(idx), weights, jnp.asarray(keep), p)
    with pytest.raises(ValueError, match="ragged impl"):
        dispatch.ragged_dispatch_combine(*args, impl="dense")
    with pytest.raises(ValueError, match="capacity method"):
        dispatch.capacity_dispatch_combine(*args, capacity=2, method="sort")


def test_take_rows_matches_plain_gather_with_gradient():
    rng = np.random.default_rng(6)
    A, M, k = 5, 9, 2
    a = jnp.asarray(rng.normal(size=(A, 3)), jnp.float32)
    # Rows 0..3 each read by up to k outputs, row 4 by none; index A means "zero row".
    idx = np.array([2, 0, A, 3, 2, 1, 0, A, 1], np.int32)
    inv = np.full((A, k), M, np.int32)
    for r in range(A):
        hits = np.nonzero(idx == r)[0]
        inv[r, :len(hits)] = hits
    g = jnp.asarray(rng.normal(size=(M, 3)), jnp.float32)

    def plain(a):
        return jnp.where(jnp.asarray(idx < A)[:, None], a[np.minimum(idx, A - 1)], 0.0)

    got, got_vjp = jax.vjp(lambda a: dispatch.take_rows(a, jnp.asarray(idx), jnp.asarray(inv)), a)
    want, want_vjp = jax.vjp(plain, a)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_allclose(np.asarray(got_vjp(g)[0]), np.asarray(want_vjp(g)[0]), rtol=1e-6)


def test_blocked_matmul_matches_per_block_loop_with_gradient():
    rng = np.random.default_rng(7)
    n, r, d, h, X = 5, 3, 4, 6, 3
    xb = jnp.asarray(rng.normal(size=(n, r, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(X, d, h)), jnp.float32)
    block_expert = np.array([0, 0, 2, 2, 1], np.int32)  # expert 1 after 2: order is free
    g = jnp.asarray(rng.normal(size=(n, r, h)), jnp.float32)

    def loop(xb, w):
        return jnp.stack([xb[b] @ w[block_expert[b]] for b in range(n)])

    got, got_vjp = jax.vjp(lambda xb, w: dispatch.blocked_matmul(xb, w, jnp.asarray(block_expert)),
                           xb, w)
    want, want_vjp = jax.vjp(loop, xb, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
