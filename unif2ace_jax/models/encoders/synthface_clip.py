"""The SynthFace CLIP-style encoder (`synthface_clip`): an image tower and a text tower trained
contrastively on SynthFace captions; the seq-MoE ``clip`` expert consumes the image tower.

    image tower:  `ConvImageEncoder` (synthface_face.py; its own weights)
                  uint8 [B, H, W, 3] -> {"tokens": [B, h·w, D], "pooled": [B, D] unit norm}
    text tower:   `TextTower`, SentencePiece ids (the data stage's text model) ->
                  {"tokens": [B, L, W], "pooled": [B, D] unit norm}
    loss:         symmetric InfoNCE over the batch with a learned inverse temperature
                  exp(log_scale), log_scale initialised to log(1 / 0.07) and clipped to
                  [0, log 100] as in CLIP (`contrastive.info_nce_loss`).

Trained by ``python -m unif2ace_jax.train.encoders --kind=clip``. Only the image tower is
needed to compute the expert's feature (``encoder_config.output`` = "pooled" or "tokens").
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.models.encoders.contrastive import l2_normalize
from unif2ace_jax.models.encoders.synthface_face import ConvImageEncoder, make_image_encoder
from unif2ace_jax.utils.defaults import with_defaults

MAX_LOG_SCALE = math.log(100.0)


def _dense(features, names, name, dtype, param_dtype, axis=-1):
    return nn.DenseGeneral(
        features, axis=axis, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, names[-len(features):] if isinstance(features, tuple)
            else names[-1:]))


def _layer_norm(name: str, dtype, param_dtype) -> nn.LayerNorm:
    return nn.LayerNorm(dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def masked_self_attention(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
    """Bidirectional attention over the valid tokens.

    ``q, k, v: [B, L, H, Dh]``, ``valid: [B, L] bool`` -> ``[B, L, H, Dh]`` (softmax in float32,
    scores scaled by ``Dh^-1/2``; keys that are not valid get no weight).
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    scores = jnp.where(valid[:, None, None, :], scores, -1e9)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class TextLayer(nn.Module):
    """Pre-LN transformer layer with a key-padding mask. ``x: [B, L, W] -> [B, L, W]``."""

    num_heads: int
    mlp_ratio: int = 4
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        w = x.shape[-1]
        hd = w // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = _layer_norm("ln1", **kw)(x)
        q, k, v = (_dense((self.num_heads, hd), ("embed", "heads", "kv"), n, **kw)(h)
                   for n in ("q", "k", "v"))
        att = masked_self_attention(q, k, v, valid)
        x = x + _dense(w, ("heads", "kv", "embed"), "out", axis=(-2, -1), **kw)(att)
        h = _layer_norm("ln2", **kw)(x)
        h = nn.gelu(_dense(self.mlp_ratio * w, ("embed", "mlp"), "fc1", **kw)(h))
        return x + _dense(w, ("mlp", "embed"), "fc2", **kw)(h)


class TextTower(nn.Module):
    """``ids: int [B, L]``, ``lengths: int [B]`` -> ``{"tokens": [B, L, W], "pooled": [B, D]}``.

    Token + learned position embeddings, `num_layers` bidirectional layers over the first
    ``lengths[b]`` ids, final LayerNorm, mean over the valid tokens, projection to D, unit norm.
    """

    vocab_size: int
    max_len: int = 128
    width: int = 128
    num_layers: int = 2
    num_heads: int = 4
    embed_dim: int = 128
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
        b, length = ids.shape
        if length > self.max_len:
            raise ValueError(f"text of {length} ids is longer than max_len {self.max_len}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        table = self.param("token_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), ("vocab", "embed")), (self.vocab_size, self.width),
            self.param_dtype)
        pos = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.01), (None, "embed")), (self.max_len, self.width),
            self.param_dtype)
        valid = jnp.arange(length)[None, :] < jnp.asarray(lengths)[:, None]
        x = (jnp.take(table, ids, axis=0) + pos[None, :length]).astype(self.dtype)
        for i in range(self.num_layers):
            x = TextLayer(self.num_heads, name=f"layers_{i}", **kw)(x, valid)
        x = _layer_norm("ln_final", **kw)(x)
        w = valid.astype(jnp.float32)[..., None]
        mean = jnp.sum(x.astype(jnp.float32) * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
        pooled = _dense(self.embed_dim, ("embed", "feature"), "projection", **kw)(mean)
        return {"tokens": x.astype(jnp.float32), "pooled": l2_normalize(pooled)}


class SynthFaceCLIP(nn.Module):
    """Both towers and the learned temperature.

    ``__call__(images, ids, lengths) -> (image [B, D], text [B, D], log_scale [])``;
    `encode_image` / `encode_text` run one tower (dicts as the towers return).
    """

    image: ConvImageEncoder
    text: TextTower
    init_temperature: float = 0.07

    def setup(self):
        self.log_scale = self.param("log_scale", nn.with_logical_partitioning(
            nn.initializers.constant(math.log(1.0 / self.init_temperature)), ()), ())

    def encode_image(self, images: jax.Array) -> dict[str, jax.Array]:
        return self.image(images)

    def encode_text(self, ids: jax.Array, lengths: jax.Array) -> dict[str, jax.Array]:
        return self.text(ids, lengths)

    def __call__(self, images: jax.Array, ids: jax.Array, lengths: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        log_scale = jnp.clip(self.log_scale.astype(jnp.float32), 0.0, MAX_LOG_SCALE)
        return self.image(images)["pooled"], self.text(ids, lengths)["pooled"], log_scale


def default_config() -> ml_collections.ConfigDict:
    """Every field of ``config.clip.model``, with its default: the image tower's fields but
    ``embed_dim`` / dtypes (`synthface_face.default_config`; those are the model's), the text
    tower's, the shared ``embed_dim`` and the initial InfoNCE temperature."""
    return ml_collections.ConfigDict(dict(
        embed_dim=128,
        image=dict(widths=(32, 64, 96), blocks=1, resolution=64, normalize=True),
        text=dict(max_len=128, width=64, num_layers=2, num_heads=4),
        init_temperature=0.07, dtype="float32", param_dtype="float32"))


def full_config(cfg) -> ml_collections.ConfigDict:
    """``config.clip.model``: `default_config` updated with `cfg` (unknown fields refused)."""
    return with_defaults(default_config(), cfg, "clip.model")


def image_tower_config(cfg) -> dict:
    """The `synthface_face.make_image_encoder` config of the clip model's image tower."""
    cfg = full_config(cfg)
    return dict(cfg.image.to_dict(), embed_dim=int(cfg.embed_dim), dtype=cfg.dtype,
                param_dtype=cfg.param_dtype)


def make_clip_model(cfg: ml_collections.ConfigDict | dict, vocab_size: int) -> SynthFaceCLIP:
    """The model of ``config.clip.model`` (fields: `default_config`)."""
    image_cfg = image_tower_config(cfg)
    cfg = full_config(cfg)
    t = cfg["text"]
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    text = TextTower(vocab_size=int(vocab_size), max_len=int(t["max_len"]), width=int(t["width"]),
                     num_layers=int(t["num_layers"]), num_heads=int(t["num_heads"]),
                     embed_dim=int(cfg["embed_dim"]), **kw)
    return SynthFaceCLIP(image=make_image_encoder(image_cfg), text=text,
                         init_temperature=float(cfg.init_temperature))
