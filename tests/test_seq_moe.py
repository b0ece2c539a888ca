"""Sequence-level grouped MoE: router math vs numpy, copy/zero experts, losses, backbone slot."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.moe import seq_moe
from unif2ace_jax.models.moe import seq_routing as routing

D = 16
B, L = 6, 7


def _cfg(und=None, gen=None, top_k=2, **kw):
    c = seq_moe.default_config()
    c.experts.clip.feature_dim = 12
    c.experts.face.feature_dim = 10
    c.experts.noise.encoder_config.dim = 8
    c.experts.noise.feature_dim = 8
    if und is not None:
        c.groups.und = und
    if gen is not None:
        c.groups.gen = gen
    c.top_k = top_k
    c.update(kw)
    return c


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(B, L, D)).astype(np.float32)
    valid = np.ones((B, L), bool)
    valid[0, 5:] = False
    valid[3, :2] = False  # left padding
    task = np.array([0, 1, 2, 0, 1, 0])  # T2I -> gen
    group = np.broadcast_to(np.where(task == 0, 1, 0)[:, None], (B, L)).astype(np.int32)
    return h, valid, group, task


def _features(cfg, task, seed=0):
    f = seq_moe.dummy_features(cfg, B)
    rng = np.random.default_rng(seed + 100)
    f = {k: jnp.asarray(rng.normal(size=v.shape).astype(np.float32)) if v.ndim > 1 else v
         for k, v in f.items()}
    f["mask_ratio"] = jnp.asarray(rng.uniform(size=(B,)).astype(np.float32))
    f["task"] = jnp.asarray(task)
    return f


def _module(cfg):
    return seq_moe.make_grouped_seq_moe(cfg, d_model=D, dtype=jnp.float32,
                                        param_dtype=jnp.float32, name="seq_moe")


def _random_params(abstract, seed=0, scale=0.3):
    """Random numpy values in the shapes of `abstract` (boxed ShapeDtypeStructs).

    Compiling `init` (one threefry per parameter) costs seconds on CPU; the tests only need
    parameters of the right shapes, and random biases / LayerNorm scales test more.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * scale, x.dtype),
                        nn.unbox(abstract))


def _init(m, h, valid, group, feats, seed=0):
    """Unboxed random params of `m`."""
    abstract = jax.eval_shape(lambda: m.init(jax.random.key(0), h, group=group, valid=valid,
                                             features=feats))["params"]
    return _random_params(abstract, seed)


def _run(cfg, h, valid, group, feats, params=None, seed=1):
    m = _module(cfg)
    if params is None:
        params = _init(m, h, valid, group, feats, seed)
    apply = jax.jit(lambda p: m.apply({"params": p}, h, group=group, valid=valid,
                                      features=feats, mutable=["aux_loss", "intermediates"]))
    y, state = apply(params)
    return np.asarray(y), state, params


# -------------------------------------------------------------------------------------------
# numpy reference of the router.

def _np_route(h, valid, seq_group, kernel, n_und, n_gen, k, available=None):
    w = valid.astype(np.float64)[..., None]
    pooled = (h * w).sum(1) / np.maximum(w.sum(1), 1.0)
    logits = pooled @ kernel.astype(np.float64)
    n = n_und + n_gen
    col_group = np.array([0] * n_und + [1] * n_gen)
    gates, idx, probs = [], [], np.zeros((h.shape[0], n))
    for b in range(h.shape[0]):
        ok = col_group == seq_group[b]
        if available is not None:
            ok &= available[b]
        z = np.where(ok, logits[b], -np.inf)
        p = np.exp(z - z[ok].max())
        p /= p.sum()
        probs[b] = p
        order = sorted(range(n), key=lambda j: (-p[j] if ok[j] else np.inf, j))[:k]
        g = p[order] / p[order].sum()
        gates.append(g)
        idx.append(order)
    return np.array(gates), np.array(idx), probs


