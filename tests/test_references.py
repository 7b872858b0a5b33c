"""Every bound recomputed from its formula, never read back from the implementation.

* The fixed-point inverse's a-priori and a-posteriori Banach bounds at EVERY iteration, from the
  recorded iterates and a Lipschitz constant recomputed here from SVDs; the iteration count must
  be the FIRST k at which the recomputed bound meets the tolerance (an inverse that stops one
  iteration early, or a bound inflated 10x, fails).
* The certified Lipschitz constant of an ``IResBlock``: >= the product of the exact (SVD) norms
  of the spectrally normalised weights recomputed here, >= the largest Jacobian norm seen at
  random points, and tight (<= 1e-9 relative above the SVD product).
* The exact moments of the power-series estimator and the roulette's standard deviation against
  matrix-power / double-sum formulas written out here.

Tolerances are set from the measured error with the margin stated beside each.
"""

import math

import autograd
import numpy as np
import pytest
from test_power import _quadform_cov, _weighted_series_moments

import flowmath as fm
from flowmath import estimators as est

EPS = np.finfo(np.float64).eps


def _normalised_by_svd(Ws, coeff):
    """W_i / max(1, sigma_i / c) with sigma_i from the SVD (the normalisation's definition)."""
    return [W / max(1.0, np.linalg.svd(W, compute_uv=False)[0] / coeff) for W in Ws]


def _lipschitz_by_svd(Ws, coeff):
    return math.prod(np.linalg.svd(W, compute_uv=False)[0] for W in _normalised_by_svd(Ws, coeff))


def _recomputed_bounds(iterates, L):
    """a_priori_k = L^k / (1 - L) ||x^1 - x^0||, a_post_k = L / (1 - L) ||x^k - x^{k-1}||,
    k = 1 .. K, from the iterates (K + 1, n, d)."""
    steps = np.linalg.norm(np.diff(iterates, axis=0), axis=2)  # (K, n): ||x^k - x^{k-1}||
    k = np.arange(1, len(steps) + 1)[:, None]
    a_priori = L**k / (1.0 - L) * steps[0][None, :]
    a_post = L / (1.0 - L) * steps
    return a_priori, a_post


