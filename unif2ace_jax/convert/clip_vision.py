"""Hugging Face CLIP vision weights -> `CLIPVisionTower` params (pure numpy).

Usage (a local directory written by ``save_pretrained``; never a hub name)::

    python -m unif2ace_jax.convert.clip_vision --hf_dir=LOCAL_DIR --out=DIR

``LOCAL_DIR`` holds ``config.json`` (a ``CLIPVisionConfig``, or a ``CLIPConfig`` whose
``vision_config`` is used) and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``; ``pytorch_model.bin`` needs torch). Keys may carry the
``vision_model.`` prefix (transformers 4.x, and full CLIP checkpoints, whose text tower is
ignored) or not (transformers 5.x). ``DIR`` receives ``clip_vision_params.msgpack`` and
``clip_vision_config.json`` (see `unif2ace_jax.models.encoders.clip_vision.load_clip_vision`).

Layout changes (torch ``Linear.weight`` is ``[out, in]``; Flax kernels are ``[in, out]``):

===========================================  ==============================================
HF                                           Flax
===========================================  ==============================================
embeddings.patch_embedding.weight [D,C,p,p]  patch_embedding/kernel [p, p, C, D]
embeddings.class_embedding [D]               class_embedding [D]
embeddings.position_embedding.weight [P,D]   position_embedding [P, D]
pre_layrnorm.{weight,bias}                   pre_layernorm/{scale,bias}
encoder.layers.i.self_attn.{q,k,v}_proj      layers_i/self_attn/{q,k,v}_proj/kernel [D, H, Dh]
                                             (W.T reshaped), bias [H, Dh]
encoder.layers.i.self_attn.out_proj          layers_i/self_attn/out_proj/kernel [H, Dh, D]
encoder.layers.i.layer_norm{1,2}             layers_i/layer_norm{1,2}/{scale,bias}
encoder.layers.i.mlp.fc{1,2}                 layers_i/fc{1,2}/{kernel (W.T), bias}
post_layernorm.{weight,bias}                 post_layernorm/{scale,bias}
===========================================  ==============================================
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping

import numpy as np
from absl import flags

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders.clip_vision import CLIPVisionSettings, save_clip_vision
from unif2ace_jax.utils.files import read_json

PREFIX = "vision_model."
IGNORED = ("embeddings.position_ids",)  # a non-persistent buffer some versions saved

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
                       "U8": np.uint8, "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as numpy arrays (bf16 -> float32)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise UserError(f"not a safetensors file (too short): {path}")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n])
    except ValueError:
        raise UserError(f"not a safetensors file (bad header): {path}") from None
    body = memoryview(data)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        raw = body[start:end]
        dtype = info["dtype"]
        if dtype == "BF16":
            bits = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif dtype in _SAFETENSORS_DTYPES:
            arr = np.frombuffer(raw, _SAFETENSORS_DTYPES[dtype])
        else:
            raise UserError(f"unsupported safetensors dtype {dtype} for {name} in {path}")
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def load_hf_state_dict(hf_dir: str) -> dict[str, np.ndarray]:
    """The state dict of a local ``save_pretrained`` directory, as numpy arrays."""
    single = os.path.join(hf_dir, "model.safetensors")
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    torch_bin = os.path.join(hf_dir, "pytorch_model.bin")
    if os.path.isfile(single):
        return read_safetensors(single)
    if os.path.isfile(index):
        files = sorted(set(read_json(index)["weight_map"].values()))
        out: dict[str, np.ndarray] = {}
        for name in files:
            out.update(read_safetensors(os.path.join(hf_dir, name)))
        return out
    if os.path.isfile(torch_bin):
        try:
            import torch  # lazy: optional dependency (.[convert])
        except ImportError:
            raise UserError("reading pytorch_model.bin needs torch (pip install -e .[convert]); "
                            "or save the model with safetensors") from None
        sd = torch.load(torch_bin, map_location="cpu", weights_only=True)
        return {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                for k, v in sd.items()}
    raise UserError(f"no model.safetensors, model.safetensors.index.json or pytorch_model.bin "
                    f"in {hf_dir}")


def settings_from_hf_config(config: Mapping[str, Any]) -> CLIPVisionSettings:
    """`CLIPVisionSettings` from a HF ``config.json`` dict (vision or full CLIP config)."""
    if "vision_config" in config:
        config = config["vision_config"]
    model_type = config.get("model_type", "clip_vision_model")
    if model_type not in ("clip_vision_model", "clip"):
        raise UserError(f"config.json is a {model_type!r} model, not a CLIP vision model")
    return CLIPVisionSettings.from_dict(config)


def _vision_keys(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    if any(k.startswith(PREFIX) for k in state_dict):
        return {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    return dict(state_dict)


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       settings: CLIPVisionSettings) -> dict[str, Any]:
    """HF CLIP vision state dict (numpy) -> the tower's ``params`` tree (float32 numpy).

    Raises UserError naming missing / unexpected keys or a shape that does not match
    ``settings``.
    """
    sd = {k: np.asarray(v, np.float32) for k, v in _vision_keys(state_dict).items()
          if k not in IGNORED}
    used: set[str] = set()
    d, h = settings.hidden_size, settings.num_attention_heads
    hd = d // h

    def take(key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in sd:
            raise UserError(f"HF checkpoint lacks {key!r}")
        arr = sd[key]
        if arr.shape != shape:
            raise UserError(f"HF tensor {key!r} has shape {arr.shape}, expected {shape} from "
                            f"config.json")
        used.add(key)
        return arr

    def norm(prefix: str) -> dict[str, np.ndarray]:
        return {"scale": take(f"{prefix}.weight", (d,)), "bias": take(f"{prefix}.bias", (d,))}

    p, c = settings.patch_size, settings.num_channels
    params: dict[str, Any] = {
        "patch_embedding": {"kernel": take("embeddings.patch_embedding.weight",
                                           (d, c, p, p)).transpose(2, 3, 1, 0)},
        "class_embedding": take("embeddings.class_embedding", (d,)),
        "position_embedding": take("embeddings.position_embedding.weight",
                                   (settings.num_tokens, d)),
        "pre_layernorm": norm("pre_layrnorm"),
        "post_layernorm": norm("post_layernorm"),
    }
    m = settings.intermediate_size
    for i in range(settings.num_hidden_layers):
        pre = f"encoder.layers.{i}"
        attn = {}
        for name in ("q_proj", "k_proj", "v_proj"):
            w = take(f"{pre}.self_attn.{name}.weight", (d, d))
            attn[name] = {"kernel": w.T.reshape(d, h, hd),
                          "bias": take(f"{pre}.self_attn.{name}.bias", (d,)).reshape(h, hd)}
        attn["out_proj"] = {"kernel": take(f"{pre}.self_attn.out_proj.weight", (d, d)).T
                            .reshape(h, hd, d),
                            "bias": take(f"{pre}.self_attn.out_proj.bias", (d,))}
        params[f"layers_{i}"] = {
            "self_attn": attn,
            "layer_norm1": norm(f"{pre}.layer_norm1"),
            "layer_norm2": norm(f"{pre}.layer_norm2"),
            "fc1": {"kernel": take(f"{pre}.mlp.fc1.weight", (m, d)).T,
                    "bias": take(f"{pre}.mlp.fc1.bias", (m,))},
            "fc2": {"kernel": take(f"{pre}.mlp.fc2.weight", (d, m)).T,
                    "bias": take(f"{pre}.mlp.fc2.bias", (d,))},
        }
    unexpected = sorted(set(sd) - used)
    if unexpected:
        raise UserError(f"HF checkpoint has {len(unexpected)} unexpected CLIP vision tensor(s), "
                        f"e.g. {unexpected[0]!r} (does config.json match the weights?)")
    return params


def convert_directory(hf_dir: str, out_dir: str) -> CLIPVisionSettings:
    """Reads ``hf_dir`` (config.json + weights), writes the converted tower to ``out_dir``."""
    if not os.path.isdir(hf_dir):
        raise UserError(f"--hf_dir is not a local directory: {hf_dir!r} (hub names are not "
                        f"fetched; save the model with save_pretrained first)")
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise UserError(f"no config.json in {hf_dir}")
    settings = settings_from_hf_config(read_json(cfg_path))
    params = convert_state_dict(load_hf_state_dict(hf_dir), settings)
    save_clip_vision(out_dir, settings, params, source=os.path.abspath(hf_dir))
    return settings


def main(argv: list[str]) -> None:
    del argv
    f = flags.FLAGS
    if not f.hf_dir or not f.out:
        raise UserError("both --hf_dir and --out are required")
    s = convert_directory(f.hf_dir, f.out)
    print(f"converted CLIP vision tower ({s.num_hidden_layers} layers, width {s.hidden_size}, "
          f"{s.image_size}px / patch {s.patch_size}) -> {f.out}")


if __name__ == "__main__":
    from unif2ace_jax.errors import run_cli

    flags.DEFINE_string("hf_dir", None, "local save_pretrained directory of a HF CLIP model")
    flags.DEFINE_string("out", None, "output directory for the Flax params")
    run_cli(main)
