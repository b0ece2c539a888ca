"""The docs/DESIGN.md §10 reference benchmark shape, for bench/train_step.py.

    python bench/train_step.py --config=configs/bench_reference.py [--torch]

Width 512, 8 layers, 8 heads, FFN 2048, vocabulary 4096, sequence 256, batch 8, AdamW step.
The unified step's sequence ``L = Lt + La + N + 5`` is made 256 with 8x8 = 64 image tokens,
La = 8 and Lt = 179; the vocabulary ``text + 7 specials + K codes + [MASK]`` is 4096 with
K = 1024 codes and 3064 text ids. Every task of the mixture runs in the step (one third each).
"""

import ml_collections

from unif2ace_jax import optim
from unif2ace_jax.losses import unified as unified_loss
from unif2ace_jax.models import backbone


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"bench_reference has no variants, got {arg!r}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1000

    config.bench = ml_collections.ConfigDict(dict(
        batch_size=8, text_width=179, answer_width=8, text_vocab_size=3064))

    config.model = backbone.full_model_config(dict(
        num_image_codes=1024, image_grid=8,
        d_model=512, num_layers=8, num_heads=8,
        ffn=dict(name="dense", hidden=2048)))

    config.loss = unified_loss.default_config()
    config.optim = optim.full_config(dict(
        lr=1e-4, warmup_steps=10, end_lr_factor=0.1, weight_decay=0.01, grad_clip=1.0))
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()
    return config
