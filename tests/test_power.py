"""Power of the statistical tests: every stochastic path detects a 1 % relative bias.

Each test below works where the exact log-det is LARGE against the estimator's spread
(|log det| ~ 10, per-estimate s.d. ~ 0.35 |log det| or less), chooses its sample size from
the analytic variance so that the standard error of the mean is at most 1/600 of
|log det|, and asserts ``|z| < Z = 4`` for the mean. A relative bias ``b`` then shifts the
z-score by ``b |log det| / s.e. >= 600 b``: a 1 % bias moves it by 6 s.e. (detected with
probability ~0.98 at |z| = 4), 2 % by 12 s.e. The detectable bias of each test (the bias at
which |z| = 4 is reached on average, ``4 s.e. / |log det|``) is written in its docstring and
checked by ``_check_power``.

Every reference is recomputed here from its formula: exact log-dets and series means from
matrix powers of a Jacobian obtained with autograd (not from the library's estimators),
variances from the second moments of Gaussian/Rademacher quadratic forms, roulette variances
from the double sum over the survival function. The variances are tested with the exact
fourth moment (Gaussian quadratic forms) or the sample fourth moment.

The layer paths are the ones a user runs: ``IResBlock(logdet="series" | "roulette")``,
``IResBlock(logdet="roulette", neumann_gradient=True)`` (gradient of the mean log-det with
respect to the parameters) and ``CNF(trace="hutchinson", probe=...)`` — each with probes the
layer draws itself from a seeded generator, never the layer's own draw replayed.
"""

import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

import flowmath as fm
from flowmath import estimators as est

Z = 4.0  # two-sided z threshold of every test here
POWER = 600.0  # required |log det| / s.e.: a 1 % bias moves the z-score by 6


def _check_power(se, scale, detectable=0.01):
    """The test has the power it claims: 4 s.e. <= (4 / 6) * 1 % of |reference|."""
    assert Z * se <= detectable * abs(scale) * Z / 6.0 * (1 + 1e-9), (se, scale)


def _n_for(sd, scale):
    """Sample size giving s.e. = |scale| / POWER for a per-sample s.d. ``sd``."""
    return int(math.ceil((POWER * sd / abs(scale)) ** 2))


# -- references --------------------------------------------------------------------------------
def _sym(A):
    return 0.5 * (A + A.T)


def _quadform_cov(A, B, probe):
    """Cov(v^T A v, v^T B v) for one isotropic probe: 2 tr(sym A sym B), minus
    2 sum_i A_ii B_ii for Rademacher signs (their fourth moment is 1, not 3)."""
    c = 2.0 * np.sum(_sym(A) * _sym(B))
    if probe == "rademacher":
        c -= 2.0 * np.sum(np.diag(A) * np.diag(B))
    return c


def _quadform_var_and_mu4(M, probe):
    """Variance and fourth central moment of v^T M v. Gaussian: cumulants of a quadratic form
    (k2 = 2 sum l^2, k4 = 48 sum l^4, l the eigenvalues of sym M). Rademacher: the variance
    from :func:`_quadform_cov` and mu4 bounded through the same cumulant formula (used only
    for the s.e. of the variance test, where a bound is conservative)."""
    lam = np.linalg.eigvalsh(_sym(M))
    k2 = 2.0 * np.sum(lam**2)
    k4 = 48.0 * np.sum(lam**4)
    return _quadform_cov(M, M, probe), k4 + 3.0 * k2**2


def _weighted_series_moments(C, first_weight_index, p, n_exact, n_probes, probe):
    """Mean and variance of X = sum_k w_k abar_k, where abar_k is the mean over ``n_probes``
    probes of v^T C_k v and w_k = 1[N >= k - m] / P(N >= k - m), N ~ Geometric(p) on
    {1, 2, ...}, shared by all probes; ``C[i]`` belongs to k = first_weight_index + i.
    E w_k w_j = 1 / P(N >= min(k, j) - m), P(N >= j) = (1 - p)^(max(j, 1) - 1)."""
    ks = first_weight_index + np.arange(len(C))
    surv = (1.0 - p) ** (np.maximum(ks - n_exact, 1) - 1)
    C = np.asarray(C)
    tr = np.trace(C, axis1=1, axis2=2)
    S = 0.5 * (C + np.swapaxes(C, 1, 2))
    cov = 2.0 * np.einsum("aij,bij->ab", S, S)
    if probe == "rademacher":
        diag = np.diagonal(C, axis1=1, axis2=2)
        cov -= 2.0 * diag @ diag.T
    mean = float(np.sum(tr))
    idx = np.arange(len(C))
    inv_surv = 1.0 / surv[np.minimum(idx[:, None], idx[None, :])]
    second = float(np.sum((np.outer(tr, tr) + cov / n_probes) * inv_surv))
    return mean, second - mean * mean


