"""flowmath.lipschitz: certified spectral norms bound the truth from above, power iteration
from below; spectral normalisation and its carried state; activations with Lip <= 1."""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from flowmath import lipschitz as lip
from flowmath.testing import check_grads


def _with_spectrum(rng, m, n, s):
    """m x n matrix with the given singular values (Haar-random singular vectors)."""
    U, _ = np.linalg.qr(rng.normal(size=(m, m)))
    V, _ = np.linalg.qr(rng.normal(size=(n, n)))
    k = min(m, n)
    S = np.zeros((m, n))
    S[np.arange(k), np.arange(k)] = s
    return U @ S @ V.T


SPECTRA = {
    # (shape, singular values): a clear gap, a tiny gap (power iteration is slow there),
    # ill-conditioned, and a rank-one matrix
    "gap": ((30, 20), lambda k: np.linspace(1.0, 0.1, k) * np.r_[2.0, np.ones(k - 1)]),
    "tiny-gap": ((40, 60), lambda k: np.r_[3.0, 3.0 * (1 - 1e-4), np.linspace(2.9, 0.1, k - 2)]),
    "ill": ((25, 25), lambda k: np.logspace(0, -12, k)),
    "rank-one": ((12, 7), lambda k: np.r_[5.0, np.zeros(k - 1)]),
    "wide": ((150, 300), lambda k: np.sort(np.random.default_rng(1).uniform(0, 2, k))[::-1]),
}


@pytest.mark.parametrize("name", list(SPECTRA))
def test_certified_geq_true_geq_power_estimate(name, rng):
    (m, n), spec = SPECTRA[name]
    s = spec(min(m, n))
    W = _with_spectrum(rng, m, n, s)
    # the reference: sigma_max by construction; W itself carries rounding ~1e-15 relative, so
    # the comparisons allow the reference that much (1e-13), not the bound
    true = s.max()
    assert np.linalg.svd(W, compute_uv=False)[0] == pytest.approx(true, rel=1e-13)
    est, _, _ = lip.power_iteration(W, rng.normal(size=m), 3)
    for method in ("gram", "norm1inf", "frobenius"):
        bound = lip.certified_spectral_norm(W, method)
        assert bound >= true * (1 - 1e-13), (method, bound, true)
    assert est <= true * (1 + 1e-13)
    # the gram certificate is tight: exact up to ~1e-10 relative
    assert lip.certified_spectral_norm(W) <= true * (1 + 1e-9)


def test_certificate_float32_and_transposes(rng):
    W = rng.normal(size=(70, 20)).astype(np.float32)
    true = np.linalg.svd(W.astype(np.float64), compute_uv=False)[0]
    b = lip.certified_spectral_norm(W)
    assert true <= b <= true * (1 + 1e-9)
    assert lip.certified_spectral_norm(W.T) == pytest.approx(b, rel=1e-10)
    assert lip.certified_spectral_norm(np.zeros((3, 4))) == 0.0


def test_certificate_cache_matches_content(rng):
    W = rng.normal(size=(9, 5))
    b = lip.cached_certified_spectral_norm(W)
    assert b == lip.certified_spectral_norm(W)
    W2 = W.copy()
    W2[0, 0] += 1.0  # same shape, different content: a fresh certificate
    assert lip.cached_certified_spectral_norm(W2) == lip.certified_spectral_norm(W2)
    assert lip.cached_certified_spectral_norm(W.copy()) == b


def test_power_iteration_state_carries_over(rng):
    W = _with_spectrum(rng, 20, 15, np.linspace(2.0, 0.2, 15))
    u0 = rng.normal(size=20)
    s_all, u_all, _ = lip.power_iteration(W, u0, 7)
    u = u0
    for _ in range(7):  # seven calls of one iteration carrying u == one call of seven
        s, u, _ = lip.power_iteration(W, u, 1)
    np.testing.assert_allclose(u, u_all, rtol=0, atol=1e-14)
    assert s == pytest.approx(s_all, rel=1e-14)
    # gap 2.0 / 1.87: the estimate converges to sigma_max from below
    s_many, _, _ = lip.power_iteration(W, u, 500)
    assert s <= s_many <= 2.0 * (1 + 1e-14)
    assert s_many == pytest.approx(2.0, rel=1e-10)


