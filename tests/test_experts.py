"""Seq-MoE experts: copy / zero, the gated resampler formula and both resamplers vs numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models import experts as ex

B, L, D, DC = 3, 5, 8, 6


def _np_softmax(z, axis=-1, where=None):
    if where is not None:
        z = np.where(where, z, -np.inf)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _np_ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_mlp(c, r):
    h = _np_gelu_tanh(c @ r["fc1"]["kernel"] + r["fc1"]["bias"])
    return h @ r["fc2"]["kernel"] + r["fc2"]["bias"]


def _expert(**kw):
    cfg = ml_collections.ConfigDict(dict(kind="feature", feature_key="clip", feature_dim=DC,
                                         encoder="precomputed", resampler="mlp",
                                         resampler_hidden=7, num_heads=2, feature_norm=True))
    cfg.update(kw)
    return ex.build_expert("clip", {"clip": cfg}, d_model=D, dtype=jnp.float32,
                           param_dtype=jnp.float32)


def _params(module, x, feats, seed=0):
    """Random values (biases, LN params included) in the module's parameter shapes."""
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), x, features=feats))
    rng = np.random.default_rng(seed)
    boxed = abstract["params"]
    for box in jax.tree.leaves(boxed, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned)):
        assert isinstance(box, nn.LogicallyPartitioned) and len(box.names) == box.value.ndim
    return jax.tree.map(lambda a: rng.normal(size=a.shape).astype(np.float32) * 0.5,
                        nn.unbox(boxed))


def _apply(module, params, x, feats):
    return np.asarray(jax.jit(lambda p, x, f: module.apply({"params": p}, x, features=f))(
        params, x, feats))


def _data(seed=0, tokens=None):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    shape = (B, DC) if tokens is None else (B, tokens, DC)
    return x, {"clip": rng.normal(size=shape).astype(np.float32)}


def test_gated_mix_vs_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, L, D)).astype(np.float32)
    g = rng.normal(size=(B, L, 2)).astype(np.float32)
    s = rng.normal(size=(B, 1, D)).astype(np.float32)
    a = _np_softmax(g)[..., :1]
    np.testing.assert_allclose(np.asarray(ex.gated_mix(x, g, s)), a * x + (1 - a) * s,
                               rtol=1e-5, atol=1e-6)


