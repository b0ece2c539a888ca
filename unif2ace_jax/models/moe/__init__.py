"""Mixtures of experts. Importing this package registers "token_moe" in `FFN_SLOTS` and
"grouped_seq_moe" in `SEQ_MOE_SLOTS`."""

from unif2ace_jax.models.moe import seq_moe  # noqa: F401  (registers "grouped_seq_moe")
from unif2ace_jax.models.moe.token_moe import TokenMoE, default_config, make_token_moe

__all__ = ["TokenMoE", "default_config", "make_token_moe"]
