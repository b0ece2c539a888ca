"""MAGVIT-v2-style convolutional image tokenizer with lookup-free quantization (docs/DESIGN.md §8).

Layout follows Show-o's MAGVIT-v2 (a taming-transformers style VQGAN encoder/decoder), so its
PyTorch weights map onto these parameters by name and layout alone:

=====================================  ==============================================
Show-o (PyTorch)                       here (Flax params path)
=====================================  ==============================================
``encoder.conv_in``                    ``encoder/conv_in``
``encoder.down.{i}.block.{j}.norm1``   ``encoder/down_{i}/block_{j}/norm1`` (also norm2,
                                       conv1, conv2, nin_shortcut)
``encoder.down.{i}.downsample.conv``   ``encoder/down_{i}/downsample/conv``
``encoder.mid.block_1`` / ``attn_1``   ``encoder/mid/block_1`` / ``attn_1`` (norm, q, k, v,
/ ``block_2``                          proj_out) / ``block_2``
``encoder.norm_out`` / ``conv_out``    ``encoder/norm_out`` / ``conv_out`` / ``quant_conv``
/ ``quant_conv``
``decoder.post_quant_conv`` /          ``decoder/post_quant_conv`` / ``conv_in`` / ``mid``
``conv_in`` / ``mid``
``decoder.up.{i}.block.{j}``,          ``decoder/up_{i}/block_{j}``, ``up_{i}/upsample/conv``
``up.{i}.upsample.conv``
``decoder.norm_out`` / ``conv_out``    ``decoder/norm_out`` / ``conv_out``
=====================================  ==============================================

Conv ``weight [O, I, kh, kw]`` -> ``kernel [kh, kw, I, O]``; GroupNorm ``weight`` -> ``scale``.
Level ``i`` of the decoder is, as in Show-o, the level at resolution ``H / 2^i`` (``up_0`` is
the last one applied). Show-o's downsampling pads (0, 1) on each spatial axis and runs a 3×3
stride-2 conv; its upsampling is nearest ×2 then a 3×3 conv; norms are GroupNorm(eps 1e-6);
activations are swish. Show-o places attention only in the mid blocks.

Images are NHWC floats in [-1, 1]. Codes are ``[B, h, w]`` int32 with
``h = H / (patch_size · 2^(levels-1))``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unif2ace_jax.models.tokenizer.lfq import LFQuantizer, indices_to_codes

CONV_AXES = (None, None, "conv_in", "conv_out")


def conv(features: int, kernel: int, *, strides: int = 1, padding="SAME", dtype=jnp.float32,
         param_dtype=jnp.float32, name: str | None = None) -> nn.Conv:
    """A 2-D conv with logical axis names on its kernel ``[kh, kw, in, out]`` and bias."""
    return nn.Conv(
        features, (kernel, kernel), strides=(strides, strides), padding=padding, dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
        name=name)


def group_norm(num_groups: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
               name: str | None = None):
    """GroupNorm(eps 1e-6) with logical axis names; ``num_groups == 0`` means no normalisation
    ([ours]: un-normalised blocks learn markedly faster in the small CPU configs)."""
    if num_groups == 0:
        return lambda x: x
    return nn.GroupNorm(
        num_groups=num_groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
        name=name)


class ResnetBlock(nn.Module):
    """``x + conv2(swish(norm2(conv1(swish(norm1(x))))))``; a 1×1 ``nin_shortcut`` when the
    width changes. ``x: [B, H, W, C_in] -> [B, H, W, out_channels]``."""

    out_channels: int
    num_groups: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.swish(group_norm(self.num_groups, name="norm1", **kw)(x))
        h = conv(self.out_channels, 3, name="conv1", **kw)(h)
        h = nn.swish(group_norm(self.num_groups, name="norm2", **kw)(h))
        h = conv(self.out_channels, 3, name="conv2", **kw)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, name="nin_shortcut", **kw)(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions with 1×1-conv q, k, v and proj_out.
    ``x: [B, H, W, C] -> [B, H, W, C]`` (residual)."""

    num_groups: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, h, w, c = x.shape
        y = group_norm(self.num_groups, name="norm", **kw)(x)
        q, k, v = (conv(c, 1, name=n, **kw)(y).reshape(b, h * w, c) for n in ("q", "k", "v"))
        scores = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * (c ** -0.5)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
        return x + conv(c, 1, name="proj_out", **kw)(out)


