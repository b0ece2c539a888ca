"""Pre-tokenisation: a new TFDS dataset = original records + the tokenizer's image codes."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from unif2ace_jax import cli
from unif2ace_jax.data import records
from unif2ace_jax.data.build import build_dataset
from unif2ace_jax.data.pretokenize import CODES_FIELD, pretokenize
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.tokenizer import make_tokenizer
from unif2ace_jax.models.tokenizer.pretrained import TrainedTokenizer, load_tokenizer, save_tokenizer
from unif2ace_jax.checkpoint.state import compile_init as compile_cheaply

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _export_tokenizer(workdir, seed):
    """An untrained (randomly initialised) 64 px tokenizer, exported like the trainer does."""
    config = cli.load_config(os.path.join(ROOT, "configs", "tokenizer_synthface_64.py"), "tiny")
    config.data.image_size = 64
    model = make_tokenizer(config.model)
    x = np.zeros((1, 64, 64, 3), np.float32)
    key = jax.random.key(seed)
    params = nn.meta.unbox(compile_cheaply(model.init, key, x)(key, x)["params"])
    save_tokenizer(workdir, config, params, step=7)
    return workdir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("src"))
    build_dataset("synthface", src, num_train=5, num_test=3, num_heldout=2)
    tok_dir = _export_tokenizer(str(tmp_path_factory.mktemp("tok")), seed=0)
    return src, tok_dir


def _snapshot(path):
    return sorted((os.path.relpath(os.path.join(r, f), path), os.path.getsize(os.path.join(r, f)))
                  for r, _, files in os.walk(path) for f in files)


def test_codes_are_added_and_originals_untouched(setup, tmp_path):
    src, tok_dir = setup
    before = _snapshot(src)
    out = str(tmp_path / "out")
    path = pretokenize(tok_dir, src, "synthface", out, batch_size=2, chunk_batches=1,
                       progress=False)
    assert _snapshot(src) == before
    tok = load_tokenizer(tok_dir)
    source = records.load_builder(src, "synthface")
    derived = records.load_builder(out, "synthface_codes")
    assert os.fspath(derived.data_dir) == path
    for split in ("train", "test", "test_heldout_combos"):
        a, b = source.as_data_source(split), derived.as_data_source(split)
        assert len(a) == len(b)
        images = np.stack([a[i]["image"] for i in range(len(a))])
        expected = tok.encode(images).reshape(len(a), -1)
        for i in range(len(a)):
            np.testing.assert_array_equal(b[i]["image"], a[i]["image"])
            assert b[i]["caption"] == a[i]["caption"] and b[i]["id"] == a[i]["id"]
            assert b[i][CODES_FIELD].dtype == np.int32
            np.testing.assert_array_equal(b[i][CODES_FIELD], expected[i])
    meta = json.load(open(os.path.join(path, "metadata.json")))["image_tokenizer"]
    assert meta["step"] == 7 and meta["grid"] == [tok.grid_size, tok.grid_size]
    assert not os.path.exists(os.path.join(out, ".derive_work", "synthface_codes"))


def test_interrupted_run_resumes_to_the_same_dataset(setup, tmp_path, monkeypatch):
    src, tok_dir = setup
    pretokenize(tok_dir, src, "synthface", str(tmp_path / "ref"), batch_size=2, chunk_batches=1,
                progress=False)
    calls = {"n": 0}
    original = TrainedTokenizer.encode

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return original(self, images)

    monkeypatch.setattr(TrainedTokenizer, "encode", flaky)
    out = str(tmp_path / "out")
    with pytest.raises(KeyboardInterrupt):
        pretokenize(tok_dir, src, "synthface", out, batch_size=2, chunk_batches=1, progress=False)
    work = os.path.join(out, ".derive_work", "synthface_codes")
    cached = [f for r, _, fs in os.walk(work) for f in fs if f.startswith("chunk_")]
    assert len(cached) == 2  # the finished chunks stay
    assert not os.path.exists(os.path.join(out, "synthface_codes"))
    monkeypatch.setattr(TrainedTokenizer, "encode", original)
    calls["n"] = 0
    path = pretokenize(tok_dir, src, "synthface", out, batch_size=2, chunk_batches=1,
                       progress=False)
    ref = records.load_builder(str(tmp_path / "ref"), "synthface_codes")
    got = records.load_builder(out, "synthface_codes")
    assert os.fspath(got.data_dir) == path
    for split in ("train", "test", "test_heldout_combos"):
        ra, rb = ref.as_data_source(split), got.as_data_source(split)
        for i in range(len(ra)):
            np.testing.assert_array_equal(ra[i][CODES_FIELD], rb[i][CODES_FIELD])


def test_another_tokenizer_does_not_reuse_a_finished_dataset(setup, tmp_path):
    src, tok_dir = setup
    out = str(tmp_path / "out")
    pretokenize(tok_dir, src, "synthface", out, batch_size=4, progress=False, splits=["test"])
    other = _export_tokenizer(str(tmp_path / "other_tok"), seed=1)
    with pytest.raises(UserError, match="another tokenizer"):
        pretokenize(other, src, "synthface", out, batch_size=4, progress=False, splits=["test"])


def test_cli_missing_flag_is_one_line_error():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "unif2ace_jax.data.pretokenize",
                           "--tokenizer_workdir=/nonexistent"], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 2
    assert "--data_dir is required" in proc.stderr and proc.stderr.strip().count("\n") == 0
