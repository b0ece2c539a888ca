"""Show-o MAGVIT-v2 -> tokenizer workdir, against Show-o's own PyTorch outputs.

The golden fixture (``shared/fixtures/showo/magvit2``, beside the repository; see its README)
is a small random checkpoint in the released layout plus what Show-o's code computed from it:
latents after ``quant_conv`` (NHWC), codes, decoded floats and uint8 pixels. Set
``UNIF2ACE_SHARED`` to the folder that holds ``fixtures/`` when it lives elsewhere.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.convert import magvit2 as conv
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.tokenizer.magvit2 import images_to_model, model_to_images
from unif2ace_jax.models.tokenizer.pretrained import CONFIG_FILE, PARAMS_FILE, load_tokenizer

import showo_fixtures

ROOT = showo_fixtures.ROOT
FIXTURE = showo_fixtures.path("magvit2")
CLEAR = 1e-3  # codes are compared where every latent channel is at least this far from 0


@pytest.fixture(scope="module")
def golden():
    return showo_fixtures.golden("magvit2")


@pytest.fixture(scope="module")
def state_dict(golden):
    return conv.read_checkpoint(FIXTURE)


@pytest.fixture(scope="module")
def workdir(golden, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("magvit2") / "tok")
    conv.convert_directory(FIXTURE, out, image_size=32)
    return out


def test_geometry_is_inferred_from_the_weights(state_dict):
    g = conv.infer_geometry(state_dict)
    assert (g.ch, g.ch_mult, g.num_res_blocks) == (32, (1, 2, 2), (1, 2, 1))
    assert (g.decoder_ch_mult, g.decoder_num_res_blocks) == ((1, 1, 2), (2, 1, 1))
    assert (g.bits, g.mid_attention, g.quant_conv) == (6, True, True)


def test_latents_and_codes_match_showo(golden, workdir):
    tok = load_tokenizer(workdir)
    x = images_to_model(jnp.asarray(golden["images"]))
    latents = np.asarray(jax.jit(lambda p, x: tok.model.apply(
        {"params": p}, x, method=lambda m, x: m.encoder(x)))(tok.params, x))
    ref = golden["latents"]
    assert latents.shape == ref.shape
    print("max |latents - Show-o|:", np.abs(latents - ref).max())
    np.testing.assert_allclose(latents, ref, rtol=1e-4, atol=1e-4)
    codes = tok.encode(golden["images"])
    clear = np.abs(ref).min(-1) > CLEAR
    assert clear.mean() > 0.9  # the comparison below covers almost every position
    np.testing.assert_array_equal(codes[clear], golden["codes"][clear])


def test_decoded_images_match_showo(golden, workdir):
    tok = load_tokenizer(workdir)
    decoded = np.asarray(jax.jit(lambda p, c: tok.model.apply(
        {"params": p}, c, method="decode"))(tok.params, jnp.asarray(golden["codes"])))
    print("max |decoded - Show-o|:", np.abs(decoded - golden["decoded"]).max())
    np.testing.assert_allclose(decoded, golden["decoded"], rtol=0, atol=1e-4)
    pixels = tok.decode(golden["codes"])
    assert pixels.dtype == np.uint8 and pixels.shape == golden["decoded_uint8"].shape
    diff = np.abs(pixels.astype(int) - golden["decoded_uint8"].astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_workdir_loads_and_round_trips(golden, workdir):
    assert sorted(os.listdir(workdir)) == sorted([CONFIG_FILE, PARAMS_FILE])
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
        model_cfg = json.load(f)["config"]["model"]
    assert model_cfg["pixel_rounding"] == "truncate" and model_cfg["num_groups"] == 32
    tok = load_tokenizer(workdir)
    assert (tok.image_size, tok.grid_size, tok.codebook_size) == (32, 8, 64)
    codes, recon = tok.reconstruct(golden["images"])
    assert codes.shape == (3, 8, 8) and codes.dtype == np.int32
    assert recon.shape == golden["images"].shape and recon.dtype == np.uint8
    assert 0 <= codes.min() and codes.max() < 64


def test_pixel_rounding_truncates_like_showo():
    x = jnp.asarray([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    np.testing.assert_array_equal(model_to_images(x, "truncate"), [0, 0, 127, 254, 255, 255])
    np.testing.assert_array_equal(model_to_images(x), [0, 0, 128, 255, 255, 255])


def test_geometry_without_mid_attention_or_quant_conv(state_dict):
    sd = {k: v for k, v in state_dict.items()
          if ".mid.attn_1." not in k and "quant_conv" not in k}
    g = conv.infer_geometry(sd)
    assert not g.mid_attention and not g.quant_conv
    params = conv.convert_state_dict(sd, conv.model_config(g, 32))
    assert "attn_1" not in params["encoder"]["mid"] and "quant_conv" not in params["encoder"]
    one_sided = {k: v for k, v in state_dict.items() if not k.startswith("decoder.mid.attn_1.")}
    with pytest.raises(UserError, match="only the encoder has mid attention"):
        conv.infer_geometry(one_sided)


def _write_checkpoint(path, sd):
    from safetensors.numpy import save_file

    os.makedirs(path)
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
              os.path.join(path, conv.WEIGHTS_FILE))


def _broken(state_dict, case):
    sd = dict(state_dict)
    if case == "missing":
        del sd["encoder.down.1.block.1.norm2.bias"]
        return sd, "encoder.down.1.block.1.norm2.bias"
    if case == "extra":
        sd["encoder.down.0.attn.0.q.weight"] = np.zeros((32, 32, 1, 1), np.float32)
        return sd, "encoder.down.0.attn.0.q.weight"
    if case == "shape":
        sd["decoder.up.1.block.0.nin_shortcut.weight"] = np.zeros((32, 64, 3, 3), np.float32)
        return sd, "decoder.up.1.block.0.nin_shortcut.weight"
    if case == "geometry":
        del sd["encoder.conv_in.weight"]
        return sd, "encoder.conv_in.weight"
    assert case == "bit_order"
    sd["quantize.power_vals"] = sd["quantize.power_vals"][::-1].copy()
    return sd, "quantize.power_vals"


@pytest.mark.parametrize("case", ["missing", "extra", "shape", "geometry", "bit_order"])
def test_bad_tensor_is_a_user_error_naming_it(state_dict, tmp_path, case):
    sd, name = _broken(state_dict, case)
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    _write_checkpoint(ckpt, sd)
    with pytest.raises(UserError, match=name.replace(".", r"\.")):
        conv.convert_directory(ckpt, out, image_size=32)
    assert not os.path.exists(out)


def _child_env():
    """This repository's package first on the path of a CLI subprocess, on the CPU."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)


