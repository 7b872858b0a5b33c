"""Dequantisation: exact identities, the bound, the importance-weighted estimate's convergence,
and the variational dequantizer (uniform as its zero-parameter special case)."""

import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from flowmath.dequantize import (
    UniformDequantizer,
    VariationalDequantizer,
    bits_per_dim,
    elbo,
    importance_weighted_log_prob,
    uniform_dequantize,
)
from flowmath.testing import check_grads
from flowmath.train import Adam, tree_map

Z = 4.0  # z-score of every statistical assertion below (fixed seeds)

# A discretised 1-D Gaussian: model density p = N(M, S^2) on y, K = 4 cells of width 1/4.
K1, M, S = 4, 0.45, 0.12


def gauss_logp(y):
    return -0.5 * ((y[:, 0] - M) / S) ** 2 - math.log(S * math.sqrt(2 * math.pi))


def exact_log_P(x):
    """log P(x) = log of the model's mass on the cell [x/K, (x+1)/K)."""
    return np.log(norm.cdf((x + 1) / K1, M, S) - norm.cdf(x / K1, M, S))


def exact_uniform_bound(x):
    """E_{u~U[0,1)} log p((x+u)/K) - ln K in closed form: y is uniform on [a, b) and
    E(y - M)^2 = ((a-M)^2 + (a-M)(b-M) + (b-M)^2) / 3."""
    a, b = x / K1 - M, (x + 1) / K1 - M
    second = (a * a + a * b + b * b) / 3
    return -0.5 * second / S**2 - math.log(S * math.sqrt(2 * math.pi)) - math.log(K1)


def relative_weight_variance(x):
    """Var(w)/P^2 for the uniform importance weight w = p((x+u)/K)/K, in closed form using
    N(y; M, S^2)^2 = N(y; M, S^2/2) / (2 S sqrt(pi))."""
    P = np.exp(exact_log_P(x))
    s2 = S / math.sqrt(2)
    mass = norm.cdf((x + 1) / K1, M, s2) - norm.cdf(x / K1, M, s2)
    ew2 = mass / (K1 * 2 * S * math.sqrt(math.pi))
    return ew2 / P**2 - 1


# -- exact identities ----------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [2, 17, 256])
def test_uniform_density_scores_log2_levels_bits(levels, rng):
    x = rng.integers(0, levels, size=(7, 5))
    zero = lambda y: np.zeros(len(y))  # noqa: E731  the uniform density on [0,1)^D
    b = bits_per_dim(elbo(zero, x, levels, rng, n_samples=3), 5)
    np.testing.assert_allclose(b, math.log2(levels), rtol=0, atol=1e-12)
    iw = importance_weighted_log_prob(zero, x, levels, rng, n_samples=9)
    np.testing.assert_allclose(bits_per_dim(iw, 5), math.log2(levels), rtol=0, atol=1e-12)
    # the continuous-density form of the helper agrees
    b = bits_per_dim(np.zeros(3), 5, levels=levels)
    np.testing.assert_allclose(b, math.log2(levels), rtol=0, atol=1e-12)


def test_nice_mnist_bits_per_dim():
    # NICE: a log-likelihood of 1980.50 nats on MNIST rescaled to [0, 1]^784 (docs/theory.rst)
    assert abs(bits_per_dim(1980.50, 784, levels=256) - 4.356) < 5e-4
    # and the two forms of the helper are the same conversion
    assert bits_per_dim(1980.50, 784, levels=256) == pytest.approx(
        bits_per_dim(1980.50 - 784 * math.log(256), 784), abs=1e-12
    )


def test_uniform_dequantize_lands_in_the_cell_and_is_uniform(rng):
    x = rng.integers(0, 17, size=(4000, 3))
    y = uniform_dequantize(x, 17, rng)
    assert y.dtype == np.float64 and y.shape == x.shape
    np.testing.assert_array_equal(np.floor(y * 17), x)
    frac = (y * 17 - x).ravel()
    # Kolmogorov-Smirnov against U(0,1): sqrt(n) D_n < 1.95 is the 0.1 % level
    frac.sort()
    n = frac.size
    d = max(np.max(np.arange(1, n + 1) / n - frac), np.max(frac - np.arange(n) / n))
    assert math.sqrt(n) * d < 1.95
    y32 = uniform_dequantize(x.astype(np.float32), 17, rng)
    assert y32.dtype == np.float32


