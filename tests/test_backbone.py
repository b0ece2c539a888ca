"""Backbone: shapes, Phi math vs numpy, scan == unrolled, logical names, remat, slots."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.backbone import (SEQ_MOE_SLOTS, build_backbone,
                                          default_config as default_model_config,
                                          image_token_index,
                                          stack_layer_params, unstack_layer_params)
from unif2ace_jax.models.ffn import FFN_SLOTS
from unif2ace_jax.models.masks import omni_attention_mask
from unif2ace_jax.models.remat import REMAT_POLICIES
from unif2ace_jax.models.sequences import build_sequences
from unif2ace_jax.models.vocab import Vocab

VOCAB = Vocab(text_size=60, num_image_codes=32)  # size 100
LOGICAL_NAMES = {"vocab", "embed", "heads", "kv", "mlp", "exp", "layers", "norm"}


def _config(**overrides):
    c = default_model_config()
    c.d_model, c.num_heads, c.num_layers = 32, 4, 2
    c.ffn.hidden = 64
    c.init_std = 0.2
    c.update(overrides)
    return c


def _inputs():
    rng = np.random.default_rng(0)
    batch = dict(task=np.array([0, 1, 2]), text=rng.integers(0, 60, (3, 4)),
                 text_len=np.array([3, 2, 4]), answer=rng.integers(0, 60, (3, 2)),
                 answer_len=np.array([0, 2, 0]), image_codes=rng.integers(0, 33, (3, 4)))
    s = build_sequences(batch, VOCAB)  # L = 4 + 2 + 4 + 5 = 15
    return dict(tokens=s["tokens"], mask=omni_attention_mask(s["is_pad"], s["image_span"]),
                positions=s["positions"], group=s["group"], valid=s["valid"]), s


def _call_kwargs(inp):
    return {k: inp[k] for k in ("mask", "positions", "group", "valid")}


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
    static = ("mutable", "return_hidden", "deterministic") if method == "apply" else ()
    return jax.jit(getattr(model, method), static_argnames=static)


def _real_init(model, inp, seed=0):
    return _jitted(model, "init")(jax.random.key(seed), inp["tokens"], **_call_kwargs(inp))


def _abstract(model, inp, **kwargs):
    """`model.init`'s output as shapes/dtypes (boxes kept), without compiling anything."""
    return jax.eval_shape(lambda k: model.init(k, inp["tokens"], **_call_kwargs(inp), **kwargs),
                          jax.random.key(0))


def _init(model, inp, seed=0, **kwargs):
    """Boxed variables of `model.init`'s structure filled from numpy (no init compile).

    Matrices ~ N(0, 0.2²), LayerNorm scales 1 + N(0, 0.1²), other vectors N(0, 0.1²).
    """
    rng = np.random.default_rng(seed)
    abstract = _abstract(model, inp, **kwargs)

    def fill(path, x):
        is_box = isinstance(x, nn.LogicallyPartitioned)
        shape = (x.value if is_box else x).shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) - (1 if "layers" in jax.tree_util.keystr(path) else 0) >= 2:
            value = 0.2 * noise
        elif jax.tree_util.keystr(path).endswith("['scale']"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        value = jnp.asarray(value)
        return x.replace(value=value) if is_box else value

    params = jax.tree_util.tree_map_with_path(
        fill, abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    return {"params": params}


def _apply(model, variables, inp, **kwargs):
    """Jitted forward (one compile instead of many eager op compiles), cached per model."""
    return _jitted(model, "apply")(variables, inp["tokens"], **_call_kwargs(inp), **kwargs)


@pytest.fixture(scope="module")
def inputs():
    return _inputs()[0]


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_init_and_forward_shapes(inputs, style):
    model = build_backbone(_config(block_style=style), VOCAB)
    variables = _real_init(model, inputs)
    logits = _apply(model, variables, inputs)
    assert logits.shape == (3, 15, VOCAB.size) and logits.dtype == jnp.float32
    layer = nn.unbox(variables["params"])["layers"]
    assert layer["self_attn"]["q_proj"]["kernel"].shape == (2, 32, 4, 8)
    assert ("post_attention_layernorm" in layer) == (style == "sequential")
    assert np.isfinite(np.asarray(logits)).all()


# ---------------------------------------------------------------------------------------------
# Independent numpy reference of the Phi model.

def _np_ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_rotary(x, pos, rd, theta=1e4):
    half = rd // 2
    ang = pos[..., None] * theta ** (-2.0 * np.arange(half) / rd)  # [B, L, half]
    c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
    a, b = x[..., :half], x[..., half:rd]
    return np.concatenate([a * c - b * s, b * c + a * s, x[..., rd:]], -1)


def _np_attention(h, p, mask, pos, rd):
    q, k, v = (np.einsum("bld,dhk->blhk", h, p[n]["kernel"]) + p[n]["bias"]
               for n in ("q_proj", "k_proj", "v_proj"))
    q, k = _np_rotary(q, pos, rd), _np_rotary(k, pos, rd)
    s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    s = np.where(mask[:, None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ctx = np.einsum("bhqs,bshk->bqhk", w, v)
    return np.einsum("bqhk,hkd->bqd", ctx, p["dense"]["kernel"]) + p["dense"]["bias"]


def _np_mlp(h, p):
    u = h @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    u = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u ** 3)))
    return u @ p["fc2"]["kernel"] + p["fc2"]["bias"]


def _np_model(params, inp, style, num_layers, rd):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    mask, pos = np.asarray(inp["mask"]), np.asarray(inp["positions"])
    x = p["embed_tokens"]["embedding"][np.asarray(inp["tokens"])]
    for i in range(num_layers):
        lp = jax.tree.map(lambda a: a[i], p["layers"])
        h = _np_ln(x, lp["input_layernorm"])
        if style == "parallel":
            x = x + _np_attention(h, lp["self_attn"], mask, pos, rd) + _np_mlp(h, lp["mlp"])
        else:
            x = x + _np_attention(h, lp["self_attn"], mask, pos, rd)
            x = x + _np_mlp(_np_ln(x, lp["post_attention_layernorm"]), lp["mlp"])
    x = _np_ln(x, p["final_layernorm"])
    return x @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_matches_numpy_phi(inputs, style):
    model = build_backbone(_config(block_style=style), VOCAB)
    params = nn.unbox(_init(model, inputs))
    got = _apply(model, params, inputs)
    want = _np_model(params["params"], inputs, style, 2, rd=4)
    valid = np.asarray(inputs["valid"])
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=2e-4, rtol=2e-4)


