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
from unif2ace_jax.utils.defaults import with_defaults

TOKENIZERS: Registry = Registry("tokenizer")


def default_config() -> ml_collections.ConfigDict:
    """Every field of the image tokenizer's ``config.model``, with its default: Show-o's
    MAGVIT-v2 geometry (256 px -> 16x16 codes of 13 bits; configs/tokenizer_magvit2_256.py).

    ``decoder_ch_mult`` / ``decoder_num_res_blocks`` () = the encoder's; ``num_groups`` 0 = no
    normalisation; ``pixel_rounding``: see `magvit2.model_to_images`.
    """
    return ml_collections.ConfigDict(dict(
        name="magvit2", bits=13, ch=128, ch_mult=(1, 2, 2, 4, 4),
        num_res_blocks=(4, 3, 4, 3, 4), decoder_ch_mult=(1, 1, 2, 2, 4),
        decoder_num_res_blocks=(4, 4, 3, 4, 3), num_groups=32, mid_attention=True,
        downsample="conv", quant_conv=True, patch_size=1, pos_embed=False, remat=False,
        pixel_rounding="round", dtype="float32", param_dtype="float32"))


def full_config(model_cfg) -> ml_collections.ConfigDict:
    """``config.model``: `default_config` updated with `model_cfg` (unknown fields refused)."""
    return with_defaults(default_config(), model_cfg, "model")


def _widths(ch: int, mult) -> list[int]:
    return [ch * m for m in mult]


@TOKENIZERS.register("magvit2")
def make_magvit2(cfg: ml_collections.ConfigDict) -> ImageTokenizer:
    """`cfg` fields: bits, ch, ch_mult, num_res_blocks, decoder_ch_mult, decoder_num_res_blocks,
    num_groups (0 = no normalisation), mid_attention, downsample ("conv" | "avgpool"), quant_conv, patch_size,
    pos_embed, remat, pixel_rounding ("round" | "truncate": uint8 output, see
    `magvit2.model_to_images`), dtype, param_dtype (`default_config`; missing ones take its
    defaults). Inconsistent values raise UserError."""
    cfg = full_config(cfg)
    bits = int(cfg.bits)
    if not 1 <= bits <= 20:
        raise UserError(f"model.bits must be in [1, 20] (codebook 2^bits), got {bits}")
    if cfg.downsample not in ("conv", "avgpool"):
        raise UserError(f"model.downsample must be 'conv' or 'avgpool', got {cfg.downsample!r}")
    rounding = cfg.pixel_rounding
    if rounding not in PIXEL_ROUNDINGS:
        raise UserError(f"model.pixel_rounding must be one of {PIXEL_ROUNDINGS}, got {rounding!r}")
    groups = int(cfg.num_groups)
    if groups < 0:
        raise UserError(f"model.num_groups must be >= 0 (0 = no normalisation), got {groups}")
    dec_mult = cfg.decoder_ch_mult or cfg.ch_mult
    for width in [cfg.ch] + _widths(cfg.ch, cfg.ch_mult) + _widths(cfg.ch, dec_mult):
        if groups and width % groups:
            raise UserError(f"model.num_groups={groups} does not divide channel width {width}")
    dec_blocks = cfg.decoder_num_res_blocks or None
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
        mid_attention=bool(cfg.mid_attention),
        downsample=cfg.downsample,
        quant_conv=bool(cfg.quant_conv),
        patch_size=int(cfg.patch_size),
        pos_embed=bool(cfg.pos_embed),
        remat=bool(cfg.remat),
        pixel_rounding=rounding,
        dtype=jnp.dtype(cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
    )


def make_tokenizer(model_cfg: ml_collections.ConfigDict) -> ImageTokenizer:
    """The tokenizer module named by ``model_cfg.name`` (fields: `default_config`)."""
    return TOKENIZERS.get(full_config(model_cfg).name)(model_cfg)