CASES = {
    # name: (hidden, coeff, activation, x scale); L = coeff^(len(hidden)+1) (ELU/LipSwish: Lip 1)
    "linear c=0.9": ((), 0.9, "elu", 1.0),
    "elu c=0.95^2": ((16,), 0.95, "elu", 2.0),
    "lipswish c=0.8^3": ((12, 12), 0.8, "lipswish", 3.0),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fixed_point_bounds_recomputed_at_every_iteration(name):
    """The recorded bounds equal the recomputed ones (measured relative error <= 4e-14 at
    k <= 200: the rounding of L^k; asserted to 1e-11, a margin of ~250), the true error is below
    them at every iteration (rounding slack 64 eps (1 + ||y||) / (1 - L)), and the loop stops
    at the first k where min(a_priori, a_post) <= tol max(1, ||y||): not one iteration earlier,
    not later."""
    hidden, coeff, act, scale = CASES[name]
    rng = np.random.default_rng(1)
    block = fm.IResBlock(hidden=hidden, coeff=coeff, logdet="exact", activation=act)
    x_star = scale * rng.normal(size=(5, 6))
    params = block.init(rng, x_star)
    L_svd = _lipschitz_by_svd([p["W"] for p in params], coeff)
    y, _ = block.forward(params, x_star)
    x, _, info = block.inverse_with_info(params, y, record=True, tol=1e-12)
    # the certificate: above the SVD value, by at most 1e-9 relative (measured: ~1e-15)
    assert L_svd <= info.lipschitz <= L_svd * (1 + 1e-9), (info.lipschitz, L_svd)
    L = info.lipschitz
    a_priori, a_post = _recomputed_bounds(info.history["iterates"], L)
    np.testing.assert_allclose(info.history["a_priori"][1:], a_priori, rtol=1e-11, atol=0)
    np.testing.assert_allclose(info.history["a_posteriori"][1:], a_post, rtol=1e-11, atol=0)
    # the bounds hold at every iteration
    err = np.linalg.norm(info.history["iterates"][1:] - x_star, axis=2)
    slack = 64 * EPS * (1 + np.linalg.norm(y, axis=1)) / (1 - L)
    assert np.all(err <= np.minimum(a_priori, a_post) + slack)
    # the stopping rule: the first k whose recomputed bound meets the tolerance
    thresh = 1e-12 * np.maximum(1.0, np.linalg.norm(y, axis=1))
    met = np.all(np.minimum(a_priori, a_post) <= thresh, axis=1)
    k_first = int(np.argmax(met)) + 1
    assert met.any() and info.n_iter == k_first == len(a_priori), (info.n_iter, k_first)
    np.testing.assert_allclose(info.bound, np.minimum(a_priori, a_post)[-1], rtol=1e-11)
    assert np.all(np.linalg.norm(x - x_star, axis=1) <= info.bound + slack)


@pytest.mark.parametrize("c", [0.5, 0.9, 0.99])
def test_fixed_point_iteration_count_is_the_a_priori_one_worst_case(c):
    """g(x) = c Q x (Q orthogonal): the error contracts by exactly c, so with the a-priori
    bound the count needed for tol is ceil(log(tol (1 - c) max(1, ||y||) / d0) / log c) up to
    the a-posteriori bound, which is the same or one smaller; computed here from the formula."""
    rng = np.random.default_rng(2)
    d = 8
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    block = fm.IResBlock(hidden=(), coeff=c, logdet="exact")
    params = [{"W": c * Q.T, "b": np.zeros(d)}]  # g(x) = c Q x in row form
    y = rng.normal(size=(1, d))
    _, info = block.invert(params, y, tol=1e-10)
    d0 = np.linalg.norm(y @ params[0]["W"])  # ||x^1 - x^0|| = ||g(y)||
    thresh = 1e-10 * max(1.0, np.linalg.norm(y))
    k_prior = math.ceil(math.log(thresh * (1 - c) / d0) / math.log(c))
    # a_post_k = c/(1-c) ||x^k - x^{k-1}|| with ||x^k - x^{k-1}|| = c^{k-1} ||(I + cQ) e_0||
    # between (1 - c) c^{k-1} ||e_0|| and (1 + c) c^{k-1} ||e_0||: never later than a priori
    assert k_prior - 3 <= info.n_iter <= k_prior, (info.n_iter, k_prior)


def test_lipschitz_certificate_against_jacobians():
    """Certified L >= max over 60 random points of ||J_g(x)||_2 (the true Lipschitz constant
    is the sup of that) >= the power-iteration estimate's product; L <= SVD product (1 + 1e-9)."""
    rng = np.random.default_rng(3)
    block = fm.IResBlock(hidden=(10,), coeff=0.9, logdet="exact")
    x = rng.normal(size=(60, 4)) * 2
    params = block.init(rng, x)
    L = block.lipschitz_bound(params)
    Wn = _normalised_by_svd([p["W"] for p in params], 0.9)
    exact = fm.IResBlock(hidden=(10,), coeff=0.9, logdet="exact")

    def g(v):
        return exact.forward(params, v[None])[0][0] - v

    jac = autograd.jacobian(g)
    seen = max(np.linalg.svd(jac(xi), compute_uv=False)[0] for xi in x)
    power = 1.0
    for W in Wn:
        est_sigma, _, _ = fm.lipschitz.power_iteration(W, rng.normal(size=W.shape[0]), 2)
        power *= est_sigma
    L_svd = math.prod(np.linalg.svd(W, compute_uv=False)[0] for W in Wn)
    assert power <= L_svd * (1 + 1e-13)
    assert seen <= L_svd * (1 + 1e-12) <= L * (1 + 1e-12)
    assert L <= L_svd * (1 + 1e-9)


# -- exact moments --------------------------------------------------------------------------
def _J(d, L, seed):
    G = np.random.default_rng(seed).standard_normal((d, d))
    return L * G / np.linalg.norm(G, 2)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
@pytest.mark.parametrize("n_probes", [1, 3])
def test_power_series_moments_recomputed(probe, n_probes):
    """power_series_bias_std against M_n = sum (-1)^{k+1} J^k / k written out: mean tr M_n,
    bias log det - tr M_n, s.d. sqrt(Cov(v^T M v, v^T M v) / m); measured error <= 3e-15
    relative, asserted at 1e-12 (margin ~300)."""
    J = _J(6, 0.7, 1)
    mom = est.power_series_bias_std(J, 12, n_probes=n_probes, probe=probe)
    ld = np.linalg.slogdet(np.eye(6) + J)[1]
    M, P = np.zeros((6, 6)), np.eye(6)
    for k in range(1, 13):
        P = P @ J
        M = M + (-1.0) ** (k + 1) / k * P
        assert mom.mean[k - 1] == pytest.approx(np.trace(M), rel=1e-12, abs=1e-14)
        assert mom.bias[k - 1] == pytest.approx(ld - np.trace(M), rel=1e-9, abs=1e-14)
        sd = math.sqrt(_quadform_cov(M, M, probe) / n_probes)
        assert mom.std[k - 1] == pytest.approx(sd, rel=1e-12)
    # the truncation bound holds and is recomputed from its formula d sum_{k>n} L^k / k
    for n in (1, 2, 5, 12):
        tail = 6 * math.fsum(0.7**k / k for k in range(n + 1, 400))
        assert est.series_truncation_bound(0.7, 6, n) == pytest.approx(tail, rel=1e-12)
        assert abs(mom.bias[n - 1]) <= tail


@pytest.mark.parametrize(
    "L, p, m, n_probes, probe",
    [(0.5, 0.5, 1, 1, "gaussian"), (0.6, 0.3, 0, 2, "rademacher"), (0.65, 0.5, 3, 8, "gaussian")],
)
def test_roulette_std_recomputed(L, p, m, n_probes, probe):
    """roulette_std against the double sum over E[w_k w_j] = 1 / P(N >= min(k, j) - m) written
    out here (120 terms: the tail (L^2 / (1 - p))^k is below 1e-20); measured relative
    difference ~1e-13, asserted at 1e-9 (a 1 % error of the second moment moves it ~1e-2)."""
    d = 5
    J = _J(d, L, 4)
    C, P = [], np.eye(d)
    for k in range(1, 121):
        P = P @ J
        C.append((-1.0) ** (k + 1) / k * P)
    mean, var = _weighted_series_moments(C, 1, p, m, n_probes, probe)
    assert mean == pytest.approx(np.linalg.slogdet(np.eye(d) + J)[1], rel=1e-12)
    got = est.roulette_std(J, p=p, n_exact=m, n_probes=n_probes, probe=probe)
    assert got == pytest.approx(math.sqrt(var), rel=1e-9)


@pytest.mark.parametrize("shape", [(6, 6), (30, 20), (64, 200)])
def test_gram_certificate_covers_rounding(shape):
    """The certificate is the floating-point estimate PLUS the rounding it must cover:
    sigma_svd (1 + 16 n eps) <= b <= sigma_svd (1 + 1e-9), n the smaller side (the bound starts
    from t = lambda (1 + 64 n eps), lambda = sigma^2). A certificate that returned the LAPACK
    value itself would sit within a few eps of the SVD and fail the left inequality."""
    W = np.random.default_rng(7).normal(size=shape)
    s = np.linalg.svd(W, compute_uv=False)[0]
    n = min(shape)
    b = fm.lipschitz.certified_spectral_norm(W)
    assert s * (1 + 16 * n * EPS) <= b <= s * (1 + 1e-9), (b / s - 1) / EPS


@pytest.mark.parametrize("rtol", [1e-4, 1e-6, 1e-8])
@pytest.mark.parametrize("first_step", [0.01, 3.0])  # 3.0: rejections clipped at MIN_FACTOR
def test_dopri5_controller_is_scipys_rk45_step_for_step(rtol, first_step):
    """The adaptive driver's elementary controller (error norm, SAFETY 0.9, exponent -1/5 for
    the 5(4) pair, factors clipped to [0.2, 10], no growth after a rejection) is scipy's RK45
    controller: from the same first step on Van der Pol (mu = 2) both take exactly the same
    number of accepted steps and evaluations and end at the same state (measured difference
    <= 1.1e-12 relative: summation order, amplified over the solve; asserted 1e-10). A
    different exponent or safety changes the counts (the mutation pass's step-control
    survivor)."""
    from scipy.integrate import solve_ivp

    def rhs(t, y, p=None):
        return np.array([y[1], 2.0 * (1 - y[0] ** 2) * y[1] - y[0]])

    y0, span = np.array([2.0, 0.0]), (0.0, 6.0)
    opts = {"rtol": rtol, "atol": rtol * 1e-2, "first_step": first_step}
    sol = fm.ode.solve(rhs, y0, np.array(span), None, **opts)
    ref = solve_ivp(rhs, span, y0, method="RK45", **opts)
    assert (sol.n_accepted, sol.nfe) == (len(ref.t) - 1, ref.nfev), (sol.n_accepted, sol.nfe)
    np.testing.assert_allclose(sol.ys[-1], ref.y[:, -1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c", [0.5, 0.9])
def test_fixed_point_residual_bound_recomputed_unconverged(c):
    """At a loose tolerance (1e-4: the iterate is far from x*, so rounding is irrelevant) the
    reported residual bound is ||y - F(x^k)|| / (1 - L) recomputed here (F is (1 - L)-co-
    Lipschitz), it bounds the true error, and it is not loose by more than (1 + L) / (1 - L)."""
    rng = np.random.default_rng(5)
    block = fm.IResBlock(hidden=(16,), coeff=math.sqrt(c), logdet="exact")
    x_star = 2 * rng.normal(size=(4, 6))
    params = block.init(rng, x_star)
    y, _ = block.forward(params, x_star)
    x, info = block.invert(params, y, tol=1e-4)
    L = info.lipschitz
    Fx, _ = block.forward(params, x)
    resid = np.linalg.norm(y - Fx, axis=1) / (1 - L)
    np.testing.assert_allclose(info.residual_bound, resid, rtol=1e-9)
    err = np.linalg.norm(x - x_star, axis=1)
    assert np.all(err > 1e-9)  # unconverged: far above rounding
    assert np.all(err <= resid * (1 + 1e-9))
    assert np.all(resid <= err * (1 + L) / (1 - L) * (1 + 1e-9))
