"""Sampling: T2I samplers (MaskGIT, ancestral), CFG helpers, MMU / VQA decoding."""

from unif2ace_jax.sampling.ancestral import ancestral_sample, reveal_probabilities
from unif2ace_jax.sampling.guidance import guided_logits, paired_forward
from unif2ace_jax.sampling.maskgit import maskgit_sample, remask_count_table
from unif2ace_jax.registry import Registry

# Samplers by config name. Shared call: (rng, logits_fn, init_codes, *, mask_id, num_steps,
# guidance, schedule, return_trace); their temperature keywords differ (see each function).
T2I_SAMPLERS: Registry = Registry("t2i sampler")
T2I_SAMPLERS.register("maskgit")(maskgit_sample)
T2I_SAMPLERS.register("ancestral")(ancestral_sample)

__all__ = [
    "T2I_SAMPLERS",
    "ancestral_sample",
    "guided_logits",
    "maskgit_sample",
    "paired_forward",
    "remask_count_table",
    "reveal_probabilities",
]
