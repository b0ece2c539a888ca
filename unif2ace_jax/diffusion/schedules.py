"""Mask schedules of the absorbing ("[MASK]") discrete diffusion, chosen by name (docs/DESIGN.md §6).

Time convention: diffusion time ``tau`` runs from 0 (clean image, mask ratio 0) to 1 (fully
masked). Training draws ``u ~ U(0, 1)`` and uses ``tau = 1 - u`` (also uniform), so Show-o's
``m = cos(pi u / 2)`` is ``m(tau) = sin(pi tau / 2)``. MaskGIT's decoding progress ``(k+1)/T``
plays the role of ``u``.

Every quantity the D3Diff loss needs is a function of the mask ratio ``m`` alone:

* total noise      ``sigma = -log(1 - m)``          (m = 1 - exp(-sigma))
* score ratio      ``r = (1 - m) / m = 1 / (exp(sigma) - 1)``
* noise rate       ``dsigma/dtau = m'(tau) / (1 - m)``, with ``m'`` written as a function of m
* ELBO weight      ``(dsigma/dtau) * r = m'(tau) / m`` (the MDLM/MD4 weight). Computed directly,
  so that neither factor's blow-up (r -> inf at m -> 0, dsigma/dtau -> inf at m -> 1) leaks in.

Registered schedules (``SCHEDULES.get(name)``):

* ``cosine`` [Show-o, default]: ``m = sin(pi tau/2) = cos(pi u/2)``, ``m' = (pi/2) sqrt(1-m^2)``.
* ``linear`` [MDLM/MD4 linear alpha_t = 1 - t]: ``m = tau``, ``m' = 1``. In SEDD's terms this is the
  log-linear noise ``sigma = -log(1 - tau)`` without the epsilon.
* ``loglinear`` [SEDD]: ``sigma = -log(1 - (1-eps) tau)``, i.e. ``m = (1-eps) tau``, ``m' = 1-eps``,
  eps = 1e-3, so the total noise ``sigma(1) = -log(eps)`` stays finite. Because ``m(1) < 1`` its
  continuous ELBO omits the prior term at tau = 1 and is slightly below the exact bound.

All functions take an ``xp`` argument (``jax.numpy`` by default, ``numpy`` for host-side float64
tables built at trace time, e.g. the samplers' step counts).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax.numpy as jnp

from unif2ace_jax.registry import Registry

Array = Any  # jax.Array or numpy.ndarray


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """A mask schedule ``m(tau)`` with its derivative written as a function of ``m``.

    Attributes:
      name: registry name.
      mask_ratio_at: ``(tau, xp) -> m`` for tau in [0, 1].
      dmask_dtau_of: ``(m, xp) -> dm/dtau`` evaluated at the tau where m(tau) = m.
      tau_of: ``(m, xp) -> tau``, the inverse of ``mask_ratio_at`` on the schedule's range.
    """

    name: str
    mask_ratio_at: Callable[[Array, Any], Array]
    dmask_dtau_of: Callable[[Array, Any], Array]
    tau_of: Callable[[Array, Any], Array]

    def mask_ratio(self, tau: Array, xp: Any = jnp) -> Array:
        """``m(tau)``; tau: any shape in [0, 1]."""
        return self.mask_ratio_at(tau, xp)

    def from_uniform(self, u: Array, xp: Any = jnp) -> Array:
        """Mask ratio for a training draw ``u ~ U(0,1)``: ``m(1 - u)`` (cosine: ``cos(pi u/2)``)."""
        return self.mask_ratio_at(1.0 - u, xp)

    def dmask_dtau(self, m: Array, xp: Any = jnp) -> Array:
        """``dm/dtau`` as a function of m."""
        return self.dmask_dtau_of(m, xp)

    def sigma(self, m: Array, xp: Any = jnp) -> Array:
        return sigma(m, xp)

    def ratio(self, m: Array, xp: Any = jnp) -> Array:
        return ratio(m, xp)

    def dsigma_dtau(self, m: Array, xp: Any = jnp) -> Array:
        """``dsigma/dtau = m'/(1-m)``; +inf at m = 1 (where cosine's formula reads 0/0)."""
        one_minus = 1.0 - m
        safe = xp.where(one_minus > 0, one_minus, 1.0)
        return xp.where(one_minus > 0, self.dmask_dtau_of(m, xp) / safe, xp.inf)

    def elbo_weight(self, m: Array, xp: Any = jnp) -> Array:
        """``(dsigma/dtau) * r = m'/m``, the weight of ``sum_i CE_i`` in the continuous NELBO."""
        return self.dmask_dtau_of(m, xp) / m


def sigma(m: Array, xp: Any = jnp) -> Array:
    """Total noise ``-log(1 - m)``."""
    return -xp.log1p(-m)


def ratio(m: Array, xp: Any = jnp) -> Array:
    """Absorbing-state score ratio ``r = (1 - m)/m = 1/(exp(sigma) - 1)``."""
    return (1.0 - m) / m


SCHEDULES: Registry[MaskSchedule] = Registry("mask schedule")


def _register(schedule: MaskSchedule) -> MaskSchedule:
    return SCHEDULES.register(schedule.name)(schedule)


_HALF_PI = math.pi / 2

COSINE = _register(MaskSchedule(
    name="cosine",
    mask_ratio_at=lambda tau, xp: xp.sin(_HALF_PI * tau),
    # m' = (pi/2) cos(pi tau/2) = (pi/2) sqrt(1 - m^2) for tau in [0, 1]; clip keeps m = 1 finite.
    dmask_dtau_of=lambda m, xp: _HALF_PI * xp.sqrt(xp.clip(1.0 - m * m, 0.0, None)),
    tau_of=lambda m, xp: xp.arcsin(m) / _HALF_PI,
))

LINEAR = _register(MaskSchedule(
    name="linear",
    mask_ratio_at=lambda tau, xp: xp.asarray(tau),
    dmask_dtau_of=lambda m, xp: xp.ones_like(m),
    tau_of=lambda m, xp: xp.asarray(m),
))

LOGLINEAR_EPS = 1e-3

LOGLINEAR = _register(MaskSchedule(
    name="loglinear",
    mask_ratio_at=lambda tau, xp: (1.0 - LOGLINEAR_EPS) * xp.asarray(tau),
    dmask_dtau_of=lambda m, xp: (1.0 - LOGLINEAR_EPS) * xp.ones_like(m),
    tau_of=lambda m, xp: m / (1.0 - LOGLINEAR_EPS),
))


def get_schedule(name: str | MaskSchedule) -> MaskSchedule:
    """A schedule by name (UserError listing known names), or pass a MaskSchedule through."""
    if isinstance(name, MaskSchedule):
        return name
    return SCHEDULES.get(name)


__all__ = ["MaskSchedule", "SCHEDULES", "get_schedule", "sigma", "ratio"]
