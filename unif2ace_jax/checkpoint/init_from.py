"""A new run's parameters initialised from another unified-model workdir (``config.init_from``),
e.g. a Show-o converted by `convert.showo`.

Every parameter of the new model (the *target*) is, by its path in the params tree:

* **copied** when the source holds the same path with the same shape (embeddings, attention
  incl. q/k LayerNorm, norms, lm head, or any other matching module);
* **copied rows** for the vocabulary tables (``embed_tokens/embedding [V, D]``,
  ``lm_head/kernel [D, V]``, ``lm_head/bias [V]``) when only the vocabulary padding differs
  (`Rules.used_vocab_rows`): the used rows are copied, the padding rows keep the fresh init;
* **upcycled** for the token-MoE experts (``…/{routed,shared}_{wi,bi,wo,bo}``) when the source
  holds a dense FFN (``…/fc1``, ``…/fc2``) at the same module path (`upcycle_ffn`, mode
  `Rules.ffn_upcycling`; ``random`` keeps them fresh);
* **fresh** (the new model's own init) when the source has no such path: the token-MoE
  router, the seq-MoE and its LayerNorm, image-code bit heads, image position embeddings.

Any other shape mismatch is a one-line UserError naming the parameter. The source params no
target parameter takes are reported as unused.

`upcycle_ffn` modes, for a dense FFN of width H and per group a shared expert of width S
(``num_shared * shared_hidden``) and E routed experts of width h (both groups get the same):

* ``split``: the shared expert takes the dense hidden units ``[0, S)``, routed expert i takes
  ``[S + i h, S + (i + 1) h)`` (fc1 columns with their bias, fc2 rows); needs
  ``S + E h <= H`` (units past ``S + E h`` are dropped). With every expert active at weight 1
  the MoE FFN equals the dense FFN when ``S + E h == H``.
* ``copy``: every expert of width w takes the dense units ``j mod H`` for ``j in [0, w)`` (the
  dense FFN truncated to its first w units, tiled when ``w > H``).

In both the fc2 bias goes to the shared expert and the routed experts' output bias is zero;
without shared experts every routed expert gets the fc2 bias (a top-k mixture whose weights
sum to 1 then keeps it exactly).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from unif2ace_jax.checkpoint.trained import load_trained
from unif2ace_jax.errors import UserError
from unif2ace_jax.models.moe.routing import NUM_GROUPS
from unif2ace_jax.models.unified import UnifiedModel

UPCYCLING_MODES = ("split", "copy", "random")
EXPERT_KINDS = ("shared", "routed")
EXPERT_LEAVES = tuple(f"{kind}_{w}" for kind in EXPERT_KINDS for w in ("wi", "bi", "wo", "bo"))
# Vocabulary tables: path -> the vocabulary axis.
VOCAB_AXES = {("embed_tokens", "embedding"): 0, ("lm_head", "kernel"): -1,
              ("lm_head", "bias"): -1}

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rules:
    """How source params map onto the target beyond "same path, same shape".

    `ffn_upcycling`: "split" | "copy" | "random" (see the module docstring).
    `used_vocab_rows`: the vocabulary's used ids (`Vocab.used_size`) when source and target
    share the vocabulary but may pad it differently; None turns the rows rule off.
    """

    ffn_upcycling: str = "split"
    used_vocab_rows: int | None = None


@dataclasses.dataclass(frozen=True)
class Report:
    """Which target params were copied (``rows``: the used vocabulary rows only), upcycled or
    left fresh, and which source params no target took. Names are ``a/b/c`` paths."""

    copied: tuple[str, ...]
    rows: tuple[str, ...]
    upcycled: tuple[str, ...]
    fresh: tuple[str, ...]
    unused: tuple[str, ...]
    ffn_upcycling: str

    def summary(self) -> str:
        """One line of counts."""
        return (f"{len(self.copied) + len(self.rows)} copied ({len(self.rows)} of them the "
                f"used vocabulary rows only), {len(self.upcycled)} upcycled "
                f"({self.ffn_upcycling}), {len(self.fresh)} fresh; {len(self.unused)} source "
                f"params unused")


def _name(path: Path) -> str:
    return "/".join(path)


# ---------------------------------------------------------------------------------------------
# Dense FFN -> token-MoE experts


def _unit_indices(mode: str, dense: int, shared: int, routed: int, num_routed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Dense hidden units of the shared expert ``[1, shared]`` and the routed experts
    ``[num_routed, routed]`` of one group."""
    if mode == "split":
        need = shared + num_routed * routed
        if need > dense:
            raise UserError(f"init.ffn_upcycling='split' needs the shared + routed widths "
                            f"({shared} + {num_routed} x {routed} = {need}) to fit in the dense "
                            f"FFN's {dense} units; use 'copy' or 'random'")
        return (np.arange(shared)[None],
                shared + np.arange(num_routed * routed).reshape(num_routed, routed))
    if mode == "copy":
        return (np.arange(shared)[None] % dense,
                np.tile(np.arange(routed) % dense, (num_routed, 1)))
    raise UserError(f"unknown init.ffn_upcycling {mode!r} for upcycling; known: split, copy")


