"""Flax modules: image tokenizer, backbone, attention, FFN slot, mixtures of experts, experts."""
