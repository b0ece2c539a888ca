"""A Flax CLIP vision tower with the math and parameter layout of Hugging Face `CLIPVisionModel`.

Forward pass (``pixel_values [B, H, W, C]``, NHWC, already CLIP-normalised; H = W = image_size)::

    patches = Conv(p×p, stride p, no bias)(pixels)            # [B, g, g, D], g = H / p
    x = concat([class_embedding, patches row-major]) + position_embedding   # [B, 1 + g², D]
    x = pre_layernorm(x)
    x = x + Attn(LN1 x);  x = x + fc2(act(fc1(LN2 x)))       # num_layers times, act = quick_gelu
    tokens = x                                                 # HF last_hidden_state
    pooled = post_layernorm(x[:, 0])                           # HF pooler_output

Returns ``{"tokens": [B, 1 + g², D], "pooled": [B, D]}``. Weights convert from a Hugging Face
checkpoint with ``python -m unif2ace_jax.convert.clip_vision`` (which writes
``DIR/clip_vision_params.msgpack`` + ``DIR/clip_vision_config.json``); `load_clip_vision` reads
that directory back. The tower is a frozen feature encoder (docs/DESIGN.md §5): call it outside the
trained model, or precompute its outputs into the records.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.files import read_json, write_atomically

PARAMS_FILE = "clip_vision_params.msgpack"
CONFIG_FILE = "clip_vision_config.json"
CONV_AXES = (None, None, "conv_in", "conv_out")
# CLIP's image normalisation (the Hugging Face CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionSettings:
    """The architecture fields of a Hugging Face `CLIPVisionConfig` (same names)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(f"CLIP hidden_size {self.hidden_size} is not divisible by "
                            f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise UserError(f"CLIP image_size {self.image_size} is not a multiple of "
                            f"patch_size {self.patch_size}")
        if self.hidden_act not in ACTIVATIONS:
            raise UserError(f"unsupported CLIP hidden_act {self.hidden_act!r}; known: "
                            f"{', '.join(ACTIVATIONS)}")

    @property
    def num_tokens(self) -> int:
        return 1 + (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPVisionSettings":
        """From a dict with these fields (extra keys ignored), e.g. a HF vision config."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _dense_init(names):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


def _layer_norm(eps: float, dtype, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=_zeros(("norm",)), name=name)


class CLIPAttention(nn.Module):
    """Bidirectional multi-head self-attention. ``x: [B, T, D] -> [B, T, D]``."""

    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        hd = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(name):
            return nn.DenseGeneral((self.num_heads, hd), kernel_init=_dense_init(
                ("embed", "heads", "kv")), bias_init=_zeros(("heads", "kv")), name=name, **kw)(x)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")  # [B, T, H, hd]
        scores = jnp.einsum("bqhd,bkhd->bhqk", q * (hd ** -0.5), k).astype(jnp.float32)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(d, axis=(-2, -1), kernel_init=_dense_init(("heads", "kv", "embed")),
                               bias_init=_zeros(("embed",)), name="out_proj", **kw)(out)


class CLIPEncoderLayer(nn.Module):
    """Pre-LN transformer layer. ``x: [B, T, D] -> [B, T, D]``."""

    settings: CLIPVisionSettings
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.settings
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x + CLIPAttention(s.num_attention_heads, name="self_attn", **kw)(
            _layer_norm(s.layer_norm_eps, name="layer_norm1", **kw)(x))
        h = _layer_norm(s.layer_norm_eps, name="layer_norm2", **kw)(x)
        h = nn.Dense(s.intermediate_size, kernel_init=_dense_init(("embed", "mlp")),
                     bias_init=_zeros(("mlp",)), name="fc1", **kw)(h)
        h = ACTIVATIONS[s.hidden_act](h)
        h = nn.Dense(s.hidden_size, kernel_init=_dense_init(("mlp", "embed")),
                     bias_init=_zeros(("embed",)), name="fc2", **kw)(h)
        return x + h


class CLIPVisionTower(nn.Module):
    """``pixel_values: [B, H, W, C]`` -> ``{"tokens": [B, T, D], "pooled": [B, D]}``."""

    settings: CLIPVisionSettings = CLIPVisionSettings()
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        s = self.settings
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (s.image_size, s.image_size,
                                                                s.num_channels):
            raise UserError(
                f"CLIP vision tower expects pixels [B, {s.image_size}, {s.image_size}, "
                f"{s.num_channels}] (NHWC), got {tuple(pixel_values.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = s.hidden_size
        patches = nn.Conv(d, (s.patch_size, s.patch_size), strides=(s.patch_size, s.patch_size),
                          padding="VALID", use_bias=False,
                          kernel_init=_dense_init(CONV_AXES), name="patch_embedding",
                          **kw)(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, d)
        cls = self.param("class_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("embed",)), (d,), self.param_dtype)
        pos = self.param("position_embedding", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, "embed")), (s.num_tokens, d), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), patches], axis=1)
        x = x + pos.astype(self.dtype)[None]
        x = _layer_norm(s.layer_norm_eps, name="pre_layernorm", **kw)(x)
        for i in range(s.num_hidden_layers):
            x = CLIPEncoderLayer(s, name=f"layers_{i}", **kw)(x)
        pooled = _layer_norm(s.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        return {"tokens": x, "pooled": pooled}


def clip_preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> float32 ``[B, S, S, 3]``, CLIP-normalised (S = image_size).

    Resize the short side to S (bicubic, antialiased), centre crop, scale to [0, 1], normalise by
    `CLIP_MEAN` / `CLIP_STD`. Close to, not bit-identical with, Hugging Face's PIL-based
    processor.
    """
    x = jnp.asarray(images, jnp.float32) / 255.0
    b, h, w, c = x.shape
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top:top + image_size, left:left + image_size]
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def save_clip_vision(directory: str, settings: CLIPVisionSettings, params: Any,
                     source: str | None = None) -> None:
    """Writes ``params`` (plain arrays, the tower's "params" tree) and its settings."""
    os.makedirs(directory, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    meta = {"settings": dataclasses.asdict(settings), "source": source}
    write_atomically(os.path.join(directory, PARAMS_FILE), serialization.msgpack_serialize(params))
    write_atomically(os.path.join(directory, CONFIG_FILE), json.dumps(meta, indent=1))


def load_clip_vision(directory: str, dtype: Any = jnp.float32
                     ) -> tuple[CLIPVisionTower, dict]:
    """``(tower, params)`` from a directory written by the converter; UserError if absent."""
    paths = [os.path.join(directory, f) for f in (CONFIG_FILE, PARAMS_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"not a converted CLIP vision directory (missing {missing[0]}); run "
                        f"python -m unif2ace_jax.convert.clip_vision first")
    settings = CLIPVisionSettings.from_dict(read_json(paths[0])["settings"])
    with open(paths[1], "rb") as f:
        params = serialization.msgpack_restore(f.read())
    return CLIPVisionTower(settings, dtype=dtype), params
