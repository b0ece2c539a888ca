"""The SynthFace face encoder (`synthface_face`): a small frozen conv net for the seq-MoE ``face``
expert, standing in for the paper's ArcFace-type identity model (AntelopeV2, 512-d).

What "identity" means here. SynthFace has no persons: every face is an independent draw of 18
attributes (hair, eyes, glasses, beard, expression, skin tone, face shape, ...) rendered with a
little jitter. So the encoder is trained the way identity encoders are (an L2-normalised
embedding, cosine classifiers with an additive margin, CosFace / ArcFace style), but the classes
are the *attribute values*, one classifier per attribute: what the embedding encodes is the
face's attribute combination, not who someone is. A second, instance-discrimination term pulls
two randomly shifted views of the same face together against the other faces of the batch
(InfoNCE), the nearest SynthFace analogue of "same person, another photo". It is trained by
``python -m unif2ace_jax.train.encoders --kind=face`` and is a separate model from the
evaluation judge (its own weights, objective and data; only the conv block type is shared).

Shapes: ``images: uint8 [B, H, W, 3]`` (resized to `resolution` when different) ->
``{"tokens": [B, h·w, D] float32, "pooled": [B, D] float32}``: ``tokens`` are the last feature
map's positions projected to D (h = w = resolution / 2^len(widths)), ``pooled`` the unit-norm
embedding (a projection of the flattened map, so position is kept: hat on top, shirt below).
Use ``encoder_config.output = "pooled"`` (default) or ``"tokens"`` to pick what the expert gets.

The conv trunk (`ConvImageEncoder`) is also the image tower of `synthface_clip`.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders.contrastive import l2_normalize
from unif2ace_jax.models.judge import ConvBlock, preprocess, value_mask
from unif2ace_jax.utils.defaults import with_defaults


def _dense(n: int, names: tuple, name: str, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(n, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]))


class ConvImageEncoder(nn.Module):
    """``images: uint8 [B, H, W, 3]`` -> ``{"tokens": [B, T, D], "pooled": [B, D]}``.

    Stride-2 3x3 conv stages (``widths``; ``blocks`` convs per stage, the extra ones residual),
    then a 1x1 projection of every position (tokens) and a projection of the flattened map
    (pooled; unit norm when ``normalize``).
    """

    embed_dim: int = 128
    widths: tuple[int, ...] = (32, 64, 96)
    blocks: tuple[int, ...] = (1, 1, 1)
    resolution: int = 64
    normalize: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [B, H, W, 3], got {tuple(images.shape)}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = preprocess(images, self.resolution).astype(self.dtype)
        for width, count in zip(self.widths, self.blocks):
            x = ConvBlock(width, stride=2, **kw)(x)
            for _ in range(count - 1):
                x = x + ConvBlock(width, **kw)(x)
        b = x.shape[0]
        tokens = _dense(self.embed_dim, ("conv_out", "feature"), "tokens", **kw)(x)
        tokens = tokens.reshape(b, -1, self.embed_dim).astype(jnp.float32)
        pooled = _dense(self.embed_dim, (None, "feature"), "pooled", **kw)(x.reshape(b, -1))
        pooled = pooled.astype(jnp.float32)
        return {"tokens": tokens, "pooled": l2_normalize(pooled) if self.normalize else pooled}


class FaceEncoderWithHeads(nn.Module):
    """The face encoder plus its training heads (cosine classifiers, one per attribute).

    ``images: uint8 [B, H, W, 3]`` -> ``(pooled [B, D] unit norm, cosines [B, A, K])`` where
    ``cosines[b, a, k]`` is the cosine between the embedding and value k of attribute a (padded
    slots k >= K_a are 0; the loss masks them). Only ``params["encoder"]`` is kept for use.
    """

    encoder: ConvImageEncoder
    num_values: tuple[int, ...]

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        pooled = self.encoder(images)["pooled"]
        a, k = len(self.num_values), max(self.num_values)
        w = self.param("value_weights", nn.with_logical_partitioning(
            nn.initializers.normal(1.0), ("feature", None)), (pooled.shape[-1], a * k),
            self.encoder.param_dtype)
        cos = jnp.dot(l2_normalize(pooled), l2_normalize(w.astype(jnp.float32), axis=0),
                      precision=jax.lax.Precision.HIGHEST)
        cos = jnp.where(jnp.asarray(value_mask(self.num_values)), cos.reshape(-1, a, k), 0.0)
        return pooled, cos


def default_config() -> ml_collections.ConfigDict:
    """Every field of the face encoder's ``config.face.model`` (also the clip image tower's),
    with its default. ``blocks``: convs per stage, one int for every stage or one per width."""
    return ml_collections.ConfigDict(dict(
        embed_dim=128, widths=(32, 64, 96), blocks=1, resolution=64, normalize=True,
        dtype="float32", param_dtype="float32"))


def full_config(cfg, where: str = "face.model") -> ml_collections.ConfigDict:
    """`default_config` updated with `cfg` (unknown fields refused)."""
    return with_defaults(default_config(), cfg, where)


def make_image_encoder(cfg: ml_collections.ConfigDict | dict) -> ConvImageEncoder:
    """A `ConvImageEncoder` from a model config (fields: `default_config`)."""
    cfg = full_config(cfg)
    widths = tuple(int(w) for w in cfg["widths"])
    blocks = cfg["blocks"]
    blocks = (int(blocks),) * len(widths) if isinstance(blocks, int) else tuple(
        int(b) for b in blocks)
    if len(blocks) != len(widths):
        raise UserError(f"encoder blocks {blocks} do not match widths {widths}")
    return ConvImageEncoder(
        embed_dim=int(cfg["embed_dim"]), widths=widths, blocks=blocks,
        resolution=int(cfg["resolution"]), normalize=bool(cfg["normalize"]),
        dtype=jnp.dtype(cfg["dtype"]), param_dtype=jnp.dtype(cfg["param_dtype"]))


def make_face_model(cfg: ml_collections.ConfigDict | dict,
                    num_values: Sequence[int]) -> FaceEncoderWithHeads:
    return FaceEncoderWithHeads(encoder=make_image_encoder(cfg),
                                num_values=tuple(int(n) for n in num_values))