def _experts(fc1: Mapping[str, Any], fc2: Mapping[str, Any], idx: np.ndarray) -> dict:
    """Experts cut from the dense FFN at hidden units ``idx [n, w]``, repeated for each group:
    ``wi [..., G n, D, w]``, ``bi [..., G n, w]``, ``wo [..., G n, w, D]`` (no output bias)."""
    wi = jnp.moveaxis(jnp.take(fc1["kernel"], idx, axis=-1), -2, -3)  # [..., n, D, w]
    bi = jnp.take(fc1["bias"], idx, axis=-1)  # [..., n, w]
    wo = jnp.take(fc2["kernel"], idx, axis=-2)  # [..., n, w, D]
    return {"wi": jnp.concatenate([wi] * NUM_GROUPS, axis=-3),
            "bi": jnp.concatenate([bi] * NUM_GROUPS, axis=-2),
            "wo": jnp.concatenate([wo] * NUM_GROUPS, axis=-3)}


def upcycle_ffn(dense_params: Mapping[str, Any], moe_shapes: Mapping[str, tuple[int, ...]],
                mode: str) -> dict[str, jax.Array]:
    """Token-MoE expert params from a dense FFN.

    `dense_params`: ``{"fc1": {"kernel" [..., D, H], "bias" [..., H]}, "fc2": {"kernel"
    [..., H, D], "bias" [..., D]}}`` (leading axes, e.g. stacked layers, are kept).
    `moe_shapes`: the target's expert leaves, ``{"routed_wi": [..., 2E, D, h], "routed_bi",
    "routed_wo", "routed_bo", "shared_wi": [..., 2, D, S], …}`` (shared and biases optional).
    `mode`: "split" | "copy" (module docstring). Returns the same keys as `moe_shapes`;
    UserError when a derived shape differs from the asked one.
    """
    fc1, fc2 = dense_params["fc1"], dense_params["fc2"]
    dense = int(fc1["kernel"].shape[-1])
    routed_shape = moe_shapes["routed_wi"]
    num_routed, routed = routed_shape[-3] // NUM_GROUPS, routed_shape[-1]
    shared = moe_shapes["shared_wi"][-1] if "shared_wi" in moe_shapes else 0
    shared_idx, routed_idx = _unit_indices(mode, dense, shared, routed, num_routed)
    out = {}
    for kind, idx in (("shared", shared_idx), ("routed", routed_idx)):
        if f"{kind}_wi" not in moe_shapes:
            continue
        experts = _experts(fc1, fc2, idx)
        bias_holder = kind == "shared" or shared == 0
        bo = jnp.broadcast_to(fc2["bias"][..., None, :], experts["wo"].shape[:-2] + (
            fc2["bias"].shape[-1],))
        experts["bo"] = bo if bias_holder else jnp.zeros_like(bo)
        for w, value in experts.items():
            key = f"{kind}_{w}"
            if key in moe_shapes:
                out[key] = value
    for key, value in out.items():
        if tuple(value.shape) != tuple(moe_shapes[key]):
            raise UserError(f"cannot upcycle the dense FFN into {key}: it gives shape "
                            f"{list(value.shape)}, the model has {list(moe_shapes[key])}")
    return out


