"""Named sharding presets: a mesh layout plus overrides of the logical rules table.

``config.sharding.preset`` (or ``--preset`` of `unif2ace_jax.aot`) names one; ``NAME:N`` sets the
size of the preset's second mesh axis (the tensor or expert axis), e.g. ``fsdp_tensor:8``.

* ``fsdp`` — pure FSDP: every device holds 1/n of every parameter and optimizer moment (split
  along ``embed``) and 1/n of the batch; weights are all-gathered per layer. No tensor or expert
  split.
* ``fsdp_tensor`` — FSDP x tensor parallelism (Megatron style): ``heads``, ``mlp``, ``vocab``
  and the activations' width split over ``tensor`` (default 4), the rest as ``fsdp``; the batch
  is split over ``fsdp`` only.
* ``fsdp_expert`` — FSDP x expert parallelism: the routed experts' ``exp`` axis split over
  ``expert`` (default 8); the batch over ``fsdp`` x ``expert``. Dense weights are split over
  ``fsdp`` only (each expert-parallel group keeps a copy, as in data parallelism).

A preset replaces ``config.mesh``; rules named in ``config.sharding.rules`` still win over the
preset's (so one rule can be adjusted without writing a new preset).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from unif2ace_jax.errors import UserError
from unif2ace_jax.parallel.rules import Rules
from unif2ace_jax.utils.defaults import with_defaults


@dataclasses.dataclass(frozen=True)
class Preset:
    name: str
    mesh: Mapping[str, int]  # sizes per mesh axis; -1 fills the rest
    rules: tuple[tuple[str, Any], ...]  # overrides of `rules.DEFAULT_RULES`
    sized_axis: str | None = None  # the axis `NAME:N` resizes


PRESETS: dict[str, Preset] = {
    "fsdp": Preset(
        "fsdp", {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1},
        (("batch", ("data", "fsdp")), ("act_embed", None), ("vocab", None), ("heads", None),
         ("mlp", None), ("exp", None))),
    "fsdp_tensor": Preset(
        "fsdp_tensor", {"data": 1, "fsdp": -1, "tensor": 4, "expert": 1},
        (("batch", ("data", "fsdp")), ("act_embed", "tensor"), ("vocab", "tensor"),
         ("heads", "tensor"), ("mlp", "tensor"), ("exp", None)),
        sized_axis="tensor"),
    "fsdp_expert": Preset(
        "fsdp_expert", {"data": 1, "fsdp": -1, "tensor": 1, "expert": 8},
        (("batch", ("data", "fsdp", "expert")), ("act_embed", None), ("vocab", None),
         ("heads", None), ("mlp", None), ("exp", "expert")),
        sized_axis="expert"),
}


def get_preset(spec: str) -> Preset:
    """``"NAME"`` or ``"NAME:N"`` -> `Preset` (with the sized axis set to N)."""
    name, _, size = (spec or "").partition(":")
    if name not in PRESETS:
        raise UserError(f"unknown sharding preset {name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if not size:
        return preset
    if preset.sized_axis is None:
        raise UserError(f"sharding preset {name!r} takes no size (got {spec!r})")
    try:
        n = int(size)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"sharding preset {spec!r}: the size after ':' must be a positive "
                        f"integer")
    return dataclasses.replace(preset, mesh={**preset.mesh, preset.sized_axis: n})


def merged_rules(preset: Preset, overrides: Rules = ()) -> tuple[tuple[str, Any], ...]:
    """The preset's rule overrides, then `overrides` (which win)."""
    table = dict(preset.rules)
    for name, axis in overrides:
        table[name] = tuple(axis) if isinstance(axis, list) else axis
    return tuple(table.items())


def default_sharding_config() -> ml_collections.ConfigDict:
    """Every field of ``config.sharding``: ``preset`` (a preset spec, "" = none) and ``rules``
    (logical-axis rules over the preset's, or over the defaults)."""
    return ml_collections.ConfigDict(dict(preset="", rules=()))


def sharding_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.sharding`` (absent or None: none given) updated onto `default_sharding_config`."""
    given = config.sharding if "sharding" in config else None
    return with_defaults(default_sharding_config(), given or {}, "sharding")


def apply_preset(config: ml_collections.ConfigDict,
                 spec: str | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` with the preset's mesh and rules written into ``mesh`` and
    ``sharding.rules``; `spec` defaults to ``config.sharding.preset``. Without a preset the
    config comes back unchanged (the same object)."""
    sharding = sharding_config(config)
    spec = spec if spec is not None else sharding.preset
    if not spec:
        return config
    preset = get_preset(spec)
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.mesh = ml_collections.ConfigDict(dict(preset.mesh))
        if "sharding" not in out or out.sharding is None:
            out.sharding = ml_collections.ConfigDict()
        out.sharding.rules = merged_rules(preset, tuple(sharding.rules or ()))
        out.sharding.preset = spec
    return out
