"""A trained tokenizer on disk, and a numpy-in / numpy-out wrapper around it.

The trainer exports ``DIR/tokenizer_params.msgpack`` (Flax msgpack of the params) and
``DIR/tokenizer_config.json`` (the full training config) at every checkpoint and at the end
(``python -m unif2ace_jax.convert.magvit2`` writes the same two files from Show-o's weights)::

    tok = load_tokenizer(DIR)
    codes = tok.encode(images)        # uint8 [B, H, W, 3] -> int32 [B, h, w]
    images = tok.decode(codes)        # int [B, h, w] -> uint8 [B, H, W, 3]

Inside jit code use ``tok.model.apply({"params": tok.params}, x, method="encode")`` directly.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import serialization
from jax.experimental import multihost_utils

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.tokenizer import make_tokenizer
from unif2ace_jax.models.tokenizer.magvit2 import ImageTokenizer, images_to_model, model_to_images
from unif2ace_jax.utils.files import read_json, write_atomically

PARAMS_FILE = "tokenizer_params.msgpack"
CONFIG_FILE = "tokenizer_config.json"


def _host_array(x: Any) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_tokenizer(workdir: str, config: ml_collections.ConfigDict, params: Any,
                   step: int | None = None) -> None:
    """Writes params and config into `workdir` atomically (process 0 writes; all must call)."""
    params = jax.tree.map(_host_array, params)
    if jax.process_index() != 0:
        return
    os.makedirs(workdir, exist_ok=True)
    meta = {"config": json.loads(config.to_json_best_effort()), "step": step}
    write_atomically(os.path.join(workdir, PARAMS_FILE), serialization.msgpack_serialize(params))
    write_atomically(os.path.join(workdir, CONFIG_FILE), json.dumps(meta, indent=1))


def load_config(workdir: str) -> tuple[ml_collections.ConfigDict, int | None]:
    """(training config, exported step) of the tokenizer in `workdir`; UserError if absent."""
    if not workdir or not os.path.isdir(workdir):
        raise UserError(f"tokenizer workdir does not exist: {workdir!r}")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(workdir, PARAMS_FILE)):
        raise UserError(f"no trained tokenizer in {workdir} (expected {CONFIG_FILE} and "
                        f"{PARAMS_FILE}; train one with python -m unif2ace_jax.train.tokenizer)")
    meta = read_json(path)
    return ml_collections.ConfigDict(meta["config"]), meta.get("step")


class TrainedTokenizer:
    """Jitted encode/decode of a trained tokenizer on numpy arrays."""

    def __init__(self, model: ImageTokenizer, params: Any, config: ml_collections.ConfigDict,
                 step: int | None = None):
        self.model = model
        self.params = jax.device_put(params)
        self.config = config
        self.step = step
        self.image_size = int(config.data.image_size)
        self.grid_size = self.image_size // model.downsample_factor
        self.codebook_size = model.codebook_size
        self._encode = jax.jit(lambda p, x: model.apply({"params": p}, images_to_model(x),
                                                        method="encode"))
        self._decode = jax.jit(lambda p, c: model_to_images(
            model.apply({"params": p}, c, method="decode"), model.pixel_rounding))

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise UserError(f"tokenizer expects uint8 images [B, H, W, 3], got "
                            f"{images.dtype} {list(images.shape)}")
        if images.shape[1] % self.model.downsample_factor or \
                images.shape[2] % self.model.downsample_factor:
            raise UserError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple "
                            f"of the tokenizer's downsampling factor {self.model.downsample_factor}")
        return images

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> int32 codes ``[B, H/f, W/f]``."""
        return np.asarray(self._encode(self.params, self._check_images(images)))

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """int codes ``[B, h, w]`` in ``[0, K)`` -> uint8 images ``[B, h·f, w·f, 3]``."""
        codes = np.asarray(codes)
        if codes.ndim != 3 or codes.dtype.kind not in "iu":
            raise UserError(f"codes must be integer [B, h, w], got {codes.dtype} {list(codes.shape)}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise UserError(f"codes must lie in [0, {self.codebook_size}), got "
                            f"[{codes.min()}, {codes.max()}]")
        return np.asarray(self._decode(self.params, jnp.asarray(codes, jnp.int32)))

    def reconstruct(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 images -> (codes, uint8 reconstructions)."""
        codes = self.encode(images)
        return codes, self.decode(codes)


def load_tokenizer(workdir: str) -> TrainedTokenizer:
    """The tokenizer exported in `workdir` by `unif2ace_jax.train.tokenizer`."""
    config, step = load_config(workdir)
    model = make_tokenizer(config.model)
    with open(os.path.join(workdir, PARAMS_FILE), "rb") as f:
        params = serialization.msgpack_restore(f.read())
    return TrainedTokenizer(model, params, config, step)
