"""The SynthFace attribute judge: a small normalisation-free CNN predicting every attribute.

Logits use a padded layout `[B, A, K]` (A attributes, K = the largest number of values); the
entries past an attribute's own value count are fixed to a large negative number, so a softmax
over the last axis is exactly the softmax over that attribute's values.

Parameter logical axes: conv kernels (None, None, "conv_in", "conv_out"), the dense layer on the
flattened conv features ("feature", "mlp"), the classifier ("mlp", "feature").
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unif2ace_jax.utils.defaults import with_defaults

NEG_INF = -1e9


def value_mask(num_values: Sequence[int]) -> np.ndarray:
    """valid: bool [A, K] with valid[a, k] = k < num_values[a], K = max(num_values)."""
    k = max(num_values)
    return np.arange(k)[None, :] < np.asarray(num_values)[:, None]


def preprocess(images: jax.Array, resolution: int) -> jax.Array:
    """uint8 (or float in [0, 255]) [B, H, W, 3] -> float32 [B, r, r, 3] in [-1, 1].

    Images of another size are resized (linear, antialiased) to `resolution`.
    """
    x = images.astype(jnp.float32) / 127.5 - 1.0
    if x.shape[1] != resolution or x.shape[2] != resolution:
        x = jax.image.resize(x, (x.shape[0], resolution, resolution, x.shape[3]),
                             method="linear", antialias=True)
    return x


def judge_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict]:
    """Mean cross-entropy over the known labels, with accuracies.

    logits: [B, A, K] float (padded layout); labels: [B, A] int, -1 = unknown (ignored).
    Returns (loss, aux) with aux `accuracy` (over known labels) and `attribute_accuracy` [A].
    """
    known = labels >= 0
    safe = jnp.where(known, labels, 0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    weight = known.astype(jnp.float32)
    count = jnp.maximum(weight.sum(), 1.0)
    loss = (nll * weight).sum() / count
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32) * weight
    per_attribute = correct.sum(0) / jnp.maximum(weight.sum(0), 1.0)
    return loss, {"accuracy": correct.sum() / count, "attribute_accuracy": per_attribute}


class ConvBlock(nn.Module):
    """3x3 conv (+ GELU), optionally strided."""

    features: int
    stride: int = 1
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(
            self.features, (3, 3), strides=(self.stride, self.stride), padding="SAME",
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal"),
                (None, None, "conv_in", "conv_out")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        )(x)
        return nn.gelu(x)


class AttributeJudge(nn.Module):
    """images [B, H, W, 3] uint8 -> logits [B, A, K] float32 (padded; see `value_mask`).

    An optional stem conv works at full resolution. Each stage then halves the resolution with
    a strided conv and applies `blocks_per_stage - 1` (one count per stage, or one int for all)
    more 3x3 convs with residual connections. The final feature map is flattened (keeping
    where things are: hat on top, shirt below) and fed to a one-hidden-layer classifier.
    """

    num_values: tuple[int, ...]
    resolution: int = 64
    stem_width: int = 0
    widths: tuple[int, ...] = (32, 64, 128)
    blocks_per_stage: int | tuple[int, ...] = 1
    hidden: int = 256
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        x = preprocess(images, self.resolution).astype(self.dtype)
        if self.stem_width:  # full-resolution features for one-pixel details (brows, mouth)
            x = ConvBlock(self.stem_width, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        blocks = self.blocks_per_stage
        blocks = (blocks,) * len(self.widths) if isinstance(blocks, int) else tuple(blocks)
        if len(blocks) != len(self.widths):
            raise ValueError(f"blocks_per_stage {blocks} does not match widths {self.widths}")
        for width, num_blocks in zip(self.widths, blocks):
            x = ConvBlock(width, stride=2, dtype=self.dtype, param_dtype=self.param_dtype)(x)
            for _ in range(num_blocks - 1):
                x = x + ConvBlock(width, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x = x.reshape(x.shape[0], -1)
        dense = lambda n, names, name: nn.Dense(  # noqa: E731
            n, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))
        x = nn.gelu(dense(self.hidden, ("feature", "mlp"), "hidden")(x))
        a, k = len(self.num_values), max(self.num_values)
        logits = dense(a * k, ("mlp", "feature"), "head")(x).astype(jnp.float32)
        logits = logits.reshape(x.shape[0], a, k)
        return jnp.where(jnp.asarray(value_mask(self.num_values)), logits, NEG_INF)


def default_config() -> ml_collections.ConfigDict:
    """Every field of the judge's ``config.model``, with its default (the 64 px SynthFace judge).

    ``stem_width`` > 0: a full-resolution conv first (slower); ``widths``: one stride-2 stage
    each (64 -> 8 px); ``blocks_per_stage``: convs per stage (> 1: residual 3x3 convs).
    """
    return ml_collections.ConfigDict(dict(
        resolution=64, stem_width=0, widths=(32, 64, 128), blocks_per_stage=(1, 1, 1),
        hidden=256, dtype="float32", param_dtype="float32"))


def full_config(model_config) -> ml_collections.ConfigDict:
    """``config.model``: `default_config` updated with `model_config` (unknown fields refused)."""
    return with_defaults(default_config(), model_config, "model")


def make_judge(model_config: ml_collections.ConfigDict,
               num_values: Sequence[int]) -> AttributeJudge:
    """The judge described by `config.model` (fields: `default_config`)."""
    model_config = full_config(model_config)
    return AttributeJudge(
        num_values=tuple(int(n) for n in num_values),
        resolution=int(model_config.resolution),
        stem_width=int(model_config.stem_width),
        widths=tuple(int(w) for w in model_config.widths),
        blocks_per_stage=_int_or_tuple(model_config.blocks_per_stage),
        hidden=int(model_config.hidden),
        dtype=jnp.dtype(model_config.dtype),
        param_dtype=jnp.dtype(model_config.param_dtype),
    )


def _int_or_tuple(value) -> int | tuple[int, ...]:
    return int(value) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