@pytest.mark.parametrize("case", ["no_file", "missing"])
def test_cli_prints_one_line_and_writes_nothing(state_dict, tmp_path, case):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    if case == "no_file":
        os.makedirs(ckpt)
        name = conv.WEIGHTS_FILE
    else:
        sd, name = _broken(state_dict, case)
        _write_checkpoint(ckpt, sd)
    env = _child_env()
    proc = subprocess.run([sys.executable, "-m", "unif2ace_jax.convert.magvit2",
                           f"--checkpoint={ckpt}", f"--out={out}", "--image_size=32"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], proc.stderr
    assert not os.path.exists(out)


def test_cli_converts_the_fixture(golden, tmp_path):
    out = str(tmp_path / "tok")
    env = _child_env()
    proc = subprocess.run([sys.executable, "-m", "unif2ace_jax.convert.magvit2",
                           f"--checkpoint={FIXTURE}", f"--out={out}", "--image_size=32"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "6 bits" in proc.stdout
    pixels = load_tokenizer(out).decode(golden["codes"]).astype(int)
    assert np.abs(pixels - golden["decoded_uint8"]).max() <= 1


def test_showo_release_geometry_is_inferred():
    """Show-o's released geometry, from zero-cost stand-ins with the released names and shapes."""
    real = conv.Geometry(ch=128, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=(4, 3, 4, 3, 4),
                         decoder_ch_mult=(1, 1, 2, 2, 4), decoder_num_res_blocks=(4, 4, 3, 4, 3),
                         bits=13, mid_attention=True, quant_conv=True)
    expected = conv._expected_params(conv.model_config(real, 256))
    zero = np.zeros((), np.float32)
    sd = {conv._torch_name(path): np.broadcast_to(zero, conv._torch_shape(shape))
          for path, shape in expected.items()}
    assert "encoder.down.4.block.3.conv2.weight" in sd and "decoder.up.0.block.3.norm1.bias" in sd
    assert sd["decoder.up.1.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert conv.infer_geometry(sd) == real
