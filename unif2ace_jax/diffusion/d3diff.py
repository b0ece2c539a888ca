"""D3Diff: masked generative loss + alpha * denoising score entropy (docs/DESIGN.md §6), a pure function.

Notation: ``N`` image positions per sequence, ``K`` image codes, mask ratio ``m`` per sequence,
logits ``f`` over the K codes, target code ``x0``, ``M`` the masked positions, ``r = (1-m)/m``.

* ``L_mask``: one global mean of ``CE(f_i, x0_i)`` over every masked position of the batch.
* ``L_score``: per sequence ``(dsigma/dtau) * sum_{i in M} DSE_i``, averaged over sequences, with
  log-scores ``l_y`` and ``DSE_i = sum_y exp(l_y) - r l_{x0} + r (log r - 1)``:

  - ``free`` (SEDD-style): ``l_y = f_y + log r - log K``;
  - ``normalized`` (RADD-style): ``l_y = log_softmax(f)_y + log r``, so ``DSE_i = r CE_i``.

  Stable form. With ``A = logsumexp(f) - log K`` (``A = 0`` for ``normalized``),
  ``DSE_i = r * [(exp(A) - 1 - A) + CE_i]``: both brackets are >= 0 and r never enters a log, so
  tiny or huge r cannot cancel. ``(dsigma/dtau) * r = m'(tau)/m`` is taken from the schedule
  as one factor (see ``schedules.py``), so ``L_score = (m'/m) * sum_{i in M} [...]``.
  DSE_i = 0 only when the score equals the true ratio ``exp(l_y) = r [y = x0]``.

* ``loss = mask_weight * L_mask + alpha * L_score`` (alpha = 0: the paper's "only mask";
  mask_weight = 0: "only score").
* ``nelbo_per_token = L_score / N`` (nats; also bits).

When is ``E[L_score]`` the exact NELBO (an upper bound on ``-log p_theta(x0)``, equal to the data
entropy for the exact posterior denoiser)? The continuous-time ELBO of the absorbing diffusion
assumes every position is masked **independently** with probability ``m(tau)``, ``tau ~ U(0,1)``,
and weights by ``m'(tau)/m(tau)`` (``masking.mask_independent`` draws exactly this, returning
``mask_ratio = m``). Then ``E[L_score] = sum_k g(k)/k`` with ``g(k)`` the expected summed CE when
``k`` uniformly chosen positions are masked, which for the exact posterior is the entropy
(any-order chain rule) -- provided ``m(1) = 1`` (true for cosine and linear; loglinear stops at
``1 - eps`` and misses an O(eps) prior term). Show-o's training masking (exactly
``k = max(1, round(N m))`` positions) is not that process: with ``mask_ratio = m`` the estimator's
expectation diverges logarithmically (one masked token at weight ~1/m as m -> 0). We therefore feed
the *realised fraction* ``k/N`` as the mask ratio for such masks (``masking.mask_exact_count``):
the weight is bounded by ``m'(1/N) N`` and ``(m'/m)(k/N)`` approximates the exactly unbiased
count weight ``1 / (k P(k))`` (P: the law of k) up to O(1/N) edge effects. That estimate is not a
strict bound: it runs slightly low (about -0.2 % at N = 256 for a context-free predictor, -20 %
at N = 3). Use independent masking to report an unbiased NELBO.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from unif2ace_jax.errors import UserError, check_shape
from unif2ace_jax.diffusion.schedules import MaskSchedule, get_schedule

SCORE_PARAMETERIZATIONS = ("free", "normalized")


def _check_parameterization(name: str) -> None:
    if name not in SCORE_PARAMETERIZATIONS:
        raise UserError(f"unknown score_parameterization {name!r}; known: "
                        + ", ".join(SCORE_PARAMETERIZATIONS))


def _compute_dtype(dtype) -> jnp.dtype:
    """At least float32 (bf16/f16 logits are upcast; float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def log_scores(logits: jax.Array, mask_ratio: jax.Array,
               score_parameterization: str = "free") -> jax.Array:
    """Log-scores ``l_y`` at every position (for inspection; the loss uses the stable form).

    Args:
      logits: [B, N, K] float.
      mask_ratio: [B] float in (0, 1].
    Returns:
      [B, N, K] float, ``exp(l_y)`` estimates ``r * p(x0 = y | context)``.
    """
    _check_parameterization(score_parameterization)
    dt = _compute_dtype(logits.dtype)
    f = logits.astype(dt)
    m = mask_ratio.astype(dt)[:, None, None]
    log_r = jnp.log1p(-m) - jnp.log(m)
    if score_parameterization == "free":
        return f + log_r - math.log(f.shape[-1])
    return jax.nn.log_softmax(f, axis=-1) + log_r


def _ce_and_offset(f: jax.Array, targets: jax.Array, score_parameterization: str
                   ) -> tuple[jax.Array, jax.Array]:
    """``CE = lse(f) - f_x0`` [B, N] and ``A = lse(f) - log K`` (0 for `normalized`) [B, N]."""
    k = f.shape[-1]
    lse = jax.nn.logsumexp(f, axis=-1)
    tgt = jnp.clip(targets, 0, k - 1).astype(jnp.int32)
    f_t = jnp.take_along_axis(f, tgt[..., None], axis=-1)[..., 0]
    ce = lse - f_t
    if score_parameterization == "free":
        offset = lse - math.log(k)
    else:
        offset = jnp.zeros_like(lse)
    return ce, offset


def _dse_over_r(ce: jax.Array, offset: jax.Array) -> jax.Array:
    """``DSE / r = (exp(A) - 1 - A) + CE``, each term >= 0."""
    return (jnp.expm1(offset) - offset) + ce


def score_entropy(logits: jax.Array, targets: jax.Array, mask_ratio: jax.Array,
                  score_parameterization: str = "free") -> jax.Array:
    """Per-position denoising score entropy ``DSE_i`` (>= 0), stable form.

    Args:
      logits: [B, N, K] float. targets: [B, N] int. mask_ratio: [B] float in (0, 1].
    Returns:
      [B, N] float (at least float32): DSE as if every position were masked.
    """
    _check_parameterization(score_parameterization)
    dt = _compute_dtype(logits.dtype)
    ce, offset = _ce_and_offset(logits.astype(dt), targets, score_parameterization)
    m = mask_ratio.astype(dt)[:, None]
    return ((1.0 - m) / m) * _dse_over_r(ce, offset)


def score_entropy_per_sequence(logits: jax.Array, targets: jax.Array, masked: jax.Array,
                               mask_ratio: jax.Array, *, schedule: str | MaskSchedule = "cosine",
                               score_parameterization: str = "free") -> jax.Array:
    """``L_score`` of each sequence: ``(dsigma/dtau) * sum_{i in M} DSE_i``.

    Args:
      logits: [B, N, K] float. targets: [B, N] int. masked: [B, N] bool.
      mask_ratio: [B] float in (0, 1] (see the module docstring for which ratio to pass).
    Returns:
      [B] float; 0 for a sequence without masked positions (whatever its mask_ratio).
    """
    _check_shapes(logits, targets, masked, mask_ratio)
    _check_parameterization(score_parameterization)
    sched = get_schedule(schedule)
    dt = _compute_dtype(logits.dtype)
    ce, offset = _ce_and_offset(logits.astype(dt), targets, score_parameterization)
    return _per_sequence(ce, offset, masked.astype(bool), mask_ratio.astype(dt), sched)


def _per_sequence(ce, offset, masked, m, sched: MaskSchedule) -> jax.Array:
    # Zero the offset where unmasked before expm1, so huge unmasked logits cannot give inf*0.
    offset = jnp.where(masked, offset, 0.0)
    bracket = jnp.where(masked, _dse_over_r(ce, offset), 0.0).sum(axis=-1)
    has_mask = masked.any(axis=-1)
    m_safe = jnp.where(has_mask, jnp.clip(m, 1e-12, 1.0), 1.0)
    weight = sched.elbo_weight(m_safe)  # = (dsigma/dtau) * r
    return jnp.where(has_mask, weight * bracket, 0.0)


def _check_shapes(logits, targets, masked, mask_ratio) -> None:
    check_shape("d3diff logits", logits, ("B", "N", "K"))
    b, n, _ = logits.shape
    check_shape("d3diff targets", targets, (b, n))
    check_shape("d3diff masked", masked, (b, n))
    check_shape("d3diff mask_ratio", mask_ratio, (b,))


def d3diff_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array,
                mask_ratio: jax.Array, *, alpha: float = 0.01,
                schedule: str | MaskSchedule = "cosine", score_parameterization: str = "free",
                mask_weight: float = 1.0, example_mask: jax.Array | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The D3Diff loss ``mask_weight * L_mask + alpha * L_score`` (docs/DESIGN.md §6).

    Args:
      logits: [B, N, K] float (any dtype; the math runs in at least float32) over image codes.
      targets: [B, N] int, the clean codes x0.
      masked: [B, N] bool, True where the input carried [MASK].
      mask_ratio: [B] float in (0, 1]; for exact-count masks pass the realised fraction
        ``|M|/N``, for independent masks the drawn m (module docstring).
      alpha: weight of the score-entropy term (paper: 0.01; 0 = "only mask").
      schedule: mask schedule name (``SCHEDULES``) or object.
      score_parameterization: ``free`` | ``normalized``.
      mask_weight: weight of L_mask (0 = the paper's "only score").
      example_mask: optional [B] bool; False rows (e.g. non-T2I rows of a mixed batch) are ignored
        in both terms and in the batch average of L_score.
    Returns:
      ``(loss, aux)``; aux scalars: ``mask_ce`` (L_mask), ``score_entropy`` (L_score, batch mean),
      ``nelbo_per_token`` (L_score / N, nats), ``nelbo_bits_per_token``, ``mask_accuracy``,
      ``num_masked``. A batch without masked positions gives 0 for every term, never NaN.
    """
    _check_shapes(logits, targets, masked, mask_ratio)
    _check_parameterization(score_parameterization)
    sched = get_schedule(schedule)
    dt = _compute_dtype(logits.dtype)
    f = logits.astype(dt)
    b, n, _ = f.shape

    masked = masked.astype(bool)
    if example_mask is None:
        rows = jnp.ones((b,), bool)
    else:
        check_shape("d3diff example_mask", example_mask, (b,))
        rows = example_mask.astype(bool)
        masked = masked & rows[:, None]

    ce, offset = _ce_and_offset(f, targets, score_parameterization)
    num_masked = masked.sum()
    denom = jnp.maximum(num_masked, 1).astype(dt)
    mask_ce = jnp.where(masked, ce, 0.0).sum() / denom
    correct = jnp.argmax(f, axis=-1) == targets
    mask_accuracy = jnp.where(masked, correct, False).sum().astype(dt) / denom

    per_seq = _per_sequence(ce, offset, masked, mask_ratio.astype(dt), sched)
    num_rows = jnp.maximum(rows.sum(), 1).astype(dt)
    score = jnp.where(rows, per_seq, 0.0).sum() / num_rows
    nelbo = score / n

    loss = mask_weight * mask_ce + alpha * score
    aux = {
        "mask_ce": mask_ce,
        "score_entropy": score,
        "nelbo_per_token": nelbo,
        "nelbo_bits_per_token": nelbo / math.log(2.0),
        "mask_accuracy": mask_accuracy,
        "num_masked": num_masked.astype(dt),
    }
    return loss, aux
