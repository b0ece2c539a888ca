"""Masked (absorbing-state) discrete diffusion over image codes, in one place (MD4-style).

* `schedules`: mask schedules m(t) and their weights (cosine, linear, ...);
* `masking`: the training-time forward process (which codes are masked, and the mask ratio);
* `d3diff`: the D3Diff loss (masked generative loss + score entropy), a pure function.

`from unif2ace_jax.losses import d3diff_loss` re-exports the loss.
"""

from unif2ace_jax.diffusion.d3diff import (
    SCORE_PARAMETERIZATIONS,
    d3diff_loss,
    log_scores,
    score_entropy,
    score_entropy_per_sequence,
)
from unif2ace_jax.diffusion.masking import (
    MASKING_MODES,
    mask_exact_count,
    mask_image_codes,
    mask_independent,
)
from unif2ace_jax.diffusion.schedules import SCHEDULES, MaskSchedule, get_schedule

__all__ = [
    "MASKING_MODES",
    "SCHEDULES",
    "SCORE_PARAMETERIZATIONS",
    "MaskSchedule",
    "d3diff_loss",
    "get_schedule",
    "log_scores",
    "mask_exact_count",
    "mask_image_codes",
    "mask_independent",
    "score_entropy",
    "score_entropy_per_sequence",
]
