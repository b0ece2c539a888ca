"""Show-o's MAGVIT-v2 checkpoint -> a tokenizer workdir (pure numpy; no torch).

Usage::

    python -m unif2ace_jax.convert.magvit2 --checkpoint=DIR --out=OUT [--image_size=256]

``DIR`` holds ``pytorch_model.safetensors`` in the layout of Show-o's released MAGVIT-v2
(``encoder.*``, ``decoder.*``, ``quantize.embedding`` / ``quantize.power_vals``); its
``config.json`` carries no geometry, so the geometry is read from tensor names and shapes:

* ``ch`` from ``encoder.conv_in.weight [ch, 3, 3, 3]``; ``bits`` from
  ``encoder.conv_out.weight [bits, C, 3, 3]``;
* levels and blocks per level from the ``encoder.down.{i}.block.{j}`` /
  ``decoder.up.{i}.block.{j}`` indices; the width multiplier of level ``i`` from that level's
  ``block.0.conv1.weight [ch·mult, ...]`` (encoder and decoder share ``ch``);
* mid attention from ``{encoder,decoder}.mid.attn_1.*``; ``quant_conv`` from
  ``encoder.quant_conv`` / ``decoder.post_quant_conv``.

The checkpoint must then hold exactly the tensors of `ImageTokenizer` with that geometry (names
as in `unif2ace_jax.models.tokenizer.magvit2`'s table), with the shapes it expects; anything
else is a UserError naming the tensor, and nothing is written. Conv ``weight [O, I, kh, kw]``
becomes ``kernel [kh, kw, I, O]``; norm ``weight`` becomes ``scale``. The quantizer buffers
must be the big-endian LFQ codebook the project's `lfq` uses (channel 0 the most significant
bit). GroupNorm uses 32 groups (Show-o's ``Normalize``; not recorded in the weights).

``OUT`` receives ``tokenizer_params.msgpack`` + ``tokenizer_config.json`` (as
`pretrained.save_tokenizer` writes them) with ``model.pixel_rounding = "truncate"`` (Show-o's
uint8 output) and ``data.image_size = --image_size``, so
`unif2ace_jax.models.tokenizer.pretrained.load_tokenizer` and every command that takes a
tokenizer workdir accept it. Pixels in: ``x / 127.5 - 1`` (= Show-o's ``x / 255 · 2 - 1``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from flax import traverse_util
from safetensors import SafetensorError, safe_open

from unif2ace_jax.cli import no_positional, require
from unif2ace_jax.errors import UserError, run_cli
from unif2ace_jax.models.tokenizer import lfq, make_tokenizer
from unif2ace_jax.models.tokenizer.pretrained import save_tokenizer

WEIGHTS_FILE = "pytorch_model.safetensors"
NUM_GROUPS = 32  # Show-o's Normalize: GroupNorm(32, eps 1e-6)
QUANTIZER = ("quantize.embedding", "quantize.power_vals")


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What the weights say about the network (see the module docstring)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    decoder_ch_mult: tuple[int, ...]
    decoder_num_res_blocks: tuple[int, ...]
    bits: int
    mid_attention: bool
    quant_conv: bool

    def describe(self) -> str:
        return (f"ch {self.ch}, encoder {self.ch_mult}/{self.num_res_blocks}, decoder "
                f"{self.decoder_ch_mult}/{self.decoder_num_res_blocks}, {self.bits} bits")


def read_checkpoint(checkpoint_dir: str) -> dict[str, np.ndarray]:
    """All tensors of ``checkpoint_dir/pytorch_model.safetensors`` as numpy arrays."""
    if not checkpoint_dir or not os.path.isdir(checkpoint_dir):
        raise UserError(f"--checkpoint is not a directory: {checkpoint_dir!r}")
    path = os.path.join(checkpoint_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no {WEIGHTS_FILE} in {checkpoint_dir}")
    try:
        with safe_open(path, framework="np") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, TypeError, ValueError) as e:
        message = " ".join(str(e).split())
        raise UserError(f"cannot read {path}: {message}") from None


def _get(sd: Mapping[str, np.ndarray], name: str) -> np.ndarray:
    if name not in sd:
        raise UserError(f"checkpoint lacks tensor {name!r}")
    return sd[name]


def _levels(sd: Mapping[str, np.ndarray], prefix: str) -> tuple[int, ...]:
    """Blocks per level from the ``{prefix}.{i}.block.{j}.`` names: ``(n_0, ..., n_{L-1})``."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(?:block\.(\d+)\.)?")
    blocks: dict[int, int] = {}
    for name in sd:
        m = pattern.match(name)
        if m:
            i = int(m.group(1))
            j = -1 if m.group(2) is None else int(m.group(2))
            blocks[i] = max(blocks.get(i, 0), j + 1)
    if not blocks:
        raise UserError(f"checkpoint has no {prefix}.* tensors (not a MAGVIT-v2 checkpoint?)")
    return tuple(blocks.get(i, 0) for i in range(max(blocks) + 1))