def test_scan_equals_unrolled(inputs):
    scanned = build_backbone(_config(scan_layers=True), VOCAB)
    unrolled = build_backbone(_config(scan_layers=False), VOCAB)
    params = nn.unbox(_init(scanned, inputs))
    flat = {"params": unstack_layer_params(params["params"], 2)}
    assert "layers_1" in flat["params"] and "layers" not in flat["params"]
    a = _apply(scanned, params, inputs)
    b = _apply(unrolled, flat, inputs)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # Boxed unrolled params restack into exactly the scanned tree (names and shapes).
    def init_fn(model, post):
        return lambda key: post(model.init(key, inputs["tokens"], **_call_kwargs(inputs))["params"])
    restacked = jax.eval_shape(init_fn(unrolled, lambda p: stack_layer_params(p, 2)),
                               jax.random.key(0))
    boxed_scanned = jax.eval_shape(init_fn(scanned, lambda p: p), jax.random.key(0))
    spec = lambda t: jax.tree.map(lambda x: (x.names, x.value.shape), t,
                                  is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert spec(restacked) == spec(boxed_scanned)


@pytest.mark.parametrize("style", ["parallel", "sequential"])
def test_every_param_has_logical_names(inputs, style):
    model = build_backbone(_config(block_style=style), VOCAB)
    boxed = _abstract(model, inputs)["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 5 + 14 + (2 if style == "sequential" else 0)
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= LOGICAL_NAMES, leaf.names
        assert leaf.value.dtype == jnp.float32


def _loss_fn(model, inp, s):
    def loss(params):
        logits = model.apply(params, inp["tokens"], **_call_kwargs(inp))
        logp = jax.nn.log_softmax(logits)
        nll = -jnp.take_along_axis(logp, s["targets"][..., None], -1)[..., 0]
        return jnp.sum(nll * s["target_weights"]) + 1e-3 * jnp.sum(logits ** 2)
    return jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def remat_reference():
    inp, s = _inputs()
    model = build_backbone(_config(remat_policy="none"), VOCAB)
    params = nn.unbox(_init(model, inp))
    return inp, s, params, _loss_fn(model, inp, s)(params)


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_remat_policies_same_loss_and_grads(remat_reference, policy):
    inp, s, params, (loss0, grads0) = remat_reference
    model = build_backbone(_config(remat_policy=policy), VOCAB)
    loss, grads = _loss_fn(model, inp, s)(params)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(g0), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Slots: the FFN gets group/valid and can sow aux losses; the seq-MoE hook gets features.

class _ProbeFFN(nn.Module):
    @nn.compact
    def __call__(self, x, *, group, valid):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",))
        w = self.param("w", init, (x.shape[-1],))
        self.sow("aux_loss", "probe", jnp.sum(valid).astype(jnp.float32))
        return group[..., None].astype(x.dtype) * w


class _ProbeSeqMoE(nn.Module):
    @nn.compact
    def __call__(self, h, *, group, valid, features):
        init = nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",))
        w = self.param("w", init, (h.shape[-1],))
        return features["bias"][:, None, None] * w * valid[..., None]


if "test_probe" not in FFN_SLOTS:
    FFN_SLOTS.register("test_probe")(lambda cfg, *, d_model, dtype, param_dtype, name=None:
                                     _ProbeFFN(name=name))
if "test_probe" not in SEQ_MOE_SLOTS:
    SEQ_MOE_SLOTS.register("test_probe")(lambda cfg, *, d_model, dtype, param_dtype, name=None:
                                         _ProbeSeqMoE(name=name))


@pytest.mark.parametrize("scan", [True, False])
def test_ffn_slot_gets_group_and_sows_aux(inputs, scan):
    model = build_backbone(_config(ffn=ml_collections.ConfigDict({"name": "test_probe"}),
                                   scan_layers=scan), VOCAB)
    variables = _init(model, inputs)
    logits, state = _apply(model, variables, inputs, mutable=("aux_loss",))
    aux = jax.tree.leaves(state["aux_loss"])
    n_valid = float(np.asarray(inputs["valid"]).sum())
    assert sum(float(jnp.sum(a)) for a in aux) == pytest.approx(2 * n_valid)  # 2 layers
    flipped = dict(inputs, group=1 - inputs["group"])
    other = _apply(model, variables, flipped)
    assert np.abs(np.asarray(other) - np.asarray(logits)).max() > 1e-3


def test_seq_moe_hook_receives_features(inputs):
    model = build_backbone(_config(block_style="sequential",
                                   seq_moe=ml_collections.ConfigDict({"name": "test_probe"})),
                           VOCAB)
    feats = {"bias": jnp.zeros((3,))}
    variables = _init(model, inputs, features=feats)
    params = nn.unbox(variables)["params"]["layers"]
    assert "seq_moe" in params and "seq_moe_layernorm" in params
    base = _apply(model, variables, inputs, features=feats)
    moved = _apply(model, variables, inputs, features={"bias": jnp.array([0.0, 1.0, 0.0])})
    diff = np.abs(np.asarray(moved) - np.asarray(base)).max(axis=(1, 2))
    assert diff[0] == 0 and diff[2] == 0 and diff[1] > 1e-3


def test_bf16_compute_keeps_fp32_params_and_logits(inputs):
    model = build_backbone(_config(dtype="bfloat16"), VOCAB)
    abstract = nn.unbox(_abstract(model, inputs))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(abstract))
    variables = _init(model, inputs)
    logits = _apply(model, variables, inputs)
    ref = _apply(build_backbone(_config(), VOCAB), variables, inputs)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.1)


