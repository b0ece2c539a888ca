"""The train state: its abstract shape, its shardings, and its creation.

Every trainer's state is a plain dict ``{"step": int32 [], "params": ..., "opt_state": ...}``
(the image tokenizer adds its discriminator's ``disc_params`` / ``disc_opt_state``), created by
`init_state` from a function returning it boxed (logical axis names on every parameter).
Parameter (and optimizer-moment) shardings come from the logical axis names every parameter
carries, mapped to mesh axes by the rules table (`parallel/rules.py`); scalars are replicated.
The unified trainer creates its state with `create_train_state`; `checkpoint.trained` restores it onto the same
abstract target (`state_shardings` + `abstract_state`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

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
    e.g. 38 s vs 11 s for the 64 px tokenizer's init, and an init runs once)."""
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    lowered = jitted.lower(*args)
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


def init_state(boxed_init: Callable[[jax.Array], Any], mesh: Mesh, rules: rules_lib.Rules,
               rng: jax.Array, *, cheap_compile: bool = True) -> tuple[Any, Any]:
    """``(state, shardings)``: ``unbox(boxed_init(rng))`` with each array written directly in
    its sharding.

    ``eval_shape`` -> logical shardings (rules table) -> ``jit(init, out_shardings=...)``;
    `cheap_compile` compiles the init with `compile_init` (plain `jax.jit` otherwise).
    """
    shardings = rules_lib.logical_shardings(jax.eval_shape(boxed_init, rng), mesh, rules)

    def unboxed(key):
        return nn.meta.unbox(boxed_init(key))

    if cheap_compile:
        return compile_init(unboxed, rng, out_shardings=shardings)(rng), shardings
    return jax.jit(unboxed, out_shardings=shardings)(rng), shardings


def create_train_state(model: UnifiedModel, tx: optax.GradientTransformation, mesh: Mesh,
                       rules: rules_lib.Rules, rng: jax.Array,
                       features: Mapping[str, jax.Array] | None = None) -> tuple[dict, Any]:
    """The unified model's initial train state (`init_state`), and its shardings.

    No mesh context here: `out_shardings` lays the parameters out, and flax would otherwise
    constrain each parameter inside the layer scan with its per-layer (unstacked) names.
    """
    return init_state(boxed_state_fn(model, tx, features), mesh, rules, rng)


def abstract_state(abstract: Any, shardings: Any) -> Any:
    """`jax.ShapeDtypeStruct`s carrying `shardings` (the restore target of a checkpoint)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def count_params(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
