"""The logits-function interface shared by the T2I samplers, and classifier-free guidance.

A sampler takes ``logits_fn(codes) -> out`` where ``codes`` is [B, N] int32 holding ``mask_id`` at
unknown places, and ``out`` is either

* ``logits`` [B, N, K] (no guidance), or
* a pair ``(cond_logits, uncond_logits)``, each [B, N, K], combined as
  ``(1 + w) * cond - w * uncond`` with the sampler's ``guidance`` w (docs/DESIGN.md §7).

``paired_forward`` turns a model forward over a doubled batch (conditional prompts first, then the
empty prompts) into such a pair, so cond and uncond run in one forward pass.
"""

from __future__ import annotations

from typing import Callable, Union

import jax
import jax.numpy as jnp

LogitsOut = Union[jax.Array, tuple[jax.Array, jax.Array]]
LogitsFn = Callable[[jax.Array], LogitsOut]


def guided_logits(out: LogitsOut, guidance: float | jax.Array = 0.0) -> jax.Array:
    """float32 logits from a logits_fn output: as is, or ``(1+w) cond - w uncond`` for a pair.

    With w = 0 the pair gives ``cond`` exactly (same bits as a cond-only logits_fn).
    """
    if isinstance(out, (tuple, list)):
        cond, uncond = out
        cond = cond.astype(jnp.float32)
        uncond = uncond.astype(jnp.float32)
        w = jnp.asarray(guidance, jnp.float32)
        return (1.0 + w) * cond - w * uncond
    return out.astype(jnp.float32)


def paired_forward(forward: Callable[[jax.Array], jax.Array]) -> LogitsFn:
    """``forward(codes [2B, N]) -> logits [2B, N, K]`` (rows 0..B-1 conditional, B..2B-1
    unconditional) becomes ``codes [B, N] -> (cond [B, N, K], uncond [B, N, K])``."""

    def fn(codes: jax.Array) -> tuple[jax.Array, jax.Array]:
        b = codes.shape[0]
        logits = forward(jnp.concatenate([codes, codes], axis=0))
        return logits[:b], logits[b:]

    return fn
