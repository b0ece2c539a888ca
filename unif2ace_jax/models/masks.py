"""Omni-attention mask (docs/DESIGN.md §2, after Show-o): causal text, bidirectional image spans."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def omni_attention_mask(is_pad: jax.Array, image_span: jax.Array) -> jax.Array:
    """Which positions each position may attend to.

    Args:
      is_pad: ``[B, L]`` bool, True at padding.
      image_span: ``[B, L]`` bool, True at every position of an image span (the sequence
        builder marks ``<soi>``, the image tokens and ``<eoi>``). A span is a maximal run of
        True; two images must therefore be separated by at least one non-span token.

    Returns:
      ``[B, L, L]`` bool, ``mask[b, i, j]`` = row i may attend to column j:
      * a text row i attends causally: non-pad columns ``j <= i``;
      * a row inside a span attends to every non-pad column up to and including the span's
        last position (its ``<eoi>``): the whole image both ways and all earlier text;
      * pad columns are never attended; a pad row attends only to itself, so its softmax stays
        finite (its output is meaningless and must be ignored downstream).
    """
    is_pad = jnp.asarray(is_pad, bool)
    span = jnp.asarray(image_span, bool) & ~is_pad
    b, length = span.shape
    idx = jnp.arange(length, dtype=jnp.int32)
    nxt = jnp.concatenate([span[:, 1:], jnp.zeros((b, 1), bool)], axis=1)
    is_end = span & ~nxt
    # For every position, the index of the nearest span end at or after it.
    end_at = jnp.where(is_end, idx[None, :], length)
    next_end = jax.lax.cummin(end_at, axis=1, reverse=True)
    limit = jnp.where(span, next_end, idx[None, :])  # last column row i may see
    allowed = (idx[None, None, :] <= limit[:, :, None]) & ~is_pad[:, None, :]
    self_only = idx[:, None] == idx[None, :]
    return jnp.where(is_pad[:, :, None], self_only[None], allowed)