# -- the bound on a discretised Gaussian where log P(x) is exact ---------------------------------
def test_uniform_bound_below_log_P_exactly_and_by_monte_carlo():
    x = np.arange(K1)
    exact = exact_uniform_bound(x)
    log_P = exact_log_P(x)
    assert np.all(exact < log_P)  # Jensen, strict: p is not constant on any cell
    # the Monte Carlo estimate of the bound agrees with the closed form at Z standard errors
    R = 20000
    xs = np.repeat(x, R)[:, None]
    est = elbo(gauss_logp, xs, K1, np.random.default_rng(1)).reshape(K1, R)
    se = est.std(axis=1, ddof=1) / math.sqrt(R)
    assert np.all(np.abs(est.mean(axis=1) - exact) < Z * se)


def test_importance_estimate_rises_with_S_towards_log_P():
    # Burda et al. (2016), Thm 1: E L_S is non-decreasing in S and tends to log P(x); with the
    # same seed the S-sample sets are nested, so paired differences have small noise.
    x0, R = 2, 20000
    xs = np.full((R, 1), x0)
    log_P = float(exact_log_P(x0))
    sizes = [1, 4, 16, 64]
    est = [
        importance_weighted_log_prob(gauss_logp, xs, K1, np.random.default_rng(3), n_samples=s)
        for s in sizes
    ]
    # S = 1 is the single-sample (uniform dequantisation) bound, draw for draw
    single = elbo(gauss_logp, xs, K1, np.random.default_rng(3))
    np.testing.assert_allclose(est[0], single, rtol=0, atol=1e-12)
    for lo, hi in zip(est[:-1], est[1:], strict=True):
        diff = hi - lo
        assert diff.mean() > Z * diff.std(ddof=1) / math.sqrt(R)  # significantly higher
    for e in est:
        assert e.mean() < log_P + Z * e.std(ddof=1) / math.sqrt(R)  # never above log P(x)
    # the large-S gap is Var(w) / (2 S P^2) (delta method); at S = 64 the next order is ~1e-5
    gap = log_P - est[-1]
    predicted = relative_weight_variance(x0) / (2 * 64)
    assert abs(gap.mean() - predicted) < Z * gap.std(ddof=1) / math.sqrt(R) + 1e-4


def test_bound_on_discretised_correlated_2d_gaussian():
    # log P(x) by tensor Gauss-Legendre quadrature over the cell (exact to ~1e-14 here)
    K = 3
    mean = np.array([0.5, 0.4])
    cov = np.array([[0.04, 0.025], [0.025, 0.05]])
    prec = np.linalg.inv(cov)
    logdet = np.linalg.slogdet(cov)[1]

    def logp(y):
        r = y - mean
        return -0.5 * anp.sum(anp.dot(r, prec) * r, axis=1) - 0.5 * logdet - math.log(2 * math.pi)

    nodes, weights = np.polynomial.legendre.leggauss(40)
    cells = np.array([(i, j) for i in range(K) for j in range(K)])
    log_P = []
    for c in cells:
        t = (c[:, None] + (nodes[None, :] + 1) / 2) / K  # (2, 40) nodes in the cell
        grid = np.stack(np.meshgrid(t[0], t[1], indexing="ij"), -1).reshape(-1, 2)
        w = np.outer(weights, weights).ravel() / (2 * K) ** 2
        log_P.append(math.log(np.sum(w * np.exp(logp(grid)))))
    log_P = np.array(log_P)
    R = 1000
    xs = np.repeat(cells, R, axis=0)
    bound = elbo(logp, xs, K, np.random.default_rng(4)).reshape(len(cells), R)
    iw = importance_weighted_log_prob(logp, xs, K, np.random.default_rng(4), n_samples=64)
    iw = iw.reshape(len(cells), R)
    for b, e in ((bound, "elbo"), (iw, "iw")):
        upper = b.mean(axis=1) - Z * b.std(axis=1, ddof=1) / math.sqrt(R)
        assert np.all(upper < log_P), e
    assert np.all(iw.mean(axis=1) > bound.mean(axis=1))
    # 64 importance samples close all but a few per cent of the uniform bound's gap (measured
    # 0.2-2.4 %, mean over the cells 1.4 %)
    se = iw.std(axis=1, ddof=1) / math.sqrt(R)
    assert np.all(log_P - iw.mean(axis=1) < 0.05 * (log_P - bound.mean(axis=1)) + Z * se)


