"""Experts of the sequence-level MoE (docs/DESIGN.md §5), by kind: ``copy``, ``zero`` and ``feature``.

Every expert maps the branch input ``x: [B, L, D]`` to ``[B, L, D]``:

* ``copy(x) = x`` and ``zero(x) = 0`` (parameter free; after MoE++'s constant experts).
* ``feature`` experts inject an external feature ``c`` through a gated resampler::

      E(x) = a ⊙ x + (1 − a) ⊙ S(c),    a = softmax(W_g x)[..., 0]   (one gate per token)

  ``S`` maps ``c`` to width D: ``mlp`` (``c`` pooled to one vector per sequence, 2-layer MLP,
  broadcast over the tokens) or ``cross_attention`` (every token attends to the feature tokens).

A feature expert's config (``model.seq_moe.experts.<name>``)::

    kind="feature"
    feature_key="clip"          # features[feature_key]: [B, Dc] or [B, T, Dc] (or raw input of
                                # an in-model encoder, e.g. the mask ratio [B] for "noise")
    feature_dim=768             # Dc of a precomputed / external feature (checked at call time)
    encoder="precomputed"       # name in `unif2ace_jax.models.encoders.ENCODERS`
    encoder_config={}           # options of that encoder
    resampler="mlp"             # mlp | cross_attention
    resampler_hidden=0          # mlp hidden width (0: d_model)
    num_heads=4                 # cross_attention heads (d_model must be divisible)
    feature_norm=True           # LayerNorm on c before S

Optional per-sequence inputs next to ``features[feature_key]``: ``<feature_key>_mask [B, T] bool``
(which feature tokens exist; used by both resamplers) and ``<feature_key>_present [B] bool`` (read
by the router: a sequence without the feature cannot pick this expert). The expert names
``copy`` and ``zero`` need no config entry.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.models.encoders import ENCODERS
from unif2ace_jax.registry import Registry
from unif2ace_jax.utils.defaults import with_defaults

RESAMPLERS = ("mlp", "cross_attention")
EXPERTS: Registry = Registry("seq-MoE expert kind")


# ---------------------------------------------------------------------------------------------
# Pure math.

def gated_mix(x: jax.Array, gate_logits: jax.Array, s: jax.Array) -> jax.Array:
    """``a * x + (1 - a) * s`` with ``a = softmax(gate_logits)[..., 0]``.

    ``x: [B, L, D]``, ``gate_logits: [B, L, G]`` (G >= 2), ``s: [B, L, D]`` or ``[B, 1, D]``
    -> ``[B, L, D]`` in ``x``'s dtype (gate in float32).
    """
    a = jax.nn.softmax(gate_logits.astype(jnp.float32), axis=-1)[..., :1]
    out = a * x.astype(jnp.float32) + (1.0 - a) * s.astype(jnp.float32)
    return out.astype(x.dtype)


def masked_mean(c: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over the feature tokens that exist. ``c: [B, T, C]``, ``mask: [B, T] -> [B, C]``
    (zeros for a row without tokens)."""
    w = mask.astype(jnp.float32)[..., None]
    return (jnp.sum(c.astype(jnp.float32) * w, axis=1)
            / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(c.dtype)


def masked_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                           mask: jax.Array) -> jax.Array:
    """Multi-head attention of queries to feature tokens.

    ``q: [B, L, H, Dh]``, ``k, v: [B, T, H, Dh]``, ``mask: [B, T] bool`` -> ``[B, L, H, Dh]``.
    Scores scaled by ``Dh^-1/2``, softmax in float32 over the existing tokens; a row without
    tokens gets zeros.
    """
    scores = jnp.einsum("blhd,bthd->bhlt", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    m = mask[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(m, scores, -1e9), axis=-1)
    probs = jnp.where(jnp.any(mask, axis=1)[:, None, None, None], probs, 0.0)
    return jnp.einsum("bhlt,bthd->blhd", probs.astype(v.dtype), v)


# ---------------------------------------------------------------------------------------------
# Modules.

def _init(names, base=nn.initializers.lecun_normal()):
    return nn.with_logical_partitioning(base, names)


def _zeros(names):
    return nn.with_logical_partitioning(nn.initializers.zeros, names)


class CopyExpert(nn.Module):
    """``copy(x) = x``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, features=None, valid=None) -> jax.Array:
        del features, valid
        return x


class ZeroExpert(nn.Module):
    """``zero(x) = 0``."""

    @nn.compact
    def __call__(self, x: jax.Array, *, features=None, valid=None) -> jax.Array:
        del features, valid
        return jnp.zeros_like(x)


class MLPResampler(nn.Module):
    """``c: [B, T, C]``, ``mask: [B, T]`` -> ``[B, 1, D]`` (pooled over T, then an MLP)."""

    d_model: int
    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, mask: jax.Array) -> jax.Array:
        del x
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        v = masked_mean(c, mask)
        v = nn.Dense(self.hidden, kernel_init=_init(("feature", "mlp")),
                     bias_init=_zeros(("mlp",)), name="fc1", **kw)(v)
        v = nn.gelu(v, approximate=True)
        v = nn.Dense(self.d_model, kernel_init=_init(("mlp", "embed")),
                     bias_init=_zeros(("embed",)), name="fc2", **kw)(v)
        return v[:, None, :]


class CrossAttentionResampler(nn.Module):
    """Tokens ``x: [B, L, D]`` attend to ``c: [B, T, C]`` (``mask: [B, T]``) -> ``[B, L, D]``."""

    d_model: int
    num_heads: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array, mask: jax.Array) -> jax.Array:
        if self.d_model % self.num_heads:
            raise UserError(f"cross_attention resampler: d_model {self.d_model} is not divisible "
                            f"by num_heads {self.num_heads}")
        hd = self.d_model // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def proj(inp, in_axis, name):
            return nn.DenseGeneral((self.num_heads, hd),
                                   kernel_init=_init((in_axis, "heads", "kv")),
                                   bias_init=_zeros(("heads", "kv")), name=name, **kw)(inp)

        out = masked_cross_attention(proj(x, "embed", "q_proj"), proj(c, "feature", "k_proj"),
                                     proj(c, "feature", "v_proj"), mask)
        return nn.DenseGeneral(self.d_model, axis=(-2, -1),
                               kernel_init=_init(("heads", "kv", "embed")),
                               bias_init=_zeros(("embed",)), name="out_proj", **kw)(out)


class FeatureExpert(nn.Module):
    """``E(x) = a x + (1 - a) S(c)``; ``x: [B, L, D]``, ``c = features[feature_key]``."""

    d_model: int
    feature_key: str
    feature_dim: int | None = None
    encoder: str = "precomputed"
    encoder_config: Any = None
    resampler: str = "mlp"
    resampler_hidden: int = 0
    num_heads: int = 4
    feature_norm: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def feature(self, features: Mapping[str, jax.Array] | None, batch: int
                ) -> tuple[jax.Array, jax.Array]:
        """``(c [B, T, C], mask [B, T] bool)`` from the features dict (runs in-model encoders)."""
        if features is None or self.feature_key not in features:
            have = sorted(features) if features is not None else "no features"
            raise UserError(f"seq-MoE feature expert needs features[{self.feature_key!r}] "
                            f"(got {have})")
        c = jnp.asarray(features[self.feature_key])
        spec = ENCODERS.get(self.encoder)
        if spec.in_model:
            c = spec.build(self.encoder_config)(c)
        elif self.feature_dim and c.shape[-1] != self.feature_dim:
            raise UserError(f"features[{self.feature_key!r}] has width {c.shape[-1]}, the config "
                            f"says feature_dim={self.feature_dim}")
        if c.ndim == 2:
            c = c[:, None, :]
        if c.ndim != 3 or c.shape[0] != batch:
            raise UserError(f"features[{self.feature_key!r}] must be [B, C] or [B, T, C] with "
                            f"B={batch}, got {tuple(c.shape)}")
        mask = features.get(f"{self.feature_key}_mask")
        if mask is None:
            return c, jnp.ones(c.shape[:2], bool)
        mask = jnp.asarray(mask, bool)
        if mask.shape != c.shape[:2]:
            raise UserError(f"features[{self.feature_key + '_mask'!r}] must be [B, T] = "
                            f"{tuple(c.shape[:2])}, got {tuple(mask.shape)}")
        return c, mask

    @nn.compact
    def __call__(self, x: jax.Array, *, features: Mapping[str, jax.Array] | None = None,
                 valid: jax.Array | None = None) -> jax.Array:
        del valid
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c, mask = self.feature(features, x.shape[0])
        c = c.astype(self.dtype)
        if self.feature_norm:
            c = nn.LayerNorm(epsilon=1e-5, scale_init=_init(("norm",), nn.initializers.ones),
                             bias_init=_zeros(("norm",)), name="feature_norm", **kw)(c)
        if self.resampler == "mlp":
            s = MLPResampler(self.d_model, self.resampler_hidden or self.d_model,
                             name="resampler", **kw)(x, c, mask)
        elif self.resampler == "cross_attention":
            s = CrossAttentionResampler(self.d_model, self.num_heads, name="resampler", **kw)(
                x, c, mask)
        else:
            raise UserError(f"unknown resampler {self.resampler!r}; known: {', '.join(RESAMPLERS)}")
        # The gate is a per-token 2-way softmax; computed in float32 like the router.
        gate_logits = nn.Dense(2, dtype=jnp.float32, param_dtype=self.param_dtype,
                               kernel_init=_init(("embed", None)), bias_init=_zeros((None,)),
                               name="gate")(x)
        return gated_mix(x, gate_logits, s)


# ---------------------------------------------------------------------------------------------
# Registry and configs.

@EXPERTS.register("copy")
def _make_copy(cfg, *, d_model: int, dtype, param_dtype, name: str | None = None) -> nn.Module:
    del cfg, d_model, dtype, param_dtype
    return CopyExpert(name=name)


@EXPERTS.register("zero")
def _make_zero(cfg, *, d_model: int, dtype, param_dtype, name: str | None = None) -> nn.Module:
    del cfg, d_model, dtype, param_dtype
    return ZeroExpert(name=name)


def default_feature_config() -> ml_collections.ConfigDict:
    """Every field of a feature expert's config (``seq_moe.experts.<name>``), with its default;
    ``feature_key`` has none (it must be given). ``encoder_config`` goes to the encoder whole."""
    return ml_collections.ConfigDict(dict(
        kind="feature", feature_key="", feature_dim=None, encoder="precomputed",
        encoder_config=dict(), resampler="mlp", resampler_hidden=0, num_heads=4,
        feature_norm=True))


def full_feature_config(cfg, name: str) -> ml_collections.ConfigDict:
    """Expert `name`'s config: `default_feature_config` updated with `cfg`."""
    return with_defaults(default_feature_config(), cfg, f"model.seq_moe.experts.{name}",
                         whole=("encoder_config",))


@EXPERTS.register("feature")
def _make_feature(cfg, *, d_model: int, dtype, param_dtype,
                  name: str | None = None) -> nn.Module:
    cfg = full_feature_config(cfg, name)
    resampler = cfg.resampler
    if resampler not in RESAMPLERS:
        raise UserError(f"unknown resampler {resampler!r} for seq-MoE expert {name!r}; known: "
                        f"{', '.join(RESAMPLERS)}")
    encoder = cfg.encoder
    ENCODERS.get(encoder)  # unknown names fail here, at build time
    if not cfg.feature_key:
        raise UserError(f"seq-MoE feature expert {name!r} needs a feature_key")
    enc_cfg = cfg.encoder_config
    if isinstance(enc_cfg, ml_collections.ConfigDict) and not isinstance(
            enc_cfg, ml_collections.FrozenConfigDict):
        enc_cfg = ml_collections.FrozenConfigDict(enc_cfg)
    return FeatureExpert(
        d_model=d_model, feature_key=cfg.feature_key, feature_dim=cfg.feature_dim,
        encoder=encoder, encoder_config=enc_cfg, resampler=resampler,
        resampler_hidden=int(cfg.resampler_hidden),
        num_heads=int(cfg.num_heads), feature_norm=bool(cfg.feature_norm),
        dtype=dtype, param_dtype=param_dtype, name=name)


def expert_kind(name: str, experts_cfg: Mapping[str, Any] | None) -> str:
    """The kind of the expert called `name`: its config's ``kind`` or the built-in copy/zero."""
    if experts_cfg is not None and name in experts_cfg:
        return experts_cfg[name].get("kind", default_feature_config().kind)
    if name in ("copy", "zero"):
        return name
    known = sorted(set(experts_cfg or {}) | {"copy", "zero"})
    raise UserError(f"unknown seq-MoE expert {name!r}; known: {', '.join(known)}")


def build_expert(name: str, experts_cfg: Mapping[str, Any] | None, *, d_model: int, dtype,
                 param_dtype) -> nn.Module:
    """The expert module called `name` (module name = expert name, so equal names share
    parameters)."""
    kind = expert_kind(name, experts_cfg)
    cfg = experts_cfg[name] if experts_cfg is not None and name in experts_cfg else None
    return EXPERTS.get(kind)(cfg, d_model=d_model, dtype=dtype, param_dtype=param_dtype,
                             name=f"expert_{name}")


def default_expert_configs() -> ml_collections.ConfigDict:
    """The paper's feature experts: clip (image embedding), face (identity embedding, 512-d as
    AntelopeV2), noise (mask-ratio embedding)."""
    return ml_collections.ConfigDict(dict(
        clip=dict(kind="feature", feature_key="clip", feature_dim=768, encoder="precomputed",
                  encoder_config=dict(), resampler="mlp", resampler_hidden=0, num_heads=4,
                  feature_norm=True),
        face=dict(kind="feature", feature_key="face", feature_dim=512, encoder="precomputed",
                  encoder_config=dict(), resampler="mlp", resampler_hidden=0, num_heads=4,
                  feature_norm=True),
        noise=dict(kind="feature", feature_key="mask_ratio", feature_dim=256, encoder="noise",
                   encoder_config=dict(dim=256, max_period=10000.0, scale=1000.0),
                   resampler="mlp", resampler_hidden=0, num_heads=4, feature_norm=True),
    ))
