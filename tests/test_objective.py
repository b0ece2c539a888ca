"""The unified objective: masking, layout, image-logit gather and the weighted sum of the losses.

The reference recomputes everything from the backbone's full ``[B, L, V]`` logits with a python
loop that knows the row layouts (docs/DESIGN.md §2) by hand, not through the code under test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.losses import d3diff_loss
from unif2ace_jax.models.backbone import default_config as default_model_config
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.unified import build_model
from unif2ace_jax.losses.unified import (default_config as default_loss_config,
                                         loss_from_inputs,
                                          prepare_inputs, unified_loss)

TEXT, K, GRID = 30, 8, 2
N = GRID * GRID
LT, LA = 5, 2


def _model(**overrides):
    cfg = default_model_config()
    cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.ffn.hidden = 16, 2, 2, 32
    cfg.init_std = 0.5  # spread-out logits, so the losses are far from trivial values
    for key, value in overrides.items():
        cfg[key] = value
    return build_model(cfg, text_vocab_size=TEXT, num_image_codes=K, image_grid=GRID)


def _batch():
    rng = np.random.default_rng(1)
    b = 6
    return {
        "task": np.array([0, 1, 2, 0, 1, 2], np.int32),
        "text": rng.integers(0, TEXT, (b, LT)).astype(np.int32),
        "text_len": np.array([5, 3, 4, 2, 1, 5], np.int32),
        "answer": rng.integers(0, TEXT, (b, LA)).astype(np.int32),
        "answer_len": np.array([0, 2, 0, 0, 1, 0], np.int32),
        "image_codes": rng.integers(0, K, (b, N)).astype(np.int32),
        "valid": np.ones((b,), bool),
    }


@pytest.fixture(scope="module")
def setup():
    model = _model()
    params = jax.jit(lambda k: model.init(k))(jax.random.key(0))
    import flax.linen as nn

    return model, nn.unbox(params)["params"]


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _reference_text_loss(logits, batch, task):
    """Mean CE of the answer (+<eos>) tokens of MMU rows / the text (+<eos>) of LM rows."""
    eos = TEXT + 5
    ce = []
    for b in np.flatnonzero(batch["task"] == task):
        if task == 1:  # <mmu> <soi> img… <eoi> <bos> question answer <eos>
            start = N + 4 + batch["text_len"][b]
            targets = list(batch["answer"][b, :batch["answer_len"][b]]) + [eos]
        else:  # <bos> text <eos>
            start = 1
            targets = list(batch["text"][b, :batch["text_len"][b]]) + [eos]
        logp = _log_softmax(logits[b])
        for j, t in enumerate(targets):
            ce.append(-logp[start + j - 1, t])
    return float(np.mean(ce))


def test_loss_is_weighted_sum_of_parts(setup):
    model, params = setup
    batch = _batch()
    cfg = default_loss_config()
    cfg.update(dict(w_t2i=0.7, w_mmu=1.3, w_lm=0.4, alpha=0.05, cond_dropout=0.0))
    rng = jax.random.key(5)
    loss, metrics = jax.jit(lambda p, b: unified_loss(model, p, b, rng, cfg))(params, batch)
    inputs = prepare_inputs(model, batch, rng, cfg)
    seqs = inputs["seqs"]
    full = np.asarray(model.backbone.apply(
        {"params": params}, seqs["tokens"],
        mask=omni_attention_mask(seqs["is_pad"], seqs["image_span"]),
        positions=seqs["positions"], group=seqs["group"], valid=seqs["valid"]))
    length = full.shape[1]
    assert length == LT + LA + N + 5

    # Image logits by hand: T2I images end right before the final <eoi>, MMU images start at 2.
    img = np.zeros((len(batch["task"]), N, K), np.float32)
    lo = model.vocab.image_offset
    for b, task in enumerate(batch["task"]):
        start = length - 1 - N if task == 0 else 2
        img[b] = full[b, start:start + N, lo:lo + K]
    masked = np.asarray(inputs["masked"])
    assert not masked[batch["task"] != 0].any()
    assert masked[batch["task"] == 0].sum(axis=1).min() >= 1
    d3, _ = d3diff_loss(jnp.asarray(img), batch["image_codes"], masked, inputs["mask_ratio"],
                        alpha=0.05, example_mask=batch["task"] == 0)
    mmu = _reference_text_loss(full, batch, 1)
    lm = _reference_text_loss(full, batch, 2)

    assert float(metrics["t2i_loss"]) == pytest.approx(float(d3), rel=1e-4)
    assert float(metrics["mmu_loss"]) == pytest.approx(mmu, rel=1e-4)
    assert float(metrics["lm_loss"]) == pytest.approx(lm, rel=1e-4)
    assert float(metrics["aux_loss"]) == 0.0  # dense FFN sows nothing
    expected = 0.7 * float(d3) + 1.3 * mmu + 0.4 * lm
    assert float(loss) == pytest.approx(expected, rel=1e-4)
    assert float(metrics["num_mmu_tokens"]) == 2 + 1 + 2  # answers + <eos> of rows 1 and 4
    assert float(metrics["num_lm_tokens"]) == 4 + 1 + 5 + 1


def test_masked_codes_enter_t2i_rows_only(setup):
    model, _ = setup
    batch = _batch()
    inputs = prepare_inputs(model, batch, jax.random.key(2), default_loss_config())
    seqs = inputs["seqs"]
    tokens = np.asarray(seqs["tokens"])
    pos = np.asarray(seqs["image_positions"])
    ids = np.take_along_axis(tokens, pos, axis=1)
    masked = np.asarray(inputs["masked"])
    want = np.where(masked, model.vocab.mask_id, batch["image_codes"] + model.vocab.image_offset)
    for b, task in enumerate(batch["task"]):
        if task in (0, 1):
            np.testing.assert_array_equal(ids[b], want[b])
    # T2I rows: exactly round(N m) >= 1 masks with m the returned ratio (the realised fraction).
    ratio = np.asarray(inputs["mask_ratio"])
    t2i = batch["task"] == 0
    np.testing.assert_allclose(masked[t2i].sum(1) / N, ratio[t2i])


def test_invalid_rows_change_nothing(setup):
    model, params = setup
    batch = _batch()
    cfg = default_loss_config()
    padded = {k: np.concatenate([v, v[:3]]) for k, v in batch.items()}
    padded["valid"][len(batch["task"]):] = False
    inputs = prepare_inputs(model, padded, jax.random.key(9), cfg)
    loss_pad, m_pad = loss_from_inputs(model, params, inputs, cfg)
    b = len(batch["task"])
    cut = jax.tree.map(lambda x: x[:b] if getattr(x, "ndim", 0) >= 1 else x, inputs)
    loss_cut, m_cut = loss_from_inputs(model, params, cut, cfg)
    assert float(loss_pad) == pytest.approx(float(loss_cut), rel=1e-5)
    for key in ("t2i_loss", "mmu_loss", "lm_loss", "num_masked"):
        assert float(m_pad[key]) == pytest.approx(float(m_cut[key]), rel=1e-5), key


def test_caption_dropout_empties_t2i_captions(setup):
    model, _ = setup
    batch = _batch()
    cfg = default_loss_config()
    cfg.cond_dropout = 1.0
    seqs = prepare_inputs(model, batch, jax.random.key(3), cfg)["seqs"]
    tokens = np.asarray(seqs["tokens"])
    for b in np.flatnonzero(batch["task"] == 0):
        row = tokens[b][np.asarray(seqs["valid"][b])]
        # <t2i> <bos> <eos> <soi> img… <eoi>: no caption left.
        assert list(row[:4]) == [model.vocab.t2i_id, model.vocab.bos_id, model.vocab.eos_id,
                                 model.vocab.soi_id]
    # Evaluation (train=False) never drops.
    seqs = prepare_inputs(model, batch, jax.random.key(3), cfg, train=False)["seqs"]
    assert not np.asarray(seqs["caption_dropped"]).any()


def test_moe_aux_losses_are_added():
    from unif2ace_jax.models.ffn import FFN_SLOTS
    import unif2ace_jax.models.unified  # noqa: F401  (registers the token_moe slot)

    if "token_moe" not in FFN_SLOTS.names():
        pytest.skip("token_moe not available")
    from unif2ace_jax.models.moe import default_config

    ffn = default_config()
    ffn.update(dict(num_routed=2, top_k=1, routed_hidden=8, shared_hidden=8))
    model = _model(ffn=ffn)
    import flax.linen as nn

    params = nn.unbox(model.init(jax.random.key(0)))["params"]
    cfg = default_loss_config()
    loss, metrics = unified_loss(model, params, _batch(), jax.random.key(1), cfg)
    parts = (cfg.w_t2i * metrics["t2i_loss"] + cfg.w_mmu * metrics["mmu_loss"]
             + cfg.w_lm * metrics["lm_loss"])
    assert float(metrics["aux_loss"]) > 0
    assert float(loss) == pytest.approx(float(parts + metrics["aux_loss"]), rel=1e-5)


def test_bit_logits_add_a_term_linear_in_each_codes_lfq_bits():
    """``image_code_logits=table+bits``: logit of code c = table logit + h · (U · bits(c)),
    bits(c) the ±1 big-endian LFQ bits; with U = 0 it is the plain model's logits exactly."""
    import flax.linen as nn

    from unif2ace_jax.errors import UserError

    model = _model(image_code_logits="table+bits")
    params = nn.unbox(jax.jit(lambda k: model.init(k))(jax.random.key(0))["params"])
    u = np.asarray(params["code_bits_head"]["kernel"])  # [D, log2 K]
    assert u.shape == (16, 3)
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 16)), jnp.float32)
    positions = jnp.asarray([[0, 2, 4, 6], [1, 3, 5, 6]], jnp.int32)
    got = np.asarray(model.image_logits(params, hidden, positions))

    h = np.asarray(hidden)[np.arange(2)[:, None], np.asarray(positions)]  # [B, N, D]
    lo = model.vocab.image_offset
    kernel = np.asarray(params["lm_head"]["kernel"])[:, lo:lo + K]
    bias = np.asarray(params["lm_head"]["bias"])[lo:lo + K]
    want = np.zeros((2, N, K))
    for c in range(K):
        bits = np.array([1.0 if (c >> (2 - j)) & 1 else -1.0 for j in range(3)])
        want[..., c] = h @ kernel[:, c] + bias[c] + h @ (u @ bits)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    plain = _model()
    zeroed = dict(params, code_bits_head={"kernel": jnp.zeros_like(u)})
    no_head = {k: v for k, v in params.items() if k != "code_bits_head"}
    np.testing.assert_allclose(np.asarray(model.image_logits(zeroed, hidden, positions)),
                               np.asarray(plain.image_logits(no_head, hidden, positions)),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(UserError, match="image_code_logits"):
        _model(image_code_logits="bits")
