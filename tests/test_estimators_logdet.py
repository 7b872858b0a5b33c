"""Bias, variance and unbiasedness checks of the log-det estimators (issue 4, item 5).

Linear blocks g(x) = J x make every expectation exact: with the isotropic finite probe set
{sqrt(d) e_j} (E[v v^T] = I) the power-series estimate averaged over it IS tr(M_n). Statistical
tests use fixed seeds and the stated two-sided threshold ``Z``.
"""

from decimal import Decimal, getcontext

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from flowmath import estimators as est
from flowmath.estimators.logdet import _roulette_coef
from flowmath.testing import check_grads

Z = 4.0  # two-sided z threshold of every statistical test here


def normalised(d, L, seed):
    """A random Gaussian d x d matrix scaled to spectral norm exactly L (numpy SVD)."""
    G = np.random.default_rng(seed).standard_normal((d, d))
    return L * G / np.linalg.norm(G, 2)


def linear_vjp(J):
    return lambda V: anp.dot(V, J)


def basis_probes(d):
    """sqrt(d) e_j, j = 1..d, as (n_probes = d, n = 1, d): an exact isotropic probe set."""
    return np.sqrt(d) * np.eye(d)[:, None, :]


def trace_Mn_by_eigenvalues(J, n):
    lam = np.linalg.eigvals(J)
    k = np.arange(1, n + 1)[:, None]
    return np.real(np.sum((-1.0) ** (k + 1) / k * lam[None, :] ** k))


# ------------------------------------------------------------------------------------------
# power series


def test_series_bias_is_exact_for_a_linear_block_and_within_the_bound():
    d, L = 6, 0.7
    J = normalised(d, L, 0)
    logdet = np.linalg.slogdet(np.eye(d) + J)[1]
    moments = est.power_series_bias_std(J, 20)
    assert moments.logdet == pytest.approx(logdet, abs=1e-14)
    for n in range(1, 21):
        mean = est.power_series_logdet(
            linear_vjp(J), 1, d, n_terms=n, n_probes=d, probes=basis_probes(d)
        )[0]
        bias = logdet - mean
        # three independent routes to the same number: estimator mean, M_n, eigenvalues
        assert abs(bias - moments.bias[n - 1]) < 1e-12
        assert abs(mean - trace_Mn_by_eigenvalues(J, n)) < 1e-12
        assert abs(bias) <= est.series_truncation_bound(L, d, n)


@given(seed=st.integers(0, 10_000), d=st.integers(1, 8), L=st.floats(0.0, 0.95))
def test_series_bias_never_exceeds_the_truncation_bound(seed, d, L):
    J = normalised(d, L, seed)
    bias = est.power_series_bias_std(J, 30).bias
    bound = np.array([est.series_truncation_bound(L, d, n) for n in range(1, 31)])
    assert np.all(np.abs(bias) <= bound * (1 + 1e-9) + 1e-13)


@pytest.mark.parametrize("probe, n_probes", [("gaussian", 1), ("gaussian", 3), ("rademacher", 2)])
def test_series_std_matches_formula(probe, n_probes):
    d, n_terms, n = 6, 5, 200_000
    J = normalised(d, 0.7, 1)
    x = est.power_series_logdet(
        linear_vjp(J),
        n,
        d,
        n_terms=n_terms,
        n_probes=n_probes,
        probe=probe,
        rng=np.random.default_rng(2),
    )
    m = est.power_series_bias_std(J, n_terms, n_probes=n_probes, probe=probe)
    z_mean = (x.mean() - m.mean[-1]) / (m.std[-1] / np.sqrt(n))
    assert abs(z_mean) < Z, z_mean
    # sample-variance z-score; fourth moment from the sample (normal approximation)
    c = x - x.mean()
    se = np.sqrt((np.mean(c**4) - np.var(x) ** 2) / n)
    z_var = (np.var(x, ddof=1) - m.std[-1] ** 2) / se
    assert abs(z_var) < Z, (np.var(x, ddof=1), m.std[-1] ** 2, z_var)


def test_series_gradient_is_exact_for_fixed_probes():
    J = normalised(4, 0.6, 3)

    def f(J):
        return anp.sum(
            est.power_series_logdet(
                linear_vjp(J), 3, 4, n_terms=6, n_probes=2, rng=np.random.default_rng(0)
            )
        )

    check_grads(f, modes=["rev"], order=2)(J)


# ------------------------------------------------------------------------------------------
# truncation bound and choice of n_terms


def _tail_decimal(L, d, n, terms=4000):
    getcontext().prec = 60
    Ld = Decimal(L)
    return float(d * sum(Ld**k / k for k in range(n + 1, n + 1 + terms)))


@pytest.mark.parametrize(
    "L, n", [(0.0, 3), (0.3, 1), (0.5, 10), (0.5, 60), (0.7, 20), (0.9, 5), (0.9, 300), (0.99, 40)]
)
def test_truncation_bound_accurate(L, n):
    d = 7
    ref = _tail_decimal(L, d, n, terms=4000 if L < 0.99 else 8000)
    got = est.series_truncation_bound(L, d, n)
    assert got == pytest.approx(ref, rel=1e-12, abs=1e-300)
    if ref > 1e-8:  # the closed form of the docstring, where it does not cancel
        closed = d * (-np.log1p(-L) - sum(L**k / k for k in range(1, n + 1)))
        assert got == pytest.approx(closed, rel=1e-9)