def test_spectral_normalize(rng):
    W = _with_spectrum(rng, 8, 6, np.linspace(3.0, 0.5, 6))
    s, u, _ = lip.power_iteration(W, rng.normal(size=8), 200)
    Wn, u_new, sigma = lip.spectral_normalize(W, u, 0.9, 1)
    assert sigma == pytest.approx(3.0, rel=1e-12)
    assert np.linalg.svd(Wn, compute_uv=False)[0] == pytest.approx(0.9, rel=1e-12)
    # below the coefficient nothing changes: max(1, sigma/c) = 1
    small = 0.1 * W
    Wn_small, _, _ = lip.spectral_normalize(small, u, 0.9, 1)
    np.testing.assert_array_equal(Wn_small, small)
    # the gradient of sigma_hat = u^T W v (u, v constants) is u v^T
    _, uu, vv = lip.power_iteration(W, u, 1)
    grad = autograd.grad(lambda A: lip.spectral_normalize(A, u, 0.9, 1)[2])(W)
    np.testing.assert_allclose(grad, np.outer(uu, vv), atol=1e-14)


def test_spectral_norm_primitive(rng):
    W = rng.normal(size=(6, 4))
    assert lip.spectral_norm(W) == pytest.approx(np.linalg.svd(W, compute_uv=False)[0], rel=1e-14)
    check_grads(lip.spectral_norm, modes=["rev"], order=1)(W)
    check_grads(
        lambda A: anp.sum(A / anp.maximum(1.0, lip.spectral_norm(A) / 0.7) ** 2),
        modes=["rev"],
        order=1,
    )(W)


@pytest.mark.parametrize("beta", [0.3, 1.0, 5.0])
def test_lipswish_lipschitz_leq_one(beta):
    x = np.linspace(-30.0, 30.0, 600001) / beta
    d = lip.lipswish_derivative(x, beta)
    # max_z sigma(z)(1 + z(1 - sigma(z))) = 1.09984 at z = 2.40, divided by 1.1
    assert d.max() == pytest.approx(1.0998393 / 1.1, abs=1e-6)
    assert np.max(np.abs(d)) <= 1.0
    fd = autograd.elementwise_grad(lambda t: lip.lipswish(t, beta))(x[::1000])
    np.testing.assert_allclose(d[::1000], fd, rtol=1e-12, atol=1e-14)


def test_elu_lipschitz_and_derivative():
    x = np.linspace(-40.0, 40.0, 8001)
    d = lip.elu_derivative(x)
    assert np.all((d > 0) & (d <= 1.0))
    np.testing.assert_array_equal(d, np.where(x > 0, 1.0, np.exp(np.minimum(x, 0.0))))
    # central differences away from the kink at 0 (autograd's expm1 VJP, g * (ans + 1),
    # underflows to 0 below x ~ -37, so the reference here is numerical)
    xs = x[np.abs(x) > 1e-3][::37]
    h = 1e-6
    fd = (lip.elu(xs + h) - lip.elu(xs - h)) / (2 * h)
    # FD rounding: eps * |elu| / h ~ 1e-9 absolute
    np.testing.assert_allclose(lip.elu_derivative(xs), fd, rtol=1e-8, atol=1e-8)
    # float32 stays float32
    assert lip.elu(x.astype(np.float32)).dtype == np.float32


def test_bad_inputs(rng):
    with pytest.raises(ValueError, match="`W` must be a 2-D array"):
        lip.certified_spectral_norm(np.ones(3))
    with pytest.raises(ValueError, match="`method` must be one of"):
        lip.certified_spectral_norm(np.eye(2), "svd-ish")
    with pytest.raises(ValueError, match="`W` must be finite"):
        lip.certified_spectral_norm(np.array([[np.nan, 1.0]]))
    with pytest.raises(TypeError, match="`W` must be a floating array"):
        lip.certified_spectral_norm(np.eye(2, dtype=int))
    with pytest.raises(ValueError, match=r"`u` must have shape \(3,\)"):
        lip.power_iteration(np.ones((3, 2)), np.ones(2), 1)
    with pytest.raises(ValueError, match="`n_iter` must be >= 1"):
        lip.power_iteration(np.ones((3, 2)), np.ones(3), 0)
    with pytest.raises(ValueError, match="`coeff` must be finite and > 0"):
        lip.spectral_normalize(np.ones((3, 2)), np.ones(3), -1.0)
