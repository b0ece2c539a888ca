"""MaskGIT parallel decoding for T2I (docs/DESIGN.md §7, [Show-o]), one jit-able ``lax.fori_loop``.

Step ``k = 0 .. T-1`` on a canvas of image codes with ``mask_id`` at unknown places:

1. ``logits = guided(logits_fn(codes))`` (CFG ``(1+w) cond - w uncond`` for a pair, see guidance.py);
2. every unknown place draws a code from ``softmax(logits / sample_temperature)``;
3. confidence ``= log p(chosen) + noise_temperature * (1 - k/T) * Gumbel`` (docs/DESIGN.md §7's annealing;
   Show-o anneals by ``1 - (k+1)/T``, a one-step shift); known places get ``+inf``;
4. the ``n_k`` least confident of the places unknown at this step are masked again, everything else
   is kept. ``n_k = floor(U0 * m((k+1)/T))`` with ``m`` the schedule's ``from_uniform`` (cosine:
   ``cos(pi/2 (k+1)/T)``) and ``U0`` the number of unknown places of the *initial* canvas (= N
   when starting fully masked; scaling by U0 makes inpainting follow the same schedule), then
   clamped to ``max(1, min(unknown - 1, n_k))`` so every step reveals at least one token and at
   least one stays for the next step; the last step re-masks nothing.

Options for converted Show-o weights (``Showo.t2i_generate``; defaults keep the above):

* ``temperature_annealing="showo_compound"``: Show-o reassigns ``t <- t (1 - (k+1)/T)`` every
  step, so step k uses ``t0 * prod_{m=1..k+1} (1 - m/T)`` (`annealing_factors`; 0 at the end).
* ``remask_rule="showo"``: ``n_k = floor(N cos(pi/2 (k+1)/T))`` computed in float32 as Show-o's
  torch code does, with N all places of the canvas (`showo_remask_counts`), same clamp.
  Show-o's last step keeps one place masked in its working ids but returns every sampled code,
  which is what re-masking nothing at the last step returns.

Known (given) places never change, and no mask remains after the last step. The per-step counts
``floor(U0 m_k)`` are tabulated on the host in float64 for every U0 in 0..N (static T, N), with a
1e-9 nudge so exact ties (e.g. ``cos(pi/3) = 1/2``) floor to the true integer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unif2ace_jax.errors import UserError, check_shape
from unif2ace_jax.diffusion.schedules import MaskSchedule, get_schedule
from unif2ace_jax.sampling.guidance import LogitsFn, guided_logits


def remask_count_table(num_positions: int, num_steps: int,
                       schedule: str | MaskSchedule = "cosine") -> np.ndarray:
    """``table[k, u0] = floor(u0 * m((k+1)/T))`` (0 at the last step), int32 [T, N+1]."""
    sched = get_schedule(schedule)
    progress = np.arange(1, num_steps + 1, dtype=np.float64) / num_steps
    m = np.asarray(sched.from_uniform(progress, xp=np), np.float64)
    u0 = np.arange(num_positions + 1, dtype=np.float64)
    table = np.floor(m[:, None] * u0[None, :] + 1e-9).astype(np.int32)
    table[-1] = 0
    return table


TEMPERATURE_ANNEALINGS = ("linear", "showo_compound")
REMASK_RULES = ("unif2ace", "showo")


def showo_remask_counts(num_positions: int, num_steps: int) -> np.ndarray:
    """Show-o's ``floor(N * cos(pi/2 * (k+1)/T))`` per step k, int32 [T] (before the clamp).

    As ``Showo.t2i_generate`` computes it: ``ratio`` a float32 tensor, ``cos(ratio * pi * 0.5)``
    and ``N * mask_ratio`` in float32, then floor."""
    ratio = (np.arange(1, num_steps + 1, dtype=np.float64) / num_steps).astype(np.float32)
    mask_ratio = np.cos(ratio * np.float32(np.pi) * np.float32(0.5))
    return np.floor(np.float32(num_positions) * mask_ratio).astype(np.int32)


def annealing_factors(num_steps: int, annealing: str) -> np.ndarray:
    """The factor step k multiplies the noise temperature by, float64 [T].

    ``linear``: ``1 - k/T``; ``showo_compound``: ``prod_{m=1..k+1} (1 - m/T)`` (Show-o)."""
    k = np.arange(num_steps, dtype=np.float64)
    if annealing == "linear":
        return 1.0 - k / num_steps
    if annealing == "showo_compound":
        return np.cumprod(1.0 - (k + 1) / num_steps)
    raise UserError(f"unknown temperature_annealing {annealing!r}; known: "
                    f"{', '.join(TEMPERATURE_ANNEALINGS)}")


def _count_table(n: int, num_steps: int, schedule, remask_rule: str) -> np.ndarray:
    """``table[k, u0]``: the step-k count before the clamp (see `remask_count_table`)."""
    if remask_rule == "unif2ace":
        return remask_count_table(n, num_steps, schedule)
    if remask_rule == "showo":
        if get_schedule(schedule).name != "cosine":
            raise UserError(f"remask_rule 'showo' uses Show-o's cosine schedule, not "
                            f"{schedule!r}")
        counts = showo_remask_counts(n, num_steps)
        counts[-1] = 0
        return np.repeat(counts[:, None], n + 1, axis=1)
    raise UserError(f"unknown remask_rule {remask_rule!r}; known: {', '.join(REMASK_RULES)}")


def _check(init_codes: jax.Array, num_steps: int) -> None:
    check_shape("init_codes", init_codes, ("B", "N"))
    if num_steps < 1:
        raise UserError(f"num_steps must be >= 1, got {num_steps}")


def maskgit_sample(rng: jax.Array, logits_fn: LogitsFn, init_codes: jax.Array, *,
                   mask_id: int, num_steps: int, guidance: float | jax.Array = 0.0,
                   noise_temperature: float | jax.Array = 1.0,
                   sample_temperature: float | jax.Array = 1.0,
                   schedule: str | MaskSchedule = "cosine", return_trace: bool = False,
                   temperature_annealing: str = "linear", remask_rule: str = "unif2ace"):
    """MaskGIT decoding (see module docstring). Wrap in ``jax.jit`` (T, N, mask_id static).

    Args:
      rng: PRNG key.
      logits_fn: ``codes [B, N] int32 -> logits [B, N, K]`` or ``(cond, uncond)`` (guidance.py).
      init_codes: [B, N] int; ``mask_id`` at unknown places (all of them for plain T2I), given
        codes elsewhere (inpainting).
      mask_id: the id marking unknown places (outside 0..K-1).
      num_steps: T (16 at 256 px).
      guidance: CFG weight w (used only when logits_fn returns a pair).
      noise_temperature: tau of the Gumbel confidence noise, annealed by (1 - k/T).
      sample_temperature: temperature of the code draws.
      schedule: mask schedule name; ``cosine`` is MaskGIT's.
      return_trace: also return ``num_masked`` [T, B] int32, the masks left after each step.
      temperature_annealing: ``linear`` (1 - k/T) or ``showo_compound`` (`annealing_factors`).
      remask_rule: ``unif2ace`` (counts from the initial unknowns) or ``showo`` (Show-o's
        float32 counts from all N places).
    Returns:
      codes [B, N] int32 with no ``mask_id`` left (and the trace if asked).
    """
    _check(init_codes, num_steps)
    codes0 = init_codes.astype(jnp.int32)
    b, n = codes0.shape
    table = jnp.asarray(_count_table(n, num_steps, schedule, remask_rule))
    factors = None
    if temperature_annealing != "linear":
        factors = jnp.asarray(annealing_factors(num_steps, temperature_annealing), jnp.float32)
    u0 = (codes0 == mask_id).sum(axis=-1)
    trace0 = jnp.zeros((num_steps, b), jnp.int32)

    def body(k, state):
        codes, trace = state
        unknown = codes == mask_id
        logits = guided_logits(logits_fn(codes), guidance)
        logp = jax.nn.log_softmax(logits / sample_temperature, axis=-1)
        k_sample, k_noise = jax.random.split(jax.random.fold_in(rng, k))
        drawn = jax.random.categorical(k_sample, logp, axis=-1).astype(jnp.int32)
        sampled = jnp.where(unknown, drawn, codes)
        chosen_logp = jnp.take_along_axis(logp, drawn[..., None], axis=-1)[..., 0]
        if factors is None:
            anneal = noise_temperature * (1.0 - k / num_steps)
        else:
            anneal = noise_temperature * factors[k]
        conf = chosen_logp + anneal * jax.random.gumbel(k_noise, (b, n), jnp.float32)
        conf = jnp.where(unknown, conf, jnp.inf)

        n_unknown = unknown.sum(axis=-1)
        target = table[k][u0]
        keep_masked = jnp.maximum(1, jnp.minimum(n_unknown - 1, target))
        keep_masked = jnp.where(k == num_steps - 1, 0, jnp.minimum(keep_masked, n_unknown))
        rank = jnp.argsort(jnp.argsort(conf, axis=-1), axis=-1)  # 0 = least confident
        remask = rank < keep_masked[:, None]
        new_codes = jnp.where(remask, jnp.int32(mask_id), sampled)
        return new_codes, trace.at[k].set(remask.sum(axis=-1).astype(jnp.int32))

    codes, trace = jax.lax.fori_loop(0, num_steps, body, (codes0, trace0))
    if return_trace:
        return codes, trace
    return codes
