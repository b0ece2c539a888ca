"""The device mesh, built from `config.mesh`.

Axes are always ``("data", "fsdp", "tensor", "expert")``. `config.mesh` gives a size per axis;
one axis may be -1 ("fill": all devices not used by the others). Multi-slice (several TPU slices
joined over the data-centre network) uses a hybrid mesh: `config.dcn_mesh` gives the per-axis
sizes across slices, `config.mesh` the sizes within a slice.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from unif2ace_jax.errors import UserError

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")


def resolve_axis_sizes(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Per-axis sizes in `MESH_AXES` order with the single -1 filled in.

    Missing axes default to 1. Raises UserError when the product does not match `num_devices`.
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise UserError(f"unknown mesh axes {sorted(unknown)}; mesh axes are {list(MESH_AXES)}")
    values = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, v in enumerate(values) if v == -1]
    if len(fill) > 1:
        raise UserError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, values))}")
    if any(v == 0 or v < -1 for v in values):
        raise UserError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, values))}")
    known = math.prod(v for v in values if v != -1)
    if fill:
        if num_devices % known:
            raise UserError(
                f"mesh {dict(zip(MESH_AXES, values))} does not divide {num_devices} devices")
        values[fill[0]] = num_devices // known
    if math.prod(values) != num_devices:
        raise UserError(
            f"mesh {dict(zip(MESH_AXES, values))} has {math.prod(values)} devices, "
            f"but {num_devices} are available")
    return tuple(values)


def make_mesh(mesh_config: Mapping[str, int], dcn_mesh_config: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A `jax.sharding.Mesh` over `devices` (default: all) with axes `MESH_AXES`."""
    devices = list(devices if devices is not None else jax.devices())
    if dcn_mesh_config:
        num_slices = 1 + max(getattr(d, "slice_index", 0) for d in devices)
        dcn = resolve_axis_sizes(dcn_mesh_config, num_slices)
        ici = resolve_axis_sizes(mesh_config, len(devices) // num_slices)
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:
        shape = resolve_axis_sizes(mesh_config, len(devices))
        try:
            grid = mesh_utils.create_device_mesh(shape, devices)
        except (AssertionError, NotImplementedError, ValueError):
            # Device kinds without a topology-aware layout (e.g. fake CPU devices) use plain order.
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)