def test_bad_config():
    with pytest.raises(UserError, match="block_style"):
        build_backbone(_config(block_style="diagonal"), VOCAB)
    with pytest.raises(UserError, match="remat_policy"):
        build_backbone(_config(remat_policy="sometimes"), VOCAB)
    with pytest.raises(UserError, match="ffn"):
        build_backbone(_config(ffn=ml_collections.ConfigDict({"name": "nope"})), VOCAB)
    with pytest.raises(UserError, match="dtype"):
        build_backbone(_config(dtype="float8"), VOCAB)


def test_hidden_then_logits_equals_full_logits(inputs):
    from unif2ace_jax.models.backbone import Backbone
    model = build_backbone(_config(), VOCAB)
    variables = _init(model, inputs)
    hidden = _apply(model, variables, inputs, return_hidden=True)
    assert hidden.shape == (3, 15, 32)
    logits = model.apply(variables, hidden, method=Backbone.logits)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(_apply(model, variables, inputs)),
                               atol=1e-6)


@pytest.mark.parametrize("policy", ["none", "full"])
def test_dropout_active_only_when_not_deterministic(inputs, policy):
    model = build_backbone(_config(dropout_rate=0.5, remat_policy=policy), VOCAB)
    variables = _init(model, inputs)
    fwd = jax.jit(model.apply, static_argnames=("deterministic",))
    kw = dict(_call_kwargs(inputs))
    base = fwd(variables, inputs["tokens"], **kw)
    a = fwd(variables, inputs["tokens"], **kw, deterministic=False,
            rngs={"dropout": jax.random.key(1)})
    b = fwd(variables, inputs["tokens"], **kw, deterministic=False,
            rngs={"dropout": jax.random.key(1)})
    c = fwd(variables, inputs["tokens"], **kw, deterministic=False,
            rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(base)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_image_token_index_on_a_hand_written_case():
    off, k = VOCAB.image_offset, VOCAB.num_image_codes
    tokens = jnp.array([[3, off, off + k, off + 5, 7],     # code, [MASK], code
                        [off + 1, 2, off + k - 1, 0, off - 1]])
    is_image, place = image_token_index(tokens, off, k)
    np.testing.assert_array_equal(np.asarray(is_image), [[0, 1, 1, 1, 0], [1, 0, 1, 0, 0]])
    np.testing.assert_array_equal(np.asarray(place), [[0, 0, 1, 2, 0], [0, 0, 1, 0, 0]])


def test_image_position_embedding_adds_one_row_per_image_place(inputs):
    """With the table zeroed the model is the plain one; row i moves only what place i feeds."""
    with_pos = build_backbone(_config(image_position_embedding=True), VOCAB, num_image_tokens=4)
    params = nn.unbox(_init(with_pos, inputs)["params"])
    assert params["embed_image_positions"]["embedding"].shape == (4, 32)
    plain = build_backbone(_config(), VOCAB)
    base = {k: v for k, v in params.items() if k != "embed_image_positions"}
    zeroed = dict(params, embed_image_positions={"embedding": jnp.zeros((4, 32))})
    ref = np.asarray(_apply(plain, {"params": base}, inputs))
    np.testing.assert_allclose(np.asarray(_apply(with_pos, {"params": zeroed}, inputs)), ref,
                               rtol=1e-5, atol=1e-5)
    # The same shift added to every image token's embedding row == a table of equal rows.
    shift = np.random.default_rng(3).normal(size=(32,)).astype(np.float32)
    table = np.array(base["embed_tokens"]["embedding"])
    table[VOCAB.image_offset:VOCAB.image_offset + VOCAB.num_image_codes + 1] += shift
    shifted = dict(base, embed_tokens={"embedding": jnp.asarray(table)})
    same_rows = dict(params, embed_image_positions={"embedding": jnp.tile(shift, (4, 1))})
    np.testing.assert_allclose(np.asarray(_apply(with_pos, {"params": same_rows}, inputs)),
                               np.asarray(_apply(plain, {"params": shifted}, inputs)),
                               rtol=1e-4, atol=1e-4)
    # Distinct rows are not a token-table change: the output differs from the plain model's.
    assert np.abs(np.asarray(_apply(with_pos, {"params": params}, inputs)) - ref).max() > 1e-3
    with pytest.raises(UserError, match="image_position_embedding"):
        build_backbone(_config(image_position_embedding=True), VOCAB)


def test_bit_embedding_equals_a_table_with_the_bits_folded_in(inputs):
    """``table+bits`` == ``table`` whose image-code rows gain ``W_bits @ (±1 bits of c)``."""
    with_bits = build_backbone(_config(image_code_embedding="table+bits"), VOCAB)
    variables = _init(with_bits, inputs)
    params = nn.unbox(variables["params"])
    w_bits = np.asarray(params["embed_code_bits"]["kernel"])  # [5, D]: K = 32 -> 5 bits
    assert w_bits.shape == (5, 32)
    codes = np.arange(VOCAB.num_image_codes)
    bits = 2.0 * ((codes[:, None] >> np.arange(4, -1, -1)[None, :]) & 1) - 1.0  # big-endian
    table = np.array(params["embed_tokens"]["embedding"])
    table[VOCAB.image_offset + codes] += bits @ w_bits  # [MASK] and text rows unchanged
    folded = {k: v for k, v in params.items() if k != "embed_code_bits"}
    folded["embed_tokens"] = {"embedding": jnp.asarray(table)}
    plain = build_backbone(_config(), VOCAB)
    np.testing.assert_allclose(np.asarray(_apply(with_bits, {"params": params}, inputs)),
                               np.asarray(_apply(plain, {"params": folded}, inputs)),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match="image_code_embedding"):
        build_backbone(_config(image_code_embedding="bits"), VOCAB)
    with pytest.raises(UserError, match="power-of-two"):
        build_backbone(_config(image_code_embedding="table+bits"),
                       Vocab(text_size=60, num_image_codes=24))
