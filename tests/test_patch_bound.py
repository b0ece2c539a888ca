"""The per-patch code bound (evaluate.patch_bound) against direct computations."""

import subprocess
import sys

import numpy as np
import pytest

from unif2ace_jax.evaluate import patch_bound


def test_to_patches_matches_a_loop():
    x = np.random.default_rng(0).random((2, 8, 12, 3)).astype(np.float32)
    got = patch_bound.to_patches(x, 4)
    assert got.shape == (2, 6, 48)
    for n in range(2):
        for i in range(2):
            for j in range(3):
                np.testing.assert_array_equal(got[n, i * 3 + j],
                                              x[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4].reshape(-1))


def test_nearest_is_the_brute_force_argmin():
    rng = np.random.default_rng(1)
    points, centroids = rng.random((50, 6)), rng.random((7, 6))
    brute = [int(np.argmin([np.sum((p - c) ** 2) for c in centroids])) for p in points]
    np.testing.assert_array_equal(patch_bound.nearest(points, centroids, chunk=16), brute)


def test_one_centroid_is_the_mean_patch():
    rng = np.random.default_rng(2)
    train, test = rng.random((5, 8, 8, 3)), rng.random((3, 8, 8, 3))
    mean_patch = patch_bound.to_patches(train, 4).reshape(-1, 48).mean(0)
    psnrs = []
    for image in test:
        errors = [np.mean((image[i:i + 4, j:j + 4].reshape(-1) - mean_patch) ** 2)
                  for i in (0, 4) for j in (0, 4)]
        psnrs.append(10 * np.log10(1 / np.mean(errors)))
    got = patch_bound.patch_code_psnr(train, test, patch=4, bits=0, iterations=3)
    assert got == pytest.approx(np.mean(psnrs), rel=1e-5)


def test_more_centroids_than_patches_and_cli_errors():
    x = np.zeros((1, 8, 8, 3), np.float32)
    with pytest.raises(patch_bound.UserError, match="centroids"):
        patch_bound.patch_code_psnr(x, x, patch=4, bits=3)
    with pytest.raises(patch_bound.UserError, match="multiple of the patch"):
        patch_bound.to_patches(np.zeros((1, 6, 8, 3)), 4)
    out = subprocess.run([sys.executable, "-m", "unif2ace_jax.evaluate.patch_bound",
                          "--data_dir=/nonexistent/dir", "--bits=x"],
                         capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
    assert out.returncode == 2 and out.stderr.strip().startswith("error: --bits"), out.stderr
