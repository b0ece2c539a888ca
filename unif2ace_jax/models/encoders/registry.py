"""Feature encoders by name (docs/DESIGN.md §5): what turns raw data into the seq-MoE experts' inputs.

Each sequence-level feature expert names an encoder in the config
(``model.seq_moe.experts.<expert>.encoder``, with options in ``encoder_config``). Two kinds:

* **in-model** encoders (``spec.in_model``): parameter-free transforms the seq-MoE module runs
  itself on ``features[feature_key]`` (``noise``: mask ratio ``[B]`` -> sinusoidal ``[B, dim]``).
* **frozen** encoders: networks with their own weights (``clip_vision``), run outside the trained
  model, either ahead of time by a prepare command that writes their outputs into the records,
  or on the fly by the caller (`load_encoder` + `LoadedEncoder.encode`). The seq-MoE then reads
  ``features[feature_key]`` as it is. ``precomputed`` names a feature that simply arrives in
  the records (made by any tool).

Registered specs (`ENCODERS.get(name)`):

=============  ========  ==========================  ====================================
name           in-model  raw input                   output
=============  ========  ==========================  ====================================
noise          yes       mask ratio ``[B]``          ``[B, dim]``
precomputed    no        (already a feature)         ``[B, dim]`` or ``[B, T, dim]``
clip_vision    no        uint8 images ``[B,H,W,3]``  ``[B, D]`` (``output="pooled"``) or
                                                     ``[B, T, D]`` (``output="tokens"``)
synthface_face no        uint8 images ``[B,H,W,3]``  same (``encoder_config.workdir``: the
synthface_clip no        uint8 images ``[B,H,W,3]``  workdir of ``train.encoders --kind=...``)
=============  ========  ==========================  ====================================
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders import clip_vision, noise, synthface_saved
from unif2ace_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """One encoder kind.

    Attributes:
      in_model: run by the seq-MoE on the raw feature (parameter free) vs. frozen and external.
      build: ``cfg -> nn.Module`` called as ``module(raw)`` (None when nothing to build).
      output_dim: ``cfg -> int``, the width of the feature the expert receives (None: taken from
        the expert's ``feature_dim``).
      load: ``cfg -> (module, params)`` for frozen encoders with weights on disk.
      prepare: ``(module, raw) -> model input``, e.g. image preprocessing (optional; skipped
        when the encoder's config says ``preprocess=False``).
      select: ``(cfg, module output) -> feature`` (optional; default: the output itself).
    """

    in_model: bool
    build: Callable[[Any], nn.Module] | None = None
    output_dim: Callable[[Any], int] | None = None
    load: Callable[[Any], tuple[nn.Module, Any]] | None = None
    prepare: Callable[[nn.Module, jax.Array], jax.Array] | None = None
    select: Callable[[Any, Any], jax.Array] | None = None


ENCODERS: Registry[EncoderSpec] = Registry("encoder")

ENCODERS.register("noise")(EncoderSpec(
    in_model=True, build=noise.build_noise_encoder,
    output_dim=lambda cfg: int(noise.build_noise_encoder(cfg).dim)))

ENCODERS.register("precomputed")(EncoderSpec(in_model=False))


def _clip_load(cfg) -> tuple[nn.Module, Any]:
    path = (cfg or {}).get("path", None)
    if not path:
        raise UserError("encoder clip_vision needs encoder_config.path (a directory written by "
                        "python -m unif2ace_jax.convert.clip_vision)")
    return clip_vision.load_clip_vision(path)


def _output_select(encoder: str) -> Callable[[Any, Mapping[str, jax.Array]], jax.Array]:
    """``encoder_config.output`` ("pooled", default, or "tokens") picks the feature."""

    def select(cfg, out: Mapping[str, jax.Array]) -> jax.Array:
        which = (cfg or {}).get("output", "pooled")
        if which not in out:
            raise UserError(f"{encoder} output must be one of {sorted(out)}, got {which!r}")
        return out[which]

    return select


ENCODERS.register("clip_vision")(EncoderSpec(
    in_model=False, load=_clip_load, select=_output_select("clip_vision"),
    prepare=lambda module, raw: clip_vision.clip_preprocess(raw, module.settings.image_size)))


def _synthface_spec(kind: str) -> EncoderSpec:
    """A trained SynthFace encoder (`synthface_saved`); images are resized by the model."""

    def workdir(cfg) -> str:
        return (cfg or {}).get("workdir", None) or ""

    return EncoderSpec(
        in_model=False, select=_output_select(f"synthface_{kind}"),
        load=lambda cfg: synthface_saved.load_image_encoder(workdir(cfg), kind),
        output_dim=lambda cfg: synthface_saved.embed_dim(workdir(cfg), kind))


ENCODERS.register("synthface_face")(_synthface_spec("face"))
ENCODERS.register("synthface_clip")(_synthface_spec("clip"))


@dataclasses.dataclass
class LoadedEncoder:
    """A frozen encoder with its weights: ``encode(raw) -> feature`` (jitted)."""

    name: str
    module: nn.Module
    params: Any
    cfg: Any

    def __post_init__(self):
        spec = ENCODERS.get(self.name)
        preprocess = spec.prepare is not None and (self.cfg or {}).get("preprocess", True)

        def run(params, raw):
            x = spec.prepare(self.module, raw) if preprocess else raw
            out = self.module.apply({"params": params}, x)
            return spec.select(self.cfg, out) if spec.select is not None else out

        self._run = jax.jit(run)

    def encode(self, raw: jax.Array) -> jax.Array:
        return self._run(self.params, raw)


def load_encoder(name: str, cfg: ml_collections.ConfigDict | Mapping | None) -> LoadedEncoder:
    """Builds and loads a frozen encoder by name (UserError for unknown or in-model names)."""
    spec = ENCODERS.get(name)
    if spec.in_model:
        raise UserError(f"encoder {name!r} runs inside the model; there is nothing to load")
    if spec.load is None:
        raise UserError(f"encoder {name!r} has no weights to load: its features must be "
                        f"precomputed into the records")
    module, params = spec.load(cfg)
    return LoadedEncoder(name=name, module=module, params=params, cfg=cfg)
