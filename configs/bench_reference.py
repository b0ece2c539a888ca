"""The DESIGN §10 reference benchmark shape, for bench/train_step.py.

    python bench/train_step.py --config=configs/bench_reference.py [--torch]

Width 512, 8 layers, 8 heads, FFN 2048, vocabulary 4096, sequence 256, batch 8, AdamW step.
The unified step's sequence ``L = Lt + La + N + 5`` is made 256 with 8x8 = 64 image tokens,
La = 8 and Lt = 179; the vocabulary ``text + 7 specials + K codes + [MASK]`` is 4096 with
K = 1024 codes and 3064 text ids. Every task of the mixture runs in the step (one third each).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ValueError(f"bench_reference has no variants, got {arg!r}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1000

    config.bench = ml_collections.ConfigDict(dict(
        batch_size=8, text_width=179, answer_width=8, text_vocab_size=3064))

    config.model = ml_collections.ConfigDict(dict(
        num_image_codes=1024, image_grid=8, vocab_pad_to_multiple=1,
        d_model=512, num_layers=8, num_heads=8,
        ffn=dict(name="dense", hidden=2048),
        seq_moe=dict(name="none"),
        block_style="parallel", rotary_fraction=0.5, rope_theta=1e4, layer_norm_eps=1e-5,
        dropout_rate=0.0, init_std=0.02, dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True, group_assignment="task", position_mode="valid"))

    config.loss = ml_collections.ConfigDict(dict(
        w_t2i=1.0, w_mmu=1.0, w_lm=0.1, alpha=0.01, mask_weight=1.0, schedule="cosine",
        score_parameterization="free", cond_dropout=0.1, masking="count"))
    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, warmup_steps=10, end_lr_factor=0.1, weight_decay=0.01, grad_clip=1.0))
    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()
    return config
