"""Tiling a batch of images into one grid image, optionally labelled, and saving it as PNG."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.files import atomic_open

_PAD = 2
_LABEL_HEIGHT = 12
_BACKGROUND = 255


def make_image_grid(images: np.ndarray, ncols: int | None = None,
                    labels: Sequence[str] | None = None, upscale: int = 1) -> np.ndarray:
    """Tiles images into a grid.

    images: uint8 [N, H, W, 3] (or [N, H, W] grey, or a list of same-shaped arrays).
    ncols: tiles per row (default: ceil(sqrt(N))). labels: N short strings drawn under the
    tiles with PIL's default font (truncated to the tile width). upscale: nearest-neighbour
    factor applied to each tile first. Returns uint8 [rows*(H'+pad(+label)), ncols*(W'+pad), 3]
    on a white background with a 2-px gap.
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=-1)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise UserError(f"images must be [N, H, W, 3] with N > 0, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise UserError(f"images must be uint8, got {images.dtype}")
    if not isinstance(upscale, (int, np.integer)) or upscale < 1:
        raise UserError(f"upscale must be a positive integer, got {upscale}")
    n = images.shape[0]
    if labels is not None and len(labels) != n:
        raise UserError(f"got {len(labels)} labels for {n} images")
    if ncols is None:
        ncols = math.ceil(math.sqrt(n))
    if ncols < 1:
        raise UserError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, n)
    if upscale > 1:
        images = images.repeat(upscale, axis=1).repeat(upscale, axis=2)
    h, w = images.shape[1:3]
    label_h = _LABEL_HEIGHT if labels is not None else 0
    rows = math.ceil(n / ncols)
    cell_h, cell_w = h + label_h + _PAD, w + _PAD
    grid = np.full((rows * cell_h + _PAD, ncols * cell_w + _PAD, 3), _BACKGROUND, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = _PAD + r * cell_h, _PAD + c * cell_w
        grid[y:y + h, x:x + w] = images[i]
    if labels is not None:
        canvas = Image.fromarray(grid)
        draw = ImageDraw.Draw(canvas)
        font = ImageFont.load_default()
        for i, label in enumerate(labels):
            r, c = divmod(i, ncols)
            y, x = _PAD + r * cell_h + h, _PAD + c * cell_w
            text = _fit(draw, str(label), font, w)
            draw.text((x + 1, y), text, fill=(0, 0, 0), font=font)
        grid = np.asarray(canvas)
    return grid


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    """Longest prefix of `text` (single line) that fits in `width` pixels."""
    text = " ".join(text.split())
    while text and draw.textlength(text, font=font) > width - 2:
        text = text[:-1]
    return text


def save_image_grid(images: np.ndarray, path: str | os.PathLike, ncols: int | None = None,
                    labels: Sequence[str] | None = None, upscale: int = 1) -> np.ndarray:
    """Writes `make_image_grid(...)` to `path` as PNG atomically; returns the grid array.

    The parent directory is created; the PNG is written with `utils.files.atomic_open`, so
    readers never see a partial file.
    """
    grid = make_image_grid(images, ncols=ncols, labels=labels, upscale=upscale)
    with atomic_open(path, "wb") as f:
        Image.fromarray(grid).save(f, format="PNG")
    return grid