def test_copy_and_zero_experts():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, L, D)), jnp.float32)
    copy = ex.build_expert("copy", None, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    zero = ex.build_expert("zero", None, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
    assert np.array_equal(copy.apply({}, x), x)
    assert np.array_equal(zero.apply({}, x), np.zeros_like(x))


def test_feature_expert_mlp_resampler_vs_numpy():
    m = _expert()
    x, feats = _data()
    p = _params(m, x, feats)
    got = _apply(m, p, x, feats)
    c = _np_ln(feats["clip"], p["feature_norm"])
    r = p["resampler"]
    s = _np_mlp(c, r)
    a = _np_softmax(x @ p["gate"]["kernel"] + p["gate"]["bias"])[..., :1]
    ref = a * x + (1 - a) * s[:, None, :]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_mlp_resampler_pools_feature_tokens_with_mask():
    m = _expert()
    x, feats = _data(tokens=4)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    feats["clip_mask"] = mask
    p = _params(m, x, feats)
    got = _apply(m, p, x, feats)
    # LayerNorm acts per token before pooling: reference = mean of LN(c) over existing tokens.
    c = _np_ln(feats["clip"], p["feature_norm"])
    pooled = np.stack([c[b][mask[b]].mean(0) for b in range(B)])
    r = p["resampler"]
    s = _np_mlp(pooled, r)
    a = _np_softmax(x @ p["gate"]["kernel"] + p["gate"]["bias"])[..., :1]
    np.testing.assert_allclose(got, a * x + (1 - a) * s[:, None, :], rtol=1e-4, atol=1e-5)


def _np_cross_attention(x, c, mask, p):
    r = p["resampler"]
    q = np.einsum("bld,dhk->blhk", x, r["q_proj"]["kernel"]) + r["q_proj"]["bias"]
    k = np.einsum("btc,chk->bthk", c, r["k_proj"]["kernel"]) + r["k_proj"]["bias"]
    v = np.einsum("btc,chk->bthk", c, r["v_proj"]["kernel"]) + r["v_proj"]["bias"]
    out = np.zeros(q.shape)
    for b in range(x.shape[0]):
        if not mask[b].any():
            continue
        for h in range(q.shape[2]):
            sc = q[b, :, h] @ k[b, :, h].T / np.sqrt(q.shape[-1])
            out[b, :, h] = _np_softmax(sc, where=mask[b][None, :]) @ v[b, :, h]
    return np.einsum("blhk,hkd->bld", out, r["out_proj"]["kernel"]) + r["out_proj"]["bias"]


def test_cross_attention_resampler_vs_numpy_shapes_and_masking():
    m = _expert(resampler="cross_attention")
    x, feats = _data(tokens=4)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], bool)
    feats["clip_mask"] = mask
    p = _params(m, x, feats)
    r = p["resampler"]
    assert r["q_proj"]["kernel"].shape == (D, 2, D // 2)
    assert r["k_proj"]["kernel"].shape == (DC, 2, D // 2)
    got = _apply(m, p, x, feats)
    assert got.shape == (B, L, D)
    c = _np_ln(feats["clip"], p["feature_norm"])
    s = _np_cross_attention(x, c, mask, p)
    a = _np_softmax(x @ p["gate"]["kernel"] + p["gate"]["bias"])[..., :1]
    np.testing.assert_allclose(got, a * x + (1 - a) * s, rtol=1e-4, atol=1e-5)
    # Masked-out feature tokens have no influence.
    feats2 = dict(feats, clip=np.where(mask[..., None], feats["clip"], 9.0).astype(np.float32))
    np.testing.assert_allclose(_apply(m, p, x, feats2), got, rtol=1e-6, atol=1e-6)
    # A row without feature tokens resamples to the output bias only.
    row = a[2] * x[2] + (1 - a[2]) * r["out_proj"]["bias"]
    np.testing.assert_allclose(got[2], row, rtol=1e-5, atol=1e-5)


def test_masked_cross_attention_single_token_is_its_value():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(2, 3, 2, 4)).astype(np.float32)
    k = rng.normal(size=(2, 1, 2, 4)).astype(np.float32)
    v = rng.normal(size=(2, 1, 2, 4)).astype(np.float32)
    out = np.asarray(ex.masked_cross_attention(q, k, v, jnp.ones((2, 1), bool)))
    np.testing.assert_allclose(out, np.broadcast_to(v, (2, 3, 2, 4)), rtol=1e-6)


def test_noise_expert_embeds_the_mask_ratio_inside():
    from unif2ace_jax.models.encoders.noise import sinusoidal_embedding

    m = _expert(feature_key="mask_ratio", encoder="noise", encoder_config=dict(dim=6),
                feature_dim=6, feature_norm=False)
    x = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
    feats = {"mask_ratio": np.array([0.0, 0.3, 1.0], np.float32)}
    p = _params(m, x, feats)
    assert p["resampler"]["fc1"]["kernel"].shape == (6, 7)
    got = _apply(m, p, x, feats)
    c = np.asarray(sinusoidal_embedding(feats["mask_ratio"], 6))
    r = p["resampler"]
    s = _np_mlp(c, r)
    a = _np_softmax(x @ p["gate"]["kernel"] + p["gate"]["bias"])[..., :1]
    np.testing.assert_allclose(got, a * x + (1 - a) * s[:, None], rtol=1e-4, atol=1e-5)


def test_bad_inputs_raise_user_errors():
    x, feats = _data()
    m = _expert()
    with pytest.raises(UserError, match="width 6.*feature_dim=5"):
        jax.eval_shape(lambda: _expert(feature_dim=5).init(jax.random.key(0), x, features=feats))
    with pytest.raises(UserError, match="clip_mask"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), x,
                                      features=dict(feats, clip_mask=np.ones((B, 3), bool))))
    with pytest.raises(UserError, match="needs features"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), x, features={}))
    with pytest.raises(UserError, match="unknown resampler"):
        _expert(resampler="perceiver")
    with pytest.raises(UserError, match="unknown encoder"):
        _expert(encoder="arcface")
    with pytest.raises(UserError, match="unknown seq-MoE expert"):
        ex.build_expert("clip", None, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)
