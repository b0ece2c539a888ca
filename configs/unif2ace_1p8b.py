"""UniF²ace at paper scale (DESIGN §1, §3, §10): 24 layers, width 2048, 32 heads, FFN 8192.

    python -m unif2ace_jax.train --config=configs/unif2ace_1p8b.py --workdir=DIR \\
        --config.tokenizer_workdir=TOK_DIR --config.data.data_dir=DATA_DIR
    python -m unif2ace_jax.train --config=configs/unif2ace_1p8b.py:tiny --workdir=DIR  # smoke

MAGVIT-v2 LFQ codes (8192 = 2^13 codes, 256 px -> 16x16 = 256 image tokens,
configs/tokenizer_magvit2_256.py), Phi-1.5 layout, float32 parameters with bfloat16 compute,
layers scanned with a remat policy, parameters and optimizer state fully sharded (fsdp = all
devices). The FFN slot is dense here; the MoE issue swaps in ``model.ffn.name = "token_moe"``
(and ``model.seq_moe``). Data: the pre-tokenised UniF2ace-130K (records with ``image_codes``).
Optimizer after Show-o's fine-tuning (DESIGN §12): AdamW (0.9, 0.999), wd 0.01, lr 5e-5 with
1k warm-up and cosine decay. `tiny`: the same layout at CPU size (a smoke run needs a prepared
dataset like every training run).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} for unif2ace_1p8b; use '' or 'tiny'")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 50_000
    config.log_every = 50
    config.ckpt_every = 1000
    config.keep_checkpoints = 3
    config.tokenizer_workdir = ""  # the trained MAGVIT-v2 tokenizer (configs/tokenizer_magvit2_256.py)
    config.judge_workdir = ""

    config.data = ml_collections.ConfigDict()
    data = config.data
    data.dataset = "unif2ace_130k_codes"  # pre-tokenised copy of unif2ace_130k
    data.config_name = ""
    data.data_dir = "runs/data"
    data.train_split = "train"
    data.eval_split = "test"
    data.image_size = 256
    data.image_field = "image_codes"
    data.extra_fields = ()
    data.max_text_len = 256  # dense captions
    data.max_answer_len = 128  # conversation / description answers
    data.mixture = ml_collections.ConfigDict({"t2i": 1.0, "mmu": 1.0, "lm": 0.1})
    data.lm_caption_prob = 0.5
    data.batch_size = 256  # global
    data.eval_batch_size = 256
    data.seed = 0
    data.num_threads = 16
    data.prefetch = 8
    data.num_workers = 8
    data.tokenizer = ml_collections.ConfigDict(dict(
        name="sentencepiece", model_path="runs/data/unif2ace_text.model", vocab_size=0))

    config.model = ml_collections.ConfigDict(dict(
        num_image_codes=8192, image_grid=16,
        vocab_pad_to_multiple=256,  # embedding / lm-head rows divide any tensor axis up to 256
        d_model=2048, num_layers=24, num_heads=32,
        ffn=dict(name="dense", hidden=8192),
        seq_moe=dict(name="none"),
        block_style="parallel", rotary_fraction=0.5, rope_theta=1e4, layer_norm_eps=1e-5,
        dropout_rate=0.0, init_std=0.02, dtype="bfloat16", param_dtype="float32",
        remat_policy="dots_with_no_batch_dims_saveable", scan_layers=True,
        group_assignment="task", position_mode="valid"))

    config.loss = ml_collections.ConfigDict(dict(
        w_t2i=1.0, w_mmu=1.0, w_lm=0.1, alpha=0.01, mask_weight=1.0, schedule="cosine",
        score_parameterization="free", cond_dropout=0.1, masking="count"))

    config.optim = ml_collections.ConfigDict(dict(
        lr=5e-5, warmup_steps=1000, end_lr_factor=0.1, b1=0.9, b2=0.999, eps=1e-8,
        weight_decay=0.01, grad_clip=1.0, accumulation_steps=1))

    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    config.dcn_mesh = ml_collections.ConfigDict()  # e.g. {"data": 2} for two slices
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    config.sampling = ml_collections.ConfigDict(dict(
        sampler="maskgit", steps=16, guidance=1.75, noise_temperature=1.0,
        sample_temperature=1.0, schedule="cosine", max_answer_tokens=128))

    if tiny:
        config.total_steps = 4
        config.log_every = 2
        config.ckpt_every = 2
        data.image_size = 64
        data.max_text_len = 32
        data.max_answer_len = 8
        data.batch_size = 8
        data.eval_batch_size = 8
        data.num_threads = 0
        data.num_workers = 0
        config.model.update(dict(num_image_codes=1024, image_grid=4, vocab_pad_to_multiple=8,
                                 d_model=64, num_layers=2, num_heads=4, dtype="float32"))
        config.model.ffn.hidden = 256
        config.optim.warmup_steps = 1
        config.sampling.steps = 4
        config.sampling.max_answer_tokens = 8
    return config
