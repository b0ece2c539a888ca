"""The noise-level encoder: a sinusoidal embedding of the mask ratio (docs/DESIGN.md §5, [ours]).

The generation group's ``noise`` expert reads the fraction of masked image tokens of each
sequence (its noise level, ``r`` in ``[0, 1]``) and embeds it like a diffusion timestep::

    e(r) = [sin(s·r·ω_0) … sin(s·r·ω_{h-1}), cos(s·r·ω_0) … cos(s·r·ω_{h-1})]
    ω_i = max_period^(−i / h),  h = dim / 2

``s`` (``scale``, default 1000) stretches ``[0, 1]`` over the range diffusion timesteps use, so the
low frequencies still resolve small ratio differences. Parameter free.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.defaults import with_defaults


def sinusoidal_embedding(values: jax.Array, dim: int, *, max_period: float = 10000.0,
                         scale: float = 1000.0) -> jax.Array:
    """``values: [B] float -> [B, dim] float32`` (sines then cosines; ``dim`` must be even)."""
    if dim <= 0 or dim % 2:
        raise UserError(f"noise embedding dim must be a positive even number, got {dim}")
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = scale * jnp.asarray(values, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class NoiseEncoder(nn.Module):
    """``mask_ratio: [B] float (or [B, 1]) -> [B, dim] float32``; no parameters."""

    dim: int = 256
    max_period: float = 10000.0
    scale: float = 1000.0

    @nn.compact
    def __call__(self, mask_ratio: jax.Array) -> jax.Array:
        r = jnp.asarray(mask_ratio)
        if r.ndim == 2 and r.shape[1] == 1:
            r = r[:, 0]
        if r.ndim != 1:
            raise UserError(f"noise encoder expects a mask ratio per sequence [B], got shape "
                            f"{tuple(r.shape)}")
        return sinusoidal_embedding(r, self.dim, max_period=self.max_period, scale=self.scale)


def default_config() -> ml_collections.ConfigDict:
    """Every field of the noise encoder's ``encoder_config``, with its default."""
    return ml_collections.ConfigDict(dict(dim=256, max_period=10000.0, scale=1000.0))


def build_noise_encoder(cfg: ml_collections.ConfigDict | None) -> NoiseEncoder:
    cfg = with_defaults(default_config(), cfg, "encoder_config (noise)")
    return NoiseEncoder(dim=int(cfg.dim), max_period=float(cfg.max_period),
                        scale=float(cfg.scale))
