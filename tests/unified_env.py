"""A tiny end-to-end environment for the unified-model tests (built once per test process).

SynthFace (24 / 6 / 4 faces at 64 px), a 150-piece SentencePiece model, an image tokenizer with
random (untrained) weights at 16 px (4x4 codes of 64), a derived dataset whose `image_codes` are
that tokenizer's codes of the faces, and a judge with random weights. Only the plumbing is
real: nothing here is trained to be good.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
import types

import jax
import ml_collections
import numpy as np

from unif2ace_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, arg: str | None = None):
    """``get_config(arg)`` of ``configs/<name>.py`` (`cli.load_config`)."""
    return cli.load_config(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def load_config_module(name: str):
    """An object whose ``get_config(arg)`` is `load_config` of ``configs/<name>.py``."""
    return types.SimpleNamespace(get_config=functools.partial(load_config, name))


@functools.lru_cache(maxsize=None)
def build_env() -> dict:
    """Paths of the environment (cached per process; lives in a temp dir)."""
    import flax.linen as nn
    import tensorflow_datasets as tfds

    from unif2ace_jax.data import records
    from unif2ace_jax.data.build import build_dataset, read_texts
    from unif2ace_jax.data.derive import derive_dataset
    from unif2ace_jax.data.images import num_values, resize_image
    from unif2ace_jax.data.text_tokenizer import train_sentencepiece
    from unif2ace_jax.evaluate.judge import save_judge
    from unif2ace_jax.models.judge import make_judge
    from unif2ace_jax.models.tokenizer import make_tokenizer
    from unif2ace_jax.models.tokenizer.pretrained import load_tokenizer, save_tokenizer

    root = tempfile.mkdtemp(prefix="unified_env_")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    data_dir = os.path.join(root, "data")
    build_dataset("synthface", data_dir, num_train=24, num_test=6, num_heldout=4)
    text_model = train_sentencepiece(read_texts(data_dir, "synthface"), 150,
                                     os.path.join(data_dir, "text.model"), model_type="bpe")

    tok_config = load_config("tokenizer_synthface_64", "tiny")
    tok_config.data.image_size = 16
    tok_model = make_tokenizer(tok_config.model)
    params = nn.unbox(tok_model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
    tok_dir = os.path.join(root, "tok")
    save_tokenizer(tok_dir, tok_config, params["params"], step=0)
    tok = load_tokenizer(tok_dir)
    grid = tok.grid_size

    src = records.load_builder(data_dir, "synthface")

    def encode(batch):
        small = np.stack([resize_image(im, 16) for im in batch["image"]])
        return {"image_codes": tok.encode(small).reshape(len(small), -1).astype(np.int32)}

    derive_dataset(src, data_dir, "synthface_codes",
                   {"image_codes": tfds.features.Tensor(shape=(grid * grid,), dtype=np.int32)},
                   encode, batch_size=8, progress=False)

    judge_config = ml_collections.ConfigDict(dict(
        model=dict(resolution=32, stem_width=0, widths=(8, 16), blocks_per_stage=1, hidden=32,
                   dtype="float32", param_dtype="float32"),
        data=dict(image_size=64)))
    judge = make_judge(judge_config.model, num_values())
    res = int(judge_config.model.resolution)
    judge_params = nn.unbox(judge.init(jax.random.key(1), np.zeros((1, res, res, 3), np.float32)))
    judge_dir = os.path.join(root, "judge")
    save_judge(judge_dir, judge_config, judge_params["params"])
    return {"root": root, "data_dir": data_dir, "text_model": text_model, "tok_dir": tok_dir,
            "judge_dir": judge_dir, "num_codes": tok.codebook_size, "grid": grid}


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """configs/synthface_tiny.py:tiny pointed at the environment."""
    env = build_env()
    config = load_config("synthface_tiny", "tiny")
    config.data.data_dir = env["data_dir"]
    config.data.dataset = "synthface_codes"
    config.data.tokenizer.model_path = env["text_model"]
    config.tokenizer_workdir = env["tok_dir"]
    config.judge_workdir = env["judge_dir"]
    config.model.num_image_codes = env["num_codes"]
    config.model.image_grid = env["grid"]
    for key, value in overrides.items():
        target = config
        *path, last = key.split(".")
        for p in path:
            target = target[p]
        target[last] = value
    return config


@functools.lru_cache(maxsize=None)
def trained_run() -> str:
    """A workdir with a few training steps of the tiny config (cached per process)."""
    from unif2ace_jax.train.train import train

    workdir = os.path.join(build_env()["root"], "run")
    train(tiny_config(total_steps=4, ckpt_every=4, log_every=2), workdir)
    return workdir


def run_module(module: str, *args: str, timeout: int = 600):
    """`python -m module args` with JAX on CPU; returns the CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


def assert_one_error_line(proc, *words) -> str:
    """The process exited with status 2 after one `error: ...` line naming `words`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]