# -- the variational dequantizer -----------------------------------------------------------------
def _perturbed(params, rng, scale=0.5):
    return tree_map(lambda a: a + scale * rng.standard_normal(a.shape), params)


@pytest.mark.parametrize("shape", [(6, 3), (5, 1, 2, 2)])
def test_zero_parameter_q_is_uniform_dequantisation(shape, rng):
    x = rng.integers(0, 5, size=shape)
    q = VariationalDequantizer(hidden=(7,))
    params = q.init(rng, x, 5)

    def logp(y):
        return -anp.sum(anp.reshape((y - 0.3) ** 2, (y.shape[0], -1)), axis=1)

    a = elbo(logp, x, 5, np.random.default_rng(11), dequantizer=q, params=params, n_samples=4)
    b = elbo(logp, x, 5, np.random.default_rng(11), n_samples=4)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)
    u, log_q = q.sample(params, x, 5, np.random.default_rng(2))
    assert u.shape == x.shape
    np.testing.assert_allclose(log_q, 0.0, atol=1e-12)
    u_uniform, _ = UniformDequantizer().sample(None, x, 5, np.random.default_rng(2))
    np.testing.assert_allclose(u, u_uniform, rtol=0, atol=1e-15)


def test_q_density_is_normalised_and_matches_sampling(rng):
    x = np.array([[0], [2], [3]])
    q = VariationalDequantizer(hidden=(5,))
    params = _perturbed(q.init(rng, x, 4), rng, 0.25)
    # sample() returns the density that log_prob() evaluates at the drawn u
    u, log_q = q.sample(params, x, 4, rng)
    np.testing.assert_allclose(q.log_prob(params, x, 4, u), log_q, rtol=0, atol=1e-10)
    assert np.ptp(log_q) > 0.1  # the perturbation made q non-uniform
    # integral over (0, 1) in logit coordinates z: int q(sigmoid z) sigmoid'(z) dz = 1, over
    # |z| <= 30 (u = sigmoid(z) still below 1 in float64); z is logistic(mu, e^s) so the mass
    # outside is at most 2 exp(-(30 - |mu|) e^-s), checked negligible first
    mu, s = q._shift_logscale(params, x.astype(float), 4)
    assert np.all(2 * np.exp(-(30 - np.abs(mu)) * np.exp(-s)) < 1e-9)
    for row in x:

        def integrand(z, row=row):
            u = 1.0 / (1.0 + np.exp(-z))
            log_q = q.log_prob(params, row[None, :], 4, np.array([[u]]))[0]
            return float(np.exp(log_q) * u * (1 - u))

        total, err = integrate.quad(integrand, -30, 30, limit=200, epsabs=1e-12)
        assert abs(total - 1.0) < 1e-8


def test_variational_elbo_gradient_matches_finite_differences(rng):
    x = rng.integers(0, 4, size=(3, 2))
    q = VariationalDequantizer(hidden=(4,))
    params = _perturbed(q.init(rng, x, 4), rng, 0.3)

    def logp(y):
        return -anp.sum((y - 0.4) ** 2 / 0.02, axis=1)

    def objective(p):
        r = np.random.default_rng(0)  # the same draws at every evaluation
        return anp.sum(elbo(logp, x, 4, r, dequantizer=q, params=p, n_samples=2))

    check_grads(objective, modes=["rev"], order=1)(params)