def test_pooled_mean_vs_numpy_and_ignores_pads():
    h, valid, _, _ = _inputs()
    got = np.asarray(routing.pooled_mean(jnp.asarray(h), jnp.asarray(valid)))
    ref = np.stack([h[b][valid[b]].mean(0) for b in range(B)])
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
    h2 = np.where(valid[..., None], h, 1e3)
    got2 = np.asarray(routing.pooled_mean(jnp.asarray(h2), jnp.asarray(valid)))
    np.testing.assert_allclose(got2, ref, rtol=1e-6, atol=1e-6)
    empty = np.asarray(routing.pooled_mean(jnp.ones((1, 3, 2)), jnp.zeros((1, 3), bool)))
    assert np.array_equal(empty, np.zeros((1, 2)))


def test_sequence_group_from_task_and_first_valid_token():
    _, valid, group, task = _inputs()
    assert np.array_equal(routing.sequence_group(jnp.asarray(group), jnp.asarray(valid),
                                                 jnp.asarray(task)), (task == 0).astype(int))
    # modality-style groups: the first valid token decides without a task.
    g = np.zeros((2, 4), np.int32)
    g[0, 2:] = 1
    g[1, 1] = 1
    v = np.array([[False, False, True, True], [False, True, True, True]])
    assert np.array_equal(routing.sequence_group(jnp.asarray(g), jnp.asarray(v)), [1, 1])


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_picks_and_gates_vs_numpy(k):
    h, valid, group, task = _inputs(seed=k)
    cfg = _cfg(und=["copy", "copy", "clip", "face"], gen=["copy", "zero", "noise"], top_k=k)
    feats = _features(cfg, task)
    m = _module(cfg)
    params = _init(m, h, valid, group, feats, 3)
    params["router"] = jnp.asarray(np.random.default_rng(k).normal(size=(D, 7)) * 2.0,
                                   jnp.float32)
    _, state, _ = _run(cfg, h, valid, group, feats, params=params)
    inter = state["intermediates"]
    gates_ref, idx_ref, probs_ref = _np_route(h, valid, (task == 0).astype(int),
                                              np.asarray(params["router"]), 4, 3, k)
    assert np.array_equal(np.asarray(inter["seq_moe_choices"][0]), idx_ref)
    np.testing.assert_allclose(np.asarray(inter["seq_moe_gates"][0]), gates_ref, rtol=1e-5,
                               atol=1e-6)
    # Never the other group's experts.
    idx = np.asarray(inter["seq_moe_choices"][0])
    gen_rows = task == 0
    assert (idx[gen_rows] >= 4).all() and (idx[~gen_rows] < 4).all()


def test_output_is_gate_weighted_sum_of_expert_outputs():
    h, valid, group, task = _inputs(seed=5)
    cfg = _cfg(und=["copy", "zero", "clip", "face"], gen=["copy", "zero", "noise", "clip"])
    feats = _features(cfg, task)
    m = _module(cfg)
    params = _init(m, h, valid, group, feats, 3)
    params["router"] = jnp.asarray(np.random.default_rng(9).normal(size=(D, 8)) * 3.0,
                                   jnp.float32)
    y, _, _ = _run(cfg, h, valid, group, feats, params=params)
    gates, idx, _ = _np_route(h, valid, (task == 0).astype(int), np.asarray(params["router"]),
                              4, 4, 2)
    cols = list(cfg.groups.und) + list(cfg.groups.gen)
    expert_out = {"copy": h, "zero": np.zeros_like(h)}
    for name in ("clip", "face", "noise"):
        e = seq_moe.experts_lib.build_expert(name, cfg.experts, d_model=D, dtype=jnp.float32,
                                             param_dtype=jnp.float32)
        expert_out[name] = np.asarray(jax.jit(lambda p, e=e: e.apply(
            {"params": p}, jnp.asarray(h), features=feats))(params[f"expert_{name}"]))
    ref = np.zeros_like(h)
    for b in range(B):
        for g, j in zip(gates[b], idx[b]):
            ref[b] += g * expert_out[cols[j]][b]
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_copy_copy_is_exactly_the_identity():
    h, valid, group, task = _inputs()
    cfg = _cfg()  # paper groups: copy, copy first in both
    feats = _features(cfg, task)
    m = _module(cfg)
    params = _init(m, h, valid, group, feats, 0)
    params["router"] = jnp.zeros_like(params["router"])  # uniform: ties go to columns 0, 1
    y, state, _ = _run(cfg, h, valid, group, feats, params=params)
    assert np.array_equal(y, h)
    # And with a router that strongly prefers two (unequal) copies, gates not 1/2 each.
    kernel = np.zeros((D, 8), np.float32)
    kernel[:, [0, 4]] = 50.0 * np.sign(h.mean(1)).mean(0)[:, None]
    kernel[:, [1, 5]] = 40.0 * np.sign(h.mean(1)).mean(0)[:, None]
    params["router"] = jnp.asarray(kernel)
    y2, state2, _ = _run(cfg, h, valid, group, feats, params=params)
    picks = np.asarray(state2["intermediates"]["seq_moe_choices"][0])
    copies = np.isin(picks, [0, 1, 4, 5]).all(axis=1)
    assert copies.any()
    assert np.array_equal(y2[copies], h[copies])


