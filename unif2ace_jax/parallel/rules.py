"""The one table mapping logical axis names (on every parameter and activation) to mesh axes.

Parameters are annotated with `nn.with_logical_partitioning(init, names)`; activations with
`nn.with_logical_constraint(x, names)`. This table is the only place that decides how they are
laid out on the mesh (MaxText style), so a sharding preset is a different table, not a code edit.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from unif2ace_jax.errors import UserError

Rules = Sequence[tuple[str, Any]]

# Logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    ("norm", None),
    ("feature", None),
    ("conv_in", None),
    ("conv_out", None),
)

# The mesh activation constraints resolve against while a step is traced (`activation_mesh`).
# Flax's `with_logical_constraint` without `mesh=` needs JAX's abstract mesh (`jax.set_mesh`),
# which flax would also apply to every parameter's logical names, with the wrong rank inside
# the layer scan; a `with mesh:` block alone sets no abstract mesh, so the constraint would be
# silently dropped. Passing the mesh explicitly avoids both.
_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar(
    "unif2ace_activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh) -> Iterator[None]:
    """Within this block `constrain` lays activations out on `mesh` (use around tracing)."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """`nn.with_logical_constraint(x, names)` on the `activation_mesh` (with the current
    `nn.logical_axis_rules`); unchanged flax behaviour outside one."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return nn.with_logical_constraint(x, names)
    return nn.with_logical_constraint(x, names, mesh=mesh)


def get_rules(overrides: Rules = ()) -> tuple[tuple[str, Any], ...]:
    """`DEFAULT_RULES` with `(name, axis)` overrides (e.g. from `config.sharding.rules`) winning."""
    table = dict(DEFAULT_RULES)
    for name, axis in overrides:
        if name not in table:
            raise UserError(f"unknown logical axis {name!r} in sharding rules; known: {sorted(table)}")
        table[name] = tuple(axis) if isinstance(axis, list) else axis
    return tuple(table.items())


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for a tree of (boxed) abstract arrays, e.g. from `jax.eval_shape(init)`.

    Leaves without logical names are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 1) -> NamedSharding:
    """Sharding for a host batch array [B, ...]: batch dim over the rule for "batch"."""
    axis = dict(rules).get("batch")
    return NamedSharding(mesh, PartitionSpec(axis, *([None] * (ndim - 1))))


def batch_shardings(batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of batch shardings matching a tree of arrays (leading batch dim each)."""
    return jax.tree.map(lambda x: batch_sharding(mesh, rules, x.ndim), batch)


def batch_shard_count(mesh: Mesh, rules: Rules) -> int:
    """How many ways the logical "batch" axis of `rules` splits a batch over `mesh`."""
    axis = dict(rules).get("batch")
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    return int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