def _multipliers(sd: Mapping[str, np.ndarray], prefix: str, blocks: tuple[int, ...],
                 ch: int) -> tuple[int, ...]:
    mult = []
    for i in range(len(blocks)):
        name = f"{prefix}.{i}.block.0.conv1.weight"
        width = int(_get(sd, name).shape[0])
        if width % ch:
            raise UserError(f"checkpoint tensor {name!r} has {width} output channels, not a "
                            f"multiple of ch={ch} (encoder.conv_in)")
        mult.append(width // ch)
    return tuple(mult)


def infer_geometry(sd: Mapping[str, np.ndarray]) -> Geometry:
    """`Geometry` from tensor names and shapes; UserError naming a tensor it needs but lacks."""
    ch = int(_get(sd, "encoder.conv_in.weight").shape[0])
    bits = int(_get(sd, "encoder.conv_out.weight").shape[0])
    enc_blocks = _levels(sd, "encoder.down")
    dec_blocks = _levels(sd, "decoder.up")
    attn = {part: f"{part}.mid.attn_1.q.weight" in sd for part in ("encoder", "decoder")}
    if attn["encoder"] != attn["decoder"]:
        with_attn = "encoder" if attn["encoder"] else "decoder"
        raise UserError(f"only the {with_attn} has mid attention ({with_attn}.mid.attn_1.*); "
                        f"the tokenizer needs it in both or neither")
    quant = {name: f"{name}.weight" in sd for name in ("encoder.quant_conv",
                                                        "decoder.post_quant_conv")}
    if len(set(quant.values())) != 1:
        present = [name for name, on in quant.items() if on][0]
        raise UserError(f"checkpoint has {present!r} without its counterpart; the tokenizer "
                        f"needs encoder.quant_conv and decoder.post_quant_conv together")
    return Geometry(ch=ch, ch_mult=_multipliers(sd, "encoder.down", enc_blocks, ch),
                    num_res_blocks=enc_blocks,
                    decoder_ch_mult=_multipliers(sd, "decoder.up", dec_blocks, ch),
                    decoder_num_res_blocks=dec_blocks, bits=bits,
                    mid_attention=attn["encoder"], quant_conv=quant["encoder.quant_conv"])


def model_config(geometry: Geometry, image_size: int):
    """The tokenizer workdir's config (``model`` and ``data`` sections) for `geometry`."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict(dict(
        name="magvit2", bits=geometry.bits, ch=geometry.ch, ch_mult=geometry.ch_mult,
        num_res_blocks=geometry.num_res_blocks, decoder_ch_mult=geometry.decoder_ch_mult,
        decoder_num_res_blocks=geometry.decoder_num_res_blocks, num_groups=NUM_GROUPS,
        mid_attention=geometry.mid_attention, downsample="conv",
        quant_conv=geometry.quant_conv, patch_size=1, pos_embed=False, remat=False,
        pixel_rounding="truncate", dtype="float32", param_dtype="float32"))
    config.data = ml_collections.ConfigDict(dict(
        source="synthface", num_examples=1000, image_size=int(image_size), synthface_seed=0,
        cache=False, name="synthface", data_dir="", num_threads=2))
    return config


def _torch_name(path: tuple[str, ...]) -> str:
    """Flax param path -> Show-o tensor name (``down_1/block_0/conv1/kernel`` ->
    ``down.1.block.0.conv1.weight``; ``mid/block_1`` stays ``mid.block_1``)."""
    parts = []
    for k, part in enumerate(path):
        level = re.fullmatch(r"(down|up)_(\d+)", part)
        block = re.fullmatch(r"block_(\d+)", part)
        if level:
            part = f"{level.group(1)}.{level.group(2)}"
        elif block and k > 0 and re.fullmatch(r"(down|up)_\d+", path[k - 1]):
            part = f"block.{block.group(1)}"
        elif k == len(path) - 1 and part in ("kernel", "scale"):
            part = "weight"
        parts.append(part)
    return ".".join(parts)


def _expected_params(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """``{flax param path: shape}`` of the tokenizer `config.model` builds."""
    model = make_tokenizer(config.model)
    size = model.downsample_factor
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    shapes = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), images))
    flat = traverse_util.flatten_dict(shapes["params"])
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _check_quantizer(sd: Mapping[str, np.ndarray], bits: int) -> None:
    """The LFQ buffers must be the big-endian ±1 codebook (UserError otherwise)."""
    expected = {"quantize.embedding": np.asarray(lfq.codebook(bits)),
                "quantize.power_vals": lfq.bit_weights(bits)}
    for name, want in expected.items():
        got = _get(sd, name)
        if tuple(got.shape) != want.shape:
            raise UserError(f"checkpoint tensor {name!r} has shape {tuple(got.shape)}, "
                            f"expected {want.shape} for {bits} bits")
        if not np.array_equal(np.asarray(got, np.float64), want.astype(np.float64)):
            raise UserError(f"checkpoint tensor {name!r} is not the big-endian LFQ codebook "
                            f"(channel 0 the most significant bit) this converter supports")


def convert_state_dict(sd: Mapping[str, np.ndarray], config) -> dict[str, Any]:
    """Show-o state dict (numpy) -> the tokenizer's nested ``params`` (float32 numpy).

    Raises UserError naming the first missing, unexpected or wrongly shaped tensor.
    """
    expected = _expected_params(config)
    names = {_torch_name(path): path for path in expected}
    unexpected = sorted(set(sd) - set(names) - set(QUANTIZER))
    if unexpected:
        raise UserError(f"checkpoint has {len(unexpected)} unexpected tensor(s), e.g. "
                        f"{unexpected[0]!r}, for the inferred geometry")
    _check_quantizer(sd, int(config.model.bits))
    flat = {}
    for name in sorted(names):
        path = names[name]
        arr = np.asarray(_get(sd, name), np.float32)
        if path[-1] == "kernel":
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr
        if arr.shape != expected[path]:
            raise UserError(f"checkpoint tensor {name!r} has shape {tuple(sd[name].shape)}, "
                            f"which does not fit the inferred geometry (expected "
                            f"{_torch_shape(expected[path])})")
        flat[path] = arr
    return traverse_util.unflatten_dict(flat)


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A Flax conv kernel shape ``[kh, kw, I, O]`` as torch's ``[O, I, kh, kw]``."""
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape


def convert_directory(checkpoint_dir: str, out_dir: str, image_size: int = 256) -> Geometry:
    """Reads Show-o's MAGVIT-v2 from `checkpoint_dir`, writes a tokenizer workdir to `out_dir`.

    Everything is checked before anything is written; on an error no new `out_dir` is left.
    """
    if not out_dir:
        raise UserError("--out is required")
    if image_size <= 0:
        raise UserError(f"--image_size must be positive, got {image_size}")
    sd = read_checkpoint(checkpoint_dir)
    geometry = infer_geometry(sd)
    config = model_config(geometry, image_size)
    factor = 2 ** (len(geometry.ch_mult) - 1)
    if image_size % factor:
        raise UserError(f"--image_size={image_size} is not a multiple of the tokenizer's "
                        f"downsampling factor {factor}")
    params = convert_state_dict(sd, config)
    config.convert = dict(source=os.path.abspath(checkpoint_dir), format="showo_magvit2")
    created = not os.path.exists(out_dir)
    try:
        save_tokenizer(out_dir, config, params)
    except BaseException:
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return geometry


def main(argv: list[str]) -> None:
    no_positional(argv)
    f = flags.FLAGS
    checkpoint, out = require("checkpoint"), require("out")
    geometry = convert_directory(checkpoint, out, f.image_size)
    print(f"converted Show-o MAGVIT-v2 ({geometry.describe()}, {f.image_size}px -> "
          f"{f.image_size // 2 ** (len(geometry.ch_mult) - 1)}² codes) -> {out}")


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "directory with Show-o's MAGVIT-v2 "
                        "pytorch_model.safetensors")
    flags.DEFINE_string("out", None, "tokenizer workdir to write")
    flags.DEFINE_integer("image_size", 256, "image size recorded in the config (data.image_size)")
    run_cli(main)
