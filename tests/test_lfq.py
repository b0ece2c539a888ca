"""LFQ math and the tokenizer losses, against numpy / exact enumeration references."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.losses import tokenizer as losses
from unif2ace_jax.models.tokenizer import lfq


def test_index_bits_round_trip_over_whole_codebook():
    k = 6
    idx = jnp.arange(2 ** k)
    bits = lfq.indices_to_bits(idx, k)
    np.testing.assert_array_equal(lfq.bits_to_indices(bits), idx)
    # and bits -> indices -> bits for random bit patterns
    rng = np.random.default_rng(0)
    rand_bits = rng.integers(0, 2, size=(5, 7, 13))
    back = lfq.indices_to_bits(lfq.bits_to_indices(jnp.asarray(rand_bits)), 13)
    np.testing.assert_array_equal(back, rand_bits)


def test_code_index_is_big_endian():
    # channel 0 is the most significant bit: python's int("b0b1...", 2)
    k = 5
    for bits in itertools.product([0, 1], repeat=k):
        expected = int("".join(map(str, bits)), 2)
        z = jnp.asarray([1.0 if b else -1.0 for b in bits])
        assert int(lfq.latents_to_indices(z)) == expected
    assert int(lfq.latents_to_indices(jnp.asarray([1.0, -1.0, -1.0]))) == 4
    assert int(lfq.latents_to_indices(jnp.asarray([-1.0, -1.0, 1.0]))) == 1


def test_sign_maps_zero_to_minus_one_and_codes_are_signs():
    z = jnp.asarray([-2.0, 0.0, 0.5, -0.0, 3.0])
    np.testing.assert_array_equal(lfq.sign_quantize(z), [-1, -1, 1, -1, 1])
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(4, 3, 10)), jnp.float32)
    codes = lfq.indices_to_codes(lfq.latents_to_indices(z), 10)
    np.testing.assert_array_equal(codes, np.where(np.asarray(z) > 0, 1.0, -1.0))
    np.testing.assert_array_equal(lfq.codebook(3)[5], [1, -1, 1])


def test_straight_through_gradient_is_identity_and_nonzero():
    z = jnp.asarray([[-0.3, 0.7, 0.0, 2.0]])
    w = jnp.asarray([[1.0, 2.0, 3.0, 4.0]])

    def f(z):
        out = lfq.LFQuantizer(bits=4).apply({}, z)
        return jnp.sum(out["quantized"] * w)

    value, grad = jax.value_and_grad(f)(z)
    assert float(value) == pytest.approx(-1 + 2 - 3 + 4)
    np.testing.assert_allclose(grad, w)
    assert np.all(np.asarray(grad) != 0)


def test_code_log_probs_equal_softmax_over_distances():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(6, 4)).astype(np.float32)
    tau = 0.7
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=4)))  # index order (big-endian)
    d = ((z[:, None, :] - codes[None]) ** 2).sum(-1)
    logits = -d / tau
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(lfq.code_log_probs(jnp.asarray(z), tau), ref, rtol=1e-5, atol=1e-5)


def _numpy_entropy_terms(z, tau, mode):
    """Direct computation: enumerate all 2^k codes, softmax over -||z-c||²/τ."""
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    k = z.shape[-1]
    codes = np.array(list(itertools.product([-1.0, 1.0], repeat=k)))
    logits = -((z[:, None, :] - codes[None]) ** 2).sum(-1) / tau
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ent = lambda q: -(q * np.log(np.maximum(q, 1e-300))).sum(-1)
    sample = ent(p).mean()
    if mode == "full":
        batch = ent(p.mean(0))
    else:  # per-bit marginals of the mean distribution
        bits = (codes > 0).astype(np.float64)  # [K, k]
        p1 = p.mean(0) @ bits  # [k]
        batch = sum(ent(np.array([a, 1 - a])) for a in p1)
    return sample, batch


@pytest.mark.parametrize("mode", ["full", "bits"])
@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_entropy_loss_matches_numpy(mode, tau):
    rng = np.random.default_rng(3)
    z = rng.normal(scale=0.8, size=(2, 3, 3, 5)).astype(np.float32)
    sample, batch = losses.lfq_entropy_terms(jnp.asarray(z), temperature=tau, mode=mode)
    ref_sample, ref_batch = _numpy_entropy_terms(z, tau, mode)
    assert float(sample) == pytest.approx(ref_sample, rel=1e-5)
    assert float(batch) == pytest.approx(ref_batch, rel=1e-5)
    loss = losses.lfq_entropy_loss(jnp.asarray(z), temperature=tau, mode=mode)
    assert float(loss) == pytest.approx(ref_sample - ref_batch, rel=1e-4, abs=1e-5)


def test_entropy_loss_prefers_confident_diverse_codes():
    # every code once, far from 0: per-sample entropy ~0, batch entropy ~k ln 2
    k = 4
    diverse = 5.0 * np.asarray(lfq.codebook(k))
    collapsed = np.full_like(diverse, 5.0)
    l_div = float(losses.lfq_entropy_loss(jnp.asarray(diverse)))
    l_col = float(losses.lfq_entropy_loss(jnp.asarray(collapsed)))
    assert l_div == pytest.approx(-k * np.log(2), abs=1e-3)
    assert l_col == pytest.approx(0.0, abs=1e-3)
    with pytest.raises(ValueError, match="entropy mode"):
        losses.lfq_entropy_terms(jnp.asarray(diverse), mode="nope")


def test_commitment_and_reconstruction_losses():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(3, 5)).astype(np.float32)
    q = np.where(z > 0, 1.0, -1.0).astype(np.float32)
    assert float(losses.commitment_loss(jnp.asarray(z), jnp.asarray(q))) == pytest.approx(
        ((z - q) ** 2).mean(), rel=1e-6)
    # no gradient flows into the codes
    g = jax.grad(lambda q: losses.commitment_loss(jnp.asarray(z), q))(jnp.asarray(q))
    np.testing.assert_array_equal(g, 0)
    x = rng.uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
    y = rng.uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)
    total, parts = losses.reconstruction_loss(jnp.asarray(x), jnp.asarray(y), l1_weight=0.5,
                                              l2_weight=2.0)
    assert float(parts["l1"]) == pytest.approx(np.abs(x - y).mean(), rel=1e-6)
    assert float(parts["l2"]) == pytest.approx(((x - y) ** 2).mean(), rel=1e-6)
    assert float(total) == pytest.approx(0.5 * np.abs(x - y).mean() + 2 * ((x - y) ** 2).mean(),
                                         rel=1e-6)


def test_hinge_losses():
    real = np.array([2.0, 0.5, -1.0])
    fake = np.array([-2.0, 0.0, 1.5])
    d = losses.hinge_discriminator_loss(jnp.asarray(real), jnp.asarray(fake))
    ref = np.maximum(0, 1 - real).mean() + np.maximum(0, 1 + fake).mean()
    assert float(d) == pytest.approx(ref)
    assert float(losses.hinge_generator_loss(jnp.asarray(fake))) == pytest.approx(-fake.mean())


def test_psnr_and_code_usage():
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, size=(2, 8, 8, 3)).astype(np.float32)
    y = np.clip(x + rng.normal(scale=5, size=x.shape), 0, 255).astype(np.float32)
    mse = ((x - y) ** 2).reshape(2, -1).mean(-1)
    np.testing.assert_allclose(losses.psnr(jnp.asarray(x), jnp.asarray(y), value_range=(0, 255)),
                               10 * np.log10(255.0 ** 2 / mse), rtol=1e-5)
    stats = losses.code_usage_stats(np.array([2, 0, 2, 0]))
    assert stats["code_usage"] == 0.5 and stats["code_perplexity"] == pytest.approx(2.0)
    stats = losses.code_usage_stats(np.array([1, 1, 1, 1, 1, 1, 1, 1]))
    assert stats["code_perplexity"] == pytest.approx(8.0)
