"""Feature encoders: the registry, the noise embedding, and the Flax CLIP vision tower vs numpy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders import ENCODERS, load_encoder
from unif2ace_jax.models.encoders import clip_vision as cv
from unif2ace_jax.models.encoders.noise import NoiseEncoder, sinusoidal_embedding

TINY = cv.CLIPVisionSettings(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                             num_attention_heads=2, image_size=16, patch_size=8)


def test_registry_names_and_errors():
    assert {"noise", "precomputed", "clip_vision"} <= set(ENCODERS.names())
    assert ENCODERS.get("noise").in_model and not ENCODERS.get("clip_vision").in_model
    with pytest.raises(UserError, match="unknown encoder 'arcface'"):
        ENCODERS.get("arcface")
    with pytest.raises(UserError, match="inside the model"):
        load_encoder("noise", {})
    with pytest.raises(UserError, match="precomputed"):
        load_encoder("precomputed", {})
    with pytest.raises(UserError, match="encoder_config.path"):
        load_encoder("clip_vision", {})


def test_sinusoidal_embedding_vs_numpy():
    r = np.array([0.0, 0.25, 0.9], np.float32)
    got = np.asarray(sinusoidal_embedding(r, 8, max_period=100.0, scale=10.0))
    ref = np.zeros((3, 8))
    for b in range(3):
        for i in range(4):
            w = 100.0 ** (-i / 4)
            ref[b, i] = np.sin(10.0 * r[b] * w)
            ref[b, 4 + i] = np.cos(10.0 * r[b] * w)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    out = NoiseEncoder(dim=8, max_period=100.0, scale=10.0).apply({}, r[:, None])
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="even"):
        sinusoidal_embedding(r, 7)


# -------------------------------------------------------------------------------------------
# CLIP vision tower vs an independent numpy forward pass.

def _np_ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_clip(pixels, p, s: cv.CLIPVisionSettings):
    b = pixels.shape[0]
    g, ps = s.image_size // s.patch_size, s.patch_size
    w = p["patch_embedding"]["kernel"]  # [p, p, C, D]
    patches = np.zeros((b, g * g, s.hidden_size))
    for i in range(g):
        for j in range(g):
            block = pixels[:, i * ps:(i + 1) * ps, j * ps:(j + 1) * ps, :]
            patches[:, i * g + j] = np.einsum("bxyc,xycd->bd", block, w)
    x = np.concatenate([np.broadcast_to(p["class_embedding"], (b, 1, s.hidden_size)), patches], 1)
    x = _np_ln(x + p["position_embedding"][None], p["pre_layernorm"])
    h, hd = s.num_attention_heads, s.hidden_size // s.num_attention_heads
    for n in range(s.num_hidden_layers):
        lp = p[f"layers_{n}"]
        a = lp["self_attn"]
        y = _np_ln(x, lp["layer_norm1"])
        q, k, v = (np.einsum("btd,dhk->bthk", y, a[nm]["kernel"]) + a[nm]["bias"]
                   for nm in ("q_proj", "k_proj", "v_proj"))
        sc = np.einsum("bqhk,bthk->bhqt", q, k) / np.sqrt(hd)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        o = np.einsum("bhqt,bthk->bqhk", sc, v)
        x = x + np.einsum("bqhk,hkd->bqd", o, a["out_proj"]["kernel"]) + a["out_proj"]["bias"]
        y = _np_ln(x, lp["layer_norm2"]) @ lp["fc1"]["kernel"] + lp["fc1"]["bias"]
        y = y / (1 + np.exp(-1.702 * y))  # quick_gelu
        x = x + y @ lp["fc2"]["kernel"] + lp["fc2"]["bias"]
    return x, _np_ln(x[:, 0], p["post_layernorm"])


def _random_tower_params(seed=0):
    tower = cv.CLIPVisionTower(TINY)
    abstract = jax.eval_shape(tower.init, jax.random.key(0),
                              jnp.zeros((1, 16, 16, 3), jnp.float32))["params"]
    boxes = jax.tree.leaves(abstract, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim
               for b in boxes)
    rng = np.random.default_rng(seed)
    return tower, jax.tree.map(lambda a: (rng.normal(size=a.shape) * 0.3).astype(np.float32),
                               nn.unbox(abstract))


def test_clip_tower_matches_numpy_forward():
    tower, params = _random_tower_params()
    pixels = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = jax.jit(lambda p, x: tower.apply({"params": p}, x))(params, pixels)
    assert out["tokens"].shape == (2, TINY.num_tokens, 16) and out["pooled"].shape == (2, 16)
    tokens, pooled = _np_clip(pixels, params, TINY)
    np.testing.assert_allclose(np.asarray(out["tokens"]), tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["pooled"]), pooled, rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="NHWC"):
        tower.apply({"params": params}, np.zeros((2, 3, 16, 16), np.float32))


def test_clip_settings_validation():
    with pytest.raises(UserError, match="divisible"):
        cv.CLIPVisionSettings(hidden_size=10, num_attention_heads=3)
    with pytest.raises(UserError, match="hidden_act"):
        cv.CLIPVisionSettings(hidden_act="swish")


def test_clip_preprocess_resizes_crops_and_normalises():
    img = np.full((2, 20, 30, 3), 255, np.uint8)
    x = np.asarray(cv.clip_preprocess(img, 16))
    assert x.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(x[0, 0, 0], (1 - np.array(cv.CLIP_MEAN)) / np.array(cv.CLIP_STD),
                               rtol=1e-4)


def test_saved_tower_loads_as_a_frozen_encoder(tmp_path):
    tower, params = _random_tower_params(seed=2)
    cv.save_clip_vision(str(tmp_path), TINY, params, source="test")
    enc = load_encoder("clip_vision", {"path": str(tmp_path), "output": "pooled"})
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
    got = np.asarray(enc.encode(images))
    _, pooled = _np_clip(np.asarray(cv.clip_preprocess(images, 16)), params, TINY)
    np.testing.assert_allclose(got, pooled, rtol=1e-4, atol=1e-4)
    tokens = load_encoder("clip_vision", {"path": str(tmp_path), "output": "tokens"})
    assert tokens.encode(images).shape == (2, TINY.num_tokens, 16)
    with pytest.raises(UserError, match="not a converted CLIP"):
        cv.load_clip_vision(str(tmp_path / "missing"))
