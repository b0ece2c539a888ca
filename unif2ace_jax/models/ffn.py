"""The backbone's FFN slot: a registry of feed-forward modules chosen by `config.ffn.name`.

Contract for every module registered in `FFN_SLOTS`:

* Built by its factory: ``FFN_SLOTS.get(name)(cfg, d_model=..., dtype=..., param_dtype=...,
  name=...)`` where ``cfg`` is the ``config.model.ffn`` ConfigDict.
* Called as ``module(x, *, group, valid) -> y`` with
  ``x: [B, L, D]`` (compute dtype), ``group: [B, L] int32`` (0 = understanding, 1 = generation),
  ``valid: [B, L] bool`` (False at pad positions), ``y: [B, L, D]``.
* Auxiliary losses (MoE balance, router z-loss) are sown as scalars:
  ``self.sow("aux_loss", "<name>", value)``; the trainer sums every leaf of that collection.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.registry import Registry

FFN_SLOTS: Registry = Registry("ffn")


class DenseFFN(nn.Module):
    """Phi-style MLP: ``fc2(gelu_tanh(fc1(x)))`` with biases. ``x: [B, L, D] -> [B, L, D]``."""

    hidden: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, group: jax.Array | None = None,
                 valid: jax.Array | None = None) -> jax.Array:
        del group, valid  # a dense FFN treats every token alike
        d_model = x.shape[-1]
        h = nn.Dense(
            self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
            name="fc1")(x)
        h = nn.gelu(h, approximate=True)
        return nn.Dense(
            d_model, dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
            name="fc2")(h)


@FFN_SLOTS.register("dense")
def make_dense_ffn(cfg: ml_collections.ConfigDict, *, d_model: int, dtype, param_dtype,
                   name: str | None = None) -> nn.Module:
    """`cfg.hidden`: the FFN width (8192 at paper scale)."""
    del d_model
    return DenseFFN(hidden=cfg.hidden, dtype=dtype, param_dtype=param_dtype, name=name)
