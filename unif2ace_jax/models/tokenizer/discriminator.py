"""PatchGAN discriminator (pix2pix / taming "NLayerDiscriminator" layout) for the tokenizer's
optional hinge adversarial loss.

``conv_0`` (4×4, stride 2) -> leaky ReLU, then ``num_layers - 1`` blocks of 4×4 stride-2 conv ->
norm -> leaky ReLU with widths ``ch · min(2^n, 8)``, one stride-1 block, and a 4×4 stride-1 conv
to one logit per patch. [ours] GroupNorm instead of taming's BatchNorm: no mutable batch
statistics, so the train step stays a pure function and does not depend on the batch layout.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.models.tokenizer.magvit2 import conv, group_norm
from unif2ace_jax.utils.defaults import with_defaults


class PatchDiscriminator(nn.Module):
    """``images [B, H, W, 3]`` in [-1, 1] -> patch logits ``[B, h, w]`` float32."""

    ch: int = 64
    num_layers: int = 3
    num_groups: int = 32
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pad = ((1, 1), (1, 1))
        h = conv(self.ch, 4, strides=2, padding=pad, name="conv_0", **kw)(x.astype(self.dtype))
        h = nn.leaky_relu(h, 0.2)
        for n in range(1, self.num_layers + 1):
            stride = 2 if n < self.num_layers else 1
            h = conv(self.ch * min(2 ** n, 8), 4, strides=stride, padding=pad, name=f"conv_{n}",
                     **kw)(h)
            h = group_norm(self.num_groups, name=f"norm_{n}", **kw)(h)
            h = nn.leaky_relu(h, 0.2)
        h = conv(1, 4, padding=pad, name="conv_out", **kw)(h)
        return h[..., 0].astype(jnp.float32)


def default_config() -> ml_collections.ConfigDict:
    """Every field of ``config.discriminator``, with its default (Show-o-sized)."""
    return ml_collections.ConfigDict(dict(ch=64, num_layers=3, num_groups=32))


def full_config(cfg) -> ml_collections.ConfigDict:
    """``config.discriminator``: `default_config` updated with `cfg` (unknown fields refused)."""
    return with_defaults(default_config(), cfg, "discriminator")


def make_discriminator(cfg: ml_collections.ConfigDict, dtype="float32",
                       param_dtype="float32") -> PatchDiscriminator:
    """From ``config.discriminator`` (fields: `default_config`)."""
    cfg = full_config(cfg)
    return PatchDiscriminator(ch=int(cfg.ch), num_layers=int(cfg.num_layers),
                              num_groups=int(cfg.num_groups), dtype=jnp.dtype(dtype),
                              param_dtype=jnp.dtype(param_dtype))