# ---------------------------------------------------------------------------------------------
# The mapping


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per target path: ``("copy" | "rows" | "upcycle" | "fresh", detail)``."""

    actions: dict[Path, tuple[str, Any]]
    report: Report


def _rows_fit(path: Path, fresh_shape: tuple, source_shape: tuple, used: int | None) -> bool:
    axis = VOCAB_AXES.get(path[-2:]) if len(path) >= 2 else None
    if axis is None or used is None or len(fresh_shape) != len(source_shape):
        return False
    rest = lambda s: s[:axis % len(s)] + s[axis % len(s) + 1:]  # noqa: E731
    return (rest(fresh_shape) == rest(source_shape) and fresh_shape[axis] >= used
            and source_shape[axis] >= used)


def plan_init(fresh_shapes: Any, source_shapes: Any, rules: Rules) -> Plan:
    """What `init_from_params` does to each target param, from shapes only (nested dicts of
    arrays or `jax.ShapeDtypeStruct`s); UserError for a shape mismatch no rule covers."""
    if rules.ffn_upcycling not in UPCYCLING_MODES:
        raise UserError(f"unknown init.ffn_upcycling {rules.ffn_upcycling!r}; known: "
                        f"{', '.join(UPCYCLING_MODES)}")
    fresh = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(fresh_shapes).items()}
    source = {p: tuple(x.shape) for p, x in traverse_util.flatten_dict(source_shapes).items()}
    actions: dict[Path, tuple[str, Any]] = {}
    used: set[Path] = set()
    for path, shape in fresh.items():
        dense = path[:-1] + ("fc1", "kernel")
        if path in source and source[path] == shape:
            actions[path] = ("copy", None)
            used.add(path)
        elif path in source and _rows_fit(path, shape, source[path], rules.used_vocab_rows):
            actions[path] = ("rows", VOCAB_AXES[path[-2:]])
            used.add(path)
        elif path in source:
            raise UserError(f"init_from: parameter {_name(path)} has shape {list(source[path])} "
                            f"in the source, {list(shape)} in the model, and no rule maps it")
        elif path[-1] in EXPERT_LEAVES and dense in source and rules.ffn_upcycling != "random":
            actions[path] = ("upcycle", path[:-1])
            used.update(path[:-1] + leaf for leaf in (("fc1", "kernel"), ("fc1", "bias"),
                                                      ("fc2", "kernel"), ("fc2", "bias")))
        else:
            actions[path] = ("fresh", None)
    for prefix in {d for kind, d in actions.values() if kind == "upcycle"}:
        _check_upcycling(prefix, fresh, source, rules.ffn_upcycling)
    names = lambda kind: tuple(_name(p) for p, a in actions.items() if a[0] == kind)  # noqa
    report = Report(copied=names("copy"), rows=names("rows"), upcycled=names("upcycle"),
                    fresh=names("fresh"),
                    unused=tuple(_name(p) for p in source if p not in used),
                    ffn_upcycling=rules.ffn_upcycling)
    return Plan(actions, report)


def _check_upcycling(prefix: Path, fresh: dict, source: dict, mode: str) -> None:
    """Runs `upcycle_ffn` on shapes only, so its UserErrors come before any array work."""
    dense = {fc: {w: jax.ShapeDtypeStruct(source[prefix + (fc, w)], jnp.float32)
                  for w in ("kernel", "bias")} for fc in ("fc1", "fc2")}
    shapes = {p[-1]: s for p, s in fresh.items() if p[:-1] == prefix and p[-1] in EXPERT_LEAVES}
    jax.eval_shape(lambda d: upcycle_ffn(d, shapes, mode), dense)


def _copy_rows(fresh: jax.Array, source: jax.Array, axis: int, used: int) -> jax.Array:
    head = jax.lax.slice_in_dim(source, 0, used, axis=axis).astype(fresh.dtype)
    tail = jax.lax.slice_in_dim(fresh, used, fresh.shape[axis], axis=axis)
    return jnp.concatenate([head, tail], axis=axis)


def apply_plan(plan: Plan, fresh: Any, source: Any, rules: Rules) -> Any:
    """The target params `plan` describes, from the `fresh` and `source` params (jittable)."""
    fresh_flat = traverse_util.flatten_dict(fresh)
    source_flat = traverse_util.flatten_dict(source)
    upcycled: dict[Path, dict] = {}
    out = {}
    for path, (kind, detail) in plan.actions.items():
        leaf = fresh_flat[path]
        if kind == "copy":
            out[path] = jnp.asarray(source_flat[path]).astype(leaf.dtype)
        elif kind == "rows":
            out[path] = _copy_rows(leaf, jnp.asarray(source_flat[path]), detail,
                                   int(rules.used_vocab_rows))
        elif kind == "upcycle":
            if detail not in upcycled:
                upcycled[detail] = _upcycle_module(detail, fresh_flat, source_flat, rules)
            out[path] = upcycled[detail][path[-1]].astype(leaf.dtype)
        else:
            out[path] = leaf
    return traverse_util.unflatten_dict(out)


def _upcycle_module(prefix: Path, fresh_flat: dict, source_flat: dict, rules: Rules) -> dict:
    dense = {fc: {w: jnp.asarray(source_flat[prefix + (fc, w)]) for w in ("kernel", "bias")}
             for fc in ("fc1", "fc2")}
    shapes = {p[-1]: tuple(x.shape) for p, x in fresh_flat.items()
              if p[:-1] == prefix and p[-1] in EXPERT_LEAVES}
    return upcycle_ffn(dense, shapes, rules.ffn_upcycling)


def init_from_params(fresh: Any, source: Any, rules: Rules) -> tuple[Any, Report]:
    """``(params, report)``: the target params from `fresh` (the new model's init, nested
    dicts) and `source` (another model's params), mapped as the module docstring says."""
    plan = plan_init(fresh, source, rules)
    return apply_plan(plan, fresh, source, rules), plan.report


# ---------------------------------------------------------------------------------------------
# From a workdir


def check_compatible(source: UnifiedModel, target: UnifiedModel, where: str) -> None:
    """UserError (one line) unless the source model reads tokens as the target does: the same
    vocabulary layout, text and image-code sizes (padding may differ), q/k LayerNorm and
    position numbering."""
    sv, tv = source.vocab, target.vocab
    checks = (("model.vocab_layout", sv.layout, tv.layout),
              ("text vocabulary size", sv.text_size, tv.text_size),
              ("model.num_image_codes", sv.num_image_codes, tv.num_image_codes),
              ("model.qk_layernorm", source.backbone.qk_layernorm, target.backbone.qk_layernorm),
              ("model.position_mode", source.position_mode, target.position_mode))
    for field, theirs, ours in checks:
        if theirs != ours:
            raise UserError(f"init_from {where}: its {field} is {theirs!r}, the config's is "
                            f"{ours!r} (the vocabulary and token layout must match)")


def init_params_from_workdir(workdir: str, model: UnifiedModel, params: Any,
                             params_shardings: Any, ffn_upcycling: str) -> tuple[Any, Report]:
    """``(params, report)``: `params` (the new model's fresh init, laid out by
    `params_shardings`) with what the unified-model workdir `workdir` (e.g. a converted Show-o)
    provides, mapped by `init_from_params`'s rules. The source is restored on the same mesh
    (with its own sharding rules); the fresh params are donated."""
    mesh = next(iter(jax.tree.leaves(params_shardings))).mesh
    source = load_trained(workdir, mesh=mesh)
    check_compatible(source.model, model, workdir)
    rules = Rules(ffn_upcycling=ffn_upcycling, used_vocab_rows=model.vocab.used_size)
    plan = plan_init(params, source.params, rules)
    mapped = jax.jit(lambda fresh, src: apply_plan(plan, fresh, src, rules),
                     out_shardings=params_shardings, donate_argnums=0)(params, source.params)
    return mapped, plan.report