def test_zero_expert_contributes_nothing():
    h, valid, group, task = _inputs()
    cfg = _cfg(und=["zero", "copy"], gen=["zero", "copy"], top_k=1)
    feats = _features(cfg, task)
    m = _module(cfg)
    params = _init(m, h, valid, group, feats, 0)
    params["router"] = jnp.zeros_like(params["router"])  # ties -> column 0 = zero
    y, _, _ = _run(cfg, h, valid, group, feats, params=params)
    assert np.array_equal(y, np.zeros_like(h))
    # top-2 of (zero, copy): the output is the copy gate times h, nothing from zero.
    cfg2 = _cfg(und=["zero", "copy"], gen=["zero", "copy"], top_k=2)
    kernel = np.random.default_rng(1).normal(size=(D, 4)).astype(np.float32)
    params["router"] = jnp.asarray(kernel)
    y2, _, _ = _run(cfg2, h, valid, group, feats, params=params)
    gates, idx, _ = _np_route(h, valid, (task == 0).astype(int), kernel, 2, 2, 2)
    w_copy = np.where(idx % 2 == 1, gates, 0.0).sum(1)
    np.testing.assert_allclose(y2, w_copy[:, None, None] * h, rtol=1e-6, atol=1e-6)


def test_pad_tokens_do_not_change_the_routing():
    h, valid, group, task = _inputs()
    cfg = _cfg()
    feats = _features(cfg, task)
    _, s1, params = _run(cfg, h, valid, group, feats)
    h2 = np.where(valid[..., None], h, -7.0).astype(np.float32)
    _, s2, _ = _run(cfg, h2, valid, group, feats, params=params)
    for key in ("seq_moe_choices", "seq_moe_gates"):
        assert np.array_equal(np.asarray(s1["intermediates"][key][0]),
                              np.asarray(s2["intermediates"][key][0]))


def test_pool_mask_restricts_the_router_input():
    h, valid, group, task = _inputs()
    cfg = _cfg()
    feats = _features(cfg, task)
    pool = np.zeros((B, L), bool)
    pool[:, 2:5] = True
    _, s1, params = _run(cfg, h, valid, group, dict(feats, pool_mask=jnp.asarray(pool)))
    # Only the tokens inside pool & valid matter: change all others.
    keep = pool & valid
    h2 = np.where(keep[..., None], h, 5.0).astype(np.float32)
    _, s2, _ = _run(cfg, h2, valid, group, dict(feats, pool_mask=jnp.asarray(pool)), params)
    gates, idx, _ = _np_route(h, keep, (task == 0).astype(int), np.asarray(params["router"]),
                              4, 4, 2)
    for s in (s1, s2):
        assert np.array_equal(np.asarray(s["intermediates"]["seq_moe_choices"][0]), idx)
        np.testing.assert_allclose(np.asarray(s["intermediates"]["seq_moe_gates"][0]), gates,
                                   rtol=1e-5, atol=1e-6)


