"""How well can b bits per patch reconstruct the images at all? A rate-distortion reference for
the image tokenizer.

    python -m unif2ace_jax.evaluate.patch_bound --data_dir=runs/default/data \\
        --dataset=synthface/small_64 --patch=8 --bits=8,10,12      # prints one JSON object

For each b, k-means with 2^b centroids is fitted to the patch x patch RGB patches of
``--train_images`` training images and every test patch is replaced by its nearest centroid.
That is the best fixed code for a decoder that sees each patch's code alone (up to k-means'
local optimum); a tokenizer whose decoder also uses neighbouring codes can do better only by
what that context adds. PSNR is averaged over test images, pixels in [0, 1], as in
`evaluate.tokenizer`.
"""

from __future__ import annotations

import json

import numpy as np
from absl import flags

from unif2ace_jax.cli import begin
from unif2ace_jax.data import records
from unif2ace_jax.errors import UserError, run_cli

flags.DEFINE_string("data_dir", None, "TFDS data dir holding the dataset.")
flags.DEFINE_string("dataset", "synthface/small_64", "name[/config] of the dataset.")
flags.DEFINE_integer("patch", 8, "Patch side in pixels (the tokenizer's downsampling factor).")
flags.DEFINE_list("bits", ["8", "10", "12"], "Code bits per patch to try (2^b centroids).")
flags.DEFINE_integer("train_images", 1500, "Training images the centroids are fitted on.")
flags.DEFINE_integer("test_images", 300, "Test images scored.")
flags.DEFINE_integer("iterations", 25, "k-means (Lloyd) iterations.")
flags.DEFINE_integer("seed", 0, "Seed of the initial centroids.")
FLAGS = flags.FLAGS


def to_patches(images: np.ndarray, patch: int) -> np.ndarray:
    """``images: [N, H, W, C]`` -> ``[N, (H/p)*(W/p), p*p*C]`` non-overlapping patches,
    row-major over the grid."""
    n, h, w, c = images.shape
    if h % patch or w % patch:
        raise UserError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(n, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, (h // patch) * (w // patch), patch * patch * c)


def nearest(points: np.ndarray, centroids: np.ndarray, chunk: int = 16384) -> np.ndarray:
    """``points: [M, D]``, ``centroids: [K, D]`` -> ``[M]`` index of the nearest centroid (L2)."""
    c2 = (centroids * centroids).sum(1)
    out = np.empty(len(points), np.int64)
    for s in range(0, len(points), chunk):
        p = points[s:s + chunk]
        out[s:s + chunk] = (c2[None, :] - 2.0 * p @ centroids.T).argmin(1)
    return out


def kmeans(points: np.ndarray, num_centroids: int, iterations: int, seed: int) -> np.ndarray:
    """Lloyd's k-means. ``points: [M, D]`` -> centroids ``[K, D]`` (an empty cluster is
    re-seeded with a random point)."""
    if num_centroids > len(points):
        raise UserError(f"{num_centroids} centroids need at least as many training patches, "
                        f"got {len(points)}; use more --train_images or fewer --bits")
    rng = np.random.default_rng(seed)
    centroids = points[rng.choice(len(points), num_centroids, replace=False)].copy()
    for _ in range(iterations):
        assign = nearest(points, centroids)
        counts = np.bincount(assign, minlength=num_centroids)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, points)
        empty = counts == 0
        centroids[~empty] = sums[~empty] / counts[~empty, None]
        centroids[empty] = points[rng.integers(len(points), size=int(empty.sum()))]
    return centroids


def patch_code_psnr(train_images: np.ndarray, test_images: np.ndarray, *, patch: int,
                    bits: int, iterations: int = 25, seed: int = 0) -> float:
    """Mean test PSNR (dB) of per-patch codes with 2^bits k-means centroids.

    ``train_images``, ``test_images``: ``[N, H, W, C]`` float in [0, 1].
    """
    train = to_patches(np.asarray(train_images, np.float32), patch)
    test = to_patches(np.asarray(test_images, np.float32), patch)
    centroids = kmeans(train.reshape(-1, train.shape[-1]), 2 ** bits, iterations, seed)
    flat = test.reshape(-1, test.shape[-1])
    recon = centroids[nearest(flat, centroids)].reshape(test.shape)
    mse = ((recon - test) ** 2).reshape(len(test), -1).mean(1)
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def _images(data_dir: str, dataset: str, split: str, num: int) -> np.ndarray:
    name, _, config = dataset.partition("/")
    source = records.load_builder(data_dir, name, config or None).as_data_source(split)
    if num > len(source):
        raise UserError(f"{dataset}:{split} has {len(source)} images, asked for {num}")
    out = []
    for i in range(num):
        image = source[i][records.IMAGE]
        if not isinstance(image, np.ndarray):
            image = records.decode_image(bytes(image), source=f"{dataset}:{split} record {i}")
        out.append(np.asarray(image, np.float32) / 255.0)
    return np.stack(out)


def main(argv: list[str]) -> None:
    begin(argv, "data_dir")
    try:
        bits = [int(b) for b in FLAGS.bits]
    except ValueError:
        raise UserError(f"--bits must be integers, got {','.join(FLAGS.bits)}") from None
    if not bits or min(bits) < 1 or max(bits) > 16:
        raise UserError(f"--bits must be in [1, 16], got {','.join(FLAGS.bits)}")
    train = _images(FLAGS.data_dir, FLAGS.dataset, "train", FLAGS.train_images)
    test = _images(FLAGS.data_dir, FLAGS.dataset, "test", FLAGS.test_images)
    result = {"dataset": FLAGS.dataset, "patch": FLAGS.patch, "train_images": len(train),
              "test_images": len(test), "psnr_by_bits": {}}
    for b in bits:
        result["psnr_by_bits"][str(b)] = patch_code_psnr(
            train, test, patch=FLAGS.patch, bits=b, iterations=FLAGS.iterations, seed=FLAGS.seed)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    run_cli(main)
