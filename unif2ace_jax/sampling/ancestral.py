"""Ancestral sampler of the masked diffusion (docs/DESIGN.md §7, [ours]): its true reverse process.

Time grid ``tau_j = 1 - j/T`` (j = 0..T), ``m_j = m(tau_j)`` from the schedule. Step j goes from
``m_t = m_j`` to ``m_s = m_{j+1}``: every still-masked place is revealed independently with
probability ``(m_t - m_s) / m_t``, with a code drawn from ``softmax(guided logits / temperature)``
at that place; the last step (``m_s = m(0) = 0``) reveals all. Given places never change. This
matches the D3Diff likelihood: with the exact posterior as the denoiser it samples p_data exactly
(for a factorised posterior at every step, as the model provides).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.errors import UserError, check_shape
from unif2ace_jax.diffusion.schedules import MaskSchedule, get_schedule
from unif2ace_jax.sampling.guidance import LogitsFn, guided_logits


def reveal_probabilities(num_steps: int, schedule: str | MaskSchedule = "cosine") -> np.ndarray:
    """``(m_j - m_{j+1}) / m_j`` for j = 0..T-1 (float64 on the host; the last is 1)."""
    sched = get_schedule(schedule)
    tau = 1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps
    m = np.asarray(sched.mask_ratio(tau, xp=np), np.float64)
    m_t, m_s = m[:-1], m[1:]
    p = np.where(m_t > 0, (m_t - m_s) / np.where(m_t > 0, m_t, 1.0), 1.0)
    p = np.clip(p, 0.0, 1.0)
    p[-1] = 1.0
    return p


def ancestral_sample(rng: jax.Array, logits_fn: LogitsFn, init_codes: jax.Array, *,
                     mask_id: int, num_steps: int, guidance: float | jax.Array = 0.0,
                     temperature: float | jax.Array = 1.0,
                     schedule: str | MaskSchedule = "cosine", return_trace: bool = False):
    """Ancestral sampling (see module docstring). Wrap in ``jax.jit`` (T, N, mask_id static).

    Args:
      rng: PRNG key.
      logits_fn: ``codes [B, N] int32 -> logits [B, N, K]`` or ``(cond, uncond)`` (guidance.py).
      init_codes: [B, N] int; ``mask_id`` at unknown places, given codes elsewhere.
      mask_id: the id marking unknown places.
      num_steps: T >= 1.
      guidance: CFG weight w (used only when logits_fn returns a pair).
      temperature: temperature of the code draws (1 = the model's distribution).
      schedule: mask schedule name (the time grid).
      return_trace: also return ``num_masked`` [T, B] int32 after each step.
    Returns:
      codes [B, N] int32 with no ``mask_id`` left (and the trace if asked).
    """
    check_shape("init_codes", init_codes, ("B", "N"))
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")
    codes0 = init_codes.astype(jnp.int32)
    b, n = codes0.shape
    probs = jnp.asarray(reveal_probabilities(num_steps, schedule), jnp.float32)
    trace0 = jnp.zeros((num_steps, b), jnp.int32)

    def body(j, state):
        codes, trace = state
        unknown = codes == mask_id
        logits = guided_logits(logits_fn(codes), guidance)
        k_sample, k_reveal = jax.random.split(jax.random.fold_in(rng, j))
        drawn = jax.random.categorical(k_sample, logits / temperature, axis=-1).astype(jnp.int32)
        reveal = unknown & (jax.random.uniform(k_reveal, (b, n), jnp.float32) < probs[j])
        reveal = reveal | (unknown & (j == num_steps - 1))
        new_codes = jnp.where(reveal, drawn, codes)
        left = (new_codes == mask_id).sum(axis=-1).astype(jnp.int32)
        return new_codes, trace.at[j].set(left)

    codes, trace = jax.lax.fori_loop(0, num_steps, body, (codes0, trace0))
    if return_trace:
        return codes, trace
    return codes
