"""Image tokenizers (docs/DESIGN.md §8), chosen by `config.model.name` through `TOKENIZERS`.

A factory takes the ``config.model`` ConfigDict and returns a Flax module with ``encode``,
``decode`` and ``__call__`` as documented on `magvit2.ImageTokenizer`.
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.tokenizer.magvit2 import PIXEL_ROUNDINGS, ImageTokenizer
from unif2ace_jax.registry import Registry

TOKENIZERS: Registry = Registry("tokenizer")


def _widths(ch: int, mult) -> list[int]:
    return [ch * m for m in mult]


@TOKENIZERS.register("magvit2")
def make_magvit2(cfg: ml_collections.ConfigDict) -> ImageTokenizer:
    """`cfg` fields: bits, ch, ch_mult, num_res_blocks, decoder_ch_mult, decoder_num_res_blocks,
    num_groups (0 = no normalisation), mid_attention, downsample ("conv" | "avgpool"), quant_conv, patch_size,
    pos_embed, remat, pixel_rounding ("round" | "truncate": uint8 output, see
    `magvit2.model_to_images`), dtype, param_dtype. Inconsistent values raise UserError."""
    bits = int(cfg.bits)
    if not 1 <= bits <= 20:
        raise UserError(f"model.bits must be in [1, 20] (codebook 2^bits), got {bits}")
    if cfg.get("downsample", "conv") not in ("conv", "avgpool"):
        raise UserError(f"model.downsample must be 'conv' or 'avgpool', got {cfg.downsample!r}")
    rounding = cfg.get("pixel_rounding", "round")
    if rounding not in PIXEL_ROUNDINGS:
        raise UserError(f"model.pixel_rounding must be one of {PIXEL_ROUNDINGS}, got {rounding!r}")
    groups = int(cfg.get("num_groups", 32))
    if groups < 0:
        raise UserError(f"model.num_groups must be >= 0 (0 = no normalisation), got {groups}")
    dec_mult = cfg.get("decoder_ch_mult", None) or cfg.ch_mult
    for width in [cfg.ch] + _widths(cfg.ch, cfg.ch_mult) + _widths(cfg.ch, dec_mult):
        if groups and width % groups:
            raise UserError(f"model.num_groups={groups} does not divide channel width {width}")
    dec_blocks = cfg.get("decoder_num_res_blocks", None)
    return ImageTokenizer(
        bits=bits,
        ch=int(cfg.ch),
        ch_mult=tuple(cfg.ch_mult),
        num_res_blocks=(cfg.num_res_blocks if isinstance(cfg.num_res_blocks, int)
                        else tuple(cfg.num_res_blocks)),
        decoder_ch_mult=tuple(dec_mult),
        decoder_num_res_blocks=(None if dec_blocks is None
                                else dec_blocks if isinstance(dec_blocks, int) else tuple(dec_blocks)),
        num_groups=groups,
        mid_attention=bool(cfg.get("mid_attention", True)),
        downsample=cfg.get("downsample", "conv"),
        quant_conv=bool(cfg.get("quant_conv", True)),
        patch_size=int(cfg.get("patch_size", 1)),
        pos_embed=bool(cfg.get("pos_embed", False)),
        remat=bool(cfg.get("remat", False)),
        pixel_rounding=rounding,
        dtype=jnp.dtype(cfg.get("dtype", "float32")),
        param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")),
    )


def make_tokenizer(model_cfg: ml_collections.ConfigDict) -> ImageTokenizer:
    """The tokenizer module named by ``model_cfg.name`` (default "magvit2")."""
    return TOKENIZERS.get(model_cfg.get("name", "magvit2"))(model_cfg)
