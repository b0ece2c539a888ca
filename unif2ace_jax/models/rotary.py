"""Partial rotary position embedding, GPT-NeoX / HF-Phi convention.

Only the first ``rotary_dim`` dims of each head rotate; they are split in two halves
``(x1, x2)`` and rotated as ``x·cos + rotate_half(x)·sin`` with ``rotate_half(x) = (−x2, x1)``
and frequencies ``θ^(−2i/rotary_dim)``, ``i < rotary_dim/2``, repeated for both halves. The
remaining dims pass through. Positions are explicit, so left padding and KV-cache offsets work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unif2ace_jax.errors import UserError


def rotary_dim_for(head_dim: int, fraction: float) -> int:
    """``int(fraction · head_dim)`` as in HF Phi; must be even."""
    rd = int(fraction * head_dim)
    if rd % 2 or rd < 0 or rd > head_dim:
        raise UserError(
            f"rotary_fraction {fraction} of head_dim {head_dim} gives rotary_dim {rd}; "
            "it must be even and within the head")
    return rd


def rotary_cos_sin(positions: jax.Array, rotary_dim: int,
                   theta: float = 1e4) -> tuple[jax.Array, jax.Array]:
    """``positions [...]`` int -> ``cos, sin [..., rotary_dim]`` float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rotary(x: jax.Array, positions: jax.Array, *, rotary_dim: int,
                 theta: float = 1e4) -> jax.Array:
    """Rotates the first ``rotary_dim`` dims of every head.

    Args:
      x: ``[B, L, H, Dh]``; positions: ``[B, L]`` int.

    Returns ``[B, L, H, Dh]`` in ``x.dtype`` (math in float32).
    """
    if rotary_dim == 0:
        return x
    cos, sin = rotary_cos_sin(positions, rotary_dim, theta)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.astype(jnp.float32)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1)
    return out.astype(x.dtype)
