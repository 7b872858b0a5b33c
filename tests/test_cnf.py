"""The CNF layer: closed forms for linear fields, Hutchinson unbiasedness, normalisation of the
density by quadrature, round trips and the Flow wrapper."""

import copy

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
import scipy.linalg

import flowmath as fm

TIGHT = {"rtol": 1e-10, "atol": 1e-12}


def _linear_params(layer, rng, d, A):
    """Parameters of the affine field f = A z + c(t) (rows: z W_e with W_e = A^T). For
    concat-squash the gate is made constant in t (gate_w = 0) and W is divided by it."""
    params = layer.init(rng, rng.normal(size=(2, d)))
    if "gate_w" in params[0]:
        params[0]["gate_w"] = np.zeros(d)
        gate = 1.0 / (1.0 + np.exp(-params[0]["gate_b"]))
        params[0]["W"] = A.T / gate
    else:
        params[0]["W"] = A.T.copy()
    return params


@pytest.mark.parametrize("time", ["concat", "concat-squash"])
def test_linear_field_exact_trace(time):
    """f = A z (+ time terms): z(t1) = expm(t1 A) x for b = u = 0, and the log-det is
    t1 tr(A) exactly (a constant integrand, integrated exactly by every Runge-Kutta step)."""
    rng = np.random.default_rng(0)
    d, t1 = 4, 0.7
    A = rng.normal(size=(d, d)) / 2
    layer = fm.CNF(hidden=(), t1=t1, time=time, **TIGHT)
    params = _linear_params(layer, rng, d, A)
    x = rng.normal(size=(6, d))
    z, logdet = layer.forward(params, x)
    np.testing.assert_allclose(logdet, t1 * np.trace(A), rtol=1e-13, atol=0)
    x_back, minus = layer.inverse(params, z)
    np.testing.assert_allclose(minus, -t1 * np.trace(A), rtol=1e-13, atol=0)
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-9)
    if time == "concat":  # without time terms the flow map is the matrix exponential
        for key in ("b", "u"):
            params[0][key] = np.zeros(d)
        z, _ = layer.forward(params, x)
        np.testing.assert_allclose(z, x @ scipy.linalg.expm(t1 * A).T, rtol=0, atol=1e-9)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_linear_field_hutchinson_per_probe(probe):
    """FFJORD's estimate with one probe reused over [0, t1] is t1 * eps^T A eps, per sample."""
    rng = np.random.default_rng(1)
    d, t1 = 3, 1.3
    A = rng.normal(size=(d, d))
    layer = fm.CNF(hidden=(), t1=t1, trace="hutchinson", probe=probe, **TIGHT)
    params = _linear_params(layer, rng, d, A)
    x = rng.normal(size=(5, d))
    draw = np.random.default_rng(42)
    eps = layer.draw_probe(copy.deepcopy(draw), x.shape)
    _, logdet = layer.forward(params, x, draw)
    np.testing.assert_allclose(
        logdet, t1 * np.einsum("ni,ij,nj->n", eps, A, eps), rtol=1e-13, atol=1e-14
    )
    if probe == "rademacher":
        assert set(np.unique(eps)) <= {-1.0, 1.0}


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_log_density_unbiased(probe):
    """z-test at |z| < 4 (seeded): the mean over K probes of the Hutchinson log-density matches
    the exact one at every point (the trajectory does not depend on the probe)."""
    rng = np.random.default_rng(2)
    d, K = 2, 600
    x = rng.normal(size=(4, d))
    exact = fm.Flow(fm.CNF(hidden=(16, 16), t1=1.0, rtol=1e-7, atol=1e-9))
    params = exact.init(rng, x)
    ref = exact.log_prob(params, x)
    hutch = fm.Flow(
        fm.CNF(hidden=(16, 16), t1=1.0, trace="hutchinson", probe=probe, rtol=1e-7, atol=1e-9)
    )
    hutch.init(rng, x)
    est = hutch.log_prob(params, np.repeat(x, K, axis=0), np.random.default_rng(3))
    est = est.reshape(len(x), K)
    zscore = (est.mean(axis=1) - ref) / (est.std(axis=1, ddof=1) / np.sqrt(K))
    assert np.all(np.abs(zscore) < 4.0), zscore
    assert np.all(est.std(axis=1) > 1e-3)  # the estimator is genuinely random