# -- the IResBlock configuration: nonlinear, log-det ~ -10 ------------------------------------
D, H = 16, 16


def _iresnet_params(seed=0):
    """g(x) = W2 ELU(W1 x + b1) + b2 with W1 = 0.9 Q and W2 = -0.62 Q^T + noise: at the test
    point J_g = W2 diag(ELU') W1 ~ -0.56 Q^T D Q, so log det(I + J) ~ -10 while the certified
    Lip(g) ~ 0.6 < 0.707 keeps the roulette variance finite at p = 1/2."""
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((D, D)))
    G = rng.standard_normal((D, D))
    W1 = 0.9 * Q
    W2 = -0.62 * Q.T + 0.04 * G / np.linalg.norm(G, 2)
    b1 = 0.3 * rng.standard_normal(D)
    # the layers compute h W + b: the transposes of the column-form W1, W2
    params = [{"W": W1.T, "b": b1}, {"W": W2.T, "b": 0.1 * rng.standard_normal(D)}]
    x = 0.5 + 0.3 * rng.standard_normal((1, D))  # mostly positive pre-activations
    return params, x


@pytest.fixture(scope="module")
def iresnet():
    params, x = _iresnet_params()
    exact = fm.IResBlock(hidden=(H,), coeff=0.95, logdet="exact")
    L = exact.lipschitz_bound(params)
    assert L < 0.68, L

    # the reference Jacobian of g at x, by autograd through the exact block's map F - I
    def g(v):
        return exact.forward(params, v[None])[0][0] - v

    J = autograd.jacobian(g)(x[0])
    ld = np.linalg.slogdet(np.eye(D) + J)[1]
    assert np.linalg.norm(J, 2) <= L * (1 + 1e-12)
    assert abs(ld) > 8.0, ld
    return {"params": params, "x": x, "J": J, "logdet": ld, "L": L}


