"""MoE configs (synthface_tiny `moe=` variants, the 1.8B paper config) and the parameter summary.

The summary's counts are checked against arithmetic on the config numbers, written out here
independently of the model code.
"""

import ml_collections
import pytest

import unified_env
from unif2ace_jax.models.backbone import default_config as default_model_config
from unif2ace_jax.summary import summarize

TINY = unified_env.load_config_module("synthface_tiny")
PAPER = unified_env.load_config_module("unif2ace_1p8b")


# ---------------------------------------------------------------------------------------------
# synthface_tiny variants


def test_plain_and_tiny_variants_stay_dense():
    for arg in ("", "tiny", None):
        c = TINY.get_config(arg)
        assert c.model.ffn.name == "dense" and c.model.seq_moe.name == "none"
        assert tuple(c.data.extra_fields) == ()
    assert TINY.get_config("tiny").model.d_model < TINY.get_config("").model.d_model


@pytest.mark.parametrize("arg", ["moe=token", "tiny,moe=token", "moe=both,tiny"])
def test_token_moe_active_hidden_equals_dense(arg):
    dense = TINY.get_config("tiny" if "tiny" in arg else "").model.ffn.hidden
    c = TINY.get_config(arg)
    f = c.model.ffn
    assert f.name == "token_moe" and (f.num_routed, f.num_shared, f.top_k) == (8, 1, 4)
    assert f.num_shared * f.shared_hidden + f.top_k * f.routed_hidden == dense
    assert f.balance_weight_gen > 0 and f.balance_weight_und > 0 and f.z_loss_weight > 0
    assert (c.model.seq_moe.name != "none") == ("both" in arg)


def test_seq_moe_groups_and_switches():
    c = TINY.get_config("tiny,moe=seq")
    assert c.model.ffn.name == "dense"
    s = c.model.seq_moe
    assert list(s.groups.und) == ["copy", "copy", "clip", "face"]
    assert list(s.groups.gen) == ["copy", "copy", "zero", "noise"]
    assert s.experts.noise.encoder == "noise" and s.top_k == 2
    assert tuple(c.data.extra_fields) == ("clip", "face")
    off = TINY.get_config("tiny,moe=seq,off=clip+face")
    assert list(off.model.seq_moe.groups.und) == ["copy", "copy", "zero", "zero"]
    assert tuple(off.data.extra_fields) == ()
    drop = TINY.get_config("tiny,moe=both,drop=face+noise")
    assert list(drop.model.seq_moe.groups.und) == ["copy", "copy", "clip"]
    assert list(drop.model.seq_moe.groups.gen) == ["copy", "copy", "zero"]
    assert tuple(drop.data.extra_fields) == ("clip",)


@pytest.mark.parametrize("arg", ["small", "tiny=1", "moe=all", "moe=token,off=clip",
                                 "moe=seq,off=clipp", "moe"])
def test_bad_variants_fail(arg):
    with pytest.raises(ValueError):
        TINY.get_config(arg)


# ---------------------------------------------------------------------------------------------
# Summary against a hand count


def _small_config():
    m = default_model_config()
    m.update(dict(d_model=16, num_layers=2, num_heads=2, vocab_pad_to_multiple=8,
                  num_image_codes=8, image_grid=2))
    m.ffn = ml_collections.ConfigDict(dict(
        name="token_moe", num_routed=3, num_shared=2, top_k=2, routed_hidden=4,
        shared_hidden=6))
    m.seq_moe = ml_collections.ConfigDict(dict(
        name="grouped_seq_moe",
        groups=dict(und=["copy", "copy", "clip", "face"], gen=["copy", "zero", "noise", "noise"]),
        experts=dict(
            clip=dict(kind="feature", feature_key="clip", feature_dim=5, encoder="precomputed",
                      resampler="mlp", resampler_hidden=7, feature_norm=True),
            face=dict(kind="feature", feature_key="face", feature_dim=3, encoder="precomputed",
                      resampler="mlp", resampler_hidden=0, feature_norm=True),
            noise=dict(kind="feature", feature_key="mask_ratio", feature_dim=4, encoder="noise",
                       encoder_config=dict(dim=4), resampler="mlp", resampler_hidden=5,
                       feature_norm=False)),
        top_k=2))
    return ml_collections.ConfigDict(dict(model=m))


