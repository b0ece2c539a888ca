"""The unified model on SynthFace 64 px image codes, sized for this 2-core CPU.

    python -m unif2ace_jax.train --config=configs/synthface_tiny.py --workdir=DIR \\
        --config.tokenizer_workdir=TOK_DIR --config.data.dataset=<pre-tokenised dataset>
    python -m unif2ace_jax.train --config=configs/synthface_tiny.py:tiny --workdir=DIR   # tests

Data: the `data` section of configs/data_synthface.py, reading the pre-tokenised copy of SynthFace
(records with `image_codes`, 8x8 codes from the 2^10-code tokenizer of
configs/tokenizer_synthface_64.py). Model: a small Phi-layout backbone, dense FFN, f32 compute
(bf16 matmuls are slower on this CPU). `tiny`: a few steps of a very small model for tests.

MoE ablation (paper Table 4), options joined by ',' (e.g. ``configs/synthface_tiny.py:tiny,moe=both``):

    moe=none|token|seq|both   dense FFN / token-level grouped MoE / sequence-level MoE / both
    off=clip+face             seq-MoE experts replaced by `zero` (their router columns stay)
    drop=face                 seq-MoE experts removed from their group

With the seq-MoE's clip / face experts on, the records must carry the "clip" / "face" feature
fields (precomputed by the frozen encoders named in FEATURE_ENCODERS; `data.extra_fields` lists
them); `off=clip+face` trains without them. The noise expert needs nothing from the records.
"""

import os

import ml_collections

from unif2ace_jax import optim
from unif2ace_jax.cli import load_config
from unif2ace_jax.losses import unified as unified_loss
from unif2ace_jax.models import backbone
from unif2ace_jax.models import experts as experts_lib
from unif2ace_jax.models.encoders import ENCODERS
from unif2ace_jax.models.moe import seq_moe, token_moe
from unif2ace_jax.sampling import t2i
from unif2ace_jax.utils.defaults import with_defaults


def _data_config(arg):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_synthface.py")
    return load_config(path, arg).data


MOE_SETTINGS = ("none", "token", "seq", "both")
# Frozen encoders of the seq-MoE's clip / face experts: registry names
# (`unif2ace_jax.models.encoders.ENCODERS`) and the widths of their features, which the records
# carry as the fields "clip" / "face" (data.extra_fields). A name not registered (yet) falls
# back to "precomputed": the model only reads the record field either way. The `tiny` variant's
# features are 64 wide (the tests' stand-in features).
FEATURE_ENCODERS = dict(clip=("synthface_clip", 128), face=("synthface_face", 128))
TINY_FEATURE_DIM = 64


def _parse_arg(arg: str | None) -> dict:
    """big_vision style: ``"tiny,moe=both,off=clip+face"`` -> options (unknown keys fail)."""
    opts = dict(tiny=False, moe="none", off="", drop="")
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in opts or (key == "tiny") != (value == ""):
            raise ValueError(f"unknown variant {part!r} for synthface_tiny; use 'tiny', "
                             f"'moe=none|token|seq|both', 'off=E1+E2' (experts -> zero), "
                             f"'drop=E1+E2' (experts removed), joined by ','")
        opts[key] = True if key == "tiny" else value
    if opts["moe"] not in MOE_SETTINGS:
        raise ValueError(f"moe={opts['moe']!r} for synthface_tiny; use one of "
                         f"{'|'.join(MOE_SETTINGS)}")
    return opts


def _encoder_name(name: str) -> str:
    return name if name in ENCODERS else "precomputed"


