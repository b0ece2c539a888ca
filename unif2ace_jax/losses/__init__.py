"""Losses: D3Diff over image codes, next-token CE over text, and the mask schedules."""

from unif2ace_jax.losses.d3diff import (
    SCORE_PARAMETERIZATIONS,
    d3diff_loss,
    log_scores,
    score_entropy,
    score_entropy_per_sequence,
)
from unif2ace_jax.losses.next_token import next_token_loss
from unif2ace_jax.losses.schedules import SCHEDULES, MaskSchedule, get_schedule

__all__ = [
    "SCHEDULES",
    "SCORE_PARAMETERIZATIONS",
    "MaskSchedule",
    "d3diff_loss",
    "get_schedule",
    "log_scores",
    "next_token_loss",
    "score_entropy",
    "score_entropy_per_sequence",
]