class Downsample(nn.Module):
    """2× down: "conv" = pad (0, 1) then 3×3 stride-2 conv (Show-o); "avgpool" = 2×2 mean."""

    mode: str = "conv"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode == "avgpool":
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        return conv(x.shape[-1], 3, strides=2, padding=((0, 1), (0, 1)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """2× up: nearest-neighbour repeat then a 3×3 conv."""

    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(x.shape[-1], 3, dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class MidBlock(nn.Module):
    """``block_1`` -> optional ``attn_1`` -> ``block_2`` at the lowest resolution."""

    num_groups: int
    attention: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(num_groups=self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, name="block_1", **kw)(x)
        if self.attention:
            x = AttnBlock(name="attn_1", **kw)(x)
        return ResnetBlock(c, name="block_2", **kw)(x)


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
    """``[B, H, W, C] -> [B, H/p, W/p, p·p·C]`` (channel order: row offset, column offset, C)."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
    """Inverse of `space_to_depth`: ``[B, h, w, p·p·C] -> [B, h·p, w·p, C]``."""
    if p == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c // (p * p))


def add_position_embedding(module: nn.Module, h: jax.Array, name: str = "pos_embed") -> jax.Array:
    """``h + P`` with a learned ``P: [H, W, C]`` (logical axes (None, None, "conv_out")).
    [ours] Optional: gives the lowest-resolution features absolute positions."""
    p = module.param(name, nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                        (None, None, "conv_out")),
                     h.shape[1:], module.param_dtype)
    return h + p.astype(h.dtype)


def _per_level(value: int | Sequence[int], levels: int, what: str) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * levels
    value = tuple(int(v) for v in value)
    if len(value) != levels:
        raise ValueError(f"{what} has {len(value)} entries; expected one per level ({levels})")
    return value


class ResLevel(nn.Module):
    """One encoder or decoder level: ``block_0..block_{n-1}`` at width `out_channels`, then an
    optional 2× ``downsample`` (encoder: `downsample` names its mode) or ``upsample`` (decoder).
    """

    out_channels: int
    num_blocks: int
    num_groups: int
    downsample: str | None = None  # None: no downsampling (decoder, last encoder level)
    upsample: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_cls = nn.remat(ResnetBlock) if self.remat else ResnetBlock
        for j in range(self.num_blocks):
            x = block_cls(self.out_channels, self.num_groups, name=f"block_{j}", **kw)(x)
        if self.downsample is not None:
            x = Downsample(self.downsample, name="downsample", **kw)(x)
        if self.upsample:
            x = Upsample(name="upsample", **kw)(x)
        return x


class Encoder(nn.Module):
    """``images [B, H, W, 3]`` -> latents ``[B, H/2^(L-1), W/2^(L-1), bits]`` float32
    (L = ``len(ch_mult)`` levels)."""

    bits: int
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int | Sequence[int]
    num_groups: int
    mid_attention: bool = True
    downsample: str = "conv"
    quant_conv: bool = True
    patch_size: int = 1
    pos_embed: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        blocks = _per_level(self.num_res_blocks, levels, "encoder num_res_blocks")
        x = space_to_depth(x.astype(self.dtype), self.patch_size)
        h = conv(self.ch, 3, name="conv_in", **kw)(x)
        for i in range(levels):
            h = ResLevel(self.ch * self.ch_mult[i], blocks[i], self.num_groups,
                         downsample=self.downsample if i != levels - 1 else None,
                         remat=self.remat, name=f"down_{i}", **kw)(h)
        if self.pos_embed:
            h = add_position_embedding(self, h)
        h = MidBlock(self.num_groups, self.mid_attention, name="mid", **kw)(h)
        h = nn.swish(group_norm(self.num_groups, name="norm_out", **kw)(h))
        h = conv(self.bits, 3, name="conv_out", **kw)(h)
        if self.quant_conv:
            h = conv(self.bits, 1, name="quant_conv", **kw)(h)
        return h.astype(jnp.float32)


class Decoder(nn.Module):
    """Quantized latents ``[B, h, w, bits]`` -> images ``[B, h·2^(L-1), w·2^(L-1), out]``
    (unclipped, nominally [-1, 1]). Levels run from ``up_{L-1}`` (lowest resolution) to ``up_0``."""

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int | Sequence[int]
    num_groups: int
    out_channels: int = 3
    mid_attention: bool = True
    quant_conv: bool = True
    patch_size: int = 1
    pos_embed: bool = False
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        levels = len(self.ch_mult)
        blocks = _per_level(self.num_res_blocks, levels, "decoder num_res_blocks")
        h = z.astype(self.dtype)
        if self.quant_conv:
            h = conv(z.shape[-1], 1, name="post_quant_conv", **kw)(h)
        h = conv(self.ch * self.ch_mult[-1], 3, name="conv_in", **kw)(h)
        if self.pos_embed:
            h = add_position_embedding(self, h)
        h = MidBlock(self.num_groups, self.mid_attention, name="mid", **kw)(h)
        for i in reversed(range(levels)):
            h = ResLevel(self.ch * self.ch_mult[i], blocks[i], self.num_groups, upsample=i != 0,
                         remat=self.remat, name=f"up_{i}", **kw)(h)
        h = nn.swish(group_norm(self.num_groups, name="norm_out", **kw)(h))
        h = conv(self.out_channels * self.patch_size ** 2, 3, name="conv_out", **kw)(h)
        return depth_to_space(h, self.patch_size).astype(jnp.float32)


class ImageTokenizer(nn.Module):
    """Encoder -> LFQ -> decoder. Methods (use with ``model.apply(variables, x, method=...)``):

    * ``__call__(images)``: ``[B, H, W, 3]`` in [-1, 1] -> dict with ``recon [B, H, W, 3]``,
      ``latents [B, h, w, k]``, ``quantized [B, h, w, k]`` (straight-through) and
      ``indices [B, h, w]`` int32.
    * ``encode(images) -> codes [B, h, w]`` int32 in ``[0, 2^k)``.
    * ``decode(codes) -> images [B, H, W, 3]`` float, nominally [-1, 1] (unclipped).

    ``decoder_ch_mult`` / ``decoder_num_res_blocks`` default to the encoder's (a mirror);
    Show-o's decoder uses its own (1, 1, 2, 2, 4) / (4, 4, 3, 4, 3).

    ``patch_size`` p > 1 [ours, for CPU-sized configs] folds p×p pixel patches into channels
    before ``conv_in`` (space-to-depth) and unfolds ``conv_out``'s ``3·p²`` channels after it,
    so no conv runs at full resolution; p = 1 is Show-o's layout. Downsampling factor:
    ``p · 2^(len(ch_mult) - 1)``. ``pos_embed`` [ours] adds a learned ``[h, w, C]`` position
    embedding (``encoder/pos_embed``, ``decoder/pos_embed``) before each mid block; it ties the
    model to one image size. Both default to Show-o's layout (off).
    """

    bits: int
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 2, 4, 4)
    num_res_blocks: int | Sequence[int] = (4, 3, 4, 3, 4)
    decoder_ch_mult: Sequence[int] | None = None
    decoder_num_res_blocks: int | Sequence[int] | None = None
    num_groups: int = 32
    mid_attention: bool = True
    downsample: str = "conv"
    quant_conv: bool = True
    out_channels: int = 3
    patch_size: int = 1
    pos_embed: bool = False
    remat: bool = False
    pixel_rounding: str = "round"
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @property
    def downsample_factor(self) -> int:
        return self.patch_size * 2 ** (len(self.ch_mult) - 1)

    @property
    def codebook_size(self) -> int:
        return 2 ** self.bits

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, num_groups=self.num_groups,
                  mid_attention=self.mid_attention, quant_conv=self.quant_conv, remat=self.remat,
                  patch_size=self.patch_size, pos_embed=self.pos_embed)
        self.encoder = Encoder(self.bits, self.ch, tuple(self.ch_mult), self.num_res_blocks,
                               downsample=self.downsample, **kw)
        dec_mult = self.ch_mult if self.decoder_ch_mult is None else self.decoder_ch_mult
        dec_blocks = (self.num_res_blocks if self.decoder_num_res_blocks is None
                      else self.decoder_num_res_blocks)
        self.decoder = Decoder(self.ch, tuple(dec_mult), dec_blocks,
                               out_channels=self.out_channels, **kw)
        self.quantize = LFQuantizer(self.bits)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        out = self.quantize(self.encoder(images))
        out["recon"] = self.decoder(out["quantized"])
        return out

    def encode(self, images: jax.Array) -> jax.Array:
        """``images [B, H, W, 3]`` in [-1, 1] -> ``codes [B, h, w]`` int32."""
        return self.quantize(self.encoder(images))["indices"]

    def decode(self, codes: jax.Array) -> jax.Array:
        """``codes [B, h, w]`` int -> ``images [B, H, W, 3]`` float (unclipped)."""
        return self.decoder(indices_to_codes(codes, self.bits, jnp.float32))


def images_to_model(images: jax.Array) -> jax.Array:
    """uint8 ``[..., 3]`` in [0, 255] -> float32 in [-1, 1]."""
    return images.astype(jnp.float32) / 127.5 - 1.0


PIXEL_ROUNDINGS = ("round", "truncate")


def model_to_images(x: jax.Array, rounding: str = "round") -> jax.Array:
    """float ``[...]`` in [-1, 1] -> uint8 ``[...]`` in [0, 255].

    "round": ``clip(round((x + 1) · 127.5))``; "truncate" (Show-o's MAGVIT-v2):
    ``floor(clip((x + 1) / 2, 0, 1) · 255)``.
    """
    x = x.astype(jnp.float32)
    if rounding == "truncate":
        return (jnp.clip((x + 1.0) / 2.0, 0.0, 1.0) * 255.0).astype(jnp.uint8)
    if rounding != "round":
        raise ValueError(f"rounding must be one of {PIXEL_ROUNDINGS}, got {rounding!r}")
    return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
