"""Losses: next-token CE over text, the image tokenizer's losses, and the unified objective
(`losses.unified`). D3Diff itself lives with the rest of the diffusion in `unif2ace_jax.diffusion`
and is re-exported here, so ``from unif2ace_jax.losses import d3diff_loss`` works."""

from unif2ace_jax.diffusion.d3diff import (
    SCORE_PARAMETERIZATIONS,
    d3diff_loss,
    log_scores,
    score_entropy,
    score_entropy_per_sequence,
)
from unif2ace_jax.losses.next_token import next_token_loss

__all__ = [
    "SCORE_PARAMETERIZATIONS",
    "d3diff_loss",
    "log_scores",
    "next_token_loss",
    "score_entropy",
    "score_entropy_per_sequence",
]
