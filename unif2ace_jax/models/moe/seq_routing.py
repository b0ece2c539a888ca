"""Router math for the sequence-level grouped MoE (docs/DESIGN.md §5): pure functions, float32 throughout.

One routing decision per sequence. The two groups' experts are the columns of one router:
columns ``[0, n_und)`` are the understanding group's expert list, ``[n_und, n_und + n_gen)`` the
generation group's. A sequence only ever scores (and picks) its own group's columns.

Shapes: ``B`` sequences, ``L`` tokens, ``D`` width, ``N = n_und + n_gen`` router columns.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unif2ace_jax.models.moe.routing import MASKED_LOGIT
from unif2ace_jax.models.sequences import GROUP_GEN, GROUP_UND, TASK_T2I


def pooled_mean(h: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``h`` over each sequence's valid tokens.

    ``h: [B, L, D]``, ``valid: [B, L] bool -> [B, D] float32``. A row without valid tokens
    pools to zeros.
    """
    w = valid.astype(jnp.float32)[..., None]
    total = jnp.sum(h.astype(jnp.float32) * w, axis=1)
    count = jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return total / count


def pooled_sum(h: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum and count of the tokens `pooled_mean` averages (the running state of decoding).

    ``h: [B, L, D]``, ``mask: [B, L] bool -> (sum [B, D] float32, count [B] float32)``;
    ``pooled_mean(h, mask) == sum / max(count, 1)``.
    """
    w = mask.astype(jnp.float32)
    return jnp.einsum("bld,bl->bd", h.astype(jnp.float32), w), jnp.sum(w, axis=1)


def prompt_pool_mask(valid: jax.Array, target_weights: jax.Array | None = None) -> jax.Array:
    """Tokens the sequence router may pool over: the valid tokens that no text loss predicts.

    ``valid: [B, L] bool``, ``target_weights: [B, L]`` (position i weighs the prediction of
    token i + 1; None for a prompt without targets) -> ``[B, L] bool``. MMU rows keep
    ``<mmu> … question`` (not the answer or its ``<eos>``), LM rows keep ``<bos>``, T2I rows
    keep everything. So the routing decision never sees a token it helps to predict, and a
    decoding prefix pools exactly what the training pass pooled.
    """
    valid = jnp.asarray(valid, bool)
    if target_weights is None:
        return valid
    predicted = jnp.asarray(target_weights) > 0
    predicted = jnp.concatenate([jnp.zeros_like(predicted[:, :1]), predicted[:, :-1]], axis=1)
    return valid & ~predicted


def sequence_group(group: jax.Array, valid: jax.Array,
                   task: jax.Array | None = None) -> jax.Array:
    """The group of each sequence, ``[B] int32`` (0 und, 1 gen).

    With ``task [B]`` (the sequence builder's ``task``: 0 T2I, 1 MMU, 2 LM) the group is the
    task's: T2I -> gen, everything else -> und. This is right under either token group
    assignment and is what callers should pass. Without it, the group of each row's first valid
    token is used (``group: [B, L] int``, ``valid: [B, L] bool``); that equals the task's group
    under ``group_assignment="task"`` (the whole row shares one group) but not under
    ``"modality"`` (a T2I row starts with ``<t2i>``, an und token).
    """
    if task is not None:
        return jnp.where(jnp.asarray(task) == TASK_T2I, GROUP_GEN, GROUP_UND).astype(jnp.int32)
    first = jnp.argmax(valid, axis=1)
    return jnp.take_along_axis(group.astype(jnp.int32), first[:, None], axis=1)[:, 0]


def column_group(n_und: int, n_gen: int) -> jax.Array:
    """Group of each router column, ``[n_und + n_gen] int32``."""
    return jnp.concatenate([jnp.full((n_und,), GROUP_UND, jnp.int32),
                            jnp.full((n_gen,), GROUP_GEN, jnp.int32)])


def eligible(seq_group: jax.Array, n_und: int, n_gen: int,
             available: jax.Array | None = None) -> jax.Array:
    """Which router columns each sequence may pick. ``seq_group: [B] -> [B, N] bool``.

    ``available: [B, N] bool`` (optional) additionally removes experts whose input feature a
    sequence lacks (e.g. a text-only LM row has no image for the CLIP expert).
    """
    ok = column_group(n_und, n_gen)[None, :] == seq_group[:, None]
    return ok if available is None else ok & available


def router_probs(logits: jax.Array, allowed: jax.Array) -> jax.Array:
    """Softmax over each sequence's allowed columns.

    ``logits: [B, N]``, ``allowed: [B, N] bool -> [B, N] float32``; disallowed columns get
    exactly 0 and each row sums to 1.
    """
    return jax.nn.softmax(jnp.where(allowed, logits.astype(jnp.float32), MASKED_LOGIT), axis=-1)


def top_k_gates(probs: jax.Array, allowed: jax.Array, k: int,
                renormalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """The k most probable allowed columns of each sequence and their gates.

    ``probs: [B, N]`` (from `router_probs`), ``allowed: [B, N] bool`` ->
    ``gates: [B, k] float32`` and ``indices: [B, k] int32`` (most probable first; ties go to the
    lower column). Allowed columns always rank above disallowed ones, even at probability 0. With
    ``renormalize`` the gates are divided by their sum (so they sum to 1), else they are the raw
    probabilities. If a row has fewer than k allowed columns, the extra picks are disallowed
    columns with gate 0.
    """
    if k < 1 or k > probs.shape[-1]:
        raise ValueError(f"top_k={k} must be in [1, {probs.shape[-1]}]")
    score = jnp.where(allowed, probs, -1.0)  # probs >= 0, so every allowed column outranks
    _, indices = jax.lax.top_k(score, k)
    gates = jnp.take_along_axis(probs, indices, axis=-1)
    gates = jnp.where(jnp.take_along_axis(allowed, indices, axis=-1), gates, 0.0)
    if renormalize:
        gates = gates / jnp.maximum(jnp.sum(gates, axis=-1, keepdims=True), 1e-20)
    return gates, indices.astype(jnp.int32)


def column_weights(gates: jax.Array, indices: jax.Array, num_columns: int) -> jax.Array:
    """Dense combine weights: the gate of every picked column, 0 elsewhere.

    ``gates, indices: [B, k] -> [B, N] float32``.
    """
    one_hot = jax.nn.one_hot(indices, num_columns, dtype=jnp.float32)  # [B, k, N]
    return jnp.einsum("bk,bkn->bn", gates.astype(jnp.float32), one_hot)


def balance_loss(probs: jax.Array, indices: jax.Array, seq_group: jax.Array,
                 seq_valid: jax.Array, n_und: int, n_gen: int) -> jax.Array:
    """Switch load-balance loss over sequences, one value per group, ``[2] float32``.

    For group g with ``n_g`` experts and sequences ``S_g`` (those of group g with at least one
    valid token): ``n_g * sum_e f_e * P_e`` with ``f_e`` the fraction of ``S_g`` that picked
    expert e (top-k picks, so ``sum_e f_e = k``) and ``P_e`` the mean router probability of e
    over ``S_g``. Uniform probabilities give k. A group without sequences gives 0.

    ``probs: [B, N]``, ``indices: [B, k]``, ``seq_group: [B] int``, ``seq_valid: [B] bool``.
    """
    num_columns = n_und + n_gen
    picked = jnp.sum(jax.nn.one_hot(indices, num_columns, dtype=jnp.float32), axis=1)  # [B, N]
    out = []
    for g, lo, n in ((GROUP_UND, 0, n_und), (GROUP_GEN, n_und, n_gen)):
        rows = ((seq_group == g) & seq_valid).astype(jnp.float32)  # [B]
        count = jnp.sum(rows)
        denom = jnp.maximum(count, 1.0)
        f = jnp.einsum("b,be->e", rows, picked[:, lo:lo + n]) / denom
        p = jnp.einsum("b,be->e", rows, probs[:, lo:lo + n].astype(jnp.float32)) / denom
        out.append(jnp.where(count > 0, n * jnp.sum(f * p), 0.0))
    return jnp.stack(out)
