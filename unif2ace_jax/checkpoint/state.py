"""The unified model's train state: its abstract shape, its shardings, and its creation.

The train state is a plain dict ``{"step": int32 [], "params": ..., "opt_state": ...}``.
Parameter (and optimizer-moment) shardings come from the logical axis names every parameter
carries, mapped to mesh axes by the rules table (`parallel/rules.py`); scalars are replicated.
The trainer creates it (`create_train_state`); `checkpoint.trained` restores it onto the same
abstract target (`state_shardings` + `abstract_state`).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from unif2ace_jax.models.unified import UnifiedModel
from unif2ace_jax.parallel import rules as rules_lib


def compile_init(fn, *args, out_shardings: Any = None):
    """`jax.jit(fn, out_shardings=...)` compiled for `args`; on CPU with XLA's backend
    optimisation off (initializers' unrolled random-number code dominates compile time there,
    and an init runs once)."""
    lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
    if jax.default_backend() == "cpu":
        return lowered.compile({"xla_backend_optimization_level": 0})
    return lowered.compile()


def boxed_state_fn(model: UnifiedModel, tx: optax.GradientTransformation,
                   features: Mapping[str, jax.Array] | None = None):
    """``rng -> {"step", "params", "opt_state"}`` with `nn.LogicallyPartitioned` leaves."""

    def init(rng: jax.Array) -> dict:
        params = model.init(rng, features=features)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    return init


def state_shardings(model: UnifiedModel, tx: optax.GradientTransformation, mesh: Mesh,
                    rules: rules_lib.Rules,
                    features: Mapping[str, jax.Array] | None = None) -> tuple[Any, Any]:
    """``(abstract unboxed state, NamedShardings)`` of the train state, via `jax.eval_shape`."""
    boxed = jax.eval_shape(boxed_state_fn(model, tx, features), jax.random.key(0))
    shardings = rules_lib.logical_shardings(boxed, mesh, rules)
    return nn.meta.unbox(boxed), shardings


def create_train_state(model: UnifiedModel, tx: optax.GradientTransformation, mesh: Mesh,
                       rules: rules_lib.Rules, rng: jax.Array,
                       features: Mapping[str, jax.Array] | None = None) -> tuple[dict, Any]:
    """The initial train state, each array written directly in its sharding, and the shardings.

    ``eval_shape`` -> logical shardings (rules table) -> ``jit(init, out_shardings=...)``.
    """
    _, shardings = state_shardings(model, tx, mesh, rules, features)
    init_fn = boxed_state_fn(model, tx, features)
    # No mesh context here: `out_shardings` lays the parameters out, and flax would otherwise
    # constrain each parameter inside the layer scan with its per-layer (unstacked) names.
    init = compile_init(lambda key: nn.meta.unbox(init_fn(key)), rng, out_shardings=shardings)
    return init(rng), shardings


def abstract_state(abstract: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s carrying `shardings` (the restore target of a checkpoint)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
