"""Router math for the token-level grouped MoE (docs/DESIGN.md §4): pure functions, float32 throughout.

Layout: the two expert groups are one layer of ``2E`` routed experts, experts
``[0, E)`` belong to the understanding group (``group == 0``) and ``[E, 2E)`` to the
generation group (``group == 1``). Every function takes flattened tokens ``[T, ...]``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NUM_GROUPS = 2  # 0 = understanding, 1 = generation
# Finite stand-in for -inf: exp() of it is exactly 0 in float32, and it keeps gradients NaN-free.
MASKED_LOGIT = -1e9


def group_expert_mask(group: jax.Array, num_experts_per_group: int) -> jax.Array:
    """Which experts a token may use. ``group: [T] int -> [T, 2E] bool``."""
    expert_group = jnp.arange(NUM_GROUPS * num_experts_per_group) // num_experts_per_group
    return expert_group[None, :] == group[:, None]


def mask_router_logits(logits: jax.Array, group: jax.Array,
                       num_experts_per_group: int) -> jax.Array:
    """Logits with other-group experts set to a large negative value.

    ``logits: [T, 2E]`` (cast to float32), ``group: [T] int -> [T, 2E] float32``.
    """
    mask = group_expert_mask(group, num_experts_per_group)
    return jnp.where(mask, logits.astype(jnp.float32), MASKED_LOGIT)


def router_probs(logits: jax.Array, group: jax.Array, num_experts_per_group: int) -> jax.Array:
    """Softmax over the token's own group's experts.

    ``logits: [T, 2E]``, ``group: [T] int -> probs: [T, 2E] float32``; probabilities of the
    other group's experts are exactly 0 and each row sums to 1.
    """
    return jax.nn.softmax(mask_router_logits(logits, group, num_experts_per_group), axis=-1)


def top_k_routing(probs: jax.Array, group: jax.Array, num_experts_per_group: int, k: int,
                  renormalize: bool = True) -> tuple[jax.Array, jax.Array]:
    """The k most probable experts of the token's group and their combine weights.

    ``probs: [T, 2E]`` (from `router_probs`), ``group: [T] int`` ->
    ``weights: [T, k] float32``, ``indices: [T, k] int32`` (global expert ids, inside the
    token's group, most probable first). With ``renormalize`` the weights are divided by
    their sum over the chosen k; otherwise they are the raw softmax probabilities.
    The choice is made among the group's E columns only, so even a probability that
    underflows to 0 can never send a token to the other group.
    """
    E = num_experts_per_group
    if not 1 <= k <= E:
        raise ValueError(f"top_k={k} must be in [1, {E}]")
    grouped = probs.reshape(probs.shape[0], NUM_GROUPS, E)
    own = jnp.take_along_axis(grouped, group[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    weights, local = jax.lax.top_k(own, k)
    indices = local.astype(jnp.int32) + group[:, None].astype(jnp.int32) * E
    if renormalize:
        weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-9)
    return weights, indices


def expert_counts(indices: jax.Array, keep: jax.Array, num_experts: int) -> jax.Array:
    """Kept token copies per expert. ``indices, keep: [T, k] -> [num_experts] int32``."""
    one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.int32)  # [T, k, X]
    return jnp.sum(one_hot * keep[..., None].astype(jnp.int32), axis=(0, 1))


def load_balance_loss(probs: jax.Array, indices: jax.Array, group: jax.Array, valid: jax.Array,
                      num_experts_per_group: int) -> jax.Array:
    """Switch load-balance loss per group, ``E * sum_e f_e * P_e``.

    ``probs: [T, 2E]``, ``indices: [T, k]``, ``group: [T]``, ``valid: [T] bool`` ->
    ``[2] float32`` (und, gen). Over the group's valid tokens: ``f_e`` = number of top-k picks
    of expert e / number of tokens (so ``sum_e f_e = k``), ``P_e`` = mean router probability
    of e. Uniform routing gives k, all tokens on the same k experts gives E. A group with no
    valid token gets 0. Gradients flow through ``P`` only.
    """
    E = num_experts_per_group
    valid_f = valid.astype(jnp.float32)
    picks = jnp.sum(jax.nn.one_hot(indices, NUM_GROUPS * E, dtype=jnp.float32), axis=1)  # [T, 2E]
    in_group = jax.nn.one_hot(group, NUM_GROUPS, dtype=jnp.float32) * valid_f[:, None]  # [T, 2]
    n_tokens = jnp.maximum(jnp.sum(in_group, axis=0), 1.0)  # [2]
    # Per-group sums over tokens; a token's picks and probs lie inside its group's E columns.
    f = jnp.einsum("tg,tx->gx", in_group, picks).reshape(NUM_GROUPS, NUM_GROUPS, E)
    p = jnp.einsum("tg,tx->gx", in_group, probs.astype(jnp.float32)).reshape(
        NUM_GROUPS, NUM_GROUPS, E)
    own = jnp.arange(NUM_GROUPS)
    f = f[own, own] / n_tokens[:, None]  # [2, E]
    p = p[own, own] / n_tokens[:, None]
    return E * jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1)


def router_z_loss(logits: jax.Array, group: jax.Array, valid: jax.Array,
                  num_experts_per_group: int) -> jax.Array:
    """``mean(logsumexp(group logits)^2)`` over valid tokens. ``logits: [T, 2E] -> [] float32``."""
    masked = mask_router_logits(logits, group, num_experts_per_group)
    z = jax.nn.logsumexp(masked, axis=-1)
    valid_f = valid.astype(jnp.float32)
    return jnp.sum(valid_f * z * z) / jnp.maximum(jnp.sum(valid_f), 1.0)
