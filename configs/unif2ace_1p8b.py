"""UniF²ace at paper scale (docs/DESIGN.md §1, §3, §10): 24 layers, width 2048, 32 heads, FFN 8192.

    python -m unif2ace_jax.train --config=configs/unif2ace_1p8b.py --workdir=DIR \\
        --config.tokenizer_workdir=TOK_DIR --config.data.data_dir=DATA_DIR
    python -m unif2ace_jax.train --config=configs/unif2ace_1p8b.py:tiny --workdir=DIR  # smoke

MAGVIT-v2 LFQ codes (8192 = 2^13 codes, 256 px -> 16x16 = 256 image tokens,
configs/tokenizer_magvit2_256.py), Phi-1.5 layout, float32 parameters with bfloat16 compute,
layers scanned with a remat policy, parameters and optimizer state fully sharded (fsdp = all
devices). Data: the pre-tokenised UniF2ace-130K (records with ``image_codes`` and the precomputed
``clip`` (768-d CLIP image embedding) and ``face`` (512-d AntelopeV2-type identity embedding)
fields the seq-MoE reads, `data.extra_fields`).

The paper's multi-level grouped MoE (docs/DESIGN.md §4, §5), with every block
``x + Attn(LN x) + TokenMoE(LN x)`` then ``x + SeqMoE(LN x)``:

* token-level MoE in the FFN slot: per group (gen, und) 1 shared + 8 routed experts, top-4
  [paper figure]. Widths: shared 1536, routed 512 (1/16 of Phi-1.5's 8192-unit FFN, i.e.
  fine-grained experts), so a token runs 1536 + 4 x 512 = 3584 hidden units (44 % of the dense
  FFN's compute) and both groups hold 2 x (1536 + 8 x 512) = 11264 units per layer (1.375x
  the dense FFN). The paper gives the counts (1 + 8, top-4) and the total (1.8B) but not the
  widths; these are the widths in multiples of 512 (TPU friendly) that, with those counts, give
  1.8B. The wider alternative (each group's shared expert = the whole 8192-unit Phi FFN, the
  natural upcycling from Show-o) already puts the two shared experts at 1.61B and the model
  past 2.2B, so it is not what a 1.8B model can hold.
* sequence-level MoE: und = (copy, copy, clip, face), gen = (copy, copy, zero, noise), top-2
  of a pooled router [paper figure]; feature experts with the gated ``mlp`` resampler of
  hidden width 256 (their input is one global vector per sequence).

Parameter count (`python -m unif2ace_jax.summary --config=configs/unif2ace_1p8b.py`; text
vocabulary = Show-o's Phi-1.5 tokenizer, 50,295 ids, ``assumed_text_vocab_size``): 1,800,584,592
in total; per token 1,029,875,040 (und) / 1,010,797,872 (gen) active. A text tokenizer of another size moves the
total by 4096 parameters per id (embedding + lm head).
Optimizer after Show-o's fine-tuning (docs/DESIGN.md §12): AdamW (0.9, 0.999), wd 0.01, lr 5e-5 with
1k warm-up and cosine decay. `tiny`: the same layout at CPU size (a smoke run needs a prepared
dataset like every training run).

`from_showo` (combinable with `tiny`: ``:tiny,from_showo``) starts from Show-o's weights::

    python -m unif2ace_jax.convert.showo --checkpoint=SHOWO_DIR --out=OUT
    python -m unif2ace_jax.train --config=configs/unif2ace_1p8b.py:from_showo --workdir=DIR \
        --config.init_from=OUT --config.data.tokenizer.model_path=PHI15_TOKENIZER_DIR ...

Show-o's vocabulary layout (``vocab_layout="showo"``: Phi-1.5's 50,295 text ids, Show-o's ten
added tokens, the 8192 codes, ``[MASK]``), QK-LayerNorm and absolute positions, Phi-1.5's BPE
text tokenizer (``gpt2_bpe``). A new run copies the converted model's embeddings, attention,
norms and lm head, and upcycles each layer's dense 8192-unit FFN into the token-MoE
(``init.ffn_upcycling="split"``: shared expert = hidden units [0, 1536), routed expert i =
the next 512-unit slices, up to unit 5632; the last 2560 units are dropped); the routers and
the seq-MoE start fresh (`checkpoint/init_from.py`). ``init_from`` is required (a new run
without it stops with an error). In `tiny,from_showo` the geometry is the tiny Show-o test
fixture's (8192 codes, 4x4 grid, FFN 64 + 8 x 24 = its 256 units, so `split` covers it exactly).
"""

import ml_collections

from unif2ace_jax import optim
from unif2ace_jax.data import pipeline
from unif2ace_jax.losses import unified as unified_loss
from unif2ace_jax.models import backbone
from unif2ace_jax.models import experts as experts_lib
from unif2ace_jax.models.moe import seq_moe, token_moe
from unif2ace_jax.sampling import t2i
from unif2ace_jax.utils.defaults import with_defaults