def _series_matrix(J, n_terms):
    """M_n = sum_{k<=n} (-1)^{k+1} J^k / k."""
    M, P = np.zeros_like(J), np.eye(len(J))
    for k in range(1, n_terms + 1):
        P = P @ J
        M = M + (-1.0) ** (k + 1) / k * P
    return M


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_iresblock_series_layer_mean_and_variance(iresnet, probe):
    """IResBlock(logdet="series") at |log det| ~ 10: n from the analytic variance
    2 ||sym M_n||_F^2 (Rademacher: minus 2 sum diag^2) so that s.e. = |log det| / 600.
    Detectable bias (|z| = 4): 0.67 % of |log det|; a 1 % bias shifts z by 6. The sample
    variance is tested against the analytic one with the exact fourth moment (Gaussian; a
    bound for Rademacher): detectable relative variance error ~ 4 * sqrt(2 / n) (3 %)."""
    J, ld, n_terms = iresnet["J"], iresnet["logdet"], 10
    M = _series_matrix(J, n_terms)
    mean_ref = np.trace(M)
    var_ref, mu4 = _quadform_var_and_mu4(M, probe)
    # the truncation bias is tiny next to the detectable bias, so tr M_n ~ log det
    assert abs(mean_ref - ld) < 1e-3 * abs(ld)
    n = max(_n_for(math.sqrt(var_ref), ld), 2000)
    se = math.sqrt(var_ref / n)
    _check_power(se, ld)
    block = fm.IResBlock(hidden=(H,), coeff=0.95, logdet="series", n_terms=n_terms, probe=probe)
    xs = np.repeat(iresnet["x"], n, axis=0)
    _, est_ld = block.forward(iresnet["params"], xs, np.random.default_rng(11))
    z = (est_ld.mean() - mean_ref) / se
    assert abs(z) < Z, (est_ld.mean(), mean_ref, z)
    z_var = (np.var(est_ld, ddof=1) - var_ref) / math.sqrt((mu4 - var_ref**2) / n)
    assert abs(z_var) < Z, (np.var(est_ld, ddof=1), var_ref, z_var)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_iresblock_roulette_layer_mean_and_variance(iresnet, probe):
    """IResBlock(logdet="roulette"): one N per call shared by the batch (as Residual Flows), so
    the unit of sampling is a call; a call over B copies of x is one estimate with B probes
    sharing N. Its variance is the double sum over P(N >= min(k, j) - m) (recomputed here,
    truncated where the geometric tail (2 L^2)^k is below 1e-17). R calls give
    s.e. <= |log det| / 600: detectable bias 0.67 % of |log det| (a 1 % bias shifts z by 6).
    The variance of the call means is tested against the formula with the sample fourth
    moment (detectable relative variance error ~ 4 sqrt((kurtosis - 1) / R), about 25 %)."""
    J, ld = iresnet["J"], iresnet["logdet"]
    p, m, B = 0.5, 3, 64
    K = 90
    C, P = [], np.eye(D)
    for k in range(1, K + 1):
        P = P @ J
        C.append((-1.0) ** (k + 1) / k * P)
    mean_ref, var_ref = _weighted_series_moments(C, 1, p, m, B, probe)
    assert abs(mean_ref - ld) < 1e-12 * abs(ld)  # the untruncated mean is the log-det
    R = max(_n_for(math.sqrt(var_ref), ld), 400)
    se = math.sqrt(var_ref / R)
    _check_power(se, ld)
    block = fm.IResBlock(
        hidden=(H,), coeff=0.95, logdet="roulette", n_exact=m, roulette_p=p, probe=probe
    )
    xs = np.repeat(iresnet["x"], B, axis=0)
    draw = np.random.default_rng(12)
    calls = np.array([block.forward(iresnet["params"], xs, draw)[1].mean() for _ in range(R)])
    z = (calls.mean() - ld) / se
    assert abs(z) < Z, (calls.mean(), ld, z)
    c = calls - calls.mean()
    z_var = (np.mean(c**2) - var_ref) / math.sqrt((np.mean(c**4) - np.mean(c**2) ** 2) / R)
    assert abs(z_var) < Z, (np.var(calls), var_ref, z_var)


def _flat_grads(g):
    return np.concatenate([np.ravel(q[k]) for k in ("W", "b") for q in g])


def test_neumann_gradient_layer_unbiased(iresnet):
    """IResBlock(logdet="roulette", neumann_gradient=True): the gradient of the batch-mean
    log-det with respect to every weight and bias, projected on the exact gradient G (autograd
    through slogdet of the dense Jacobian of the exact block): s = <G_hat, G> / ||G||^2 has mean
    1. Its s.d. is measured on a pilot of 200 calls and R chosen so that s.e. <= 1/600:
    detectable bias 0.67 % of the gradient (a 1 % bias shifts z by 6)."""
    params, x = iresnet["params"], iresnet["x"]
    exact = fm.IResBlock(hidden=(H,), coeff=0.95, logdet="exact")
    G = _flat_grads(autograd.grad(lambda q: anp.mean(exact.forward(q, x)[1]))(params))
    block = fm.IResBlock(
        hidden=(H,), coeff=0.95, logdet="roulette", n_exact=8, neumann_gradient=True
    )
    xs = np.repeat(x, 256, axis=0)  # 8 exact terms and 256 probes: R ~ 200 calls suffice
    grad = autograd.grad(lambda q, r: anp.mean(block.forward(q, xs, r)[1]))
    draw = np.random.default_rng(13)

    def one():
        return float(_flat_grads(grad(params, draw)) @ G / (G @ G))

    pilot = np.array([one() for _ in range(200)])
    R = max(_n_for(pilot.std(ddof=1), 1.0), 200)
    assert R <= 1500, R  # the configuration keeps the test to a few seconds
    s = np.concatenate([pilot, [one() for _ in range(R)]])[200:]
    se = s.std(ddof=1) / math.sqrt(R)
    assert se <= 1.0 / 600 * 1.15  # the pilot's s.d. may be 15 % low
    z = (s.mean() - 1.0) / se
    assert abs(z) < Z, (s.mean(), z)


