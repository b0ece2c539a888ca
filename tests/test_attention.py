"""Attention: masked softmax vs numpy, Phi param layout, and the KV-cache path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.models.attention import Attention, dot_product_attention
from unif2ace_jax.models.rotary import apply_rotary


def _numpy_attention(q, k, v, mask):
    b, t, h, d = q.shape
    out = np.zeros_like(q, dtype=np.float64)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                s = np.array([q[bi, ti, hi] @ k[bi, si, hi] for si in range(k.shape[1])])
                s = s / np.sqrt(d)
                s = np.where(mask[bi, ti], s, -np.inf)
                p = np.exp(s - s.max())
                p /= p.sum()
                out[bi, ti, hi] = p @ v[bi, :, hi]
    return out


def test_dot_product_attention_vs_numpy():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 3, 2, 4)).astype(np.float32)
    k = rng.standard_normal((2, 5, 2, 4)).astype(np.float32)
    v = rng.standard_normal((2, 5, 2, 4)).astype(np.float32)
    mask = rng.random((2, 3, 5)) < 0.6
    mask[..., 0] = True
    got = np.asarray(dot_product_attention(q, k, v, mask))
    np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), atol=1e-5)


def _module():
    return Attention(num_heads=2, head_dim=8, rotary_dim=4, init_std=0.3)


def test_param_layout_and_logical_names():
    x = jnp.ones((1, 3, 16))
    mask = jnp.tril(jnp.ones((1, 3, 3), bool))
    variables = _module().init(jax.random.key(0), x, mask=mask, positions=jnp.arange(3)[None])
    boxed = variables["params"]
    assert set(boxed) == {"q_proj", "k_proj", "v_proj", "dense"}
    for name in ("q_proj", "k_proj", "v_proj"):
        assert boxed[name]["kernel"].names == ("embed", "heads", "kv")
        assert boxed[name]["kernel"].value.shape == (16, 2, 8)
        assert boxed[name]["bias"].names == ("heads", "kv")
    assert boxed["dense"]["kernel"].names == ("heads", "kv", "embed")
    assert boxed["dense"]["bias"].names == ("embed",)


def test_cache_chunks_equal_full_pass():
    """Prefill 3 tokens, then 2 more one at a time: same outputs as one causal pass."""
    rng = np.random.default_rng(1)
    b, length, s = 2, 5, 7
    x = jnp.asarray(rng.standard_normal((b, length, 16)), jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    causal = jnp.tril(jnp.ones((length, length), bool))[None].repeat(b, 0)
    mod = _module()
    params = nn.unbox(mod.init(jax.random.key(0), x, mask=causal, positions=positions))
    apply = jax.jit(mod.apply)
    full, _ = apply(params, x, mask=causal, positions=positions)

    cache = {"k": jnp.zeros((b, s, 2, 8)), "v": jnp.zeros((b, s, 2, 8))}
    slot_mask = jnp.zeros((b, length, s), bool).at[:, :, :length].set(causal)
    out0, cache = apply(params, x[:, :3], mask=slot_mask[:, :3], positions=positions[:, :3],
                            cache=cache, cache_index=0)
    outs = [out0]
    for t in (3, 4):
        o, cache = apply(params, x[:, t:t + 1], mask=slot_mask[:, t:t + 1],
                             positions=positions[:, t:t + 1], cache=cache, cache_index=t)
        outs.append(o)
    np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(full),
                               atol=1e-5)
    assert np.abs(np.asarray(cache["k"][:, 5:])).max() == 0  # untouched slots


def test_bf16_compute_close_to_f32():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((1, 4, 16)), jnp.float32)
    mask = jnp.tril(jnp.ones((1, 4, 4), bool))
    pos = jnp.arange(4)[None]
    params = nn.unbox(_module().init(jax.random.key(0), x, mask=mask, positions=pos))
    f32, _ = _module().apply(params, x, mask=mask, positions=pos)
    bf16_mod = Attention(num_heads=2, head_dim=8, rotary_dim=4, dtype=jnp.bfloat16)
    bf16, _ = bf16_mod.apply(params, x, mask=mask, positions=pos)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=0.05)


def test_qk_layernorm_normalises_each_head_before_rotary():
    """Show-o's Phi: per-head LayerNorm of q and k ([Dh] params shared by heads), then rotary."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 3, 16)), jnp.float32)
    mask = jnp.tril(jnp.ones((1, 3, 3), bool))
    pos = jnp.arange(3)[None]
    mod = Attention(num_heads=2, head_dim=8, rotary_dim=4, init_std=0.3, qk_layernorm=True)
    boxed = mod.init(jax.random.key(0), x, mask=mask, positions=pos)["params"]
    for name in ("q_layernorm", "k_layernorm"):
        assert boxed[name]["scale"].names == ("kv",) and boxed[name]["scale"].value.shape == (8,)
        assert boxed[name]["bias"].names == ("kv",)
    params = nn.unbox(boxed)
    params["q_layernorm"]["scale"] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    params["k_layernorm"]["bias"] = jnp.asarray(rng.standard_normal(8), jnp.float32)
    got, _ = mod.apply({"params": params}, x, mask=mask, positions=pos)

    def proj(name):
        p = params[name]
        return np.einsum("btd,dhk->bthk", np.asarray(x), p["kernel"]) + np.asarray(p["bias"])

    def norm(y, p):
        mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
        return (y - mu) / np.sqrt(var + 1e-5) * np.asarray(p["scale"]) + np.asarray(p["bias"])

    q = apply_rotary(jnp.asarray(norm(proj("q_proj"), params["q_layernorm"])), pos, rotary_dim=4)
    k = apply_rotary(jnp.asarray(norm(proj("k_proj"), params["k_layernorm"])), pos, rotary_dim=4)
    ctx = _numpy_attention(np.asarray(q), np.asarray(k), proj("v_proj"), np.asarray(mask))
    want = np.einsum("bthk,hkd->btd", ctx, params["dense"]["kernel"]) + params["dense"]["bias"]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
