"""Mask schedules: derivatives against jax.grad and float64 finite differences, identities."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unif2ace_jax.errors import UserError
from unif2ace_jax.diffusion import SCHEDULES
from unif2ace_jax.diffusion.schedules import LOGLINEAR_EPS, get_schedule

NAMES = list(SCHEDULES)
TAU = np.linspace(0.02, 0.98, 25)


def test_registered_names():
    assert {"cosine", "linear", "loglinear"} <= set(NAMES)
    with pytest.raises(UserError, match="unknown mask schedule 'nope'"):
        get_schedule("nope")


def test_cosine_matches_show_o_and_design():
    s = SCHEDULES.get("cosine")
    u = np.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(s.from_uniform(u, xp=np), np.cos(np.pi * u / 2), atol=1e-12)
    m = np.sin(np.pi * TAU / 2)
    np.testing.assert_allclose(s.mask_ratio(TAU, xp=np), m, atol=1e-12)
    design = (np.pi / 2) * np.sqrt(1 - m**2) / (1 - m)  # docs/DESIGN.md §6
    np.testing.assert_allclose(s.dsigma_dtau(m, xp=np), design, rtol=1e-12)
    np.testing.assert_allclose(s.elbo_weight(m, xp=np), (np.pi / 2) * np.sqrt(1 - m**2) / m,
                               rtol=1e-12)


def test_linear_and_loglinear_closed_forms():
    lin = SCHEDULES.get("linear")
    np.testing.assert_allclose(lin.from_uniform(np.array([0.25]), xp=np), [0.75])
    ll = SCHEDULES.get("loglinear")
    # SEDD: sigma(t) = -log(1 - (1 - eps) t)
    np.testing.assert_allclose(ll.sigma(ll.mask_ratio(TAU, xp=np), xp=np),
                               -np.log(1 - (1 - LOGLINEAR_EPS) * TAU), rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_endpoints_monotone_inverse(name):
    s = SCHEDULES.get(name)
    assert float(s.mask_ratio(np.float64(0.0), xp=np)) == 0.0
    m = s.mask_ratio(np.linspace(0, 1, 101), xp=np)
    assert np.all(np.diff(m) > 0)
    assert m[-1] <= 1.0
    np.testing.assert_allclose(s.tau_of(s.mask_ratio(TAU, xp=np), xp=np), TAU, rtol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_sigma_and_ratio_identities(name):
    s = SCHEDULES.get(name)
    m = s.mask_ratio(TAU, xp=np)
    sig = s.sigma(m, xp=np)
    np.testing.assert_allclose(1 - np.exp(-sig), m, rtol=1e-12)
    np.testing.assert_allclose(s.ratio(m, xp=np), 1 / np.expm1(sig), rtol=1e-10)
    np.testing.assert_allclose(s.elbo_weight(m, xp=np), s.dsigma_dtau(m, xp=np) * s.ratio(m, xp=np),
                               rtol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_dsigma_dtau_against_jax_grad(name):
    s = SCHEDULES.get(name)
    sigma_of_tau = lambda t: s.sigma(s.mask_ratio(t))
    tau = jnp.asarray(TAU, jnp.float32)
    grad = jax.vmap(jax.grad(sigma_of_tau))(tau)
    # float32: near tau = 1 both sides lose digits to 1 - m (condition number ~ 1/(1-m)).
    np.testing.assert_allclose(grad, s.dsigma_dtau(s.mask_ratio(tau)), rtol=1e-4)
    dm = jax.vmap(jax.grad(lambda t: s.mask_ratio(t)))(tau)
    np.testing.assert_allclose(dm, s.dmask_dtau(s.mask_ratio(tau)), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_dsigma_dtau_against_finite_differences(name):
    s = SCHEDULES.get(name)
    h = 1e-6
    sig = lambda t: s.sigma(s.mask_ratio(t, xp=np), xp=np)
    fd = (sig(TAU + h) - sig(TAU - h)) / (2 * h)
    np.testing.assert_allclose(s.dsigma_dtau(s.mask_ratio(TAU, xp=np), xp=np), fd, rtol=1e-7)


def test_x64_jnp_matches_numpy():
    with jax.enable_x64(True):
        for name in NAMES:
            s = SCHEDULES.get(name)
            m = s.mask_ratio(jnp.asarray(TAU))
            assert m.dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(s.elbo_weight(m)),
                                       s.elbo_weight(s.mask_ratio(TAU, xp=np), xp=np), rtol=1e-13)


def test_cosine_weight_finite_at_full_mask():
    s = SCHEDULES.get("cosine")
    assert float(s.elbo_weight(jnp.float32(1.0))) == 0.0
    assert math.isinf(float(s.dsigma_dtau(jnp.float32(1.0))))
