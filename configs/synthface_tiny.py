"""The unified model on SynthFace 64 px image codes, sized for this 2-core CPU.

    python -m unif2ace_jax.train --config=configs/synthface_tiny.py --workdir=DIR \\
        --config.tokenizer_workdir=TOK_DIR --config.data.dataset=<pre-tokenised dataset>
    python -m unif2ace_jax.train --config=configs/synthface_tiny.py:tiny --workdir=DIR   # tests

Data: the `data` section of configs/data_synthface.py, reading the pre-tokenised copy of SynthFace
(records with `image_codes`, 8x8 codes from the 2^10-code tokenizer of
configs/tokenizer_synthface_64.py). Model: a small Phi-layout backbone, dense FFN, f32 compute
(bf16 matmuls are slower on this CPU). `tiny`: a few steps of a very small model for tests.
"""

import importlib.util
import os

import ml_collections


def _data_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_synthface.py")
    spec = importlib.util.spec_from_file_location("data_synthface", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg).data


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = arg == "tiny"
    if arg not in (None, "", "tiny"):
        raise ValueError(f"unknown variant {arg!r} for synthface_tiny; use '' or 'tiny'")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1200
    config.log_every = 25
    config.ckpt_every = 200
    config.keep_checkpoints = 2

    # The image tokenizer whose codes the data carries (generate/evaluate decode with it).
    config.tokenizer_workdir = ""
    # The SynthFace attribute judge used by `evaluate` (can also be given as --judge_workdir).
    config.judge_workdir = ""

    config.data = _data_config("tiny" if tiny else None)
    config.data.dataset = "synthface_codes"
    config.data.config_name = ""
    config.data.image_field = "image_codes"
    config.data.max_text_len = 96
    config.data.max_answer_len = 4
    config.data.mixture = ml_collections.ConfigDict({"t2i": 1.0, "mmu": 1.0, "lm": 0.1})
    config.data.batch_size = 64
    config.data.eval_batch_size = 100

    config.model = ml_collections.ConfigDict(dict(
        num_image_codes=1024, image_grid=8,  # 0 = take them from the tokenizer
        vocab_pad_to_multiple=8,
        d_model=256, num_layers=4, num_heads=8,
        ffn=dict(name="dense", hidden=1024),
        seq_moe=dict(name="none"),
        block_style="parallel", rotary_fraction=0.5, rope_theta=1e4, layer_norm_eps=1e-5,
        dropout_rate=0.0, init_std=0.02, dtype="float32", param_dtype="float32",
        remat_policy="none", scan_layers=True, group_assignment="task", position_mode="valid"))

    config.loss = ml_collections.ConfigDict(dict(
        w_t2i=1.0, w_mmu=1.0, w_lm=0.1, alpha=0.01, mask_weight=1.0, schedule="cosine",
        score_parameterization="free", cond_dropout=0.1, masking="count"))

    config.optim = ml_collections.ConfigDict(dict(
        lr=2e-3, warmup_steps=60, end_lr_factor=0.05, b1=0.9, b2=0.98, eps=1e-8,
        weight_decay=0.01, grad_clip=1.0, accumulation_steps=1))

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    # Defaults of generate / evaluate.
    config.sampling = ml_collections.ConfigDict(dict(
        sampler="maskgit", steps=8, guidance=1.5, noise_temperature=1.0, sample_temperature=1.0,
        schedule="cosine", max_answer_tokens=6))

    if tiny:
        config.total_steps = 4
        config.log_every = 2
        config.ckpt_every = 2
        config.data.dataset = "synthface_codes"
        config.data.max_text_len = 32
        config.data.max_answer_len = 3
        config.data.batch_size = 8
        config.data.eval_batch_size = 8
        config.data.num_threads = 0
        config.model.num_image_codes = 64
        config.model.image_grid = 4
        config.model.d_model = 32
        config.model.num_layers = 2
        config.model.num_heads = 4
        config.model.ffn.hidden = 64
        config.optim.warmup_steps = 1
        config.sampling.steps = 4
        config.sampling.max_answer_tokens = 4
    return config
