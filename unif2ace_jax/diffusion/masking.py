"""Training-time random masking of image codes for T2I (docs/DESIGN.md §6), jit-friendly, static shapes.

Two processes, both drawing ``u ~ U(0,1)`` per example and ``m = schedule.from_uniform(u)``:

* ``count`` (Show-o, the training default): mask exactly ``k = max(1, round(N m))`` positions
  (round half to even), chosen uniformly at random (random scores + rank). Returns
  ``mask_ratio = k / N``, the realised fraction, which is what ``d3diff_loss`` should be given for
  such masks: it keeps the score weight bounded and is what a model can read off its input
  (see ``diffusion/d3diff.py`` for why the drawn m would make the L_score estimator heavy-tailed).
* ``independent`` (the continuous-time ELBO's forward process): every position is masked
  independently with probability m. Returns ``mask_ratio = m``. With this, ``E[L_score]`` is exactly
  the NELBO; use it to report an unbiased ``nelbo_per_token``. A row may end with no mask at all
  (it then contributes 0 to L_score, as it should).
* ``stratified``: ``independent`` with the batch's ``u`` spread over ``[0, 1)`` (one shared offset,
  ``u_b = (u_0 + b / B) mod 1``), as VDM/MD4 do. Each row is still exactly the ELBO's forward
  process, so the mean stays unbiased, but the estimate's variance is far lower: the per-token
  ELBO weight grows like ``1/m`` near ``m = 0``, and plain sampling puts a random number of rows
  there. Use it for reported NELBO figures.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unif2ace_jax.errors import UserError, check_shape
from unif2ace_jax.diffusion.schedules import MaskSchedule, get_schedule

MASKING_MODES = ("count", "independent", "stratified")


def _check_codes(codes: jax.Array) -> None:
    check_shape("image codes", codes, ("B", "N"))


def mask_exact_count(rng: jax.Array, codes: jax.Array, *, mask_id: int,
                     schedule: str | MaskSchedule = "cosine"
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mask exactly ``max(1, round(N m))`` random positions per example.

    Args:
      rng: PRNG key. codes: [B, N] int image codes. mask_id: id written at masked places.
    Returns:
      ``masked_codes`` [B, N] (codes dtype), ``masked`` [B, N] bool, ``mask_ratio`` [B] float32
      equal to the realised fraction ``k / N``.
    """
    _check_codes(codes)
    sched = get_schedule(schedule)
    b, n = codes.shape
    rng_u, rng_pos = jax.random.split(rng)
    u = jax.random.uniform(rng_u, (b,), jnp.float32)
    m = sched.from_uniform(u)
    k = jnp.clip(jnp.round(n * m), 1, n).astype(jnp.int32)
    scores = jax.random.uniform(rng_pos, (b, n), jnp.float32)
    rank = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # a random permutation per row
    masked = rank < k[:, None]
    masked_codes = jnp.where(masked, jnp.asarray(mask_id, codes.dtype), codes)
    return masked_codes, masked, k.astype(jnp.float32) / n


def mask_independent(rng: jax.Array, codes: jax.Array, *, mask_id: int,
                     schedule: str | MaskSchedule = "cosine", stratified: bool = False
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mask each position independently with probability ``m`` (the ELBO's forward process).

    ``stratified``: the rows' uniforms are ``(u_0 + b / B) mod 1`` (see the module docstring).

    Returns:
      ``masked_codes`` [B, N], ``masked`` [B, N] bool, ``mask_ratio`` [B] float32 equal to m.
    """
    _check_codes(codes)
    sched = get_schedule(schedule)
    b, n = codes.shape
    rng_u, rng_pos = jax.random.split(rng)
    if stratified:
        u0 = jax.random.uniform(rng_u, (), jnp.float32)
        u = jnp.mod(u0 + jnp.arange(b, dtype=jnp.float32) / b, 1.0)
    else:
        u = jax.random.uniform(rng_u, (b,), jnp.float32)
    m = sched.from_uniform(u)
    masked = jax.random.uniform(rng_pos, (b, n), jnp.float32) < m[:, None]
    masked_codes = jnp.where(masked, jnp.asarray(mask_id, codes.dtype), codes)
    return masked_codes, masked, m


def mask_image_codes(rng: jax.Array, codes: jax.Array, *, mask_id: int,
                     schedule: str | MaskSchedule = "cosine", mode: str = "count"
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Dispatch on ``mode``: ``count`` (training default), ``independent`` or ``stratified``
    (see the module docstring)."""
    if mode == "count":
        return mask_exact_count(rng, codes, mask_id=mask_id, schedule=schedule)
    if mode == "independent":
        return mask_independent(rng, codes, mask_id=mask_id, schedule=schedule)
    if mode == "stratified":
        return mask_independent(rng, codes, mask_id=mask_id, schedule=schedule, stratified=True)
    raise UserError(f"unknown masking mode {mode!r}; known: " + ", ".join(MASKING_MODES))
