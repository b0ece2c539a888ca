"""TPU slice names and per-chip figures, for the ahead-of-time fit check (`unif2ace_jax.aot`).

A topology is written ``KIND:AxB`` (v5e, v6e: 2-D torus) or ``KIND:AxBxC`` (v4, v5p: 3-D), the
shape in chips, e.g. ``v5p:4x4x2`` (32 chips = the slice Cloud calls ``v5p-64``). The Cloud names
``v4-N`` / ``v5p-N`` (N = TensorCores = 2 per chip) and ``v5e-N`` / ``v6e-N`` (N = chips) are
accepted too, for the standard slice shapes below.

v4 and v5p chips run in megacore mode (the two TensorCores of a chip are one JAX device), as on
Cloud TPU VMs, so one device = one chip, with the chip's whole HBM.

Figures (public spec sheets): HBM per chip and peak dense bf16 FLOP/s per chip.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping

from unif2ace_jax.errors import UserError

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipKind:
    name: str  # as in topology strings: v4, v5e, v5p, v6e
    hbm_bytes: int  # per chip
    peak_bf16_flops: float  # per chip, dense
    dims: int  # torus dimensions of a slice shape
    cores_per_chip: int  # TensorCores per chip (Cloud slice names count these for v4 / v5p)
    megacore: bool  # compile with one JAX device per chip (both cores)
    accelerator_prefix: str  # Cloud accelerator-type prefix, e.g. "v5litepod" in v5litepod-256


CHIPS: dict[str, ChipKind] = {
    "v4": ChipKind("v4", 32 * GiB, 275e12, 3, 2, True, "v4"),
    "v5e": ChipKind("v5e", 16 * GiB, 197e12, 2, 1, False, "v5litepod"),
    "v5p": ChipKind("v5p", 95 * GiB, 459e12, 3, 2, True, "v5p"),
    "v6e": ChipKind("v6e", 32 * GiB, 918e12, 2, 1, False, "v6e"),
}

# Standard slice shapes by chip count (Cloud TPU documentation).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
              256: (16, 16)}
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    chip: ChipKind
    shape: tuple[int, ...]  # chips per torus dimension

    @property
    def num_chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:
        """The `jax.experimental.topologies` name, e.g. ``v5p:4x4x2``."""
        return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

    @property
    def slice_name(self) -> str:
        """The Cloud name, e.g. ``v5p-64`` (TensorCores for v4 / v5p, chips for v5e / v6e)."""
        return f"{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}"

    @property
    def accelerator_type(self) -> str:
        """``TPU_ACCELERATOR_TYPE`` of the slice, e.g. ``v5litepod-256``."""
        return f"{self.chip.accelerator_prefix}-{self.num_chips * self.chip.cores_per_chip}"


def parse_topology(text: str) -> Topology:
    """``"v5p:4x4x2"`` or ``"v5p-64"`` -> `Topology`; UserError naming what is wrong."""
    text = (text or "").strip().lower()
    known = ", ".join(CHIPS)
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
    if m:
        kind, dims = m.group(1), tuple(int(d) for d in m.group(2).split("x"))
        chip = _chip(kind, text, known)
        if len(dims) != chip.dims or min(dims) < 1:
            example = "x".join(["2"] * chip.dims)
            raise UserError(f"topology {text!r}: {kind} slices have {chip.dims} dimensions "
                            f"(e.g. {kind}:{example})")
        return Topology(chip, dims)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
    if m:
        kind, count = m.group(1), int(m.group(2))
        kind = {"v5litepod": "v5e"}.get(kind, kind)
        chip = _chip(kind, text, known)
        if count % chip.cores_per_chip:
            raise UserError(f"topology {text!r}: {kind}-N counts TensorCores, "
                            f"{chip.cores_per_chip} per chip")
        chips = count // chip.cores_per_chip
        shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{kind}-{n * chip.cores_per_chip}" for n in shapes)
            raise UserError(f"topology {text!r} is not a standard slice ({sizes}); give the "
                            f"shape instead, e.g. {kind}:{'x'.join(['2'] * chip.dims)}")
        return Topology(chip, shapes[chips])
    raise UserError(f"unknown topology {text!r}; write KIND:AxB[xC] (e.g. v5p:4x4x2, "
                    f"v5e:16x16) or a slice name (e.g. v5p-64); kinds: {known}")


def _chip(kind: str, text: str, known: str) -> ChipKind:
    if kind not in CHIPS:
        raise UserError(f"unknown TPU kind {kind!r} in topology {text!r}; known: {known}")
    return CHIPS[kind]


def libtpu_env(topology: Topology) -> dict[str, str]:
    """Environment for a compile-only libtpu on a host that is not a TPU VM.

    Without these, libtpu probes the GCE metadata server and prints warnings about an unknown
    accelerator type and worker hostnames, and a second process fails on libtpu's lockfile.
    They only describe "this host", not the slice.
    """
    return {"TPU_ACCELERATOR_TYPE": topology.accelerator_type,
            "TPU_WORKER_HOSTNAMES": "localhost",
            "TPU_WORKER_ID": "0",
            "TPU_SKIP_MDS_QUERY": "1",
            # Compile-only: several checks may run at once (libtpu otherwise takes a lockfile).
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology_kwargs(topology: Topology) -> Mapping[str, object]:
    """Extra options of `jax.experimental.topologies.get_topology_desc` for this kind."""
    return {"chip_config_name": "megacore"} if topology.chip.megacore else {}
