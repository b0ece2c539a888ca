"""The SynthFace attribute judge (unif2ace_jax.train.judge).

    python -m unif2ace_jax.train.judge --config=configs/judge_synthface.py --workdir=DIR
    python -m unif2ace_jax.train.judge --config=configs/judge_synthface.py:tiny --workdir=DIR

`tiny` is for tests: a few steps of a very small model on a few dozen faces.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.data = ml_collections.ConfigDict()
    config.data.source = "synthface"  # "synthface" (rendered on the fly) or "tfds"
    config.data.num_examples = 24_000  # training faces (the test splits are separate)
    config.data.image_size = 64
    config.data.synthface_seed = 0
    config.data.cache = True  # render the training faces once, keep them in memory
    # The judge measures faces of every split, so it also learns the attribute combinations
    # held out of `train`: this share of its faces comes from `test_heldout_combos` drawn with
    # another seed (never the evaluation faces). Their natural share is about 7.8%.
    config.data.heldout_mix = 0.08
    config.data.heldout_seed = 1_000_003
    config.data.name = "synthface"  # tfds source only
    config.data.data_dir = ""  # tfds source only
    config.data.num_threads = 2

    config.model = ml_collections.ConfigDict()
    config.model.resolution = 64
    config.model.stem_width = 0  # > 0: a full-resolution conv first (slower)
    config.model.widths = (32, 64, 128)  # one stride-2 stage each: 64 -> 8 px
    config.model.blocks_per_stage = (1, 1, 1)  # convs per stage (> 1: residual 3x3 convs)
    config.model.hidden = 256
    config.model.dtype = "float32"
    config.model.param_dtype = "float32"

    config.optim = ml_collections.ConfigDict()
    config.optim.lr = 2e-3
    config.optim.warmup_steps = 100
    config.optim.end_lr_factor = 0.02
    config.optim.weight_decay = 0.01
    config.optim.grad_clip = 1.0

    config.train = ml_collections.ConfigDict()
    config.train.steps = 500
    config.train.batch_size = 128  # global
    config.train.log_every = 50
    config.train.checkpoint_every = 100
    # Random translation by up to this many pixels. Off: SynthFace jitters faces by about a
    # pixel already, and odd shifts against the stride-2 grid cost accuracy on one-pixel details
    # (measured: 0.948 mean test accuracy with 2 vs 0.988 without).
    config.train.augment_shift = 0
    config.train.eval_split = "test"
    config.train.eval_examples = 1000

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    if arg == "tiny":
        config.data.num_examples = 64
        config.model.resolution = 32
        config.model.widths = (8, 16)
        config.model.blocks_per_stage = (1, 2)
        config.model.hidden = 32
        config.optim.warmup_steps = 2
        config.train.steps = 6
        config.train.batch_size = 8
        config.train.log_every = 2
        config.train.checkpoint_every = 3
        config.train.eval_examples = 16
        config.train.augment_shift = 1
    elif arg:
        raise ValueError(f"unknown judge config {arg!r}; known: '' (default), 'tiny'")
    return config
