"""The property table's cells come from measurements on the layers, not from labels.

Each test re-measures one property on the experiment's own objects, so that a layer whose
inverse starts to iterate, or whose exact log-likelihood drifts from the dense Jacobian, changes
the cell and fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

import flowmath as fm
from experiments import property_table as pt
from flowmath.testing import count_iterations

ROWS = pt.rows()
EXACT = ["nice", "irevnet", "realnvp", "glow", "iresnet_exact"] + (["maf"] if "maf" in ROWS else [])
ANALYTIC_INVERSE = ["nice", "irevnet", "realnvp", "glow"] + (["maf"] if "maf" in ROWS else [])


def _build(name, seed=0):
    rng = np.random.default_rng(seed)
    model, x, prepare = ROWS[name][1](rng)
    params = model.init(rng, x)
    if prepare is not None:
        params = prepare(params, rng)
    return model, params, x[:3], rng


def _measure(name, seed=0):
    rng = np.random.default_rng(seed)
    model, x, prepare = ROWS[name][1](rng)
    cfg = pt.Config.quick()
    return pt.measure_row(model, x, cfg, rng, prepare, pt.ROW_GROUPS.get(name, 1000)), cfg


def test_counter_sees_fixed_point_and_ode_work():
    """The hook counts what the drivers do: a fixed-point inverse and an ODE solve."""
    model, params, x, _ = _build("iresnet_exact")
    with count_iterations() as c:
        _, info = model.layer.invert(params, x)
    assert c.fixed_point_solves == 1 and c.fixed_point_iterations == info.n_iter > 1
    model, params, x, _ = _build("ffjord_exact")
    with count_iterations() as c:
        model.layer.forward(params, x)
    assert c.ode_solves == 1 and c.ode_steps > 0 and c.ode_nfe >= 6 * c.ode_steps
    # nesting: an outer block sees the inner one's work
    with count_iterations() as outer, count_iterations() as inner:
        model.layer.forward(params, x)
    assert outer.ode_steps == inner.ode_steps > 0


@pytest.mark.parametrize("name", ANALYTIC_INVERSE)
def test_analytic_inverse_runs_no_iteration(name):
    """Coupling, Glow (ActNorm, LU 1x1 convolution) and autoregressive inverses are closed
    forms: zero fixed-point iterations and zero ODE steps, and the round trip is exact."""
    model, params, x, _ = _build(name)
    z, _ = model.layer.forward(params, x)
    with count_iterations() as c:
        x_back, _ = model.layer.inverse(params, z)
    assert not c.iterative, c
    # the inverse is a closed form, so it is exact to rounding (measured ~1e-15; margin 100x)
    assert np.max(np.abs(x_back - x)) < 1e-13


@pytest.mark.parametrize("name", EXACT)
def test_exact_likelihood_equals_dense_jacobian(name):
    """log_prob = log pi(f(x)) + slogdet(J_f(x)) from autograd's dense Jacobian to 1e-10
    (measured <= 4e-16 relative; the table's threshold is the tolerance)."""
    m, cfg = _measure(name)
    assert m["likelihood_error"] <= pt.EXACT_TOL
    assert pt.cells(m, cfg)[4] == "yes"


def test_cells_follow_the_measurements():
    """The decision rules of the table, fed with synthetic measurements: a single fixed-point
    iteration makes an inverse non-analytic; a likelihood error above 1e-10 makes it inexact; a
    z-score beyond z_crit makes the estimator biased."""
    cfg = pt.Config.quick()
    zero = dict(
        fixed_point_solves=0, fixed_point_iterations=0, ode_solves=0, ode_steps=0, ode_nfe=0
    )
    base = {
        "free_form_declared": False,
        "has_inverse": True,
        "forward_counts": zero,
        "inverse_counts": zero,
        "nvp_spread": 0.5,
        "likelihood_error": 1e-16,
    }
    assert pt.cells(base, cfg) == ("no", "yes", "yes", "yes", "yes", "N/A")
    one_iter = {**zero, "fixed_point_solves": 1, "fixed_point_iterations": 1}
    assert pt.cells({**base, "inverse_counts": one_iter}, cfg)[2] == "no"
    drift = {**base, "likelihood_error": 2e-10, "z_test": {"z": 0.3}}
    assert pt.cells(drift, cfg)[4:] == ("no", "yes")
    biased = {**drift, "z_test": {"z": -cfg.z_crit - 0.1}}
    assert pt.cells(biased, cfg)[5] == "no"
    assert pt.cells({**base, "nvp_spread": 0.0}, cfg)[3] == "no"


def _z_test(name):
    m, cfg = _measure(name)
    zt = m["z_test"]
    # enough calls that a 1 % bias is z_crit + 2 = 6 standard errors (5 % margin on the pilot)
    assert zt["detectable_rel_bias"] <= 0.0105, zt
    return abs(zt["z"]), cfg.z_crit


def test_iresnet_power_series_is_biased():
    """On the aligned block (J_g near -0.81 I, d = 4) the 10-term power series misses the tail
    of the series: truncation bias about 1.6 % of the log-det, measured at |z| > 4."""
    z, z_crit = _z_test("iresnet")
    assert z > z_crit


@pytest.mark.slow
def test_residual_flow_roulette_is_unbiased():
    """The same block with the Russian-roulette estimator: no bias at the 1 % level (|z| < 4)."""
    z, z_crit = _z_test("residual_flow")
    assert z < z_crit


def test_free_form_is_declared_by_the_layers():
    for name in ("nice", "irevnet", "realnvp", "glow", "ffjord", "iresnet", "residual_flow"):
        model, _, _, _ = _build(name)
        flag, reason = pt.declared_free_form(model)
        assert flag is not None and reason, name
    assert pt.declared_free_form(fm.Flow(fm.CNF(hidden=(4,))))[0] is True
    assert pt.declared_free_form(fm.Chain([fm.AffineCoupling(), fm.ActNorm()]))[0] is False