def test_neumann_gradient_linear_variance_matches_formula():
    """Linear block g(x) = W x (hidden=()): the Neumann surrogate's gradient is
    (1/B) sum_i u_i v_i^T with u_i = sum_{k=0}^{N+m} (-1)^k w_k (W^T)^k v_i, so its projection
    on G = (I + W)^{-T} is sum_k w_k abar_k with C_k = (-1)^k W^k G: mean ||G||_F^2 and the
    variance of the same double sum as the roulette (recomputed here). Mean: s.e. <= 1/600
    of the mean (detectable bias 0.67 %); variance: detectable error ~ 25 %."""
    rng = np.random.default_rng(3)
    d, p, m, B = 16, 0.5, 4, 128
    Gm = rng.standard_normal((d, d))
    W = -0.5 * np.eye(d) + 0.06 * Gm / np.linalg.norm(Gm, 2)
    G = np.linalg.inv(np.eye(d) + W).T
    C, P = [], np.eye(d)
    for k in range(0, 90):
        C.append((-1.0) ** k * P @ G)
        P = P @ W
    mean_ref, var_ref = _weighted_series_moments(C, 0, p, m, B, "gaussian")
    assert abs(mean_ref - np.sum(G * G)) < 1e-10 * mean_ref
    R = max(_n_for(math.sqrt(var_ref), mean_ref), 400)
    assert R <= 1000, R
    se = math.sqrt(var_ref / R)
    _check_power(se, mean_ref)
    block = fm.IResBlock(hidden=(), coeff=0.9, logdet="roulette", n_exact=m, neumann_gradient=True)
    params = [{"W": W.T, "b": np.zeros(d)}]  # row form: x W^T
    xs = np.zeros((B, d))
    grad = autograd.grad(lambda q, r: anp.mean(block.forward(q, xs, r)[1]))
    draw = np.random.default_rng(14)
    s = np.array([np.sum(grad(params, draw)[0]["W"] * G.T) for _ in range(R)])
    z = (s.mean() - mean_ref) / se
    assert abs(z) < Z, (s.mean(), mean_ref, z)
    c = s - s.mean()
    z_var = (np.mean(c**2) - var_ref) / math.sqrt((np.mean(c**4) - np.mean(c**2) ** 2) / R)
    assert abs(z_var) < Z, (np.var(s), var_ref, z_var)


# -- CNF: FFJORD's Hutchinson trace at the layer level ------------------------------------------
@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_cnf_hutchinson_layer_mean_and_variance(probe):
    """CNF(trace="hutchinson") on a linear field f = A z + b + t u, d = 16, t1 = 1: the
    log-det estimate of a sample is t1 eps^T A eps with eps the layer's own fresh probe, so
    its mean is t1 tr A (~ -8) and its variance t1^2 * 2 ||A_s||_F^2 (Rademacher: minus
    2 sum A_ii^2), recomputed here. n from that variance: s.e. = |t1 tr A| / 600, detectable
    bias 0.67 % (a 1 % bias, e.g. a probe scaled by 1.005, shifts z by 6); the sample variance
    against the formula with the exact (Gaussian) or bounding (Rademacher) fourth moment."""
    rng = np.random.default_rng(5)
    d, t1 = 16, 1.0
    Gm = rng.standard_normal((d, d))
    A = -0.5 * np.eye(d) + 0.3 * Gm / np.linalg.norm(Gm, 2)
    layer = fm.CNF(hidden=(), t1=t1, trace="hutchinson", probe=probe, rtol=1e-9, atol=1e-11)
    params = layer.init(rng, rng.normal(size=(2, d)))
    params[0]["W"] = A.T.copy()
    mean_ref = t1 * np.trace(A)
    var_ref, mu4 = _quadform_var_and_mu4(t1 * A, probe)
    n = max(_n_for(math.sqrt(var_ref), mean_ref), 2000)
    assert n <= 60_000, n
    se = math.sqrt(var_ref / n)
    _check_power(se, mean_ref)
    x = rng.normal(size=(n, d))
    _, ld = layer.forward(params, x, np.random.default_rng(15))
    z = (ld.mean() - mean_ref) / se
    assert abs(z) < Z, (ld.mean(), mean_ref, z)
    z_var = (np.var(ld, ddof=1) - var_ref) / math.sqrt((mu4 - var_ref**2) / n)
    assert abs(z_var) < Z, (np.var(ld, ddof=1), var_ref, z_var)