def _feature_expert(**fields) -> dict:
    return with_defaults(experts_lib.default_feature_config(), dict(
        fields, resampler_hidden=256)).to_dict()


VARIANTS = ("tiny", "from_showo")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variants = [v for v in (arg or "").split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or len(set(variants)) != len(variants):
        raise ValueError(f"unknown variant {arg!r} for unif2ace_1p8b; use a comma-separated "
                         f"subset of {', '.join(VARIANTS)} (or nothing)")
    tiny, from_showo = "tiny" in variants, "from_showo" in variants
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 50_000
    config.log_every = 50
    config.ckpt_every = 1000
    config.keep_checkpoints = 3
    config.tokenizer_workdir = ""  # the trained MAGVIT-v2 tokenizer (configs/tokenizer_magvit2_256.py)
    config.judge_workdir = ""
    # Text vocabulary assumed where no tokenizer is at hand (summary, AOT): Show-o's Phi-1.5
    # tokenizer. The trained model always takes the real size from its tokenizer.
    config.assumed_text_vocab_size = 50_295

    data = config.data = pipeline.full_config(dict(
        dataset="unif2ace_130k_codes",  # pre-tokenised copy of unif2ace_130k
        image_size=256,
        image_field="image_codes",
        extra_fields=("clip", "face"),  # precomputed seq-MoE features in the records
        max_text_len=256,  # dense captions
        max_answer_len=128,  # conversation / description answers
        mixture={"t2i": 1.0, "mmu": 1.0, "lm": 0.1},
        batch_size=256,  # global
        eval_batch_size=256,
        num_threads=16, prefetch=8, num_workers=8,
        tokenizer=dict(model_path="runs/data/unif2ace_text.model")))

    config.model = backbone.full_model_config(dict(
        num_image_codes=8192, image_grid=16,
        vocab_pad_to_multiple=256,  # embedding / lm-head rows divide any tensor axis up to 256
        d_model=2048, num_layers=24, num_heads=32,
        ffn=with_defaults(token_moe.default_config(), dict(
            shared_hidden=1536, routed_hidden=512)),  # dispatch ragged: ragged_dot on TPU/GPU
        seq_moe=seq_moe.full_config(dict(experts=dict(
            clip=_feature_expert(feature_key="clip", feature_dim=768),
            face=_feature_expert(feature_key="face", feature_dim=512),
            noise=_feature_expert(
                feature_key="mask_ratio", feature_dim=256, encoder="noise",
                encoder_config=dict(dim=256, max_period=10000.0, scale=1000.0))))),
        dtype="bfloat16", remat_policy="dots_with_no_batch_dims_saveable"))

    config.loss = unified_loss.default_config()

    config.optim = optim.full_config(dict(
        lr=5e-5, warmup_steps=1000, end_lr_factor=0.1, weight_decay=0.01, grad_clip=1.0))

    config.mesh = ml_collections.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    config.dcn_mesh = ml_collections.ConfigDict()  # e.g. {"data": 2} for two slices
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    config.sampling = with_defaults(t2i.default_config(), dict(max_answer_tokens=128))

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
        config.model.ffn.update(dict(shared_hidden=64, routed_hidden=32))
        for name in ("clip", "face", "noise"):
            config.model.seq_moe.experts[name].resampler_hidden = 32
        config.model.seq_moe.experts.clip.feature_dim = 32
        config.model.seq_moe.experts.face.feature_dim = 32
        config.model.seq_moe.experts.noise.feature_dim = 32
        config.model.seq_moe.experts.noise.encoder_config.dim = 32
        config.optim.warmup_steps = 1
        config.sampling.steps = 4
        config.sampling.max_answer_tokens = 8
    if from_showo:
        _from_showo(config, tiny)
    return config


def _from_showo(config: ml_collections.ConfigDict, tiny: bool) -> None:
    """Show-o's token layout and text tokenizer; params from a converted Show-o, the token-MoE
    experts split from its dense FFN."""
    config.model.update(dict(vocab_layout="showo", qk_layernorm=True, position_mode="absolute"))
    config.data.tokenizer = dict(name="gpt2_bpe", model_path="runs/data/phi-1_5", vocab_size=0)
    config.init_from = ""  # --config.init_from=OUT of python -m unif2ace_jax.convert.showo
    config.init = ml_collections.ConfigDict(dict(ffn_upcycling="split", from_required=True))
    if tiny:  # the geometry of the tiny Show-o test fixture (FFN 256 = 64 + 8 x 24)
        config.model.update(dict(num_image_codes=8192, image_grid=4))
        config.model.ffn.update(dict(shared_hidden=64, routed_hidden=24))
