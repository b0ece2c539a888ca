"""Sequence-level grouped MoE (docs/DESIGN.md §5), registered in `SEQ_MOE_SLOTS` as "grouped_seq_moe".

The backbone adds it as a residual branch, ``x += SeqMoE(LN(x))``. One decision per sequence:

1. the sequence's group: ``features["task"]`` (config ``task_key``; T2I -> gen, MMU / LM -> und)
   when given, else the group of its first valid token (right only under
   ``group_assignment="task"``; always pass the task under ``"modality"``);
2. pooled input: mean of ``h`` over the valid tokens (and, when ``features`` has it, only where
   ``features["pool_mask"] [B, L] bool``, config ``pool_mask_key``: e.g. the prompt part of MMU
   rows, so the decision does not see the answer it helps predict); router
   ``Linear(D -> n_und + n_gen)`` without bias, in float32; softmax over the group's experts
   (minus experts whose feature the sequence lacks, ``features["<feature_key>_present"] [B]
   bool``); top-k (2), renormalised;
3. output ``sum_chosen gate_e * E_e(h)``.

Experts are named in ``groups.und`` / ``groups.gen`` (e.g. ``["copy", "copy", "clip", "face"]``);
each list position is its own router column (so two ``copy`` columns are two experts), but equal
names share one module (and parameters). Names resolve through ``experts`` (feature expert
configs) or the built-ins ``copy`` / ``zero`` (`unif2ace_jax.models.experts`). With
renormalised gates the copy coefficient is computed as ``1 − Σ(non-copy gates)``: the same value,
but a sequence routed to copy+copy gets exactly ``h``.

All feature experts run on every sequence (dense); their cost is small next to the block
(an MLP on one vector, or L×T cross-attention) and it keeps shapes static.

KV-cache decoding: `Backbone.decode` hands the module only the new tokens, plus
``pool_cache={"sum" [B, D], "count" [B]}`` (the pooled tokens so far, kept in the backbone's
cache); the module adds the new tokens that ``pool_mask`` allows and routes on
``sum / count``, returning ``(y, new_pool_cache)``. `UnifiedModel.forward` sets
``pool_mask = seq_routing.prompt_pool_mask(...)`` (prompt only, never the answer) and the MMU
decoder pools the prefix and none of the generated tokens, so decoding routes exactly as the
full recomputation does.

Sown: ``aux_loss/seq_moe_balance`` (``λ_und·B_und + λ_gen·B_gen``, Switch balance over sequences,
`seq_routing.balance_loss`); ``intermediates/seq_moe_choices [B, k]`` (router columns, most
probable first), ``seq_moe_gates [B, k]``, ``seq_moe_group [B]``, ``seq_moe_usage [N]`` (picks
per column over the batch's non-empty sequences).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.models import experts as experts_lib
from unif2ace_jax.models.backbone import SEQ_MOE_SLOTS
from unif2ace_jax.models.encoders import ENCODERS
from unif2ace_jax.models.moe import seq_routing as routing
from unif2ace_jax.utils.defaults import with_defaults


def default_config() -> ml_collections.ConfigDict:
    """Every field the "grouped_seq_moe" factory reads, with its default (the paper's groups)."""
    return ml_collections.ConfigDict(dict(
        name="grouped_seq_moe",
        groups=dict(und=["copy", "copy", "clip", "face"], gen=["copy", "copy", "zero", "noise"]),
        experts=experts_lib.default_expert_configs(),
        top_k=2,
        renormalize=True,
        balance_weight_und=0.01,
        balance_weight_gen=0.01,
        task_key="task",  # features[task_key] [B]: the sequence builder's task (0 T2I, 1 MMU, 2 LM)
        pool_mask_key="pool_mask",  # optional features[pool_mask_key] [B, L] bool: pool only there
    ))


class GroupedSeqMoE(nn.Module):
    """``h: [B, L, D]``, ``group: [B, L] int``, ``valid: [B, L] bool``, ``features`` ->
    ``[B, L, D]``."""

    d_model: int
    und: tuple[str, ...] = ("copy", "copy", "clip", "face")
    gen: tuple[str, ...] = ("copy", "copy", "zero", "noise")
    experts: Any = None  # name -> expert config (FrozenConfigDict / mapping)
    top_k: int = 2
    renormalize: bool = True
    balance_weight_und: float = 0.01
    balance_weight_gen: float = 0.01
    task_key: str = "task"
    pool_mask_key: str = "pool_mask"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.und) + tuple(self.gen)

    def _available(self, features: Mapping[str, jax.Array] | None, batch: int) -> jax.Array | None:
        """``[B, N] bool`` from ``<feature_key>_present`` entries (None if there are none)."""
        if not features:
            return None
        cols = []
        found = False
        for name in self.columns:
            present = None
            if experts_lib.expert_kind(name, self.experts) == "feature":
                key = self.experts[name].feature_key + "_present"
                if key in features:
                    present = jnp.asarray(features[key], bool).reshape(batch)
                    found = True
            cols.append(jnp.ones((batch,), bool) if present is None else present)
        return jnp.stack(cols, axis=1) if found else None

    @nn.compact
    def __call__(self, h: jax.Array, *, group: jax.Array, valid: jax.Array,
                 features: Mapping[str, jax.Array] | None = None,
                 pool_cache: Mapping[str, jax.Array] | None = None):
        n_und, n_gen = len(self.und), len(self.gen)
        cols = self.columns
        b = h.shape[0]
        valid = jnp.asarray(valid, bool)
        task = None if features is None else features.get(self.task_key)
        seq_group = routing.sequence_group(group, valid, task)
        seq_valid = jnp.any(valid, axis=1)

        router = self.param("router", nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", None)), (h.shape[-1], n_und + n_gen),
            self.param_dtype)
        pool = valid
        if features is not None and self.pool_mask_key in features:
            pool = valid & jnp.asarray(features[self.pool_mask_key], bool)
        if pool_cache is None:
            pooled = routing.pooled_mean(h, pool)
        else:
            new_sum, new_count = routing.pooled_sum(h, pool)
            pool_cache = {"sum": pool_cache["sum"] + new_sum,
                          "count": pool_cache["count"] + new_count}
            pooled = pool_cache["sum"] / jnp.maximum(pool_cache["count"], 1.0)[:, None]
        logits = jnp.dot(pooled, router.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
        allowed = routing.eligible(seq_group, n_und, n_gen, self._available(features, b))
        probs = routing.router_probs(logits, allowed)
        gates, indices = routing.top_k_gates(probs, allowed, self.top_k, self.renormalize)
        weights = routing.column_weights(gates, indices, n_und + n_gen)  # [B, N]

        def weight_of(names) -> jax.Array:  # [B]: summed gates of the columns named `names`
            sel = jnp.asarray([c in names for c in cols])
            return jnp.sum(jnp.where(sel[None, :], weights, 0.0), axis=1)

        distinct = list(dict.fromkeys(cols))
        kinds = {n: experts_lib.expert_kind(n, self.experts) for n in distinct}
        copies = {n for n in distinct if kinds[n] == "copy"}
        out = jnp.zeros(h.shape, jnp.float32)
        if copies:
            w_copy = weight_of(copies)
            if self.renormalize:
                w_copy = jnp.where(w_copy > 0, 1.0 - weight_of(set(distinct) - copies), 0.0)
            out = out + w_copy[:, None, None] * h.astype(jnp.float32)
        for name in distinct:
            if kinds[name] in ("copy", "zero"):
                continue
            expert = experts_lib.build_expert(name, self.experts, d_model=self.d_model,
                                              dtype=self.dtype, param_dtype=self.param_dtype)
            y = expert(h, features=features, valid=valid)
            out = out + weight_of({name})[:, None, None] * y.astype(jnp.float32)

        balance = routing.balance_loss(probs, indices, seq_group, seq_valid, n_und, n_gen)
        self.sow("aux_loss", "seq_moe_balance",
                 self.balance_weight_und * balance[0] + self.balance_weight_gen * balance[1])
        self.sow("intermediates", "seq_moe_choices", indices)
        self.sow("intermediates", "seq_moe_gates", gates)
        self.sow("intermediates", "seq_moe_group", seq_group)
        picked = jnp.sum(jax.nn.one_hot(indices, n_und + n_gen) * (gates > 0)[..., None], axis=1)
        self.sow("intermediates", "seq_moe_usage",
                 jnp.sum(picked * seq_valid[:, None], axis=0))
        if pool_cache is not None:
            return out.astype(self.dtype), pool_cache
        return out.astype(self.dtype)


def full_config(cfg) -> ml_collections.ConfigDict:
    """``config.model.seq_moe``: `default_config` updated with `cfg` (``groups`` and
    ``experts`` are taken whole; unknown fields refused)."""
    return with_defaults(default_config(), cfg, "model.seq_moe", whole=("groups", "experts"))


def _validate(cfg) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`cfg`: a `full_config`."""
    groups = cfg.groups
    if groups is None or "und" not in groups or "gen" not in groups:
        raise UserError("seq_moe.groups needs both 'und' and 'gen' expert lists")
    und, gen = tuple(groups.und), tuple(groups.gen)
    k = int(cfg.top_k)
    for gname, names in (("und", und), ("gen", gen)):
        if not names:
            raise UserError(f"seq_moe.groups.{gname} is empty (use seq_moe.name='none' to turn "
                            f"the whole seq-MoE off)")
        if k < 1 or k > len(names):
            raise UserError(f"seq_moe.top_k={k} must be in [1, {len(names)}] "
                            f"(seq_moe.groups.{gname} has {len(names)} experts)")
        for n in names:
            kind = experts_lib.expert_kind(n, cfg.experts)
            experts_lib.EXPERTS.get(kind)
    return und, gen


def _frozen(x):
    if isinstance(x, ml_collections.ConfigDict) and not isinstance(
            x, ml_collections.FrozenConfigDict):
        return ml_collections.FrozenConfigDict(x)
    return x


@SEQ_MOE_SLOTS.register("grouped_seq_moe")
def make_grouped_seq_moe(cfg: ml_collections.ConfigDict, *, d_model: int, dtype, param_dtype,
                         name: str | None = None) -> GroupedSeqMoE:
    """Factory for the backbone's seq-MoE slot; `cfg` is ``config.model.seq_moe``
    (fields: `default_config`)."""
    cfg = full_config(cfg)
    und, gen = _validate(cfg)
    return GroupedSeqMoE(
        d_model=d_model, und=und, gen=gen, experts=_frozen(cfg.experts),
        top_k=int(cfg.top_k), renormalize=bool(cfg.renormalize),
        balance_weight_und=float(cfg.balance_weight_und),
        balance_weight_gen=float(cfg.balance_weight_gen),
        task_key=cfg.task_key, pool_mask_key=cfg.pool_mask_key,
        dtype=dtype, param_dtype=param_dtype, name=name)


def feature_keys(cfg: ml_collections.ConfigDict) -> dict[str, str]:
    """``feature_key -> encoder name`` for every feature expert the groups use."""
    cfg = full_config(cfg)
    und, gen = _validate(cfg)
    out = {}
    for n in dict.fromkeys(und + gen):
        if experts_lib.expert_kind(n, cfg.experts) == "feature":
            e = experts_lib.full_feature_config(cfg.experts[n], n)
            out[e.feature_key] = e.encoder
    return out


def dummy_features(cfg: ml_collections.ConfigDict, batch: int,
                   num_feature_tokens: int = 0) -> dict[str, jax.Array]:
    """Zero features of the right shapes for ``cfg`` (for `init` / `jax.eval_shape`).

    In-model encoders get their raw input (``[B]``), others ``[B, feature_dim]`` (or
    ``[B, T, feature_dim]`` with ``num_feature_tokens = T > 0``); plus ``task [B]``.
    """
    cfg = full_config(cfg)
    out: dict[str, jax.Array] = {cfg.task_key: jnp.zeros((batch,), jnp.int32)}
    und, gen = _validate(cfg)
    for n in dict.fromkeys(und + gen):
        if experts_lib.expert_kind(n, cfg.experts) != "feature":
            continue
        e = experts_lib.full_feature_config(cfg.experts[n], n)
        if ENCODERS.get(e.encoder).in_model:
            out[e.feature_key] = jnp.zeros((batch,), jnp.float32)
        else:
            if not e.feature_dim:
                raise UserError(f"seq_moe.experts.{n}.feature_dim is needed for dummy features")
            shape = (batch, num_feature_tokens, e.feature_dim) if num_feature_tokens else (
                batch, e.feature_dim)
            out[e.feature_key] = jnp.zeros(shape, jnp.float32)
    return out