def test_density_integrates_to_one_1d():
    """A generic 1-D CNF's density integrates to 1 within the solver tolerance (rtol = 1e-8):
    trapezoid rule on 401 points over [-12, 12] (the density is smooth and Gaussian-tailed, so
    the quadrature error is far below the tolerance: 1e-10 with 801 points)."""
    rng = np.random.default_rng(4)
    layer = fm.CNF(hidden=(16, 16), t1=1.0, rtol=1e-8, atol=1e-10)
    params = layer.init(rng, rng.normal(size=(8, 1)))
    x = np.linspace(-12.0, 12.0, 401)[:, None]
    mass = np.trapezoid(np.exp(fm.Flow(layer).log_prob(params, x)), x[:, 0])
    assert abs(1.0 - mass) < 1e-8, mass
    z, _ = layer.forward(params, x)
    assert np.std(z - x) > 0.1  # the map is far from the identity


def test_density_integrates_to_one_2d():
    """A 2-D CNF's density on a 61 x 61 grid over [-8, 8]^2 integrates to 1 within the solver
    tolerance rtol = 1e-8 (tensor trapezoid rule; 121 x 121 points agree to 1e-10)."""
    rng = np.random.default_rng(5)
    layer = fm.CNF(hidden=(16,), t1=1.0, rtol=1e-8, atol=1e-10)
    params = layer.init(rng, rng.normal(size=(8, 2)))
    g = np.linspace(-8.0, 8.0, 61)
    X, Y = np.meshgrid(g, g, indexing="ij")
    pts = np.stack([X.ravel(), Y.ravel()], axis=1)
    p = np.exp(fm.Flow(layer).log_prob(params, pts)).reshape(X.shape)
    mass = np.trapezoid(np.trapezoid(p, g, axis=1), g)
    assert abs(1.0 - mass) < 1e-8, mass
    z, _ = layer.forward(params, pts)
    assert np.std(z - pts) > 0.1


@pytest.mark.parametrize(("time", "act"), [("concat", "tanh"), ("concat-squash", "softplus")])
def test_check_bijection_exact_trace(time, act):
    """Round trips, log-det against slogdet of the autograd Jacobian, inverse log-det, batch
    independence at 10 * rtol (see tests/cases/continuous.py for the measured errors)."""
    rng = np.random.default_rng(6)
    layer = fm.CNF(hidden=(6, 5), t1=0.6, time=time, activation=act, **TIGHT)
    x = rng.normal(size=(2, 3))
    params = layer.init(rng, x)
    fm.testing.check_bijection(layer, params, x).assert_ok(1e-9)


def test_flow_sampling_and_log_prob_agree():
    """Flow(CNF): log p at samples from the inverse pass matches log_prob of the forward pass."""
    rng = np.random.default_rng(7)
    flow = fm.Flow(fm.CNF(hidden=(8,), t1=0.5, **TIGHT))
    params = flow.init(rng, rng.normal(size=(4, 2)))
    x, logp = flow.sample_and_log_prob(params, 16, rng)
    # measured 2e-12 (solver tolerance 1e-10 on a log-density of ~3); tolerance 1e-10
    np.testing.assert_allclose(flow.log_prob(params, x), logp, rtol=0, atol=1e-10)
    assert flow.sample(params, 3, rng).shape == (3, 2)


