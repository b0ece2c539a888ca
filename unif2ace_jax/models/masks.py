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


# ---------------------------------------------------------------------------------------------
# Show-o's masks (training/prompting_utils.py), for converted Show-o weights. True = may attend.


def showo_t2i_attention_mask(tokens: jax.Array, *, pad_id: int, soi_id: int,
                             eoi_id: int) -> jax.Array:
    """Show-o's ``create_attention_mask_predict_next(..., rm_pad_in_image=True)`` as bool.

    Args:
      tokens: ``[B, L]`` ids of ``[PAD]… <|t2i|> <bos> text <eos> <|soi|> image <|eoi|>`` rows.

    Returns ``[B, L, L]`` bool: a query inside ``<|soi|>`` … ``<|eoi|>`` attends every non-pad
    key (bidirectional image, all text); any other query ``i`` attends keys ``j <= i``, except
    that queries after the row's last ``[PAD]`` never see a pad (pad queries stay causal over
    the pads before them, so no row is empty).
    """
    tokens = jnp.asarray(tokens)
    length = tokens.shape[1]
    idx = jnp.arange(length, dtype=jnp.int32)
    is_pad = tokens == pad_id
    is_eoi = tokens == eoi_id
    opened = jnp.cumsum(tokens == soi_id, axis=1) - jnp.cumsum(is_eoi, axis=1)
    in_image = (opened > 0) | is_eoi
    last_pad = jnp.max(jnp.where(is_pad, idx[None, :], -1), axis=1)  # -1: no pad
    causal = idx[None, :, None] >= idx[None, None, :]
    sees_pad = ~((idx[None, :, None] > last_pad[:, None, None])
                 & (idx[None, None, :] <= last_pad[:, None, None]))
    text_rows = causal & sees_pad
    image_rows = jnp.broadcast_to(~is_pad[:, None, :], text_rows.shape)
    return jnp.where(in_image[:, :, None], image_rows, text_rows)


def showo_mmu_attention_mask(tokens: jax.Array, *, eoi_id: int) -> jax.Array:
    """Show-o's ``create_attention_mask_for_mmu`` as bool: causal, plus every key up to the
    first ``<|eoi|>`` of ROW 0 (used for the whole batch, as Show-o does) seen by every query,
    so ``<|mmu|> <|soi|> image <|eoi|>`` is a bidirectional prefix. ``[B, L] -> [B, L, L]``."""
    tokens = jnp.asarray(tokens)
    b, length = tokens.shape
    idx = jnp.arange(length, dtype=jnp.int32)
    end = jnp.argmax(tokens[0] == eoi_id)
    allowed = (idx[:, None] >= idx[None, :]) | (idx[None, :] <= end)
    return jnp.broadcast_to(allowed[None], (b, length, length))