def _apply_moe(config: ml_collections.ConfigDict, opts: dict) -> None:
    """The MoE ablation settings (paper Table 4) on top of the dense model.

    token: the FFN slot becomes the token-level grouped MoE (docs/DESIGN.md §4): per group (gen, und)
    1 shared + 8 routed experts, top-4, so that the active hidden units per token equal the
    dense FFN's (shared = hidden/2, routed = hidden/8). seq: the sequence-level grouped MoE
    (docs/DESIGN.md §5) with und = (copy, copy, clip, face), gen = (copy, copy, zero, noise).
    ``off`` replaces the named experts by ``zero`` (router columns kept), ``drop`` removes them.
    """
    moe, hidden = opts["moe"], int(config.model.ffn.hidden)
    if moe in ("token", "both"):
        config.model.ffn = with_defaults(token_moe.default_config(), dict(
            shared_hidden=hidden // 2, routed_hidden=hidden // 8), "model.ffn")
    off = [n for n in opts["off"].split("+") if n]
    drop = [n for n in opts["drop"].split("+") if n]
    if moe not in ("seq", "both"):
        if off or drop:
            raise ValueError("off= / drop= switch seq-MoE experts: use them with moe=seq|both")
        return
    groups = dict(und=["copy", "copy", "clip", "face"], gen=["copy", "copy", "zero", "noise"])
    for name in off + drop:
        if not any(name in g for g in groups.values()):
            raise ValueError(f"off/drop names an expert the seq-MoE does not have: {name!r}; "
                             f"experts: copy, zero, clip, face, noise")
    groups = {g: ["zero" if n in off else n for n in names if n not in drop]
              for g, names in groups.items()}
    noise_dim = 64 if opts["tiny"] else 256
    feature = experts_lib.default_feature_config().to_dict()
    experts = dict(noise=dict(feature, feature_key="mask_ratio", feature_dim=noise_dim,
                              encoder="noise", encoder_config=dict(
                                  dim=noise_dim, max_period=10000.0, scale=1000.0)))
    for key, (encoder, dim) in FEATURE_ENCODERS.items():
        experts[key] = dict(feature, feature_key=key,
                            feature_dim=TINY_FEATURE_DIM if opts["tiny"] else dim,
                            encoder=_encoder_name(encoder))
    used = {n for names in groups.values() for n in names}
    config.model.seq_moe = seq_moe.full_config(dict(groups=groups, experts=experts))
    config.data.extra_fields = tuple(k for k in FEATURE_ENCODERS if k in used)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    opts = _parse_arg(arg)
    tiny = opts["tiny"]
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 1500
    config.log_every = 25
    config.ckpt_every = 100
    config.keep_checkpoints = 2

    # The image tokenizer whose codes the data carries (generate/evaluate decode with it).
    config.tokenizer_workdir = ""
    # The SynthFace attribute judge used by `evaluate` (can also be given as --judge_workdir).
    config.judge_workdir = ""

    config.data = _data_config("tiny" if tiny else None)
    config.data.dataset = "synthface_codes"
    config.data.config_name = ""
    config.data.image_field = "image_codes"
    config.data.max_text_len = 64  # ~9 of a caption's ~15 attributes; evaluation scores those
    config.data.max_answer_len = 4
    # Up to 4 QA pairs of one image per MMU row (distinct attributes; evaluation asks one): four
    # answers for the compute of one row.
    config.data.mmu_questions_per_row = 4
    # At 1500 steps about 26 500 T2I and 20 500 MMU rows. VQA needs about that many MMU rows
    # (every one teaches up to 4 answers); binding caption words to image places needs every
    # T2I row it can get (README: 1.6:1 lowered VQA without raising generation).
    config.data.mixture = ml_collections.ConfigDict({"t2i": 1.3, "mmu": 1.0, "lm": 0.05})
    # A quarter of the T2I captions cut to their first k sentences: the 64-id text width
    # truncates every whole SynthFace caption, so without this a short prompt is out of
    # distribution (its faces came out as noise). Whole captions teach more words per row.
    config.data.t2i_short_caption_prob = 0.25
    config.data.batch_size = 32
    config.data.eval_batch_size = 100

    config.model = backbone.full_model_config(dict(
        num_image_codes=1024, image_grid=8,  # 0 = take them from the tokenizer
        vocab_pad_to_multiple=8,
        d_model=128, num_layers=4,
        ffn=dict(name="dense", hidden=512),
        # A learned row per image place: without it a fully masked canvas is 64 identical
        # [MASK] inputs and the caption's words (but the background) go unused (README).
        image_position_embedding=True,
        # Each code's 10 LFQ bits in its input embedding and in its logit: NELBO 1.37-1.39
        # against 1.54, generation 0.507 against 0.48 (mean of 3 seeds, README).
        image_code_embedding="table+bits", image_code_logits="table+bits"))

    config.loss = unified_loss.default_config()

    config.optim = optim.full_config(dict(
        lr=4e-3, warmup_steps=60, end_lr_factor=0.05, b2=0.98, weight_decay=0.01,
        grad_clip=1.0))

    config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "expert": 1})
    config.sharding = ml_collections.ConfigDict()
    config.sharding.rules = ()

    # Defaults of generate / evaluate.
    config.sampling = with_defaults(t2i.default_config(), dict(
        steps=8, guidance=1.5, max_answer_tokens=6), "sampling")

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
    _apply_moe(config, opts)
    return config
