"""The on-disk form of a trained SynthFace encoder (`synthface_face` / `synthface_clip`).

A trainer workdir ends up with::

    DIR/encoder_params.msgpack   the whole trained model's params (flax msgpack)
    DIR/encoder_config.json      {"kind": "face"|"clip", "model": {...}, "vocab_size": ...,
                                  "text_tokenizer": ..., "step": ..., "eval": {...}}

`load_trained(DIR)` rebuilds the whole model (with its heads / text tower);
`load_image_encoder(DIR, kind)` returns only what the seq-MoE expert needs: the image encoder
(`ConvImageEncoder`) and its params.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import serialization

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders.synthface_clip import image_tower_config, make_clip_model
from unif2ace_jax.models.encoders.synthface_face import make_face_model, make_image_encoder
from unif2ace_jax.utils.files import read_json, write_atomically

PARAMS_FILE = "encoder_params.msgpack"
CONFIG_FILE = "encoder_config.json"
KINDS = ("face", "clip")
IMAGE_PARAMS = {"face": "encoder", "clip": "image"}  # where the image encoder's params live


def save_trained(workdir: str, kind: str, model_config: Mapping[str, Any], params: Any,
                 **meta: Any) -> None:
    """Writes the params and ``{"kind", "model", **meta}`` (meta must be JSON-serialisable)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    os.makedirs(workdir, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    write_atomically(os.path.join(workdir, PARAMS_FILE), serialization.msgpack_serialize(params))
    record = {"kind": kind, "model": dict(model_config), **meta}
    write_atomically(os.path.join(workdir, CONFIG_FILE), json.dumps(record, indent=1))


def load_meta(workdir: str, kind: str | None = None) -> dict:
    """The JSON record of a trained encoder; UserError if absent or of another kind."""
    if not workdir:
        raise UserError("a trained SynthFace encoder needs its workdir (encoder_config.workdir)")
    paths = [os.path.join(workdir, f) for f in (CONFIG_FILE, PARAMS_FILE)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        hint = f" --kind={kind}" if kind else ""
        raise UserError(f"not a trained SynthFace encoder directory (missing {missing[0]}); "
                        f"train one with python -m unif2ace_jax.train.encoders{hint} "
                        f"--workdir={workdir}")
    meta = read_json(paths[0])
    if kind is not None and meta.get("kind") != kind:
        raise UserError(f"{workdir} holds a synthface_{meta.get('kind')} encoder, not "
                        f"synthface_{kind}")
    return meta


def _tuples(cfg: Any) -> Any:
    """JSON lists back to tuples (module fields are tuples)."""
    if isinstance(cfg, dict):
        return {k: _tuples(v) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return tuple(cfg)
    return cfg


def build_model(meta: Mapping[str, Any],
                num_values: Sequence[int] | None = None) -> nn.Module:
    """The whole trained model described by a record of `load_meta`.

    A face model's attribute heads need the number of values of each attribute: the record's
    ``num_values`` (written by the trainer), else `num_values` as passed.
    """
    cfg = _tuples(meta["model"])
    if meta["kind"] == "face":
        num_values = meta.get("num_values") or num_values
        if not num_values:
            raise UserError("the face encoder record has no num_values (values per attribute); "
                            "pass them to build_model / load_trained")
        return make_face_model(cfg, num_values)
    return make_clip_model(cfg, int(meta["vocab_size"]))


def load_trained(workdir: str, kind: str | None = None,
                 num_values: Sequence[int] | None = None) -> tuple[nn.Module, Any, dict]:
    """``(model, params, meta)`` of the trained encoder in `workdir` (`num_values`: see
    `build_model`)."""
    meta = load_meta(workdir, kind)
    with open(os.path.join(workdir, PARAMS_FILE), "rb") as f:
        params = serialization.msgpack_restore(f.read())
    return build_model(meta, num_values), params, meta


def load_image_encoder(workdir: str, kind: str) -> tuple[nn.Module, Any]:
    """``(ConvImageEncoder, its params)``: ``module.apply({"params": p}, uint8 images)`` gives
    ``{"tokens": [B, T, D], "pooled": [B, D]}``."""
    model, params, meta = load_trained(workdir, kind)
    cfg = _tuples(meta["model"])
    if kind == "clip":
        cfg = image_tower_config(cfg)
    del model
    return make_image_encoder(cfg), params[IMAGE_PARAMS[kind]]


def embed_dim(workdir: str, kind: str) -> int:
    """D of the encoder's features (read from its record)."""
    return int(load_meta(workdir, kind)["model"]["embed_dim"])
