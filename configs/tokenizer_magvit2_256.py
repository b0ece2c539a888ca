"""Show-o's MAGVIT-v2 geometry: 256 px -> 16×16 codes, 13 bits (8192 codes), 128 channels with
multipliers (1, 2, 2, 4, 4) in the encoder and (1, 1, 2, 2, 4) in the decoder, ResNet blocks
(4, 3, 4, 3, 4) / (4, 4, 3, 4, 3), attention in the mid blocks, GroupNorm(32).

Its parameter names and shapes map one-to-one onto Show-o's released weights (see
`unif2ace_jax/models/tokenizer/magvit2.py`). Training it from scratch needs accelerators:

    python -m unif2ace_jax.train.tokenizer --config=configs/tokenizer_magvit2_256.py --workdir=DIR

`tiny` keeps the 5-level layout with very small widths (tests).

That geometry and the discriminator are the `default_config()` of `unif2ace_jax.models.tokenizer`
and `...tokenizer.discriminator`.
"""

import os

import ml_collections

from unif2ace_jax.cli import load_config
from unif2ace_jax.models import tokenizer
from unif2ace_jax.models.tokenizer import discriminator


def _base_config() -> ml_collections.ConfigDict:
    """The 64 px config (sibling file; loaded by path so this works from any directory)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer_synthface_64.py")
    return load_config(path)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = _base_config()
    config.data.image_size = 256
    config.data.num_threads = 8

    config.model = tokenizer.full_config(dict(
        remat=True, dtype="bfloat16"))  # accelerators; params stay float32

    config.loss.entropy_mode = "bits"  # Show-o's per-bit factorisation; cheap at 8192 codes
    config.loss.gan = 0.1
    config.loss.gan_start_step = 20_000

    config.discriminator = discriminator.default_config()

    config.optim.lr = 1e-4
    config.optim.warmup_steps = 2000
    config.optim.b2 = 0.99
    config.optim.weight_decay = 1e-4

    config.train.steps = 200_000
    config.train.batch_size = 64
    config.train.log_every = 100
    config.train.checkpoint_every = 2000
    config.train.image_every = 2000
    config.train.num_grid_images = 8
    config.train.eval_examples = 2000

    if arg == "tiny":
        config.data.image_size = 64
        config.data.num_examples = 64
        config.data.num_threads = 2
        config.model.ch = 8
        config.model.num_res_blocks = (1, 1, 1, 1, 1)
        config.model.decoder_num_res_blocks = (1, 1, 1, 1, 1)
        config.model.num_groups = 4
        config.model.dtype = "float32"
        config.model.remat = False
        config.loss.gan_start_step = 2
        config.discriminator.ch = 8
        config.discriminator.num_groups = 4
        config.optim.warmup_steps = 2
        config.train.steps = 4
        config.train.batch_size = 4
        config.train.log_every = 2
        config.train.checkpoint_every = 2
        config.train.image_every = 2
        config.train.num_grid_images = 2
        config.train.eval_examples = 8
    elif arg:
        raise ValueError(f"unknown tokenizer config {arg!r}; known: '' (default), 'tiny'")
    return config