def test_absent_feature_is_never_picked():
    h, valid, group, task = _inputs()
    cfg = _cfg()
    feats = _features(cfg, task)
    m = _module(cfg)
    params = _init(m, h, valid, group, feats, 0)
    kernel = np.zeros((D, 8), np.float32)
    kernel[:, 2] = 100.0 * np.sign(h.mean(1)).mean(0)  # clip would win everywhere
    params["router"] = jnp.asarray(kernel)
    feats["clip_present"] = jnp.asarray(task == 1)  # only MMU rows have an image
    _, state, _ = _run(cfg, h, valid, group, feats, params=params)
    picks = np.asarray(state["intermediates"]["seq_moe_choices"][0])
    has_clip = (picks == 2).any(axis=1)
    und = task != 0
    assert not has_clip[und & (task != 1)].any()


def test_balance_loss_uniform_gives_k_and_matches_numpy():
    n_und, n_gen, k = 4, 3, 2
    seq_group = np.array([0, 0, 1, 1, 1, 0])
    seq_valid = np.array([True, True, True, True, True, False])
    uniform = np.concatenate([np.where(seq_group[:, None] == 0, 1 / 4, 0.0) * np.ones((6, 4)),
                              np.where(seq_group[:, None] == 1, 1 / 3, 0.0) * np.ones((6, 3))],
                             axis=1)
    allowed = uniform > 0
    _, idx = routing.top_k_gates(jnp.asarray(uniform, jnp.float32), jnp.asarray(allowed), k)
    bl = routing.balance_loss(jnp.asarray(uniform, jnp.float32), idx, jnp.asarray(seq_group),
                              jnp.asarray(seq_valid), n_und, n_gen)
    np.testing.assert_allclose(np.asarray(bl), [k, k], rtol=1e-6)
    # random probabilities vs a python loop
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 7)).astype(np.float32)
    probs = routing.router_probs(jnp.asarray(logits), jnp.asarray(allowed))
    _, idx = routing.top_k_gates(probs, jnp.asarray(allowed), k)
    bl = np.asarray(routing.balance_loss(probs, idx, jnp.asarray(seq_group),
                                         jnp.asarray(seq_valid), n_und, n_gen))
    probs, idx = np.asarray(probs), np.asarray(idx)
    for g, lo, n in ((0, 0, n_und), (1, n_und, n_gen)):
        rows = [b for b in range(6) if seq_group[b] == g and seq_valid[b]]
        f = [np.mean([lo + e in idx[b] for b in rows]) for e in range(n)]
        p = [np.mean([probs[b, lo + e] for b in rows]) for e in range(n)]
        np.testing.assert_allclose(bl[g], n * np.dot(f, p), rtol=1e-5)
    # a group without sequences contributes 0
    empty = routing.balance_loss(jnp.asarray(probs), jnp.asarray(idx), jnp.zeros(6, jnp.int32),
                                 jnp.ones(6, bool), n_und, n_gen)
    assert float(empty[1]) == 0.0


def test_aux_loss_is_sown_weighted():
    h, valid, group, task = _inputs()
    cfg = _cfg(balance_weight_und=0.5, balance_weight_gen=0.25)
    feats = _features(cfg, task)
    m = _module(cfg)
    params = _init(m, h, valid, group, feats, 0)
    params["router"] = jnp.zeros_like(params["router"])
    _, state, _ = _run(cfg, h, valid, group, feats, params=params)
    (loss,) = state["aux_loss"]["seq_moe_balance"]
    np.testing.assert_allclose(float(loss), 0.5 * 2 + 0.25 * 2, rtol=1e-6)
    usage = np.asarray(state["intermediates"]["seq_moe_usage"][0])
    assert usage.sum() == 2 * B


def test_config_errors():
    with pytest.raises(UserError, match="unknown seq-MoE expert 'clipp'"):
        _module(_cfg(und=["copy", "clipp"]))
    with pytest.raises(UserError, match="top_k"):
        _module(_cfg(und=["copy"], top_k=2))
    with pytest.raises(UserError, match="empty"):
        _module(_cfg(gen=[]))
    h, valid, group, task = _inputs()
    m = _module(_cfg())
    with pytest.raises(UserError, match="features\\['clip'\\]"):
        jax.eval_shape(lambda: m.init(jax.random.key(0), h, group=group, valid=valid,
                                      features={"task": task}))


