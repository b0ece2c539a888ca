"""HF CLIPVisionModel -> Flax CLIPVisionTower: same outputs to 1e-4 on a tiny random model."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from unif2ace_jax.convert import clip_vision as conv
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders.clip_vision import load_clip_vision

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8)


def _randomise(model, seed=0):
    """Random values everywhere (LayerNorms and biases too: HF inits them to 1 / 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def _compare(hf_vision, flax_dir):
    pixels = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = hf_vision(pixel_values=torch.from_numpy(pixels))
    tower, params = load_clip_vision(flax_dir)
    out = jax.jit(lambda p, x: tower.apply({"params": p}, x))(params,
                                                             pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(out["tokens"]), ref.last_hidden_state.numpy(),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["pooled"]), ref.pooler_output.numpy(),
                               rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def hf_vision_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = _randomise(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TINY)))
    path = str(tmp_path_factory.mktemp("hf_clip_vision"))
    model.save_pretrained(path)
    return model, path


def test_converted_vision_model_matches_torch(hf_vision_dir, tmp_path):
    model, path = hf_vision_dir
    conv.convert_directory(path, str(tmp_path / "flax"))
    _compare(model, str(tmp_path / "flax"))


def test_full_clip_checkpoint_uses_its_vision_tower(tmp_path):
    cfg = transformers.CLIPConfig(
        vision_config=TINY,
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50, max_position_embeddings=8),
        projection_dim=8)
    model = _randomise(transformers.CLIPModel(cfg), seed=1)
    model.save_pretrained(str(tmp_path / "hf"))
    conv.convert_directory(str(tmp_path / "hf"), str(tmp_path / "flax"))
    _compare(model.vision_model, str(tmp_path / "flax"))


def test_mismatched_config_and_missing_dir_are_user_errors(hf_vision_dir, tmp_path):
    _, path = hf_vision_dir
    sd = conv.load_hf_state_dict(path)
    bad = conv.CLIPVisionSettings.from_dict(dict(TINY, intermediate_size=40))
    with pytest.raises(UserError, match="fc1.weight.*expected"):
        conv.convert_state_dict(sd, bad)
    sd.pop("post_layernorm.bias")
    with pytest.raises(UserError, match="lacks 'post_layernorm.bias'"):
        conv.convert_state_dict(sd, conv.CLIPVisionSettings.from_dict(TINY))
    with pytest.raises(UserError, match="not a local directory"):
        conv.convert_directory("openai/clip-vit-base-patch32", str(tmp_path))


def test_cli_converts_and_reports_errors_in_one_line(hf_vision_dir, tmp_path):
    _, path = hf_vision_dir
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = tmp_path / "cli"
    ok = subprocess.run([sys.executable, "-m", "unif2ace_jax.convert.clip_vision",
                         f"--hf_dir={path}", f"--out={out}"], capture_output=True, text=True,
                        env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    meta = json.loads((out / "clip_vision_config.json").read_text())
    assert meta["settings"]["hidden_size"] == 32
    bad = subprocess.run([sys.executable, "-m", "unif2ace_jax.convert.clip_vision",
                          f"--hf_dir={tmp_path / 'nope'}", f"--out={out}"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
