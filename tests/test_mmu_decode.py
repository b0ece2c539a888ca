"""MMU decoding with a KV cache equals full recomputation on the growing sequence."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.models.backbone import (build_backbone,
                                          default_config as default_model_config,
                                          unstack_layer_params)
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.sequences import build_mmu_prefix
from unif2ace_jax.models.vocab import Vocab
from unif2ace_jax.sampling.mmu import mmu_decode

VOCAB = Vocab(text_size=60, num_image_codes=32)
T = 6  # max new tokens


def _config(**overrides):
    c = default_model_config()
    c.d_model, c.num_heads, c.num_layers = 32, 4, 2
    c.ffn.hidden = 64
    c.init_std = 0.3  # peaked logits, so greedy choices are far from ties
    c.update(overrides)
    return c


def _init_params(model, prefix):
    """Unboxed variables of `model` initialised on an MMU prefix."""
    return nn.unbox(jax.jit(model.init)(
        jax.random.key(0), prefix["tokens"],
        mask=omni_attention_mask(prefix["is_pad"], prefix["image_span"]),
        positions=prefix["positions"], group=prefix["group"], valid=prefix["valid"]))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 32, (3, 4))
    question = rng.integers(0, 60, (3, 5))
    qlen = np.array([5, 2, 0])
    model = build_backbone(_config(), VOCAB)
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB, pad_side="left")
    params = _init_params(model, prefix)
    return model, params, codes, question, qlen


@functools.lru_cache(maxsize=None)
def _jitted_apply(model):
    return jax.jit(model.apply)


def _recompute(model, params, prefix, generated, mask_fn=None):
    """Logits for every step t from a full pass over ``prefix + generated[:t]``.

    The growing sequence is held in a fixed-size buffer (later slots are <pad>, masked out), so
    one compiled forward serves every step. ``mask_fn(valid, span)`` replaces the omni mask.
    """
    b, p = prefix["tokens"].shape
    fwd = _jitted_apply(model)
    allowed = (np.arange(model.vocab_size) < VOCAB.text_size) | (
        np.arange(model.vocab_size) == VOCAB.eos_id)
    out_logits, out_tokens = [], []
    for t in range(T):
        tokens = np.concatenate([np.asarray(prefix["tokens"]),
                                 np.full((b, T), VOCAB.pad_id)], 1)
        tokens[:, p:p + t] = generated[:, :t]
        valid = np.concatenate([np.asarray(prefix["valid"]), np.zeros((b, T), bool)], 1)
        valid[:, p:p + t] = True
        span = np.concatenate([np.asarray(prefix["image_span"]), np.zeros((b, T), bool)], 1)
        positions = np.where(valid, np.cumsum(valid, 1) - 1, 0)
        mask = (mask_fn or (lambda v, sp: omni_attention_mask(~v, sp)))(valid, span)
        logits = np.asarray(fwd(params, jnp.asarray(tokens), mask=mask, positions=positions,
                                group=np.zeros_like(tokens), valid=valid))
        last = np.max(np.where(valid, np.arange(p + T), -1), axis=1)
        step = logits[np.arange(b), last]
        out_logits.append(step)
        out_tokens.append(np.argmax(np.where(allowed, step, -np.inf), -1))
    return np.stack(out_logits, 1), np.stack(out_tokens, 1)


def _compare(result, ref_logits, ref_tokens):
    tokens = np.asarray(result["tokens"])
    logits = np.asarray(result["logits"])
    for b in range(tokens.shape[0]):
        n = int(result["length"][b]) + 1 if bool(result["done"][b]) else T  # incl. <eos>
        np.testing.assert_array_equal(tokens[b, :n], ref_tokens[b, :n], err_msg=f"row {b}")
        np.testing.assert_allclose(logits[b, :n], ref_logits[b, :n], atol=1e-4, rtol=1e-4)
        assert (tokens[b, n:] == VOCAB.pad_id).all()


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_kv_cache_equals_full_recomputation(setup, pad_side):
    model, params, codes, question, qlen = setup
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB, pad_side=pad_side)
    result = mmu_decode(model, params, prefix, vocab=VOCAB, max_new_tokens=T,
                        return_logits=True)
    ref_logits, ref_tokens = _recompute(model, params, prefix, np.asarray(result["tokens"]))
    _compare(result, ref_logits, ref_tokens)
    # The bidirectional image prefix matters: a plain causal mask gives other logits.
    def causal(valid, span):
        length = valid.shape[1]
        return (np.tril(np.ones((length, length), bool))[None] & valid[:, None]) | np.eye(
            length, dtype=bool)

    causal_logits, _ = _recompute(model, params, prefix, np.asarray(result["tokens"]), causal)
    assert np.abs(causal_logits[:, 0] - np.asarray(result["logits"])[:, 0]).max() > 1e-3


def test_left_and_right_padding_agree(setup):
    model, params, codes, question, qlen = setup
    res = [mmu_decode(model, params, build_mmu_prefix(codes, question, qlen, VOCAB,
                                                      pad_side=side),
                      vocab=VOCAB, max_new_tokens=T, return_logits=True)
           for side in ("left", "right")]
    np.testing.assert_array_equal(np.asarray(res[0]["tokens"]), np.asarray(res[1]["tokens"]))
    np.testing.assert_allclose(np.asarray(res[0]["logits"]), np.asarray(res[1]["logits"]),
                               atol=1e-4)
    # Each row decodes as it would alone (no batch interaction).
    alone = mmu_decode(model, params, build_mmu_prefix(codes[1:2], question[1:2, :2], qlen[1:2],
                                                       VOCAB), vocab=VOCAB, max_new_tokens=T)
    n = T if not bool(alone["done"][0]) else int(alone["length"][0]) + 1
    np.testing.assert_array_equal(np.asarray(alone["tokens"])[0, :n],
                                  np.asarray(res[0]["tokens"])[1, :n])


def _boost_eos(params, amount):
    out = jax.tree.map(lambda x: x, params)
    bias = out["params"]["lm_head"]["bias"]
    out["params"]["lm_head"]["bias"] = bias.at[VOCAB.eos_id].add(amount)
    return out


def test_rows_stop_at_their_own_eos(setup):
    model, params, codes, question, qlen = setup
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB)
    # A moderate <eos> boost makes the rows stop at different steps (checked below, so the
    # test cannot silently lose that property).
    boosted = _boost_eos(params, 1.7)
    result = mmu_decode(model, boosted, prefix, vocab=VOCAB, max_new_tokens=T,
                        return_logits=True)
    done, length = np.asarray(result["done"]), np.asarray(result["length"])
    assert done.any() and not done.all()
    assert len(set(length[done].tolist())) == int(done.sum())  # distinct stop steps
    _compare(result, *_recompute(model, boosted, prefix, np.asarray(result["tokens"])))
    # A huge boost: every row answers <eos> at once.
    forced = mmu_decode(model, _boost_eos(params, 1e4), prefix, vocab=VOCAB, max_new_tokens=T)
    tokens = np.asarray(forced["tokens"])
    np.testing.assert_array_equal(tokens[:, 0], VOCAB.eos_id)
    np.testing.assert_array_equal(tokens[:, 1:], VOCAB.pad_id)
    np.testing.assert_array_equal(np.asarray(forced["length"]), [0, 0, 0])
    assert bool(np.all(forced["done"]))


def test_top_k_sampling(setup):
    model, params, codes, question, qlen = setup
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB)
    kw = dict(vocab=VOCAB, max_new_tokens=T, temperature=1.0, top_k=3, return_logits=True)
    a = mmu_decode(model, params, prefix, rng=jax.random.key(1), **kw)
    b = mmu_decode(model, params, prefix, rng=jax.random.key(1), **kw)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    tokens, logits = np.asarray(a["tokens"]), np.asarray(a["logits"])
    allowed = (np.arange(model.vocab_size) < VOCAB.text_size) | (
        np.arange(model.vocab_size) == VOCAB.eos_id)
    for r in range(3):
        n = int(a["length"][r]) + 1 if bool(a["done"][r]) else T
        for t in range(n):
            top3 = np.argsort(np.where(allowed, logits[r, t], -np.inf))[-3:]
            assert tokens[r, t] in top3
    ref_logits, _ = _recompute(model, params, prefix, tokens)
    for r in range(3):
        n = int(a["length"][r]) + 1 if bool(a["done"][r]) else T
        np.testing.assert_allclose(logits[r, :n], ref_logits[r, :n], atol=1e-4, rtol=1e-4)


def test_unrolled_layers_decode_the_same(setup):
    model, params, codes, question, qlen = setup
    unrolled = build_backbone(_config(scan_layers=False), VOCAB)
    flat = {"params": unstack_layer_params(params["params"], 2)}
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB, pad_side="right")
    a = mmu_decode(model, params, prefix, vocab=VOCAB, max_new_tokens=T, return_logits=True)
    b = mmu_decode(unrolled, flat, prefix, vocab=VOCAB, max_new_tokens=T, return_logits=True)
    np.testing.assert_array_equal(np.asarray(a["tokens"]), np.asarray(b["tokens"]))
    np.testing.assert_allclose(np.asarray(a["logits"]), np.asarray(b["logits"]), atol=1e-5)


def test_kv_cache_equals_full_recomputation_with_image_positions(setup):
    """The image-position embedding reaches the cached prefix exactly as the full pass."""
    _, _, codes, question, qlen = setup
    model = build_backbone(_config(image_position_embedding=True), VOCAB, num_image_tokens=4)
    prefix = build_mmu_prefix(codes, question, qlen, VOCAB, pad_side="left")
    params = _init_params(model, prefix)
    assert params["params"]["embed_image_positions"]["embedding"].shape == (4, 32)
    result = mmu_decode(model, params, prefix, vocab=VOCAB, max_new_tokens=T,
                        return_logits=True)
    ref_logits, ref_tokens = _recompute(model, params, prefix, np.asarray(result["tokens"]))
    _compare(result, ref_logits, ref_tokens)
