"""Tokenizer modules: shapes for both configs, Show-o name/layout mapping, logical axes, and
the pieces (space-to-depth, Show-o downsampling, encode/decode consistency) against references."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax import cli
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.tokenizer import lfq, make_tokenizer
from unif2ace_jax.models.tokenizer import magvit2
from unif2ace_jax.models.tokenizer.discriminator import make_discriminator
from unif2ace_jax.checkpoint.state import compile_init as compile_cheaply

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
    return cli.load_config(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def _abstract_shapes(model, size):
    images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    codes = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, images)
    grid = size // model.downsample_factor
    decoded = jax.eval_shape(lambda v, c: model.apply(v, c, method="decode"), variables,
                             jax.ShapeDtypeStruct((2, grid, grid), jnp.int32))
    return variables, codes, decoded


@pytest.mark.parametrize("name, size, grid, bits", [
    ("tokenizer_synthface_64", 64, 8, 10),
    ("tokenizer_magvit2_256", 256, 16, 13),
])
def test_encode_decode_shapes_of_the_configs(name, size, grid, bits):
    config = load_config(name)
    assert config.data.image_size == size and config.model.bits == bits
    model = make_tokenizer(config.model)
    assert model.codebook_size == 2 ** bits
    _, codes, decoded = _abstract_shapes(model, size)
    assert codes.shape == (2, grid, grid) and codes.dtype == jnp.int32
    assert decoded.shape == (2, size, size, 3)


def test_tiny_forward_encode_decode_consistent():
    config = load_config("tokenizer_synthface_64", "tiny")
    model = make_tokenizer(config.model)
    size = config.data.image_size
    x = jax.random.uniform(jax.random.key(1), (2, size, size, 3), minval=-1, maxval=1)
    variables = compile_cheaply(model.init, jax.random.key(0), x)(jax.random.key(0), x)
    out = compile_cheaply(model.apply, variables, x)(variables, x)
    grid = size // model.downsample_factor
    assert out["recon"].shape == x.shape
    assert out["latents"].shape == (2, grid, grid, config.model.bits)
    encode = lambda v, x: model.apply(v, x, method="encode")  # noqa: E731
    codes = compile_cheaply(encode, variables, x)(variables, x)
    np.testing.assert_array_equal(codes, lfq.latents_to_indices(out["latents"]))
    np.testing.assert_array_equal(codes, out["indices"])
    # decoding the codes gives what the forward pass reconstructs from the quantized latents
    decode = lambda v, c: model.apply(v, c, method="decode")  # noqa: E731
    decoded = compile_cheaply(decode, variables, codes)(variables, codes)
    np.testing.assert_allclose(decoded, out["recon"],
                               rtol=1e-5, atol=1e-5)
    assert codes.min() >= 0 and codes.max() < 2 ** config.model.bits


def test_every_parameter_has_logical_axis_names():
    unnormed = load_config("tokenizer_synthface_64", "tiny").model
    unnormed.num_groups = 0
    unnormed.pos_embed = True
    models = [make_tokenizer(load_config(n, "tiny").model)
              for n in ("tokenizer_synthface_64", "tokenizer_magvit2_256")]
    for model in models + [make_tokenizer(unnormed)]:
        variables, _, _ = _abstract_shapes(model, 64)
        leaves = jax.tree.leaves(variables["params"],
                                 is_leaf=lambda x: isinstance(x, nn.Partitioned))
        assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
        for leaf in leaves:
            assert len(leaf.names) == leaf.value.ndim
            assert set(leaf.names) <= {None, "conv_in", "conv_out", "norm"}
    # num_groups=0: no norm parameters; pos_embed: one [h, w, C] table per side
    variables, _, _ = _abstract_shapes(make_tokenizer(unnormed), 64)
    flat = {"/".join(str(k.key) for k in path): leaf.value.shape
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    assert not any("norm" in path for path in flat)
    grid = 64 // make_tokenizer(unnormed).downsample_factor
    assert flat["encoder/pos_embed"] == flat["decoder/pos_embed"] == (grid, grid, 16)


def _showo_torch_shapes(ch, ch_mult, nrb, dec_mult, dec_nrb, z):
    """Parameter names and shapes of Show-o's MAGVIT-v2 (PyTorch layout), written out from the
    structure of its VQGANEncoder / VQGANDecoder (taming-style ResnetBlock, AttnBlock,
    Downsample/Upsample with conv)."""
    shapes = {}

    def conv(name, cout, cin, k):
        shapes[f"{name}.weight"] = (cout, cin, k, k)
        shapes[f"{name}.bias"] = (cout,)

    def norm(name, c):
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(prefix, c):
        resblock(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for n in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{n}", c, c, 1)
        resblock(f"{prefix}.mid.block_2", c, c)

    conv("encoder.conv_in", ch, 3, 3)
    in_mult = (1,) + tuple(ch_mult)
    for i in range(len(ch_mult)):
        block_in = ch * in_mult[i]
        for j in range(nrb[i]):
            resblock(f"encoder.down.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", z, block_in, 3)
    conv("encoder.quant_conv", z, z, 1)

    block_in = ch * dec_mult[-1]
    conv("decoder.conv_in", block_in, z, 3)
    mid("decoder", block_in)
    for i in reversed(range(len(dec_mult))):
        for j in range(dec_nrb[i]):
            resblock(f"decoder.up.{i}.block.{j}", block_in, ch * dec_mult[i])
            block_in = ch * dec_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in, 3)
    conv("decoder.post_quant_conv", z, z, 1)
    return shapes


def _torch_to_flax(name, shape):
    """The documented mapping: `down.{i}` -> `down_{i}`, `block.{j}` -> `block_{j}`,
    conv weight [O,I,kh,kw] -> kernel [kh,kw,I,O], norm weight -> scale."""
    parts = name.split(".")
    out = []
    i = 0
    while i < len(parts):
        if parts[i] in ("down", "up", "block") and i + 1 < len(parts) and parts[i + 1].isdigit():
            out.append(f"{parts[i]}_{parts[i + 1]}")
            i += 2
        else:
            out.append(parts[i])
            i += 1
    leaf = out[-1]
    if leaf == "weight" and len(shape) == 4:
        out[-1], shape = "kernel", (shape[2], shape[3], shape[1], shape[0])
    elif leaf == "weight":
        out[-1] = "scale"
    return "/".join(out), tuple(shape)


def test_256_config_matches_showo_parameter_names_and_layouts():
    config = load_config("tokenizer_magvit2_256")
    m = config.model
    model = make_tokenizer(m)
    variables, _, _ = _abstract_shapes(model, 256)
    ours = {"/".join(str(k.key) for k in path): tuple(leaf.value.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(
                variables["params"], is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
    expected = dict(_torch_to_flax(n, s) for n, s in _showo_torch_shapes(
        m.ch, m.ch_mult, m.num_res_blocks, m.decoder_ch_mult, m.decoder_num_res_blocks,
        m.bits).items())
    assert ours == expected
    # Show-o's tokenizer has ~ 100M+ parameters at this geometry; a sanity bound on our count
    assert sum(int(np.prod(s)) for s in ours.values()) > 50_000_000


def test_space_to_depth_matches_loop_and_inverts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 4, 6, 3)).astype(np.float32)
    y = np.asarray(magvit2.space_to_depth(jnp.asarray(x), 2))
    assert y.shape == (2, 2, 3, 12)
    for i in range(2):
        for j in range(3):
            for di in range(2):
                for dj in range(2):
                    c0 = (di * 2 + dj) * 3
                    np.testing.assert_array_equal(y[:, i, j, c0:c0 + 3], x[:, 2 * i + di, 2 * j + dj])
    np.testing.assert_array_equal(magvit2.depth_to_space(jnp.asarray(y), 2), x)


def test_downsample_matches_showo_padding():
    """pad one zero row/column at the bottom/right, then a 3x3 stride-2 valid conv."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
    module = magvit2.Downsample("conv")
    variables = compile_cheaply(module.init, jax.random.key(0), x)(jax.random.key(0), x)
    kernel = np.asarray(nn.unbox(variables)["params"]["conv"]["kernel"])  # [3,3,in,out]
    bias = np.asarray(nn.unbox(variables)["params"]["conv"]["bias"])
    padded = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    ref = np.zeros((1, 3, 3, 2), np.float32)
    for i in range(3):
        for j in range(3):
            patch = padded[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3, :]
            ref[0, i, j] = np.einsum("hwc,hwco->o", patch, kernel) + bias
    np.testing.assert_allclose(module.apply(variables, jnp.asarray(x)), ref, rtol=1e-5, atol=1e-5)
    pooled = magvit2.Downsample("avgpool").apply({}, jnp.asarray(x))
    np.testing.assert_allclose(pooled, x.reshape(1, 3, 2, 3, 2, 2).mean((2, 4)), rtol=1e-6)


def test_bad_model_configs_are_user_errors():
    config = load_config("tokenizer_synthface_64", "tiny")
    bad = config.model.copy_and_resolve_references()
    bad.num_groups = 3
    with pytest.raises(UserError, match="num_groups"):
        make_tokenizer(bad)
    bad = config.model.copy_and_resolve_references()
    bad.name = "vqgan9000"
    with pytest.raises(UserError, match="unknown tokenizer"):
        make_tokenizer(bad)


def test_discriminator_patch_logits():
    config = load_config("tokenizer_synthface_64", "tiny")
    disc = make_discriminator(config.discriminator)
    x = jnp.zeros((2, 32, 32, 3))
    variables = compile_cheaply(disc.init, jax.random.key(0), x)(jax.random.key(0), x)
    logits = compile_cheaply(disc.apply, variables, x)(variables, x)
    # two stride-2 layers (32 -> 8), then two stride-1 4x4 convs with padding 1 (8 -> 7 -> 6)
    assert logits.shape == (2, 6, 6)
