"""Multi-head self-attention with biases and partial rotary embedding (Phi layout).

Parameter names follow HF Phi (``q_proj, k_proj, v_proj, dense``) so converted weights map 1:1
(after reshaping ``[D, D]`` to ``[D, H, Dh]``). Softmax runs in float32.

``qk_layernorm`` (Show-o's Phi): q and k each get a LayerNorm over ``head_dim`` after the head
split and before rotary, one ``[Dh]`` scale/bias shared by all heads (``q_layernorm``,
``k_layernorm``); v gets none.

KV cache: explicit arrays ``{"k", "v"}: [B, S, H, Dh]`` passed in and returned (no mutable
Flax collection), so decoding is a pure function under `jit` / `lax.while_loop`. With a cache,
the T new keys/values are written at ``[cache_index, cache_index + T)`` and the queries attend
over all S cache slots through the mask ``[B, T, S]``; one path covers both prefill (T = prefix)
and decode steps (T = 1).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from unif2ace_jax.models.rotary import apply_rotary

KVCache = dict  # {"k": [B, S, H, Dh], "v": [B, S, H, Dh]}


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array) -> jax.Array:
    """Masked softmax attention, logits and softmax in float32.

    Args:
      q: ``[B, T, H, Dh]``; k, v: ``[B, S, H, Dh]``; mask: ``[B, T, S]`` bool (True = attend).
        Every row must allow at least one column.

    Returns ``[B, T, H, Dh]`` in ``v.dtype``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)


def _init(names: tuple[str, ...], std: float | None = None):
    base = nn.initializers.zeros if std is None else nn.initializers.normal(std)
    return nn.with_logical_partitioning(base, names)


class Attention(nn.Module):
    """``x [B, T, D] -> (y [B, T, D], new_cache | None)``."""

    num_heads: int
    head_dim: int
    rotary_dim: int
    rope_theta: float = 1e4
    init_std: float = 0.02
    qk_layernorm: bool = False
    layer_norm_eps: float = 1e-5
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, mask: jax.Array, positions: jax.Array,
                 cache: KVCache | None = None,
                 cache_index: jax.Array | int | None = None) -> tuple[jax.Array, KVCache | None]:
        """
        Args:
          x: ``[B, T, D]``; positions: ``[B, T]`` int (rotary positions of the T tokens).
          mask: ``[B, T, T]`` without cache, ``[B, T, S]`` with cache; bool, True = attend.
          cache: optional ``{"k", "v"}: [B, S, H, Dh]``; cache_index: scalar int write offset.
        """
        d_model = x.shape[-1]

        def proj(name: str) -> jax.Array:
            return nn.DenseGeneral(
                (self.num_heads, self.head_dim), axis=-1, dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=_init(("embed", "heads", "kv"), self.init_std),
                bias_init=_init(("heads", "kv")), name=name)(x)

        q = checkpoint_name(proj("q_proj"), "query_proj")
        k = checkpoint_name(proj("k_proj"), "key_proj")
        v = checkpoint_name(proj("v_proj"), "value_proj")
        if self.qk_layernorm:
            q, k = self._head_norm("q_layernorm")(q), self._head_norm("k_layernorm")(k)
        q = apply_rotary(q, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)
        k = apply_rotary(k, positions, rotary_dim=self.rotary_dim, theta=self.rope_theta)

        new_cache = None
        if cache is not None:
            start = (0, jnp.asarray(cache_index, jnp.int32), 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v}
            k, v = k.astype(self.dtype), v.astype(self.dtype)

        ctx = checkpoint_name(dot_product_attention(q, k, v, mask), "context")
        out = nn.DenseGeneral(
            d_model, axis=(-2, -1), dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=_init(("heads", "kv", "embed"), self.init_std),
            bias_init=_init(("embed",)), name="dense")(ctx)
        return checkpoint_name(out, "attn_out"), new_cache

    def _head_norm(self, name: str) -> nn.LayerNorm:
        """LayerNorm over the last axis (``head_dim``) of ``[B, T, H, Dh]``."""
        return nn.LayerNorm(
            epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("kv",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("kv",)), name=name)