# -- the estimator functions --------------------------------------------------------------------
def _big_trace_matrix(d, seed, shift=-2.0, noise=1.0):
    G = np.random.default_rng(seed).standard_normal((d, d))
    return shift * np.eye(d) + noise * G / math.sqrt(d)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_trace_power(probe):
    """hutchinson_trace on A = -2 I + G / sqrt(d), d = 20 (tr A ~ -40): n probes from the
    analytic variance give s.e. = |tr A| / 600 (detectable bias 0.67 %; 1 % shifts z by 6)."""
    d = 20
    A = _big_trace_matrix(d, 0)
    var = _quadform_cov(A, A, probe)
    n = _n_for(math.sqrt(var), np.trace(A))
    se = math.sqrt(var / n)
    _check_power(se, np.trace(A))
    t = est.hutchinson_trace(
        lambda V: V @ A.T, d, n_probes=n, probe=probe, rng=np.random.default_rng(2)
    )
    assert abs((t - np.trace(A)) / se) < Z, (t, np.trace(A))


def test_hutchpp_trace_power():
    """hutchpp_trace (budget 30 on d = 20): unbiased with a variance bounded by Hutchinson's on
    the deflated remainder, 2 ||A||_F^2 / l; R repetitions chosen from that bound give
    s.e. <= |tr A| / 600 (detectable bias <= 0.67 %)."""
    d, budget = 20, 30
    A = _big_trace_matrix(d, 1)
    A = A @ A.T / d + np.eye(d)  # symmetric positive definite, tr ~ 2 d
    l = budget - 2 * (budget // 3)
    bound = 2.0 * np.sum(A * A) / l
    R = _n_for(math.sqrt(bound), np.trace(A))
    assert R <= 20_000, R
    draw = np.random.default_rng(4)
    t = np.array(
        [est.hutchpp_trace(lambda V: V @ A.T, d, n_matvecs=budget, rng=draw) for _ in range(R)]
    )
    se = t.std(ddof=1) / math.sqrt(R)
    assert se <= math.sqrt(bound / R) * 1.05
    _check_power(math.sqrt(bound / R), np.trace(A))
    assert abs((t.mean() - np.trace(A)) / se) < Z


@pytest.mark.parametrize("distribution", ["geometric", "poisson"])
def test_roulette_logdet_function_power(distribution):
    """roulette_logdet(per_sample=True) on J = -0.5 I + 0.06 G/||G||, d = 16 (log det ~ -11):
    independent estimates; n from the geometric variance formula (recomputed; the Poisson law
    has infinite variance in theory, so its s.e. is the sample one and n is the geometric n
    times 4) — detectable bias 0.67 % of |log det| (geometric)."""
    rng = np.random.default_rng(6)
    d = 16
    Gm = rng.standard_normal((d, d))
    J = -0.5 * np.eye(d) + 0.06 * Gm / np.linalg.norm(Gm, 2)
    ld = np.linalg.slogdet(np.eye(d) + J)[1]
    C, P = [], np.eye(d)
    for k in range(1, 90):
        P = P @ J
        C.append((-1.0) ** (k + 1) / k * P)
    _, var_ref = _weighted_series_moments(C, 1, 0.5, 1, 1, "gaussian")
    n = _n_for(math.sqrt(var_ref), ld) * (1 if distribution == "geometric" else 4)
    r = est.roulette_logdet(
        lambda V: V @ J,
        n,
        d,
        distribution=distribution,
        lam=2.0,
        rng=np.random.default_rng(7),
        per_sample=True,
    )
    se = r.logdet.std(ddof=1) / math.sqrt(n)
    if distribution == "geometric":
        _check_power(math.sqrt(var_ref / n), ld)
        z_sd = (r.logdet.std(ddof=1) ** 2 - var_ref) / var_ref
        assert abs(z_sd) < 0.1, z_sd  # loose: the fourth moment of the roulette is heavy
    assert abs((r.logdet.mean() - ld) / se) < Z, (r.logdet.mean(), ld)


# -- the models of the training issue ------------------------------------------------------------
def _model(recipe):
    if recipe == "iresnet":  # power series, 30 terms: truncation bias < 1e-6 |log det|
        return fm.models.iresnet(D, n_blocks=2, hidden=(H,), coeff=0.95, n_terms=30)
    return fm.models.residual_flow(D, n_blocks=2, hidden=(H,), coeff=0.95, n_exact=3)


@pytest.mark.parametrize("recipe", ["iresnet", "residual_flow"])
def test_model_log_prob_power(recipe):
    """fm.models.iresnet / residual_flow (ActNorm + IResBlock, two blocks, d = 16): the
    stochastic log p(x) against log pi(f(x)) + slogdet of the dense Jacobian of the whole map
    (autograd), with both blocks set to the contracting configuration above so that the summed
    log-det is ~ -19 (ELU; ~ -9 with LipSwish). The variance is the sum of the blocks' analytic
    variances at their own inputs (series: 2 ||sym M_30||_F^2 per block; roulette: the double
    sum, one N per block and call). Sample sizes from those: s.e. <= |log det| / 600
    (roulette: / 800), detectable bias 0.67 % (0.5 %) of the log-det: a 1 % bias shifts z by 6
    (resp. 8)."""
    from flowmath.testing import dense_jacobian

    flow = _model(recipe)
    p_block, x = _iresnet_params(0)
    p_block2, _ = _iresnet_params(1)
    params = flow.init(np.random.default_rng(0), np.repeat(x, 8, axis=0) + 0.1)
    zero = {"loc": np.zeros(D), "log_scale": np.zeros(D)}
    params = [zero, p_block, dict(zero), p_block2]
    layers = flow.layer.layers
    exact_flow = fm.models.exact(flow)
    # inputs of each block and the blocks' Jacobians J_g, by autograd through the exact twin
    u, jacs = x, []
    for layer, p in zip(fm.models.exact(flow).layer.layers, params, strict=True):
        if isinstance(layer, fm.IResBlock):

            def g(v, layer=layer, p=p):
                return layer.forward(p, v[None])[0][0] - v

            jacs.append(autograd.jacobian(g)(u[0]))
        u = layer.forward(p, u)[0]
    z, _ = exact_flow.layer.forward(params, x)
    J_f = dense_jacobian(lambda v: exact_flow.layer.forward(params, v)[0], x)[0]
    logdet = np.linalg.slogdet(J_f)[1]
    log_pi = -0.5 * np.sum(z * z) - 0.5 * D * math.log(2 * math.pi)
    assert abs(logdet - sum(np.linalg.slogdet(np.eye(D) + J)[1] for J in jacs)) < 1e-10
    assert abs(logdet) > 8, logdet  # -19 (ELU), -9 (LipSwish: slopes ~0.6)
    assert all(isinstance(layers[i], fm.IResBlock) for i in (1, 3))
    draw = np.random.default_rng(21)
    if recipe == "iresnet":
        Ms = [_series_matrix(J, 30) for J in jacs]
        lam = np.concatenate([np.linalg.eigvalsh(_sym(M)) for M in Ms])
        var_ref = 2.0 * np.sum(lam**2)
        mu4 = 48.0 * np.sum(lam**4) + 3.0 * var_ref**2
        mean_ref = log_pi + sum(np.trace(M) for M in Ms)
        assert abs(mean_ref - log_pi - logdet) < 1e-5 * abs(logdet)  # truncation
        n = max(_n_for(math.sqrt(var_ref), logdet), 2000)
        assert n <= 100_000, n
        se = math.sqrt(var_ref / n)
        _check_power(se, logdet)
        est = flow.log_prob(params, np.repeat(x, n, axis=0), draw)
        z_var = (np.var(est, ddof=1) - var_ref) / math.sqrt((mu4 - var_ref**2) / n)
    else:
        B, var_ref = 64, 0.0
        for J in jacs:
            C, P = [], np.eye(D)
            for k in range(1, 90):
                P = P @ J
                C.append((-1.0) ** (k + 1) / k * P)
            var_ref += _weighted_series_moments(C, 1, 0.5, 3, B, "gaussian")[1]
        mean_ref = log_pi + logdet
        # 800 instead of 600: the roulette's heavier tail; a 1 % bias shifts z by 8
        R = max(int(math.ceil((800 * math.sqrt(var_ref) / abs(logdet)) ** 2)), 400)
        assert R <= 4000, R
        se = math.sqrt(var_ref / R)
        _check_power(se, logdet)
        xs = np.repeat(x, B, axis=0)
        est = np.array([flow.log_prob(params, xs, draw).mean() for _ in range(R)])
        c = est - est.mean()
        z_var = (np.mean(c**2) - var_ref) / math.sqrt((np.mean(c**4) - np.mean(c**2) ** 2) / R)
    z = (est.mean() - mean_ref) / se
    assert abs(z) < Z, (est.mean(), mean_ref, z)
    assert abs(z_var) < Z, (np.var(est), var_ref, z_var)