def _mlp_expert(d, c, hidden, norm):
    """feature LayerNorm (scale, bias) + fc1 + fc2 + the 2-way gate, all with biases."""
    h = hidden or d
    return (2 * c if norm else 0) + (c * h + h) + (h * d + d) + (d * 2 + 2)


def test_summary_matches_a_hand_count():
    d, layers, text_v = 16, 2, 20
    vocab = -(-(text_v + 7 + 8 + 1) // 8) * 8  # text + 7 specials + K codes + [MASK], padded
    E, k, hr, ns, hs = 3, 2, 4, 2, 6
    expert = lambda h: d * h + h * d + h + d  # noqa: E731  (wi, wo, bi, bo)
    clip, face, noise = _mlp_expert(d, 5, 7, True), _mlp_expert(d, 3, 0, True), \
        _mlp_expert(d, 4, 5, False)
    n_cols = 8
    want = {
        "token embedding": vocab * d,
        "attention": layers * 4 * (d * d + d),
        "layer norms": layers * 2 * 2 * d + 2 * d,  # input + seq-MoE LN per layer, final LN
        "token-MoE router": layers * d * 2 * E,
        "token-MoE shared (und)": layers * expert(ns * hs),
        "token-MoE shared (gen)": layers * expert(ns * hs),
        "token-MoE routed (und)": layers * E * expert(hr),
        "token-MoE routed (gen)": layers * E * expert(hr),
        "seq-MoE router": layers * d * n_cols,
        "seq-MoE expert clip": layers * clip,
        "seq-MoE expert face": layers * face,
        "seq-MoE expert noise": layers * noise,
        "lm head": d * vocab + vocab,
    }
    s = summarize(_small_config(), text_vocab_size=text_v)
    assert dict(s.rows) == want
    total = sum(want.values())
    assert s.total == total
    # Idle for a token: the other group's router columns / routed / shared experts, E - k of
    # its own routed experts, the other group's seq-router columns, and seq experts beyond the
    # top-2 most expensive of its own group (und: face, clip; gen: noise only).
    common = d * E + E * expert(hr) + (E - k) * expert(hr) + expert(ns * hs) + d * 4
    assert s.active["und"] == total - layers * (common + noise)
    assert s.active["gen"] == total - layers * (common + clip + face)


def test_dense_summary_has_all_parameters_active():
    cfg = _small_config()
    cfg.model.ffn = ml_collections.ConfigDict(dict(name="dense", hidden=24))
    cfg.model.seq_moe = ml_collections.ConfigDict(dict(name="none"))
    s = summarize(cfg, text_vocab_size=20)
    assert s.rows["FFN (dense)"] == 2 * (16 * 24 + 24 + 24 * 16 + 16)
    assert s.active == {"und": s.total, "gen": s.total}


def test_paper_config_has_1p8b_parameters():
    config = PAPER.get_config("")
    s = summarize(config)  # text vocabulary: config.assumed_text_vocab_size (Show-o's 50,295)
    assert abs(s.total - 1.8e9) <= 0.05e9, s.total
    assert s.text_vocab_size == 50_295
    f = config.model.ffn
    assert f.name == "token_moe" and (f.num_routed, f.num_shared, f.top_k) == (8, 1, 4)
    assert list(config.model.seq_moe.groups.und) == ["copy", "copy", "clip", "face"]
    assert list(config.model.seq_moe.groups.gen) == ["copy", "copy", "zero", "noise"]
    # The MoE widths as the docstring explains them.
    d, layers = 2048, 24
    per_group = f.shared_hidden + f.num_routed * f.routed_hidden
    assert s.rows["token-MoE routed (gen)"] + s.rows["token-MoE shared (gen)"] == layers * (
        2 * d * per_group + per_group + (1 + f.num_routed) * d)
    assert s.active["gen"] < s.total and s.active["und"] < s.total


def test_summary_cli_prints_the_table():
    proc = unified_env.run_module("unif2ace_jax.summary", "--config=configs/unif2ace_1p8b.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = summarize(PAPER.get_config("")).total
    assert f"{total:,}" in proc.stdout
    for row in ("token embedding", "attention", "token-MoE routed (und)", "seq-MoE router",
                "lm head", "active per token (gen"):
        assert row in proc.stdout
    bad = unified_env.run_module("unif2ace_jax.summary")
    unified_env.assert_one_error_line(bad, "--config")
