"""Conversion time and peak memory of Show-o's weights at their released sizes.

    python bench/convert.py [--which=magvit2,showo] [--workdir=DIR] [--keep]

For each converter the bench first writes a checkpoint of random weights in the released
layout and at the released size (it downloads nothing):

* ``magvit2``: Show-o's MAGVIT-v2 (128 channels, encoder (1,2,2,4,4) / (4,3,4,3,4), decoder
  (1,1,2,2,4) / (4,4,3,4,3), 13 bits; about 95M weights), ``pytorch_model.safetensors``;
* ``showo``: Show-o on Phi-1.5 (24 layers, width 2048, 32 heads, FFN 8192, QK-LayerNorm,
  vocabulary 58 498; about 1.4B weights, 5.7 GB in float32) with its Phi ``config.json``.

The file is written one tensor at a time (safetensors: an 8-byte header length, a JSON header,
then the raw little-endian data), so the bench itself never holds the model. Then it runs the
converter as a child process (``python -m unif2ace_jax.convert.<name>``) and reports its wall
time and its peak resident memory (``getrusage(RUSAGE_CHILDREN).ru_maxrss``; this counts the
pages of the memory-mapped input file the converter has touched, which the kernel can drop).
One JSON object is printed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from unif2ace_jax.convert import magvit2 as magvit2_conv  # noqa: E402
from unif2ace_jax.convert import showo as showo_conv  # noqa: E402
from unif2ace_jax.errors import run_cli  # noqa: E402
from unif2ace_jax.models.tokenizer import lfq  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("which", ["magvit2", "showo"], "converters to time: magvit2, showo")
flags.DEFINE_string("workdir", "", "where checkpoints and outputs go (default: a temp folder)")
flags.DEFINE_bool("keep", False, "keep the written checkpoints and converted outputs")
flags.DEFINE_integer("seed", 0, "seed of the random weights")

# Show-o's released geometry (its MAGVIT-v2 and the Phi-1.5 it builds on).
MAGVIT2_RELEASE = magvit2_conv.Geometry(
    ch=128, ch_mult=(1, 2, 2, 4, 4), num_res_blocks=(4, 3, 4, 3, 4),
    decoder_ch_mult=(1, 1, 2, 2, 4), decoder_num_res_blocks=(4, 4, 3, 4, 3), bits=13,
    mid_attention=True, quant_conv=True)
PHI15_CONFIG = {
    "model_type": "phi", "hidden_size": 2048, "num_hidden_layers": 24,
    "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 8192,
    "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
    "hidden_act": "gelu_new", "vocab_size": 51200, "tie_word_embeddings": False,
}
SHOWO_CONFIG = {
    "_class_name": "Showo", "vocab_size": 58498, "llm_vocab_size": 50295,
    "llm_model_path": "phi", "codebook_size": 8192, "num_vq_tokens": 256,
    "mask_token_id": 58497, "w_clip_vit": False,
}


def write_safetensors(path: str, tensors: Iterable[tuple[str, tuple[int, ...]]],
                      fill) -> int:
    """Writes float32 tensors ``(name, shape)`` to `path`, each made by ``fill(name, shape)``
    only when its turn comes; returns the number of weights."""
    tensors = list(tensors)
    header, offset = {}, 0
    for name, shape in tensors:
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in tensors:
            f.write(np.ascontiguousarray(fill(name, shape), dtype="<f4").tobytes())
    return sum(int(np.prod(s)) for _, s in tensors)


def _random_fill(seed: int):
    rng = np.random.default_rng(seed)

    def fill(name: str, shape: tuple[int, ...]) -> np.ndarray:
        return (rng.random(shape, dtype=np.float32) - 0.5) * 0.04

    return fill


def make_magvit2(directory: str, seed: int) -> int:
    """A random-weight MAGVIT-v2 checkpoint of Show-o's released geometry in `directory`."""
    config = magvit2_conv.model_config(MAGVIT2_RELEASE, 256)
    tensors = [(magvit2_conv._torch_name(path), magvit2_conv._torch_shape(shape))
               for path, shape in magvit2_conv._expected_params(config).items()]
    bits = MAGVIT2_RELEASE.bits
    quantizer = {"quantize.embedding": np.asarray(lfq.codebook(bits), np.float32),
                 "quantize.power_vals": np.asarray(lfq.bit_weights(bits), np.float32)}
    tensors += [(name, value.shape) for name, value in quantizer.items()]
    random = _random_fill(seed)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": "MAGVITv2"}, f)
    return write_safetensors(os.path.join(directory, magvit2_conv.WEIGHTS_FILE), tensors,
                             lambda n, s: quantizer[n] if n in quantizer else random(n, s))


def make_showo(directory: str, seed: int) -> int:
    """A random-weight Show-o checkpoint (Phi-1.5 with QK-LayerNorm) in `directory`."""
    os.makedirs(os.path.join(directory, "phi"), exist_ok=True)
    for path, value in (("config.json", SHOWO_CONFIG), ("phi/config.json", PHI15_CONFIG)):
        with open(os.path.join(directory, path), "w") as f:
            json.dump(value, f, indent=1)
    source = showo_conv.read_source(directory)
    source = dataclasses.replace(source, qk_layernorm=True)
    tensors = [(name, tuple(target.torch_shape))
               for name, target in showo_conv.expected_tensors(source).items()]
    return write_safetensors(source.weights, tensors, _random_fill(seed))


MAKERS = {"magvit2": make_magvit2, "showo": make_showo}


def time_conversion(name: str, checkpoint: str, out: str) -> dict:
    """Wall seconds and peak RSS of ``python -m unif2ace_jax.convert.<name>`` as a child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"unif2ace_jax.convert.{name}",
                           f"--checkpoint={checkpoint}", f"--out={out}"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"convert.{name} failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip().splitlines()[-1:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"convert_s": round(wall, 2),
            "peak_rss_mib": round(peak_kb / 1024, 1) if peak_kb > before else None}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str]) -> None:
    del argv
    unknown = sorted(set(FLAGS.which) - set(MAKERS))
    if unknown:
        raise SystemExit(f"--which: unknown converter(s) {unknown}; known: {sorted(MAKERS)}")
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="bench_convert_")
    results = {}
    try:
        # Largest last: ru_maxrss of children is a running maximum over all of them.
        for name in sorted(FLAGS.which, key=["magvit2", "showo"].index):
            checkpoint, out = os.path.join(root, f"{name}_ckpt"), os.path.join(root, f"{name}_out")
            t0 = time.perf_counter()
            weights = MAKERS[name](checkpoint, FLAGS.seed)
            made = time.perf_counter() - t0
            print(f"[{name}] wrote {weights:,} random weights in {made:.1f}s; converting",
                  flush=True)
            results[name] = {"weights": weights, "checkpoint_bytes": _dir_bytes(checkpoint),
                             **time_conversion(name, checkpoint, out),
                             "output_bytes": _dir_bytes(out)}
            print(f"[{name}] {json.dumps(results[name])}", flush=True)
            if not FLAGS.keep:
                shutil.rmtree(checkpoint, ignore_errors=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        if not FLAGS.keep and not FLAGS.workdir:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    run_cli(main)