def test_gradients_agree_across_adjoints():
    """The gradient of a mean log-likelihood from backsolve, checkpoint and direct agree to the
    solver tolerance (the fused VJP drives the first two, autograd the last)."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 2))
    grads = {}
    for adjoint in ("backsolve", "checkpoint", "direct"):
        flow = fm.Flow(fm.CNF(hidden=(8,), t1=0.5, adjoint=adjoint, **TIGHT))
        params = flow.init(np.random.default_rng(9), x)
        g = autograd.grad(lambda p, flow=flow: anp.mean(flow.log_prob(p, x)))(params)
        grads[adjoint] = np.concatenate([np.ravel(g[i][k]) for i in range(2) for k in sorted(g[i])])
    scale = np.max(np.abs(grads["direct"]))
    # measured 7e-16 (the same discrete computation) and 8e-12 (backsolve re-integrates at
    # rtol 1e-10); tolerances 1e-13 and 10 rtol = 1e-9 (were 1e-10 and 1e-6: 10^5 looser)
    assert np.max(np.abs(grads["checkpoint"] - grads["direct"])) < 1e-13 * scale
    assert np.max(np.abs(grads["backsolve"] - grads["direct"])) < 1e-9 * scale


def test_float32_is_preserved():
    rng = np.random.default_rng(10)
    layer = fm.CNF(hidden=(8,), t1=0.5)
    x = rng.normal(size=(3, 2)).astype(np.float32)
    params = layer.init(rng, x)
    z, logdet = layer.forward(params, x)
    assert z.dtype == np.float32 and logdet.dtype == np.float32
    z64, ld64 = layer.forward(params, x.astype(np.float64))
    np.testing.assert_allclose(z, z64, rtol=1e-6, atol=1e-6)


def test_contract_attributes_and_bad_arguments():
    assert not fm.CNF().stochastic
    assert fm.CNF(trace="hutchinson").stochastic
    assert fm.CNF().event_ndims == (1,)
    with pytest.raises(ValueError, match="`trace` must be one of"):
        fm.CNF(trace="series")
    with pytest.raises(ValueError, match="`probe` must be one of"):
        fm.CNF(probe="uniform")
    with pytest.raises(ValueError, match="`t1` must be finite and > 0"):
        fm.CNF(t1=0.0)
    with pytest.raises(ValueError, match="`rtol` must be finite and > 0"):
        fm.CNF(rtol=-1.0)
    with pytest.raises(ValueError, match="`adjoint` must be one of"):
        fm.CNF(adjoint="reverse")
    with pytest.raises(ValueError, match="`step_size` must be given"):
        fm.CNF(method="rk4")
    rng = np.random.default_rng(11)
    layer = fm.CNF(hidden=(4,), trace="hutchinson")
    params = layer.init(rng, rng.normal(size=(2, 3)))
    with pytest.raises(ValueError, match="`rng` must be a numpy.random.Generator"):
        layer.forward(params, rng.normal(size=(2, 3)))
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 3\)"):
        layer.forward(params, rng.normal(size=(2, 4)), rng)


def test_identity_init_and_generic_init():
    rng = np.random.default_rng(12)
    x = rng.normal(size=(3, 2))
    ident = fm.CNF(hidden=(4,), identity_init=True)
    z, logdet = ident.forward(ident.init(rng, x), x)
    np.testing.assert_array_equal(z, x)
    np.testing.assert_array_equal(logdet, 0.0)
    generic = fm.CNF(hidden=(4,))
    z, logdet = generic.forward(generic.init(rng, x), x)
    assert not np.allclose(z, x) and not np.allclose(logdet, 0.0)


def test_cnf_inside_a_chain():
    """A CNF composes with exact layers: the chain's log-det is the sum, and gradients flow."""
    rng = np.random.default_rng(13)
    x = rng.normal(size=(4, 2))
    cnf, lin = fm.CNF(hidden=(6,), t1=0.5, **TIGHT), fm.LULinear()
    flow = fm.Flow(fm.Chain([cnf, lin]))
    params = flow.init(rng, x)
    z1, ld1 = cnf.forward(params[0], x)
    _, ld2 = lin.forward(params[1], z1)
    _, ld = flow.layer.forward(params, x)
    np.testing.assert_allclose(ld, ld1 + ld2, rtol=1e-13, atol=1e-13)
    g = autograd.grad(lambda p: anp.mean(flow.log_prob(p, x)))(params)
    assert all(np.all(np.isfinite(v)) for v in g[0][0].values())
