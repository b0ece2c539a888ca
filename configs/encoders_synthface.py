"""The SynthFace expert encoders of the seq-MoE (unif2ace_jax.train.encoders).

    python -m unif2ace_jax.train.encoders --kind=face --workdir=DIR [--config=configs/encoders_synthface.py]
    python -m unif2ace_jax.train.encoders --kind=clip --workdir=DIR --config.data.data_dir=runs/default/data \
        --config.data.tokenizer.model_path=runs/default/data/synthface_text.model
    ... --config=configs/encoders_synthface.py:tiny     # a few steps of tiny models (tests)

`face` (`synthface_face`): conv encoder, additive-margin attribute classifiers + two-view instance
InfoNCE. `clip` (`synthface_clip`): conv image tower + transformer text tower, InfoNCE on captions.
Both read the prepared SynthFace TFDS dataset (`data.source = "tfds"`; `"synthface"` renders the
faces on the fly instead, slow: ~30 ms a face) and keep the training split in memory.

Measured on small_64 (20000 train faces), on the shared 2-core CPU at load average 8-11:
face: test attribute accuracy 0.884, 350 steps in 5m03s wall (whole process: 115 s of CPU time,
data loading and evaluation included); clip: test image->text top-1 0.816 among 1000 pairs
(top-5 0.988), 250 steps in 13m55s wall (264 s of CPU time). On an idle 2-core machine the CPU
times suggest about 1 and 2.5 minutes; not measured there.
"""

import ml_collections

from unif2ace_jax.data import encoder_data
from unif2ace_jax.models.encoders import synthface_clip, synthface_face


def _optim(lr: float, warmup: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(lr=lr, warmup_steps=warmup, end_lr_factor=0.05,
                                          weight_decay=0.01, grad_clip=1.0))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Source "tfds" (the default; a prepared dataset, all its training records) or "synthface"
    # (rendered on the fly). Caption ids: max_text_len 128 (SynthFace captions: median 96,
    # max ~130 ids).
    data = config.data = encoder_data.full_config(dict(
        data_dir="runs/default/data",  # where `python -m unif2ace_jax.data build` wrote it
        config="small_64",
        eval_examples=1000,  # test records scored at the end (0 = the whole split)
        tokenizer=dict(model_path="runs/default/data/synthface_text.model")))

    face = config.face = ml_collections.ConfigDict()
    face.model = synthface_face.full_config(dict(blocks=(1, 1, 1)))
    face.loss = ml_collections.ConfigDict(dict(
        scale=16.0,  # s of the additive-margin softmax
        margin=0.2,  # m
        instance_weight=0.5,  # weight of the two-view InfoNCE term (0: one view, no term)
        instance_temperature=0.1,
        shift=2))  # the views: each image translated by up to this many pixels
    face.optim = _optim(3e-3, 30)
    face.train = ml_collections.ConfigDict(dict(
        steps=350, batch_size=64, log_every=50, checkpoint_every=100))

    clip = config.clip = ml_collections.ConfigDict()
    clip.model = synthface_clip.full_config(dict(image=dict(blocks=(1, 1, 1))))
    clip.optim = _optim(2e-3, 30)
    clip.train = ml_collections.ConfigDict(dict(
        steps=250, batch_size=128, log_every=50, checkpoint_every=100))

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    if arg == "tiny":
        data.num_examples = 32
        data.eval_examples = 16
        data.max_text_len = 48
        face.model.embed_dim = 16
        face.model.widths = (8, 16)
        face.model.blocks = (1, 2)
        face.train.update(steps=6, batch_size=8, log_every=2, checkpoint_every=3)
        face.optim.warmup_steps = 2
        clip.model.embed_dim = 16
        clip.model.image.update(widths=(8, 16), blocks=(1, 1))
        clip.model.text.update(max_len=48, width=16, num_layers=1, num_heads=2)
        clip.train.update(steps=6, batch_size=8, log_every=2, checkpoint_every=3)
        clip.optim.warmup_steps = 2
    elif arg:
        raise ValueError(f"unknown encoders config {arg!r}; known: '' (default), 'tiny'")
    return config
