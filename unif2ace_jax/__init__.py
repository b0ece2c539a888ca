"""unif2ace_jax: UniF^2ace (arXiv 2503.08120) in JAX/Flax, TPU-first."""

__version__ = "0.1.0"
