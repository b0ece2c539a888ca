"""Lookup-free quantization (LFQ, MAGVIT-v2): pure math plus a thin parameter-free module.

A latent vector ``z ∈ R^k`` is quantized per channel to ``q = sign(z) ∈ {-1, +1}^k`` with
``0 -> -1``. The code index is big-endian over channels, as in Show-o's MAGVIT-v2::

    index = Σ_j 2^(k-1-j) · [z_j > 0]        (channel 0 is the most significant bit)

so the codebook has ``K = 2^k`` entries and code ``c`` is the ±1 vector of its bits. Gradients
pass straight through the sign: ``q_st = z + stop_gradient(q - z)``.

Soft code assignments (for the entropy loss) come from distances to the codebook,
``p(c | z) ∝ exp(-||z - c||² / τ)``. Because ``||z - c||² = Σ_j (z_j - c_j)²`` this distribution
factorises over bits: ``p(bit_j = 1 | z) = sigmoid(4 z_j / τ)``. `bit_log_probs` returns those
per-bit log-probabilities and `code_log_probs` the full ``[..., K]`` table built from them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def bit_weights(bits: int) -> np.ndarray:
    """``[k]`` int: ``2^(k-1-j)`` for channel ``j`` (big-endian)."""
    return (2 ** np.arange(bits - 1, -1, -1)).astype(np.int64)


def bits_to_indices(bits: jax.Array) -> jax.Array:
    """Code indices from bits. ``bits: [..., k]`` bool or {0,1} -> ``[...]`` int32."""
    k = bits.shape[-1]
    if k > 31:
        raise ValueError(f"LFQ with {k} bits does not fit int32 code indices")
    weights = jnp.asarray(bit_weights(k), jnp.int32)
    return jnp.sum(bits.astype(jnp.int32) * weights, axis=-1)


def indices_to_bits(indices: jax.Array, bits: int) -> jax.Array:
    """Bits of code indices. ``indices: [...]`` int -> ``[..., k]`` int32 in {0, 1}."""
    shifts = jnp.arange(bits - 1, -1, -1, dtype=jnp.int32)
    return (indices.astype(jnp.int32)[..., None] >> shifts) & 1


def indices_to_codes(indices: jax.Array, bits: int, dtype=jnp.float32) -> jax.Array:
    """The ±1 code vectors of indices. ``indices: [...]`` -> ``[..., k]`` in {-1, +1}."""
    return (2 * indices_to_bits(indices, bits) - 1).astype(dtype)


def codebook(bits: int, dtype=jnp.float32) -> jax.Array:
    """All ``K = 2^k`` codes in index order: ``[K, k]`` in {-1, +1}."""
    return indices_to_codes(jnp.arange(2 ** bits, dtype=jnp.int32), bits, dtype)


def sign_quantize(z: jax.Array) -> jax.Array:
    """``q = sign(z)`` with 0 -> -1 (no gradient). ``z: [..., k]`` -> same shape, same dtype."""
    return jnp.where(z > 0, 1.0, -1.0).astype(z.dtype)


def latents_to_indices(z: jax.Array) -> jax.Array:
    """Code indices of latents. ``z: [..., k]`` float -> ``[...]`` int32."""
    return bits_to_indices(z > 0)


def straight_through(z: jax.Array, q: jax.Array) -> jax.Array:
    """Value ``q``, gradient of the identity w.r.t. ``z``."""
    return z + jax.lax.stop_gradient(q - z)


def bit_log_probs(z: jax.Array, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """Per-bit soft assignment from distances to ±1.

    ``z: [..., k]`` -> ``(log p(bit=1), log p(bit=0))``, each ``[..., k]`` float32, where
    ``p(bit=1) ∝ exp(-(z-1)²/τ)`` and ``p(bit=0) ∝ exp(-(z+1)²/τ)``, i.e. a logit of ``4z/τ``.
    """
    logit = 4.0 * z.astype(jnp.float32) / temperature
    return jax.nn.log_sigmoid(logit), jax.nn.log_sigmoid(-logit)


def code_log_probs(z: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``log p(c | z)`` for every code ``c``: ``z: [..., k]`` -> ``[..., 2^k]`` float32.

    Equal to ``log_softmax_c(-||z - c||² / τ)`` (exactly, up to float rounding).
    """
    k = z.shape[-1]
    log_p1, log_p0 = bit_log_probs(z, temperature)
    bits = indices_to_bits(jnp.arange(2 ** k, dtype=jnp.int32), k).astype(jnp.float32)  # [K, k]
    return jnp.sum(log_p0, axis=-1, keepdims=True) + (log_p1 - log_p0) @ bits.T


class LFQuantizer(nn.Module):
    """Parameter-free LFQ layer. Called on ``z: [..., k]``; returns a dict with

    * ``quantized``: ``[..., k]`` ±1 values with a straight-through gradient to ``z``,
    * ``indices``: ``[...]`` int32 big-endian code indices,
    * ``latents``: ``z`` itself (for the entropy and commitment losses).
    """

    bits: int

    def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
        if z.shape[-1] != self.bits:
            raise ValueError(f"LFQ expects {self.bits} latent channels, got shape {z.shape}")
        q = sign_quantize(z)
        return {"quantized": straight_through(z, q), "indices": latents_to_indices(z), "latents": z}
