"""Show-o / Phi checkpoint -> unified-model workdir, against Show-o's own PyTorch outputs.

The golden fixture (``shared/fixtures/showo/showo``, beside the repository; see its README) is a
tiny random Show-o checkpoint (QK-LayerNorm Phi, Show-o's vocabulary of 58498 ids) plus the
logits and greedy tokens Show-o's code computed from it. Set ``UNIF2ACE_SHARED`` to the folder
that holds ``fixtures/`` when it lives elsewhere. A second check converts a plain Hugging Face
Phi written by ``transformers`` and compares with ``PhiForCausalLM``.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.convert import showo as conv
from unif2ace_jax.errors import UserError

import showo_fixtures

ROOT = showo_fixtures.ROOT
FIXTURE = showo_fixtures.path("showo")
RTOL = 1e-4  # max |ours - Show-o| / max |Show-o|
N_IMAGE = 16  # num_vq_tokens of the fixture
CODE0 = 50305  # Show-o id of image code 0


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def golden():
    return showo_fixtures.golden("showo")


@pytest.fixture(scope="module")
def workdir(golden, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("showo") / "run")
    conv.convert_directory(FIXTURE, out)
    return out


@pytest.fixture(scope="module")
def model(workdir):
    return conv.load_showo(workdir)


def test_workdir_is_a_trained_run_in_showo_layout(workdir):
    trained = load_trained(workdir)
    m = trained.model
    assert m.backbone.qk_layernorm and m.position_mode == "absolute"
    v = m.vocab
    assert (v.size, v.text_size, v.num_image_codes, m.image_grid) == (58498, 50295, 8192, 4)
    assert (v.pad_id, v.soi_id, v.eoi_id, v.t2i_id, v.mmu_id) == (50295, 50296, 50297, 50300,
                                                                  50301)
    assert (v.bos_id, v.eos_id, v.image_offset, v.mask_id) == (50256, 50256, CODE0, 58497)
    attn = trained.params["layers"]["self_attn"]
    assert attn["q_layernorm"]["scale"].shape == (2, 16)
    assert attn["q_proj"]["kernel"].shape == (2, 64, 4, 16)
    with open(os.path.join(workdir, "run.json")) as f:
        assert json.load(f)["converted_from"] == "showo"


def test_t2i_image_logits_match_showo(golden, model):
    logits = model.logits(golden["t2i_ids"], golden["t2i_attend"])
    assert logits.dtype == np.float32 and logits.shape == golden["t2i_ids"].shape + (58498,)
    image = logits[:, -(N_IMAGE + 1):-1, CODE0:-1]
    err = _rel(image, golden["t2i_image_logits"])
    print("T2I image logits, max relative error:", err)
    assert err < RTOL
    s, n = float(golden["guidance"]), int(golden["num_t2i_cond"])
    guided = (1 + s) * image[:n] - s * image[n:]
    err = _rel(guided, golden["t2i_guided"])
    print("guided logits, max relative error:", err)
    assert err < RTOL


def test_mmu_logits_match_showo(golden, model):
    logits = model.logits(golden["mmu_ids"], golden["mmu_attend"])[:, -4:]
    err = _rel(logits, golden["mmu_text_logits"])
    print("MMU logits, max relative error:", err)
    assert err < RTOL


def test_greedy_text_matches_showo(golden, model):
    ids, attend, ref = golden["mmu_ids"], golden["mmu_attend"], golden["mmu_greedy"]
    for row in range(ids.shape[0]):  # Show-o's mmu_generate runs batch 1
        got = model.greedy_text(ids[row:row + 1], attend[row:row + 1], ref.shape[1])
        np.testing.assert_array_equal(got[0], ref[row])
    np.testing.assert_array_equal(model.greedy_text(ids, attend, ref.shape[1]), ref)


# ---------------------------------------------------------------------------------------------
# A plain Hugging Face Phi


def test_plain_phi_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PhiConfig(
        vocab_size=51200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, partial_rotary_factor=0.5, hidden_act="gelu_new",
        max_position_embeddings=64, tie_word_embeddings=False)
    hf = transformers.PhiForCausalLM(config).eval()
    with torch.no_grad():
        for p in hf.parameters():  # random biases and norms too
            p.normal_(0.0, 0.3)
    ckpt, out = str(tmp_path / "phi"), str(tmp_path / "run")
    hf.save_pretrained(ckpt, safe_serialization=True)
    source = conv.convert_directory(ckpt, out)
    assert source.kind == "phi" and not source.qk_layernorm
    ids = np.random.default_rng(0).integers(0, 50295, size=(2, 12))
    with torch.no_grad():
        ref = hf(torch.as_tensor(ids)).logits.float().numpy()
    ours = conv.load_showo(out)
    v = ours.vocab
    assert (v.size, v.text_size, v.pad_id, v.image_offset, v.mask_id) == (
        51200, 50295, 50295, CODE0, 51199)
    causal = np.broadcast_to(np.tril(np.ones((12, 12), bool)), (2, 12, 12))
    err = _rel(ours.logits(ids, causal), ref)
    print("plain Phi logits vs transformers, max relative error:", err)
    assert err < RTOL


# ---------------------------------------------------------------------------------------------
# Bad checkpoints


def _broken_checkpoint(path: str, case: str) -> str:
    """A copy of the fixture broken as `case`; returns the name the error must carry."""
    from safetensors.numpy import load_file, save_file

    os.makedirs(path)
    shutil.copy(os.path.join(FIXTURE, "config.json"), path)
    shutil.copytree(os.path.join(FIXTURE, "phi"), os.path.join(path, "phi"))
    if case == "no_file":
        return conv.SHOWO_WEIGHTS
    sd = load_file(os.path.join(FIXTURE, conv.SHOWO_WEIGHTS))
    name = "showo.model.layers.1.self_attn.k_layernorm.bias"
    if case == "missing":
        del sd[name]
    elif case == "extra":
        name = "showo.model.layers.0.self_attn.rotary_emb.inv_freq"
        sd[name] = np.zeros((4,), np.float32)
    else:
        assert case == "shape"
        name = "showo.model.layers.0.mlp.fc1.weight"
        sd[name] = np.zeros((128, 64), np.float32)
    save_file(sd, os.path.join(path, conv.SHOWO_WEIGHTS))
    return name


def _child_env():
    """This repository's package first on the path of a CLI subprocess, on the CPU."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)


@pytest.mark.parametrize("case", ["no_file", "missing", "extra", "shape"])
def test_bad_checkpoint_prints_one_line_and_writes_nothing(golden, tmp_path, case):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    name = _broken_checkpoint(ckpt, case)
    proc = subprocess.run([sys.executable, "-m", "unif2ace_jax.convert.showo",
                           f"--checkpoint={ckpt}", f"--out={out}"],
                          env=_child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], proc.stderr
    assert not os.path.exists(out) and os.listdir(tmp_path) == ["ckpt"]


def test_existing_out_is_refused(golden, tmp_path):
    with pytest.raises(UserError, match="already exists"):
        conv.convert_directory(FIXTURE, str(tmp_path))
