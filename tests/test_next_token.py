"""Weighted next-token CE against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.losses import next_token_loss


def np_ce(logits, targets):
    f = np.asarray(logits, np.float64)
    mx = f.max(-1, keepdims=True)
    lp = f - mx - np.log(np.exp(f - mx).sum(-1, keepdims=True))
    return -np.take_along_axis(lp, targets[..., None], -1)[..., 0]


def batch(seed, b=3, l=7, v=11):
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(b, l, v)) * 3).astype(np.float32)
    targets = rng.integers(0, v, size=(b, l))
    weights = (rng.random((b, l)) < 0.6) * rng.choice([0.5, 1.0, 2.0], size=(b, l))
    weights[0, 0] = 1.0
    return logits, targets, weights.astype(np.float32)


def test_weighted_mean_ce_and_accuracy():
    logits, targets, weights = batch(0)
    loss, aux = jax.jit(next_token_loss)(jnp.asarray(logits), jnp.asarray(targets),
                                         jnp.asarray(weights))
    ce = np_ce(logits, targets)
    ref = (weights * ce).sum() / weights.sum()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    np.testing.assert_allclose(float(aux["ce_sum"]), (weights * ce).sum(), rtol=1e-6)
    np.testing.assert_allclose(float(aux["weight_sum"]), weights.sum(), rtol=1e-6)
    assert float(aux["num_tokens"]) == float((weights > 0).sum())
    acc = (weights * (logits.argmax(-1) == targets)).sum() / weights.sum()
    np.testing.assert_allclose(float(aux["accuracy"]), acc, rtol=1e-6)


def test_zero_weight_places_are_ignored_even_with_bad_targets():
    logits, targets, weights = batch(1)
    bad = np.where(weights > 0, targets, -1)  # pad label where the weight is 0
    big = np.where(weights[..., None] > 0, logits, 1e4).astype(np.float32)
    l1, _ = next_token_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    l2, _ = next_token_loss(jnp.asarray(big), jnp.asarray(bad), jnp.asarray(weights))
    np.testing.assert_allclose(float(l1), float(l2), rtol=1e-6)


def test_no_weight_gives_zero_and_finite_grad():
    logits, targets, _ = batch(2)
    w = jnp.zeros(targets.shape)
    (loss, aux), g = jax.value_and_grad(next_token_loss, has_aux=True)(
        jnp.asarray(logits), jnp.asarray(targets), w)
    assert float(loss) == 0.0 and float(aux["accuracy"]) == 0.0
    assert np.all(np.asarray(g) == 0)


def test_bf16_logits_computed_in_float32():
    logits, targets, weights = batch(3)
    lb = jnp.asarray(logits, jnp.bfloat16)
    loss, _ = next_token_loss(lb, jnp.asarray(targets), jnp.asarray(weights))
    assert loss.dtype == jnp.float32
    ce = np_ce(np.asarray(lb.astype(jnp.float32)), targets)
    np.testing.assert_allclose(float(loss), (weights * ce).sum() / weights.sum(), rtol=1e-6)


def test_shape_errors():
    logits, targets, weights = map(jnp.asarray, batch(4))
    with pytest.raises(UserError, match="targets"):
        next_token_loss(logits, targets[:, 1:], weights)
    with pytest.raises(UserError, match="weights"):
        next_token_loss(logits, targets, weights[:1])
    with pytest.raises(UserError, match="logits"):
        next_token_loss(logits[0], targets, weights)
