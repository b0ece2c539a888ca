"""MAGVIT-v2-style LFQ image tokenizer for 64 px SynthFace: 8×8 codes, 2^10 codebook.

    python -m unif2ace_jax.train.tokenizer --config=configs/tokenizer_synthface_64.py --workdir=DIR
    python -m unif2ace_jax.evaluate.tokenizer --workdir=DIR --split=test --judge_workdir=JUDGE_DIR

Sized for a 2-core CPU (about 10 minutes of training when the machine is not shared): a
space-to-depth stem (patch_size 2, so no conv runs at 64×64), then 32 -> 16 -> 8 with ResNet
blocks, GroupNorm + swish, mid attention, and a mirrored decoder. `tiny` is for tests.

Defaults of the `data`, `model` and `discriminator` sections: `unif2ace_jax.data.images`,
`unif2ace_jax.models.tokenizer` and `...tokenizer.discriminator` ``default_config()``.
"""

import ml_collections

from unif2ace_jax.data import images
from unif2ace_jax.models import tokenizer
from unif2ace_jax.models.tokenizer import discriminator


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # SynthFace rendered on the fly (source "synthface"); "tfds" reads a prepared dataset.
    config.data = images.full_config(dict(
        num_examples=1_000_000))  # training faces to draw from (rendered when read)

    # float32 compute (the default): bf16 is slower than f32 on this CPU.
    config.model = tokenizer.full_config(dict(
        bits=10,  # codebook 2^10 = 1024
        patch_size=4,  # 4x4 pixels -> channels first: convs run at 16x16 and 8x8
        ch=64, ch_mult=(1, 2), num_res_blocks=(1, 1),
        decoder_ch_mult=(1, 2), decoder_num_res_blocks=(2, 2),
        num_groups=0))  # no GroupNorm: learns much faster here (see docstring)

    config.loss = ml_collections.ConfigDict()
    config.loss.l1 = 1.0
    config.loss.l2 = 1.0
    config.loss.entropy = 0.1
    config.loss.entropy_mode = "full"  # "full" (2^k-way, exact) or "bits" (per-bit, Show-o)
    config.loss.entropy_temperature = 1.0
    config.loss.commitment = 0.25
    config.loss.gan = 0.0  # > 0 turns on the PatchGAN hinge loss
    config.loss.gan_start_step = 0  # generator/discriminator GAN updates from this step on

    config.discriminator = discriminator.full_config(dict(ch=32, num_layers=2, num_groups=8))

    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-3, warmup_steps=100, end_lr_factor=0.05, b1=0.9, b2=0.99, weight_decay=0.0,
        grad_clip=1.0))
    config.disc_optim = ml_collections.ConfigDict(dict(
        lr=2e-4, warmup_steps=0, end_lr_factor=1.0, b1=0.5, b2=0.9, weight_decay=0.0,
        grad_clip=1.0))

    config.train = ml_collections.ConfigDict()
    config.train.steps = 2000
    config.train.batch_size = 8  # global; small batches learn more per image here
    config.train.log_every = 50
    config.train.checkpoint_every = 500
    config.train.keep_checkpoints = 2
    config.train.image_every = 500  # reconstruction grid PNGs (input | reconstruction)
    config.train.num_grid_images = 16
    config.train.eval_split = "test"
    config.train.eval_examples = 1000  # PSNR / code usage at the end (0 = skip)

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    if arg == "tiny":
        config.data.num_examples = 64
        config.data.image_size = 32
        config.model.bits = 6
        config.model.ch = 8
        config.model.ch_mult = (1, 2)
        config.model.num_res_blocks = (1, 1)
        config.model.decoder_ch_mult = (1, 2)
        config.model.decoder_num_res_blocks = (1, 1)
        config.model.num_groups = 4
        config.discriminator.ch = 8
        config.discriminator.num_groups = 4
        config.optim.warmup_steps = 2
        config.train.steps = 6
        config.train.batch_size = 8
        config.train.log_every = 2
        config.train.checkpoint_every = 3
        config.train.image_every = 3
        config.train.num_grid_images = 4
        config.train.eval_examples = 16
    elif arg:
        raise ValueError(f"unknown tokenizer config {arg!r}; known: '' (default), 'tiny'")
    return config