def test_fitted_q_beats_uniform_and_stays_below_log_P():
    x = np.arange(K1)[:, None]
    q = VariationalDequantizer(hidden=(16,))
    rng = np.random.default_rng(0)
    params = q.init(rng, x, K1)
    opt = Adam(0.02)
    state = opt.init(params)

    def loss(p, r):
        return -anp.mean(elbo(gauss_logp, x, K1, r, dequantizer=q, params=p, n_samples=16))

    grad = autograd.grad(loss)
    for _ in range(150):
        params, state = opt.update(params, grad(params, rng), state)
    R = 20000
    est = elbo(
        gauss_logp,
        np.repeat(x, R, axis=0),
        K1,
        np.random.default_rng(7),
        dequantizer=q,
        params=params,
    ).reshape(K1, R)
    se = est.std(axis=1, ddof=1) / math.sqrt(R)
    variational = est.mean(axis=1)
    uniform = exact_uniform_bound(np.arange(K1))
    log_P = exact_log_P(np.arange(K1))
    assert np.all(variational - Z * se > uniform)
    assert np.all(variational - Z * se < log_P)
    # the fitted q closes most of the uniform bound's gap (measured: 95-98 %)
    assert np.all(log_P - variational < 0.2 * (log_P - uniform))


def test_q_with_an_unconditional_layer(rng):
    fm = pytest.importorskip("flowmath")
    try:
        layer = fm.Chain([fm.LULinear(), fm.LeakyReLU(0.5)])
        layer.init(rng, rng.standard_normal((4, 2)))
    except NotImplementedError:
        pytest.skip("LULinear / LeakyReLU not built yet")
    x = rng.integers(0, 3, size=(64, 2))
    q = VariationalDequantizer(hidden=(6,), layer=layer)
    params = _perturbed(q.init(rng, x, 3), rng, 0.2)
    u, log_q = q.sample(params, x, 3, rng)
    assert np.all((u > 0) & (u < 1))
    np.testing.assert_allclose(q.log_prob(params, x, 3, u), log_q, rtol=0, atol=1e-9)
    # normalisation: importance estimate of int q = E_{u~U}[q(u|x)] = 1 at a fixed x
    xs = np.repeat(x[:1], 40000, axis=0)
    vals = np.exp(q.log_prob(params, xs, 3, np.random.default_rng(5).uniform(size=xs.shape)))
    assert abs(vals.mean() - 1.0) < Z * vals.std(ddof=1) / math.sqrt(len(vals))


# -- bad input -----------------------------------------------------------------------------------
def test_bad_inputs(rng):
    zero = lambda y: np.zeros(len(y))  # noqa: E731
    x = rng.integers(0, 4, size=(3, 2))
    with pytest.raises(ValueError, match="`levels` must be >= 2; got 1"):
        elbo(zero, x, 1, rng)
    with pytest.raises(ValueError, match=r"`x` must lie in 0\.\.3 for `levels` = 4; got range"):
        uniform_dequantize(x + 1, 4, rng)
    with pytest.raises(ValueError, match="`x` must hold integer values"):
        uniform_dequantize(x + 0.5, 8, rng)
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, \.\.\.\)"):
        uniform_dequantize(np.arange(3), 4, rng)
    with pytest.raises(ValueError, match="`x` must be finite"):
        uniform_dequantize(np.array([[np.nan]]), 4, rng)
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator"):
        uniform_dequantize(x, 4, 0)
    msg = r"`log_prob` must map a batch of 3 samples to an array of shape \(3,\); got \(3, 2\)"
    with pytest.raises(ValueError, match=msg):
        elbo(lambda y: y, x, 4, rng)
    with pytest.raises(TypeError, match="`log_prob` must be callable"):
        elbo(None, x, 4, rng)
    with pytest.raises(ValueError, match="`n_samples` must be >= 1; got 0"):
        importance_weighted_log_prob(zero, x, 4, rng, n_samples=0)
    with pytest.raises(ValueError, match=r"`u` must lie in the open interval \(0, 1\)"):
        q = VariationalDequantizer(hidden=())
        q.log_prob(q.init(rng, x, 4), x, 4, np.ones(x.shape))
    with pytest.raises(TypeError, match="`layer` must be a Bijection or None; got str"):
        VariationalDequantizer(layer="nope")
