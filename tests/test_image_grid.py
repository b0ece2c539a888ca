"""Image grid: tile placement against a direct loop, labels, atomic save, bad inputs."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from unif2ace_jax.errors import UserError
from unif2ace_jax.utils.image_grid import make_image_grid, save_image_grid


def _images(n=5, h=6, w=4):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


def test_tiles_placed_row_major():
    imgs = _images()
    grid = make_image_grid(imgs, ncols=2)
    pad = 2
    assert grid.shape == (3 * (6 + pad) + pad, 2 * (4 + pad) + pad, 3)
    for i in range(5):
        r, c = divmod(i, 2)
        y, x = pad + r * (6 + pad), pad + c * (4 + pad)
        np.testing.assert_array_equal(grid[y:y + 6, x:x + 4], imgs[i])
    # The unused sixth cell stays background.
    assert (grid[pad + 2 * 8:pad + 2 * 8 + 6, pad + 6:pad + 10] == 255).all()


def test_upscale_is_nearest_neighbour():
    imgs = _images(n=1)
    grid = make_image_grid(imgs, upscale=3)
    tile = grid[2:2 + 18, 2:2 + 12]
    np.testing.assert_array_equal(tile, np.repeat(np.repeat(imgs[0], 3, 0), 3, 1))


def test_labels_drawn_below_tiles():
    imgs = np.zeros((2, 16, 40, 3), np.uint8)
    plain = make_image_grid(imgs, ncols=2)
    labelled = make_image_grid(imgs, ncols=2, labels=["ab", "c"])
    assert labelled.shape[0] > plain.shape[0]
    np.testing.assert_array_equal(labelled[2:18, 2:42], imgs[0])
    assert (labelled[18:30, 2:42] < 128).any()  # some dark text pixels under tile 0


def test_save_atomic_and_creates_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "grid.png"
    grid = save_image_grid(_images(), path, ncols=3)
    assert path.exists()
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), grid)
    assert [f for f in os.listdir(path.parent) if ".tmp" in f] == []


def test_bad_inputs():
    with pytest.raises(UserError, match="uint8"):
        make_image_grid(np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserError, match="shape"):
        make_image_grid(np.zeros((4, 4, 3, 2), np.uint8))
    with pytest.raises(UserError, match="labels"):
        make_image_grid(_images(), labels=["x"])
