"""Feature encoders for the sequence-level MoE's experts, chosen by name (`ENCODERS`)."""

from unif2ace_jax.models.encoders.registry import ENCODERS, EncoderSpec, LoadedEncoder, load_encoder

__all__ = ["ENCODERS", "EncoderSpec", "LoadedEncoder", "load_encoder"]
