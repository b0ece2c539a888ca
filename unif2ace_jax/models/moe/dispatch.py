"""Token dispatch and combine for a layer of X feed-forward experts: pure functions.

A *copy* is one (token, choice) pair of the router's top-k. Every function here computes

    y[t] = sum_j keep[t, j] * weights[t, j] * FFN_{indices[t, j]}(x[t])
    FFN_e(v) = gelu_tanh(v @ wi[e] + bi[e]) @ wo[e] + bo[e]

and differs only in how the copies reach the experts:

* `ragged_dispatch_combine` (dropless): copies are laid out sorted by expert, then either
  `jax.lax.ragged_dot` with the per-expert group sizes (``impl="ragged_dot"``: the TPU/GPU
  path), or a blocked layout (``impl="blocked"``) where each expert's rows are padded up to a
  multiple of ``block_size`` and a loop over blocks multiplies each block by its expert's
  weights (`blocked_matmul`). On CPU `ragged_dot` lowers to a masked dense product over
  *all* experts (X times the FLOPs), so the blocked layout is the CPU path. Its static
  shape covers ``N + X * (block_size - 1)`` rows (N = T * k copies, rounded down to whole
  blocks), which bounds the padding for any routing.
* `capacity_dispatch_combine` (static shapes, may drop): each expert has ``capacity`` slots;
  copies take slots in priority order (see `capacity_positions`) and copies past the
  capacity are dropped (contribute 0). ``method="einsum"`` dispatches and combines with
  one-hot ``[T, X, C]`` tensors (the classic TPU form; memory ``T * X * C`` and FLOPs
  ``4 * T * X * C * d``, i.e. growing as ``capacity_factor * T^2 * k``, so keep T small per
  device); ``method="gather"`` moves rows by index instead (memory ``(T * k + X * C) * d``),
  with identical results.

Rows move with `take_rows`, whose backward is a gather through the inverse index map rather
than a scatter-add (slow on CPU).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from unif2ace_jax.models.moe.routing import expert_counts

RAGGED_IMPLS = ("ragged_dot", "blocked")
CAPACITY_METHODS = ("einsum", "gather")


class ExpertParams(NamedTuple):
    """Weights of X experts: ``wi [X, d, h]``, ``wo [X, h, d]``, ``bi [X, h]``, ``bo [X, d]``."""

    wi: jax.Array
    wo: jax.Array
    bi: jax.Array | None = None
    bo: jax.Array | None = None


def compute_capacity(num_tokens: int, top_k: int, num_experts: int,
                     capacity_factor: float) -> int:
    """Slots per expert: ``C = min(T, max(1, ceil(capacity_factor * T * k / X)))``.

    ``T`` counts every token slot of the (flattened) batch, pads included, and ``X`` is the
    total number of experts in the layer (both groups), so ``capacity_factor = 1`` gives
    exactly one slot per copy when the copies spread evenly over all X experts. With a
    batch dominated by one group, that group's experts see up to twice their even share;
    raise ``capacity_factor`` (2.0 covers an all-one-group batch routed evenly). No
    expert can receive more than T copies (the top-k picks of a token are distinct).
    A tiny epsilon keeps float round-off (1.1 * 10 = 11.000000000000002) from adding a slot.
    """
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    raw = capacity_factor * num_tokens * top_k / num_experts
    return int(min(num_tokens, max(1, math.ceil(raw - 1e-9))))


def capacity_positions(indices: jax.Array, keep: jax.Array, num_experts: int) -> jax.Array:
    """Each copy's slot within its expert, in priority order.

    ``indices: [T, k] int``, ``keep: [T, k] bool -> [T, k] int32``. Priority: all first
    choices in token order, then all second choices in token order, and so on (so a token's
    top-1 pick is never displaced by another token's top-2 pick). Copies with ``keep`` False
    take no slot and get position -1.
    """
    T, k = indices.shape
    flat = indices.T.reshape(-1)  # choice-major: [k * T]
    flat_keep = keep.T.reshape(-1)
    one_hot = jax.nn.one_hot(flat, num_experts, dtype=jnp.int32)
    one_hot = one_hot * flat_keep[:, None].astype(jnp.int32)
    ranks = jnp.cumsum(one_hot, axis=0) - 1
    pos = jnp.take_along_axis(ranks, flat[:, None].astype(jnp.int32), axis=1)[:, 0]
    pos = jnp.where(flat_keep, pos, -1)
    return pos.reshape(k, T).T.astype(jnp.int32)


def _expert_of_rows(ends: jax.Array, rows: jax.Array, num_experts: int) -> jax.Array:
    """Expert owning each row of a layout whose expert e ends (exclusive) at ``ends[e]``."""
    e = jnp.searchsorted(ends, rows, side="right")
    return jnp.clip(e, 0, num_experts - 1).astype(jnp.int32)


def _cast(x: jax.Array, params: ExpertParams, dtype) -> tuple[jax.Array, ExpertParams]:
    """``(x, params)`` in the compute `dtype` (None: as they are); the weights are cast first."""
    if dtype is None:
        return x, params
    params = ExpertParams(*(None if p is None else p.astype(dtype) for p in params))
    return x.astype(dtype), params


@jax.custom_vjp
def take_rows(a: jax.Array, idx: jax.Array, inv: jax.Array) -> jax.Array:
    """``a[idx]`` with zero rows where ``idx`` is out of range, and a gather as backward.

    ``a: [A, ...]``, ``idx: [M] int``, ``inv: [A, m] int`` -> ``[M, ...]``. ``inv`` must be
    the exact inverse of ``idx``: row r of ``inv`` lists every i with ``idx[i] == r``, padded
    with out-of-range values (>= M). The backward then gathers and sums instead of a
    scatter-add into a zero buffer (much slower on CPU).
    """
    del inv
    return a.at[idx].get(mode="fill", fill_value=0)


def _take_rows_fwd(a, idx, inv):
    return take_rows(a, idx, inv), (idx, inv)


def _take_rows_bwd(res, g):
    idx, inv = res
    del idx
    return jnp.sum(g.at[inv].get(mode="fill", fill_value=0), axis=1), None, None


take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)


@jax.custom_vjp
def blocked_matmul(xb: jax.Array, w: jax.Array, block_expert: jax.Array) -> jax.Array:
    """``out[b] = xb[b] @ w[block_expert[b]]``, one block at a time.

    ``xb: [n, r, d]``, ``w: [X, d, h]``, ``block_expert: [n] int`` in ``[0, X)`` ->
    ``[n, r, h]``. A loop over blocks reads each block's weights in place, so no
    ``[n, d, h]`` copy of the weights is ever built; the backward accumulates the weight
    gradient per expert in place (in float32).
    """
    return jax.lax.map(lambda a: a[0] @ _expert(w, a[1]), (xb, block_expert))


def _expert(w: jax.Array, e: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _blocked_matmul_fwd(xb, w, block_expert):
    return blocked_matmul(xb, w, block_expert), (xb, w, block_expert)


def _blocked_matmul_bwd(res, g):
    xb, w, block_expert = res
    dx = jax.lax.map(lambda a: a[0] @ _expert(w, a[1]).T, (g, block_expert))

    def add_block(b, dw):
        e = block_expert[b]
        update = jnp.matmul(xb[b].T, g[b], preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_index_in_dim(dw, _expert(dw, e) + update, e, axis=0)

    dw = jax.lax.fori_loop(0, xb.shape[0], add_block, jnp.zeros(w.shape, jnp.float32))
    return dx.astype(xb.dtype), dw.astype(w.dtype), None


blocked_matmul.defvjp(_blocked_matmul_fwd, _blocked_matmul_bwd)


def _batched_ffn(xb: jax.Array, p: ExpertParams) -> jax.Array:
    """``xb: [n, r, d]`` with per-batch weights ``wi [n, d, h]`` ... ``-> [n, r, d]``."""
    h = jnp.einsum("nrd,ndh->nrh", xb, p.wi)
    if p.bi is not None:
        h = h + p.bi[:, None, :]
    h = jax.nn.gelu(h, approximate=True)
    out = jnp.einsum("nrh,nhd->nrd", h, p.wo)
    if p.bo is not None:
        out = out + p.bo[:, None, :]
    return out


def _blocked_ffn(xb: jax.Array, p: ExpertParams, block_expert: jax.Array) -> jax.Array:
    """``xb: [n, r, d]``, block b through expert ``block_expert[b]`` -> ``[n, r, d]``."""
    h = blocked_matmul(xb, p.wi, block_expert)
    if p.bi is not None:
        h = h + p.bi[block_expert][:, None, :]
    h = jax.nn.gelu(h, approximate=True)
    out = blocked_matmul(h, p.wo, block_expert)
    if p.bo is not None:
        out = out + p.bo[block_expert][:, None, :]
    return out


def _combine(copies: jax.Array, weights: jax.Array, kept: jax.Array) -> jax.Array:
    """``copies: [T, k, d]`` expert outputs, ``weights, kept: [T, k] -> [T, d]``."""
    # `where`, not a multiply: rows of dropped copies may hold anything (even NaN).
    copies = jnp.where(kept[..., None], copies, 0)
    w = jnp.where(kept, weights, 0).astype(copies.dtype)
    return jnp.einsum("tkd,tk->td", copies, w)


def ragged_dispatch_combine(x: jax.Array, indices: jax.Array, weights: jax.Array,
                            keep: jax.Array, params: ExpertParams, *,
                            impl: str = "ragged_dot", block_size: int = 128,
                            dtype=None) -> jax.Array:
    """Dropless mixture output.

    ``x: [T, d]``, ``indices: [T, k] int`` (expert ids in ``[0, X)``), ``weights: [T, k]``
    combine weights, ``keep: [T, k] bool`` (False: the copy is skipped, e.g. pad tokens),
    ``params``: X experts -> ``y: [T, d]``. ``impl``: ``"ragged_dot"`` or ``"blocked"``
    (see the module docstring); ``block_size`` is used by ``"blocked"`` only, capped at the
    power of two at or above ``N / X`` (N = T * k). ``dtype``: the
    compute dtype of the expert matmuls (None: that of ``x`` and the weights).
    """
    if impl not in RAGGED_IMPLS:
        raise ValueError(f"unknown ragged impl {impl!r}; expected one of {RAGGED_IMPLS}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x, p = _cast(x, params, dtype)
    T, d = x.shape
    k = indices.shape[1]
    X = p.wi.shape[0]
    N = T * k
    keep = keep.astype(bool)
    pos = capacity_positions(indices, keep, X)  # rank of each copy within its expert
    sizes = expert_counts(indices, keep, X)

    if impl == "ragged_dot":
        R = N
        ends = jnp.cumsum(sizes)
        starts = ends - sizes
        # Skipped copies go after every kept one, each to its own row.
        skipped_rank = (jnp.cumsum(~keep.reshape(-1)) - 1).reshape(T, k)
        row = jnp.where(keep, starts[indices] + pos, ends[-1] + skipped_rank)
    else:
        # Blocked: expert e owns rows [pstart[e], pend[e]), its size rounded up to whole
        # blocks; enough blocks for any routing. Small batches (decoding) use smaller blocks
        # so that the X * block_size padding stays in proportion to the N copies.
        block_size = min(block_size, 1 << max(0, math.ceil(math.log2(max(1, N / X)))))
        num_blocks = (N + X * (block_size - 1)) // block_size
        R = num_blocks * block_size
        padded = (sizes + block_size - 1) // block_size * block_size
        pend = jnp.cumsum(padded)
        row = jnp.where(keep, (pend - padded)[indices] + pos, R)  # R: no row
    copy_of_row = jnp.full((R,), N, jnp.int32).at[row.reshape(-1)].set(
        jnp.arange(N, dtype=jnp.int32), mode="drop", unique_indices=True)
    xs = take_rows(x, copy_of_row // k, row)  # [R, d]; rows of no copy read x[T] = 0

    if impl == "ragged_dot":
        row_expert = _expert_of_rows(ends, jnp.arange(N), X)
        h = jax.lax.ragged_dot(xs, p.wi, sizes)
        if p.bi is not None:
            h = h + p.bi[row_expert]
        h = jax.nn.gelu(h, approximate=True)
        out = jax.lax.ragged_dot(h, p.wo, sizes)
        if p.bo is not None:
            out = out + p.bo[row_expert]
    else:
        block_expert = _expert_of_rows(pend, jnp.arange(num_blocks) * block_size, X)
        out = _blocked_ffn(xs.reshape(num_blocks, block_size, d), p, block_expert).reshape(R, d)
    copies = take_rows(out, row.reshape(-1), copy_of_row[:, None]).reshape(T, k, d)
    return _combine(copies, weights, keep)


def capacity_dispatch_combine(x: jax.Array, indices: jax.Array, weights: jax.Array,
                              keep: jax.Array, params: ExpertParams, *, capacity: int,
                              method: str = "einsum", dtype=None
                              ) -> tuple[jax.Array, jax.Array]:
    """Mixture output with ``capacity`` slots per expert; copies past it are dropped.

    Shapes as `ragged_dispatch_combine`; returns ``(y: [T, d], kept: [T, k] bool)`` where
    ``kept`` marks the copies that got a slot (``keep`` and position < capacity, positions
    from `capacity_positions`). Expert buffers are ``[X, capacity, d]``.
    """
    if method not in CAPACITY_METHODS:
        raise ValueError(f"unknown capacity method {method!r}; expected one of {CAPACITY_METHODS}")
    x, p = _cast(x, params, dtype)
    T, d = x.shape
    k = indices.shape[1]
    X = p.wi.shape[0]
    C = int(capacity)
    pos = capacity_positions(indices, keep.astype(bool), X)
    kept = keep.astype(bool) & (pos >= 0) & (pos < C)

    if method == "einsum":
        expert_hot = jax.nn.one_hot(indices, X, dtype=x.dtype)  # [T, k, X]
        slot_hot = jax.nn.one_hot(jnp.where(kept, pos, -1), C, dtype=x.dtype)  # -1: all zeros
        dispatch = jnp.einsum("tkx,tkc->txc", expert_hot, slot_hot)
        combine = jnp.einsum("tkx,tkc,tk->txc", expert_hot, slot_hot,
                             jnp.where(kept, weights, 0).astype(x.dtype))
        xe = jnp.einsum("txc,td->xcd", dispatch, x)
        out = _batched_ffn(xe, p)
        return jnp.einsum("txc,xcd->td", combine, out), kept

    slot = jnp.where(kept, indices * C + pos, X * C)  # X * C: no slot
    copy_of_slot = jnp.full((X * C,), T * k, jnp.int32).at[slot.reshape(-1)].set(
        jnp.arange(T * k, dtype=jnp.int32), mode="drop", unique_indices=True)
    xe = take_rows(x, copy_of_slot // k, slot).reshape(X, C, d)  # empty slots read zeros
    out = _batched_ffn(xe, p).reshape(X * C, d)
    copies = take_rows(out, slot.reshape(-1), copy_of_slot[:, None]).reshape(T, k, d)
    return _combine(copies, weights, kept), kept