def test_ablation_config_builds_without_the_clip_expert():
    h, valid, group, task = _inputs()
    cfg = _cfg(und=["copy", "copy", "zero", "face"])
    feats = _features(cfg, task)
    assert "clip" not in feats
    y, _, params = _run(cfg, h, valid, group, feats)
    assert "expert_clip" not in params and y.shape == h.shape


# -------------------------------------------------------------------------------------------
# In the backbone.

def test_backbone_with_grouped_seq_moe_forward_and_backward():
    from unif2ace_jax.models.backbone import build_backbone, default_config as default_model_config
    from unif2ace_jax.models.masks import omni_attention_mask
    from unif2ace_jax.models.sequences import build_sequences
    from unif2ace_jax.models.vocab import Vocab

    vocab = Vocab(text_size=60, num_image_codes=32)
    c = default_model_config()
    c.d_model, c.num_heads, c.num_layers = D, 2, 2
    c.ffn.hidden = 32
    # One expert of each kind, the CLIP one with the cross-attention resampler (face is
    # switched off, as the ablation would).
    c.seq_moe = _cfg(und=["copy", "copy", "clip"], gen=["copy", "zero", "noise"])
    c.seq_moe.experts.clip.resampler = "cross_attention"
    c.seq_moe.experts.clip.num_heads = 2
    model = build_backbone(c, vocab)
    rng = np.random.default_rng(0)
    batch = dict(task=np.array([0, 1, 2]), text=rng.integers(0, 60, (3, 4)),
                 text_len=np.array([3, 2, 4]), answer=rng.integers(0, 60, (3, 2)),
                 answer_len=np.array([0, 2, 0]), image_codes=rng.integers(0, 33, (3, 4)))
    s = build_sequences(batch, vocab)
    kw = dict(mask=omni_attention_mask(s["is_pad"], s["image_span"]), positions=s["positions"],
              group=s["group"], valid=s["valid"])
    feats = {"task": s["task"], "clip": jnp.asarray(rng.normal(size=(3, 5, 12)), jnp.float32),
             "clip_mask": jnp.asarray([[1, 1, 1, 0, 0]] * 3, bool),
             "clip_present": s["task"] == 1,
             "mask_ratio": jnp.asarray([0.5, 0.0, 0.0], jnp.float32)}

    def loss_fn(p):
        logits, state = model.apply({"params": p}, s["tokens"], features=feats,
                                    mutable=["aux_loss", "intermediates"], **kw)
        aux = sum(jnp.sum(x) for x in jax.tree.leaves(state["aux_loss"]))
        return jnp.mean(logits ** 2) + aux, state

    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), s["tokens"], features=feats,
                                              **kw))["params"]
    params = _random_params(boxed, scale=0.2)
    (loss, state), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    seq_params = params["layers"]["seq_moe"]
    assert seq_params["router"].shape == (2, D, 6)
    assert set(seq_params) == {"router", "expert_clip", "expert_noise"}
    assert np.isfinite(float(loss))
    g = grads["layers"]["seq_moe"]
    assert np.abs(np.asarray(g["router"])).sum() > 0
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
    assert state["aux_loss"]["layers"]["seq_moe"]["seq_moe_balance"][0].shape == (2,)
    choices = np.asarray(state["intermediates"]["layers"]["seq_moe"]["seq_moe_choices"][0])
    assert choices.shape == (2, 3, 2)
    assert (choices[:, 0] >= 3).all() and (choices[:, 1:] < 3).all()  # row 0 is T2I (gen)
    assert not (choices[:, 2] == 2).any()  # the LM row has no image: never the clip expert
    # every parameter carries logical names
    for box in jax.tree.leaves(boxed["layers"]["seq_moe"],
                               is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert isinstance(box, nn.LogicallyPartitioned)
        assert len(box.names) == box.value.ndim


def test_feature_keys_and_dummy_features_follow_the_config():
    cfg = _cfg(und=["copy", "copy", "face"])
    assert seq_moe.feature_keys(cfg) == {"face": "precomputed", "mask_ratio": "noise"}
    f = seq_moe.dummy_features(cfg, 3, num_feature_tokens=2)
    assert {k: v.shape for k, v in f.items()} == {"task": (3,), "face": (3, 2, 10),
                                                 "mask_ratio": (3,)}
