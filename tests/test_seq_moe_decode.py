"""KV-cache MMU decoding of a model with token- and sequence-level MoE equals full recomputation.

The sequence router pools the prompt only (`seq_routing.prompt_pool_mask`); the decoder keeps the
pooled sum in the cache, so every decode step routes exactly as a full pass over the grown
sequence with the same pool mask.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import unif2ace_jax.models.moe  # noqa: F401  (registers token_moe, grouped_seq_moe)
from unif2ace_jax.models.backbone import (POOL_COUNT, POOL_SUM, build_backbone,
                                          default_config as default_model_config)
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.moe import seq_routing
from unif2ace_jax.models.sequences import TASK_MMU, build_mmu_prefix
from unif2ace_jax.models.vocab import Vocab
from unif2ace_jax.sampling.mmu import mmu_decode

VOCAB = Vocab(text_size=60, num_image_codes=32)
T = 5
B = 3


def _config():
    c = default_model_config()
    c.d_model, c.num_heads, c.num_layers = 32, 4, 2
    c.init_std = 0.3
    c.ffn = ml_collections.ConfigDict(dict(
        name="token_moe", num_routed=4, num_shared=1, top_k=2, routed_hidden=16,
        shared_hidden=32, dispatch="ragged"))
    feature = dict(kind="feature", resampler="mlp", resampler_hidden=16, feature_norm=True,
                   encoder_config=dict())
    c.seq_moe = ml_collections.ConfigDict(dict(
        name="grouped_seq_moe",
        groups=dict(und=["copy", "zero", "clip", "noise"], gen=["copy", "zero"]),
        experts=dict(
            clip=dict(feature, feature_key="clip", feature_dim=8, encoder="precomputed"),
            noise=dict(feature, feature_key="mask_ratio", feature_dim=16, encoder="noise",
                       encoder_config=dict(dim=16))),
        top_k=2))
    return c


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, (B, 4))
    question = rng.integers(0, 60, (B, 5))
    qlen = np.array([5, 2, 1])
    model = build_backbone(_config(), VOCAB)
    features = {"task": jnp.full((B,), TASK_MMU, jnp.int32),
                "mask_ratio": jnp.asarray(rng.uniform(size=B), jnp.float32),
                "clip": jnp.asarray(rng.normal(size=(B, 8)), jnp.float32),
                # A row without the feature: its router cannot pick clip (prefill and steps).
                "clip_present": jnp.asarray([True, False, True])}
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB, pad_side="left")
    variables = jax.jit(model.init)(
        jax.random.key(1), prefix["tokens"],
        mask=omni_attention_mask(prefix["is_pad"], prefix["image_span"]),
        positions=prefix["positions"], group=prefix["group"], valid=prefix["valid"],
        features=features)
    return model, nn.unbox(variables), prefix, features


def _recompute(model, params, prefix, generated, features, pool_generated=False):
    """Step-t logits of full passes over ``prefix + generated[:t]`` (fixed-size buffer)."""
    b, p = prefix["tokens"].shape
    fwd = jax.jit(model.apply)
    out = []
    for t in range(T):
        tokens = np.concatenate([np.asarray(prefix["tokens"]), np.full((b, T), VOCAB.pad_id)], 1)
        tokens[:, p:p + t] = generated[:, :t]
        valid = np.concatenate([np.asarray(prefix["valid"]), np.zeros((b, T), bool)], 1)
        valid[:, p:p + t] = True
        span = np.concatenate([np.asarray(prefix["image_span"]), np.zeros((b, T), bool)], 1)
        positions = np.where(valid, np.cumsum(valid, 1) - 1, 0)
        pool = valid if pool_generated else np.concatenate(
            [np.asarray(prefix["valid"]), np.zeros((b, T), bool)], 1)
        logits = np.asarray(fwd(params, jnp.asarray(tokens),
                                mask=omni_attention_mask(~valid, span), positions=positions,
                                group=np.zeros_like(tokens), valid=valid,
                                features=dict(features, pool_mask=pool)))
        last = np.max(np.where(valid, np.arange(p + T), -1), axis=1)
        out.append(logits[np.arange(b), last])
    return np.stack(out, 1)


def test_cache_holds_the_pooled_router_input():
    model = build_backbone(_config(), VOCAB)
    cache = model.init_cache(B, 7)
    assert cache[POOL_SUM].shape == (2, B, 32) and cache[POOL_COUNT].shape == (2, B)


@pytest.mark.slow
def test_kv_cache_decoding_equals_full_recomputation_with_seq_moe(setup):
    model, params, prefix, features = setup
    result = mmu_decode(model, params, prefix, vocab=VOCAB, max_new_tokens=T,
                        return_logits=True, features=features)
    generated = np.asarray(result["tokens"])
    ref = _recompute(model, params, prefix, generated, features)
    got = np.asarray(result["logits"])
    for b in range(B):
        n = int(result["length"][b]) + 1 if bool(result["done"][b]) else T
        np.testing.assert_allclose(got[b, :n], ref[b, :n], atol=1e-4, rtol=1e-4)
    # Pooling the generated tokens too (the routing the cache avoids) gives other logits, so
    # the comparison above does depend on the seq-MoE's pooled routing.
    leaky = _recompute(model, params, prefix, generated, features, pool_generated=True)
    assert np.abs(leaky[:, 1:] - ref[:, 1:]).max() > 1e-4


def test_prompt_pool_mask_matches_a_loop():
    rng = np.random.default_rng(3)
    valid = rng.uniform(size=(4, 9)) < 0.8
    weights = (rng.uniform(size=(4, 9)) < 0.4).astype(np.float32)
    got = np.asarray(seq_routing.prompt_pool_mask(jnp.asarray(valid), jnp.asarray(weights)))
    want = np.zeros_like(valid)
    for b in range(4):
        for i in range(9):
            predicted = i > 0 and weights[b, i - 1] > 0
            want[b, i] = valid[b, i] and not predicted
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(seq_routing.prompt_pool_mask(valid)), valid)


def test_pooled_sum_agrees_with_pooled_mean():
    rng = np.random.default_rng(4)
    h = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = rng.uniform(size=(3, 5)) < 0.5
    mask[2] = False
    s, c = seq_routing.pooled_sum(jnp.asarray(h), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(s), (h * mask[..., None]).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(c), mask.sum(1))
    np.testing.assert_allclose(np.asarray(s) / np.maximum(np.asarray(c), 1)[:, None],
                               np.asarray(seq_routing.pooled_mean(jnp.asarray(h),
                                                                  jnp.asarray(mask))),
                               rtol=1e-6, atol=1e-7)


def test_training_sequences_pool_the_prompt_only():
    """An MMU row's answer and an LM row's text never reach the sequence router."""
    from unif2ace_jax.models.sequences import build_sequences

    batch = {"task": np.array([0, 1, 2], np.int32),
             "text": np.array([[5, 6, 7], [8, 9, 0], [11, 12, 13]], np.int32),
             "text_len": np.array([3, 2, 3], np.int32),
             "answer": np.array([[20, 21], [22, 23], [0, 0]], np.int32),
             "answer_len": np.array([0, 2, 0], np.int32),
             "image_codes": np.zeros((3, 4), np.int32)}
    seqs = build_sequences(batch, VOCAB)
    pool = np.asarray(seq_routing.prompt_pool_mask(seqs["valid"], seqs["target_weights"]))
    tokens, valid = np.asarray(seqs["tokens"]), np.asarray(seqs["valid"])
    np.testing.assert_array_equal(pool[0], valid[0])  # T2I: everything
    mmu = tokens[1][pool[1]].tolist()
    assert 22 not in mmu and 23 not in mmu and VOCAB.eos_id not in mmu
    assert 8 in mmu and 9 in mmu and VOCAB.mmu_id in mmu
    assert tokens[2][pool[2]].tolist() == [VOCAB.bos_id]  # LM: <bos> only
