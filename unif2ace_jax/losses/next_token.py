"""Weighted next-token cross-entropy for the MMU (answers) and LM tasks (docs/DESIGN.md §2), pure."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unif2ace_jax.errors import check_shape


def next_token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean cross-entropy, computed in (at least) float32.

    The caller aligns the shift: ``logits[:, t]`` predicts ``targets[:, t]`` (usually
    ``logits = model(tokens)[:, :-1]``, ``targets = tokens[:, 1:]``).

    Args:
      logits: [B, L, V] float, any dtype.
      targets: [B, L] int; values at weight-0 places may be anything (e.g. -1 or pad).
      weights: [B, L] float >= 0 (1 on answer tokens, 0 on prompt and pad).
    Returns:
      ``(loss, aux)`` with ``loss = sum(w * CE) / sum(w)`` (0 when ``sum(w) = 0``) and aux scalars
      ``ce_sum`` (sum of w * CE, for exact accumulation across micro-batches), ``weight_sum``,
      ``num_tokens`` (count of places with w > 0), ``accuracy`` (weighted argmax accuracy).
    """
    check_shape("next-token logits", logits, ("B", "L", "V"))
    b, l, v = logits.shape
    check_shape("next-token targets", targets, (b, l))
    check_shape("next-token weights", weights, (b, l))
    dt = jnp.promote_types(logits.dtype, jnp.float32)
    f = logits.astype(dt)
    w = weights.astype(dt)
    active = w > 0
    tgt = jnp.clip(targets, 0, v - 1).astype(jnp.int32)
    lse = jax.nn.logsumexp(f, axis=-1)
    f_t = jnp.take_along_axis(f, tgt[..., None], axis=-1)[..., 0]
    ce = jnp.where(active, lse - f_t, 0.0)
    weight_sum = w.sum()
    ce_sum = (w * ce).sum()
    denom = jnp.where(weight_sum > 0, weight_sum, 1.0)
    correct = jnp.where(active, jnp.argmax(f, axis=-1) == targets, False).astype(dt)
    aux = {
        "ce_sum": ce_sum,
        "weight_sum": weight_sum,
        "num_tokens": active.sum().astype(dt),
        "accuracy": (w * correct).sum() / denom,
    }
    return ce_sum / denom, aux
