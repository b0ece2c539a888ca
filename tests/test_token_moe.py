"""The token-level grouped MoE module ("token_moe" in the FFN slot) against a loop reference."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.ffn import FFN_SLOTS
from unif2ace_jax.models.moe import TokenMoE, default_config

B, L, D = 2, 6, 8
E, K = 4, 2
SMALL = dict(num_routed=E, top_k=K, routed_hidden=5, shared_hidden=7, block_size=4)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, L, D)), jnp.float32)
    # Sequence 0 is und, sequence 1 gen, except one und token inside it (modality-style mix).
    group = np.array([[0] * L, [1] * L], np.int32)
    group[1, 1] = 0
    valid = np.ones((B, L), bool)
    valid[0, -2:] = False
    valid[1, -1] = False
    return x, jnp.asarray(group), jnp.asarray(valid)


def _params(module, x, group, valid, seed=0):
    """Initialised params with every leaf (biases too) replaced by random values."""
    shapes = jax.eval_shape(lambda: nn.unbox(
        module.init(jax.random.key(seed), x, group=group, valid=valid)["params"]))
    leaves, tree = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    scale = lambda a: 0.3 if len(a.shape) < 3 else 1.0 / np.sqrt(a.shape[-2])  # noqa: E731
    return jax.tree.unflatten(tree, [jnp.asarray(rng.normal(size=a.shape) * scale(a), a.dtype)
                                     for a in leaves])


# ----------------------------------------------------------------------------- reference


def _np_softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _ref_routing(params, x, group, valid, capacity=None):
    """Concrete routing with numpy: (global indices [T, k], kept [T, k], probs [T, E])."""
    T = B * L
    xt = np.asarray(x, np.float64).reshape(T, D)
    g = np.asarray(group).reshape(T)
    ok = np.asarray(valid).reshape(T)
    logits = xt @ np.asarray(params["router"], np.float64)
    own = np.stack([logits[t, g[t] * E:(g[t] + 1) * E] for t in range(T)])
    probs = _np_softmax(own)
    idx = np.argsort(-probs, axis=1)[:, :K] + g[:, None] * E
    kept = np.repeat(ok[:, None], K, axis=1)
    if capacity is not None:  # slots: first choices in token order, then second choices
        fill = np.zeros(2 * E, int)
        for j in range(K):
            for t in range(T):
                if kept[t, j]:
                    kept[t, j] = fill[idx[t, j]] < capacity
                    fill[idx[t, j]] += 1
    return idx, kept, probs, logits


def _ffn(v, wi, wo, bi, bo):
    return jax.nn.gelu(v @ wi + bi, approximate=True) @ wo + bo


def _ref_forward(params, x, group, idx, kept, renormalize=True):
    """y = shared_{group}(x) + sum over kept picks of weight * expert(x), one expert at a time."""
    T = B * L
    xt = x.reshape(T, D)
    g = np.asarray(group).reshape(T)
    logits = xt @ params["router"]
    rows = np.arange(T)[:, None]
    probs = jax.nn.softmax(logits[rows, g[:, None] * E + np.arange(E)], axis=-1)  # own group only
    w = probs[rows, idx - g[:, None] * E]
    if renormalize:
        w = w / jnp.sum(w, axis=-1, keepdims=True)
    y = jnp.zeros_like(xt)
    for e in range(2 * E):
        gate = jnp.sum(jnp.where(jnp.asarray((idx == e) & kept), w, 0.0), axis=1)
        y = y + gate[:, None] * _ffn(xt, params["routed_wi"][e], params["routed_wo"][e],
                                     params["routed_bi"][e], params["routed_bo"][e])
    for grp in range(2):
        y = y + jnp.asarray(g == grp, jnp.float32)[:, None] * _ffn(
            xt, params["shared_wi"][grp], params["shared_wo"][grp],
            params["shared_bi"][grp], params["shared_bo"][grp])
    return y.reshape(B, L, D)


def _ref_losses(idx, probs, logits, group, valid):
    g = np.asarray(group).reshape(-1)
    ok = np.asarray(valid).reshape(-1)
    balance = []
    for grp in range(2):
        toks = np.nonzero(ok & (g == grp))[0]
        f = np.zeros(E)
        for t in toks:
            for e in idx[t]:
                f[e - grp * E] += 1
        balance.append(E * np.sum(f / len(toks) * probs[toks].mean(0)))
    z = [np.log(np.exp(logits[t, g[t] * E:(g[t] + 1) * E]).sum()) ** 2 for t in np.nonzero(ok)[0]]
    return balance, np.mean(z)


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, params, x, group, valid):
    """Jitted: op-by-op execution would compile every small op of the layer separately."""
    return module.apply({"params": params}, x, group=group, valid=valid,
                        mutable=["aux_loss", "intermediates"])


def _value_and_vjp(f, r, *args):
    y, vjp = jax.vjp(f, *args)
    return y, vjp(r)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", [
    dict(dispatch="ragged", grouped_matmul="blocked"),
    dict(dispatch="ragged", grouped_matmul="ragged_dot"),
    dict(dispatch="capacity", capacity_method="gather", capacity_factor=0.5),
    dict(dispatch="capacity", capacity_method="einsum", capacity_factor=0.5),
])
def test_module_matches_loop_reference(variant):
    module = TokenMoE(**SMALL, **variant)
    x, group, valid = _inputs()
    params = _params(module, x, group, valid)
    capacity = None
    if variant["dispatch"] == "capacity":
        capacity = int(np.ceil(0.5 * B * L * K / (2 * E)))  # = 2: some copies are dropped
    idx, kept, probs, logits = _ref_routing(params, x, group, valid, capacity)
    if capacity is not None:
        assert (~kept & np.asarray(valid).reshape(-1, 1)).any(), "the case must drop copies"
    r = jax.random.normal(jax.random.key(7), x.shape)

    def f(params, x):
        return module.apply({"params": params}, x, group=group, valid=valid)

    (y, (gp, gx)) = jax.jit(lambda p, x: _value_and_vjp(f, r, p, x))(params, x)
    (y_ref, (gp_ref, gx_ref)) = jax.jit(lambda p, x: _value_and_vjp(
        lambda p, x: _ref_forward(p, x, group, idx, kept), r, p, x))(params, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gx), np.asarray(gx_ref), rtol=1e-4, atol=1e-5)
    for name in gp_ref:
        np.testing.assert_allclose(np.asarray(gp[name]), np.asarray(gp_ref[name]),
                                   rtol=1e-4, atol=1e-5, err_msg=name)

    _, state = _apply(module, params, x, group, valid)
    balance, z = _ref_losses(idx, probs, logits, group, valid)
    aux = state["aux_loss"]
    np.testing.assert_allclose(aux["balance_und"][0], 0.01 * balance[0], rtol=1e-5)
    np.testing.assert_allclose(aux["balance_gen"][0], 0.01 * balance[1], rtol=1e-5)
    np.testing.assert_allclose(aux["router_z"][0], 1e-3 * z, rtol=1e-4)
    counts = np.zeros(2 * E, int)
    np.add.at(counts, idx[kept], 1)
    np.testing.assert_array_equal(np.asarray(state["intermediates"]["expert_counts"][0]), counts)


@pytest.mark.parametrize("dispatch", ["ragged", "capacity"])
def test_tokens_never_reach_the_other_groups_experts(dispatch):
    module = TokenMoE(**SMALL, dispatch=dispatch, capacity_factor=1.0)
    x, group, valid = _inputs(seed=1)
    params = _params(module, x, group, valid)
    y, state = _apply(module, params, x, group, valid)

    # Routing: every pick of a token lies in its own group's expert range.
    gen_only = jnp.ones_like(group)
    _, st = _apply(module, params, x, gen_only, valid)
    assert np.all(np.asarray(st["intermediates"]["expert_counts"][0])[:E] == 0)

    # Wreck the und experts (routed 0..E-1 and the und shared expert): gen tokens don't see it.
    wrecked = dict(params)
    for name in ("routed_wi", "routed_wo", "routed_bi", "routed_bo"):
        wrecked[name] = params[name].at[:E].set(1e3)
    for name in ("shared_wi", "shared_wo", "shared_bi", "shared_bo"):
        wrecked[name] = params[name].at[0].set(1e3)
    y2, state2 = _apply(module, wrecked, x, group, valid)
    is_gen = np.asarray(group) == 1
    np.testing.assert_array_equal(np.asarray(y2)[is_gen], np.asarray(y)[is_gen])
    assert not np.allclose(np.asarray(y2)[~is_gen], np.asarray(y)[~is_gen])
    np.testing.assert_array_equal(np.asarray(state2["intermediates"]["expert_counts"][0]),
                                  np.asarray(state["intermediates"]["expert_counts"][0]))


@pytest.mark.parametrize("dispatch", ["ragged", "capacity"])
def test_pad_tokens_affect_neither_losses_nor_valid_outputs(dispatch):
    # Tight capacity: pads taking slots would change which valid copies are dropped.
    module = TokenMoE(**SMALL, dispatch=dispatch, capacity_factor=0.5)
    x, group, valid = _inputs(seed=2)
    params = _params(module, x, group, valid)
    pad = ~np.asarray(valid)
    noise = 100.0 * jax.random.normal(jax.random.key(3), x.shape)
    x2 = jnp.where(jnp.asarray(pad)[..., None], noise, x)
    group2 = jnp.where(jnp.asarray(pad), 1 - group, group)
    y, s = _apply(module, params, x, group, valid)
    y2, s2 = _apply(module, params, x2, group2, valid)
    np.testing.assert_allclose(np.asarray(y2)[~pad], np.asarray(y)[~pad], rtol=1e-6, atol=1e-6)
    for name in ("balance_und", "balance_gen", "router_z"):
        np.testing.assert_allclose(s2["aux_loss"][name][0], s["aux_loss"][name][0], rtol=1e-6)


def test_ragged_and_capacity_agree_when_capacity_suffices():
    x, group, valid = _inputs(seed=3)
    ragged = TokenMoE(**SMALL, dispatch="ragged")
    params = _params(ragged, x, group, valid)
    y = _apply(ragged, params, x, group, valid)[0]
    for method in ("gather", "einsum"):
        # capacity_factor = 2E / k gives C = T: no copy can be dropped.
        cap = TokenMoE(**SMALL, dispatch="capacity", capacity_method=method,
                       capacity_factor=2 * E / K)
        y2, st = _apply(cap, params, x, group, valid)
        np.testing.assert_allclose(np.asarray(y2), np.asarray(y), rtol=1e-5, atol=1e-6)
        assert float(st["intermediates"]["dropped_fraction"][0]) == 0.0


def test_uniform_router_gives_balance_loss_k():
    module = TokenMoE(**SMALL, balance_weight_und=0.5, balance_weight_gen=0.25)
    x, group, valid = _inputs(seed=4)
    params = _params(module, x, group, valid)
    params["router"] = jnp.zeros_like(params["router"])  # every probability is 1/E
    _, state = _apply(module, params, x, group, valid)
    np.testing.assert_allclose(state["aux_loss"]["balance_und"][0], 0.5 * K, rtol=1e-6)
    np.testing.assert_allclose(state["aux_loss"]["balance_gen"][0], 0.25 * K, rtol=1e-6)
    # Uniform logits of 0: logsumexp = log E.
    np.testing.assert_allclose(state["aux_loss"]["router_z"][0], 1e-3 * np.log(E) ** 2, rtol=1e-5)


def test_zero_weights_sow_no_losses():
    module = TokenMoE(**SMALL, balance_weight_und=0.0, balance_weight_gen=0.0, z_loss_weight=0.0)
    x, group, valid = _inputs()
    params = _params(module, x, group, valid)
    _, state = _apply(module, params, x, group, valid)
    assert "aux_loss" not in state


def test_logical_axes_of_parameters():
    module = TokenMoE(**SMALL)
    x, group, valid = _inputs()
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), x, group=group,
                                               valid=valid))["params"]
    names = {k: v.names for k, v in boxed.items()}
    assert names["routed_wi"] == ("exp", "embed", "mlp")
    assert names["routed_wo"] == ("exp", "mlp", "embed")
    assert names["routed_bi"] == ("exp", "mlp")
    assert names["routed_bo"] == ("exp", "embed")
    assert names["shared_wi"] == (None, "embed", "mlp")
    assert names["router"] == ("embed", None)
    assert boxed["router"].value.dtype == jnp.float32
    assert boxed["routed_wi"].value.shape == (2 * E, D, SMALL["routed_hidden"])
    assert boxed["shared_wi"].value.shape == (2, D, SMALL["shared_hidden"])


def test_bf16_compute_is_close_to_f32():
    x, group, valid = _inputs(seed=5)
    f32 = TokenMoE(**SMALL)
    bf16 = TokenMoE(**SMALL, dtype=jnp.bfloat16)
    params = _params(f32, x, group, valid)
    y32 = _apply(f32, params, x, group, valid)[0]
    y16, st = _apply(bf16, params, x.astype(jnp.bfloat16), group, valid)
    assert y16.dtype == jnp.bfloat16
    assert st["aux_loss"]["router_z"][0].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


def test_factory_builds_from_config_and_rejects_bad_fields():
    cfg = default_config()
    cfg.update(SMALL)
    cfg.dispatch = "capacity"
    module = FFN_SLOTS.get("token_moe")(cfg, d_model=D, dtype=jnp.float32,
                                        param_dtype=jnp.float32, name="ffn")
    assert isinstance(module, TokenMoE) and module.dispatch == "capacity" and module.top_k == K
    x, group, valid = _inputs()
    out = jax.eval_shape(lambda: module.init_with_output(jax.random.key(0), x, group=group,
                                                         valid=valid)[0])
    assert out.shape == x.shape

    def build(**fields):
        c = ml_collections.ConfigDict(dict(name="token_moe", **fields))
        return FFN_SLOTS.get("token_moe")(c, d_model=D, dtype=jnp.float32, param_dtype=jnp.float32)

    assert build(top_k=2).num_routed == 8  # missing fields take the defaults
    with pytest.raises(UserError, match="top_k"):
        build(num_routed=4, top_k=5)
    with pytest.raises(UserError, match="dispatch"):
        build(dispatch="sorted")
    with pytest.raises(UserError, match="capacity_factor"):
        build(capacity_factor=0.0)
    with pytest.raises(UserError, match="grouped_matmul"):
        build(grouped_matmul="megablox")
    with pytest.raises(UserError, match="unknown config field"):
        build(num_expert=8)


@pytest.mark.multidevice
def test_expert_sharded_layer_equals_single_device(multidevice):
    code = """
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from unif2ace_jax.models.moe import TokenMoE

    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    rules = (("exp", "expert"), ("batch", "data"))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 6, 8)), jnp.float32)
    group = jnp.asarray(np.repeat([[0], [1], [1], [0]], 6, axis=1), jnp.int32)
    valid = jnp.asarray(rng.random((4, 6)) > 0.2)
    r = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    variants = [dict(dispatch="ragged", grouped_matmul="blocked"),
                dict(dispatch="ragged", grouped_matmul="ragged_dot"),
                dict(dispatch="capacity", capacity_method="einsum", capacity_factor=1.0)]
    for v in variants:
        m = TokenMoE(num_routed=4, top_k=2, routed_hidden=8, shared_hidden=16, block_size=4, **v)
        boxed = jax.jit(lambda: m.init(jax.random.key(0), x, group=group, valid=valid))()["params"]
        shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
        params = nn.unbox(boxed)

        def loss(params, x):
            y, st = m.apply({"params": params}, x, group=group, valid=valid, mutable=["aux_loss"])
            return jnp.sum(y * r) + sum(jax.tree.leaves(st["aux_loss"]))

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        ref_val, ref_grads = step(params, x)
        sp = jax.device_put(params, shardings)
        sx = jax.device_put(x, NamedSharding(mesh, P("data")))
        assert sp["routed_wi"].sharding.spec == P("expert", None, None), sp["routed_wi"].sharding
        assert sp["routed_wi"].addressable_shards[0].data.shape[0] == 2  # 8 experts / 4
        val, grads = step(sp, sx)
        np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        print("ok", v)
    """
    out = multidevice(code)
    assert out.count("ok") == 3, out
