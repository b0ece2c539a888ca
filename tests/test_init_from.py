"""`config.init_from`: a new run's params from another workdir (checkpoint/init_from.py).

The upcycling math is checked against the dense FFN itself: with every expert routed at weight 1
(the router's top-k replaced in the test), a split-upcycled token-MoE equals the dense FFN. The
workdir path uses the tiny Show-o golden fixture (``shared/fixtures/showo/showo``; set
``UNIF2ACE_SHARED`` to the folder holding ``fixtures/``) converted by `convert.showo`.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from unif2ace_jax.checkpoint import init_from as lib
from unif2ace_jax.checkpoint import state as state_lib
from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.convert import showo as conv
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.ffn import DenseFFN
from unif2ace_jax.models.moe import routing
from unif2ace_jax.models.moe.token_moe import TokenMoE
from unif2ace_jax.models.unified import build_model, default_features
from unif2ace_jax.optim import make_optimizer
from unif2ace_jax.parallel import rules as rules_lib
from unif2ace_jax.parallel.mesh import make_mesh

import showo_fixtures
import unified_env

FIXTURE = showo_fixtures.path("showo")
D, E, SHARED_H, ROUTED_H = 16, 4, 12, 5
DENSE_H = SHARED_H + E * ROUTED_H  # 32


def _dense_params(key, lead=()):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    return {"fc1": {"kernel": jax.random.normal(k1, lead + (D, DENSE_H)),
                    "bias": jax.random.normal(k2, lead + (DENSE_H,))},
            "fc2": {"kernel": jax.random.normal(k3, lead + (DENSE_H, D)) / 4,
                    "bias": jax.random.normal(k4, lead + (D,))}}


def _moe(num_shared=1):
    return TokenMoE(num_routed=E, num_shared=num_shared, top_k=E, routed_hidden=ROUTED_H,
                    shared_hidden=SHARED_H, grouped_matmul="blocked", block_size=8)


def _all_experts_at_weight_one(probs, group, num_experts_per_group, k, renormalize):
    """Test-only routing: every token to all E experts of its group, each with weight 1."""
    del probs, renormalize
    indices = group[:, None] * num_experts_per_group + jnp.arange(k)[None]
    return jnp.ones(indices.shape, jnp.float32), indices.astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# upcycle_ffn


def test_split_upcycled_moe_equals_the_dense_ffn(monkeypatch):
    x = jax.random.normal(jax.random.key(1), (2, 7, D))
    group = jnp.array([[0] * 7, [1] * 3 + [0] * 4], jnp.int32)
    dense = _dense_params(jax.random.key(0))
    want = DenseFFN(hidden=DENSE_H).apply({"params": dense}, x)
    moe = _moe()
    fresh = nn.meta.unbox(moe.init(jax.random.key(2), x, group=group))["params"]
    shapes = {k: v.shape for k, v in fresh.items() if k in lib.EXPERT_LEAVES}
    params = {**fresh, **lib.upcycle_ffn(dense, shapes, "split")}
    monkeypatch.setattr(routing, "top_k_routing", _all_experts_at_weight_one)
    got = moe.apply({"params": params}, x, group=group)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    assert np.abs(want).max() > 0.5


def test_split_and_copy_take_the_units_the_docstring_names():
    dense = _dense_params(jax.random.key(0), lead=(3,))  # 3 stacked layers
    shapes = {"routed_wi": (3, 2 * E, D, ROUTED_H), "routed_bi": (3, 2 * E, ROUTED_H),
              "routed_wo": (3, 2 * E, ROUTED_H, D), "routed_bo": (3, 2 * E, D),
              "shared_wi": (3, 2, D, SHARED_H), "shared_bi": (3, 2, SHARED_H),
              "shared_wo": (3, 2, SHARED_H, D), "shared_bo": (3, 2, D)}
    k1, b1 = dense["fc1"]["kernel"], dense["fc1"]["bias"]
    k2, b2 = dense["fc2"]["kernel"], dense["fc2"]["bias"]
    split = lib.upcycle_ffn(dense, shapes, "split")
    for g in range(2):
        np.testing.assert_array_equal(split["shared_wi"][:, g], k1[..., :SHARED_H])
        np.testing.assert_array_equal(split["shared_wo"][:, g], k2[:, :SHARED_H])
        np.testing.assert_array_equal(split["shared_bo"][:, g], b2)
        for i in range(E):
            units = slice(SHARED_H + i * ROUTED_H, SHARED_H + (i + 1) * ROUTED_H)
            np.testing.assert_array_equal(split["routed_wi"][:, g * E + i], k1[..., units])
            np.testing.assert_array_equal(split["routed_bi"][:, g * E + i], b1[..., units])
            np.testing.assert_array_equal(split["routed_wo"][:, g * E + i], k2[:, units])
    assert not np.any(split["routed_bo"])
    wide = dict(shapes, shared_wi=(3, 2, D, 40), shared_bi=(3, 2, 40), shared_wo=(3, 2, 40, D))
    copy = lib.upcycle_ffn(dense, wide, "copy")
    tiled = np.concatenate([k1, k1[..., :8]], axis=-1)  # 40 units of a 32-unit FFN
    np.testing.assert_array_equal(copy["shared_wi"][:, 1], tiled)
    for e in range(2 * E):
        np.testing.assert_array_equal(copy["routed_wi"][:, e], k1[..., :ROUTED_H])
        np.testing.assert_array_equal(copy["routed_bi"][:, e], b1[..., :ROUTED_H])
    np.testing.assert_array_equal(copy["shared_bo"][:, 0], b2)
    assert not np.any(copy["routed_bo"])


def test_split_wider_than_the_dense_ffn_is_one_line():
    shapes = {"routed_wi": (2 * E, D, ROUTED_H + 1), "shared_wi": (2, D, SHARED_H)}
    with pytest.raises(UserError) as e:
        lib.upcycle_ffn(_dense_params(jax.random.key(0)), shapes, "split")
    assert "\n" not in str(e.value) and "'copy'" in str(e.value)


# ---------------------------------------------------------------------------------------------
# init_from_params (pure)


def _tree(**leaves):
    return traverse_util.unflatten_dict({tuple(k.split("__")): v for k, v in leaves.items()})


def test_init_from_params_rules_and_report():
    dense = _dense_params(jax.random.key(0))
    source = {"embed_tokens": {"embedding": jnp.arange(10.0 * D).reshape(10, D)},
              "mlp": dense, "old_head": {"kernel": jnp.ones((D, 2))}}
    moe_init = _moe().init(jax.random.key(2), jnp.zeros((1, 1, D)), group=jnp.zeros((1, 1), int))
    fresh = {"embed_tokens": {"embedding": -jnp.ones((16, D))},
             "mlp": nn.meta.unbox(moe_init)["params"], "seq_moe": {"router": jnp.zeros((D, 8))}}
    params, report = lib.init_from_params(fresh, source, lib.Rules("split", used_vocab_rows=9))
    emb = params["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(emb[:9], source["embed_tokens"]["embedding"][:9])
    np.testing.assert_array_equal(emb[9:], -1)  # padding rows stay fresh
    np.testing.assert_array_equal(params["mlp"]["router"], fresh["mlp"]["router"])
    np.testing.assert_array_equal(params["mlp"]["shared_bo"][1], dense["fc2"]["bias"])
    assert report.rows == ("embed_tokens/embedding",) and report.copied == ()
    assert len(report.upcycled) == 8
    assert report.fresh == ("mlp/router", "seq_moe/router")
    assert report.unused == ("old_head/kernel",)
    assert report.summary().startswith("1 copied (1 of them the used vocabulary rows only), "
                                       "8 upcycled (split), 2 fresh; 1 source params unused")
    _, rand = lib.init_from_params(fresh, source, lib.Rules("random", used_vocab_rows=9))
    assert rand.upcycled == () and len(rand.fresh) == 10 and len(rand.unused) == 5


@pytest.mark.parametrize("source,rules,words", [
    ({"attn": {"kernel": jnp.ones((D, 3))}}, lib.Rules(), ["attn/kernel", "[16, 3]", "[16, 4]"]),
    ({"lm_head": {"kernel": jnp.ones((D, 5))}}, lib.Rules(used_vocab_rows=6), ["lm_head/kernel"]),
    ({"attn": {"kernel": jnp.ones((D, 4))}}, lib.Rules("splitt"), ["splitt"]),
])
def test_unmapped_shape_or_rule_is_one_line(source, rules, words):
    fresh = {"attn": {"kernel": jnp.zeros((D, 4))}, "lm_head": {"kernel": jnp.zeros((D, 8))}}
    with pytest.raises(UserError) as e:
        lib.init_from_params(fresh, source, rules)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


# ---------------------------------------------------------------------------------------------
# From a converted tiny Show-o


@pytest.fixture(scope="module")
def showo_workdir(tmp_path_factory):
    showo_fixtures.require(FIXTURE)
    out = str(tmp_path_factory.mktemp("showo") / "run")
    conv.convert_directory(FIXTURE, out)
    return out


def _model(arg):
    config = unified_env.load_config("unif2ace_1p8b", arg)
    return config, build_model(config.model, text_vocab_size=50295, num_image_codes=8192,
                               image_grid=4)


def test_init_from_a_converted_showo(showo_workdir):
    config, model = _model("tiny,from_showo")
    assert config.init.ffn_upcycling == "split" and config.init.from_required
    features = default_features(np.zeros((1,), np.int32), np.zeros((1,), np.float32),
                                {"clip": np.zeros((1, 32), np.float32),
                                 "face": np.zeros((1, 32), np.float32)})
    tx, _ = make_optimizer(config.optim, 4)
    mesh = make_mesh({"fsdp": -1})
    rules = rules_lib.get_rules(())
    state, shardings = state_lib.create_train_state(model, tx, mesh, rules, jax.random.key(0),
                                                    features)
    fresh = jax.tree.map(np.asarray, state["params"])
    params, report = lib.init_params_from_workdir(showo_workdir, model, state["params"],
                                                  shardings["params"], "split")
    source = load_trained(showo_workdir).params
    assert (len(report.copied), len(report.rows), len(report.upcycled), len(report.fresh),
            len(report.unused)) == (16, 3, 8, 28, 0)
    assert "layers/self_attn/q_layernorm/scale" in report.copied
    for name in report.copied:
        path = tuple(name.split("/"))
        np.testing.assert_array_equal(traverse_util.flatten_dict(params)[path],
                                      traverse_util.flatten_dict(source)[path])
    used = model.vocab.used_size
    assert used == 58498 and params["lm_head"]["kernel"].shape[1] == 58504
    np.testing.assert_array_equal(params["embed_tokens"]["embedding"][:used],
                                  source["embed_tokens"]["embedding"])
    np.testing.assert_array_equal(params["lm_head"]["bias"][used:], fresh["lm_head"]["bias"][used:])
    mlp, dense = params["layers"]["mlp"], source["layers"]["mlp"]
    np.testing.assert_array_equal(mlp["shared_wi"][:, 1], dense["fc1"]["kernel"][..., :64])
    np.testing.assert_array_equal(mlp["routed_wo"][:, 15], dense["fc2"]["kernel"][:, 232:256])
    for name in report.fresh:
        path = tuple(name.split("/"))
        np.testing.assert_array_equal(traverse_util.flatten_dict(params)[path],
                                      traverse_util.flatten_dict(fresh)[path])


@pytest.mark.parametrize("arg,field", [
    ("tiny", "model.vocab_layout"),  # the UniF2ace layout
])
def test_mismatched_vocabulary_is_one_line(showo_workdir, arg, field):
    _, model = _model(arg)
    with pytest.raises(UserError) as e:
        lib.check_compatible(load_trained(showo_workdir).model, model, showo_workdir)
    assert "\n" not in str(e.value) and field in str(e.value)


def test_mismatched_text_vocabulary_is_one_line(showo_workdir):
    config = unified_env.load_config("unif2ace_1p8b", "tiny,from_showo")
    model = build_model(config.model, text_vocab_size=50257, num_image_codes=8192, image_grid=4)
    with pytest.raises(UserError) as e:
        lib.check_compatible(load_trained(showo_workdir).model, model, showo_workdir)
    assert "\n" not in str(e.value) and "text vocabulary size is 50295" in str(e.value)
