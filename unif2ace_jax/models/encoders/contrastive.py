"""Pure losses of the SynthFace encoders: InfoNCE (CLIP's symmetric contrastive loss) and the
additive-margin cosine classifier (CosFace, the family ArcFace-type identity encoders use).

InfoNCE over a batch of N matched pairs (row i of `a` goes with row i of `b`), embeddings
L2-normalised, ``t = exp(log_scale)`` the inverse temperature::

    logits = t · a bᵀ                                   [N, N]
    loss   = ½ (CE(logits, diag) + CE(logitsᵀ, diag))   (mean over rows)

Additive margin (per attribute a with K_a values, cosine ``cos[b, a, k]`` between the embedding
and the value's unit weight vector)::

    logit[b, a, k] = s · (cos[b, a, k] − m · [k = y_ba])   (then CE over the valid values)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e9


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-6) -> jax.Array:
    """``x / max(‖x‖, eps)`` along `axis` (float32)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


def info_nce_loss(a: jax.Array, b: jax.Array, log_scale: jax.Array | float
                  ) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE. ``a, b: [N, D]`` (normalised inside), ``log_scale`` scalar.

    Returns ``(loss, aux)`` with aux ``a_to_b_top1`` / ``b_to_a_top1`` (fraction of rows whose
    own partner has the largest logit) and ``scale`` (= exp(log_scale)).
    """
    a, b = l2_normalize(a), l2_normalize(b)
    scale = jnp.exp(jnp.asarray(log_scale, jnp.float32))
    logits = scale * jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    n = logits.shape[0]
    diag = jnp.arange(n)
    loss_ab = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[diag, diag])
    loss_ba = -jnp.mean(jax.nn.log_softmax(logits, axis=0)[diag, diag])
    aux = {"a_to_b_top1": jnp.mean(jnp.argmax(logits, axis=1) == diag),
           "b_to_a_top1": jnp.mean(jnp.argmax(logits, axis=0) == diag), "scale": scale}
    return 0.5 * (loss_ab + loss_ba), aux


def margin_attribute_loss(cosines: jax.Array, labels: jax.Array, valid_values: jax.Array, *,
                          scale: float, margin: float) -> tuple[jax.Array, dict]:
    """Additive-margin softmax per attribute, averaged over the known labels.

    Args:
      cosines: ``[B, A, K]`` float, cosine of each embedding with each value's weight vector.
      labels: ``[B, A]`` int, the value index; -1 = unknown (ignored).
      valid_values: ``[A, K]`` bool, which value slots exist for each attribute.
      scale, margin: s and m above.
    Returns ``(loss, aux)`` with aux ``accuracy`` (argmax of the plain cosines, over known labels)
    and ``attribute_accuracy [A]``.
    """
    known = labels >= 0
    safe = jnp.where(known, labels, 0)
    onehot = jax.nn.one_hot(safe, cosines.shape[-1], dtype=jnp.float32)
    cos = jnp.where(valid_values[None], cosines.astype(jnp.float32), NEG_INF)
    logits = jnp.where(valid_values[None], scale * (cos - margin * onehot), NEG_INF)
    nll = -jnp.sum(jax.nn.log_softmax(logits, axis=-1) * onehot, axis=-1)
    weight = known.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    correct = (jnp.argmax(cos, axis=-1) == labels).astype(jnp.float32) * weight
    return (nll * weight).sum() / count, {
        "accuracy": correct.sum() / count,
        "attribute_accuracy": correct.sum(0) / jnp.maximum(weight.sum(0), 1.0)}