@pytest.mark.parametrize(
    "L, d, bias",
    [(0.5, 10, 1e-6), (0.7, 6, 1e-3), (0.9, 784, 1e-2), (0.0, 3, 1e-9), (0.99, 2, 1e-8)],
)
def test_choose_n_terms_is_minimal(L, d, bias):
    n = est.choose_n_terms(L, d, bias)
    assert est.series_truncation_bound(L, d, n) <= bias
    if n > 1:
        assert est.series_truncation_bound(L, d, n - 1) > bias


# ------------------------------------------------------------------------------------------
# Russian roulette


@pytest.mark.parametrize(
    "distribution, p, lam, n_exact",
    [
        ("geometric", 0.5, 2.0, 0),
        ("geometric", 0.5, 2.0, 2),
        ("geometric", 0.2, 2.0, 1),
        ("poisson", 0.5, 2.0, 0),
        ("poisson", 0.5, 3.5, 2),
    ],
)
def test_roulette_weights_have_unit_expectation(distribution, p, lam, n_exact):
    """E_N[weight of term k] = 1 for every k: the exact unbiasedness of the weighting."""
    Nmax = 400 if distribution == "geometric" else 150  # pmf beyond is < 1e-100
    Ns = np.arange(0 if distribution == "poisson" else 1, Nmax + 1)
    pmf = stats.geom.pmf(Ns, p) if distribution == "geometric" else stats.poisson.pmf(Ns, lam)
    coef, K = _roulette_coef(Ns, n_exact, distribution, p, lam, np.float64)
    expected = coef @ pmf  # (K,)
    np.testing.assert_allclose(expected[:60], 1.0, rtol=1e-12)
    surv = est.roulette_survival(np.arange(-2, 30), distribution=distribution, p=p, lam=lam)
    ref = (
        stats.geom.sf(np.arange(-2, 30) - 1, p)
        if distribution == "geometric"
        else stats.poisson.sf(np.arange(-2, 30) - 1, lam)
    )
    np.testing.assert_allclose(surv, ref, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize(
    "L, distribution, p, lam, n_exact",
    [
        (0.5, "geometric", 0.5, 2.0, 1),
        (0.7, "geometric", 0.5, 2.0, 2),  # L^2 = 0.49 < 1 - p: finite variance
        (0.7, "geometric", 0.3, 2.0, 0),
        (0.5, "poisson", 0.5, 2.0, 1),
    ],
)
def test_roulette_unbiased_and_mean_number_of_terms(L, distribution, p, lam, n_exact):
    d, n = 5, 100_000
    J = normalised(d, L, 4)
    r = est.roulette_logdet(
        linear_vjp(J),
        n,
        d,
        p=p,
        distribution=distribution,
        lam=lam,
        n_exact=n_exact,
        rng=np.random.default_rng(5),
        per_sample=True,
    )
    truth = np.linalg.slogdet(np.eye(d) + J)[1]
    z = (r.logdet.mean() - truth) / (r.logdet.std(ddof=1) / np.sqrt(n))
    assert abs(z) < Z, (r.logdet.mean(), truth, z)
    # mean number of terms: N + n_exact with E N = 1/p (geometric on {1, 2, ...}) or lam
    mean_terms = (1 / p if distribution == "geometric" else lam) + n_exact
    var_terms = (1 - p) / p**2 if distribution == "geometric" else lam
    z_terms = (r.n_terms.mean() - mean_terms) / np.sqrt(var_terms / n)
    assert abs(z_terms) < Z, (r.n_terms.mean(), mean_terms)
    assert r.n_matvecs == r.n_terms.max()


def test_roulette_batch_draw_shares_n():
    J = normalised(3, 0.5, 0)
    r = est.roulette_logdet(linear_vjp(J), 50, 3, rng=np.random.default_rng(1), n_probes=2)
    assert np.all(r.n_terms == r.n_terms[0]) and r.n_matvecs == 2 * r.n_terms[0]


def test_roulette_p_one_is_the_truncated_series():
    J = normalised(4, 0.6, 2)
    V = np.random.default_rng(0).standard_normal((1, 8, 4))
    r = est.roulette_logdet(
        linear_vjp(J), 8, 4, p=1.0, n_exact=3, probes=V, rng=np.random.default_rng(0)
    )
    s = est.power_series_logdet(linear_vjp(J), 8, 4, n_terms=4, probes=V)
    np.testing.assert_allclose(r.logdet, s, rtol=1e-14, atol=1e-15)
    assert np.all(r.n_terms == 4)


# ------------------------------------------------------------------------------------------
# Neumann-series gradient


def _batched_gradient_z(grad_fn, exact, n_batches):
    G = np.array([grad_fn(b) for b in range(n_batches)])
    z = (G.mean(0) - exact) / (G.std(0, ddof=1) / np.sqrt(n_batches))
    return z, G


@pytest.mark.parametrize("estimator", ["neumann", "roulette_backprop"])
def test_neumann_gradient_unbiased_linear(estimator):
    d, n, L = 4, 4000, 0.6
    W = normalised(d, L, 7)
    exact = np.linalg.inv(np.eye(d) + W).T  # d log det(I + W) / dW
    fn = est.neumann_logdet if estimator == "neumann" else est.roulette_logdet

    def mean_logdet(W, seed):
        r = fn(linear_vjp(W), n, d, n_exact=1, rng=np.random.default_rng(seed), per_sample=True)
        return anp.mean(r.logdet)

    grad = autograd.grad(mean_logdet)
    z, _ = _batched_gradient_z(lambda b: grad(W, 100 + b), exact, 40)
    # 16 entries: Z per entry
    assert np.max(np.abs(z)) < Z, z


def test_neumann_gradient_unbiased_nonlinear_block():
    """g(x) = W2 tanh(W1 x): the layer-style use, vjp built from traced weights."""
    d, h, n = 3, 5, 64
    rng = np.random.default_rng(8)
    W1 = normalised_rect(h, d, 0.8, rng)
    W2 = normalised_rect(d, h, 0.8, rng)
    x = rng.standard_normal((n, d))

    def jacobians(W1, W2):
        s = 1 - anp.tanh(anp.dot(x, W1.T)) ** 2  # (n, h)
        return anp.einsum("ah,nh,hb->nab", W2, s, W1)

    def exact_total(params):
        return anp.sum(est.exact_logdet(jacobians(*params)))

    exact = autograd.grad(exact_total)((W1, W2))

    def est_total(params, seed):
        W1, W2 = params
        s = 1 - anp.tanh(anp.dot(x, W1.T)) ** 2

        def vjp(V):  # rows v_i^T J_i = ((v_i^T W2) * s_i) W1
            return anp.dot(anp.dot(V, W2) * s, W1)

        r = est.neumann_logdet(
            vjp, n, d, n_exact=2, n_probes=4, rng=np.random.default_rng(seed), per_sample=True
        )
        return anp.sum(r.logdet)

    grad = autograd.grad(est_total)
    G = [grad((W1, W2), 1000 + b) for b in range(150)]
    for j in range(2):
        Gj = np.array([g[j] for g in G])
        z = (Gj.mean(0) - exact[j]) / (Gj.std(0, ddof=1) / np.sqrt(len(G)))
        assert np.max(np.abs(z)) < Z, z


def normalised_rect(a, b, L, rng):
    G = rng.standard_normal((a, b))
    return L * G / np.linalg.norm(G, 2)


def test_neumann_backprop_visits_one_vjp():
    """Only the surrogate call is traced: the backward pass sees one vjp, not N + n_exact."""
    d, n = 4, 10
    W = normalised(d, 0.5, 9)
    boxed_outputs = []

    def mean_logdet(W):
        def vjp(V):
            out = anp.dot(V, W)
            boxed_outputs.append(out)
            return out

        r = est.neumann_logdet(vjp, n, d, n_exact=3, rng=np.random.default_rng(0))
        mean_logdet.calls = r.n_matvecs
        return anp.sum(r.logdet)

    autograd.grad(mean_logdet)(W)
    assert mean_logdet.calls == len(boxed_outputs) >= 5  # 4+ series terms + the surrogate


@pytest.mark.parametrize(
    "L, p, n_exact, n_probes, probe",
    [
        (0.5, 0.5, 1, 1, "gaussian"),
        (0.6, 0.3, 0, 2, "rademacher"),
    ],
)
def test_roulette_std_matches_exact_formula(L, p, n_exact, n_probes, probe):
    d, n = 5, 60_000
    J = normalised(d, L, 4)
    r = est.roulette_logdet(
        linear_vjp(J),
        n,
        d,
        p=p,
        n_exact=n_exact,
        n_probes=n_probes,
        probe=probe,
        rng=np.random.default_rng(3),
        per_sample=True,
    )
    sd = est.roulette_std(J, p=p, n_exact=n_exact, n_probes=n_probes, probe=probe)
    x = r.logdet
    c = x - x.mean()
    se = np.sqrt((np.mean(c**4) - np.var(x) ** 2) / n)
    z = (np.var(x, ddof=1) - sd**2) / se
    assert abs(z) < Z, (np.var(x, ddof=1), sd**2, z)


def test_roulette_std_limits():
    J = normalised(4, 0.6, 5)
    series = est.power_series_bias_std(J, 3).std[-1]
    assert est.roulette_std(J, p=1.0, n_exact=2) == pytest.approx(series, rel=1e-14)
    # but p -> 1 does not approach it: the variance is infinite once ||J||^2 >= 1 - p
    with pytest.raises(ValueError, match="finite only for"):
        est.roulette_std(normalised(4, 0.75, 5), p=0.5)
    with pytest.raises(ValueError, match="finite only for"):
        est.roulette_std(J, p=1 - 1e-7, n_exact=2)
