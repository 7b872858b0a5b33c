"""IResBlock: the Banach bound of the fixed-point inverse at every iteration, invertibility
properties, gradients through the inverse (implicit-function theorem) against finite
differences, the Lipschitz checks, unbiasedness of the stochastic log-dets, chains."""

import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import flowmath as fm
from flowmath.layers.residual import FixedPointError, solve_fixed_point
from flowmath.testing import check_grads

# docs/theory.rst: iterations to 1e-6 "about 20, 39, 131, 1375" for c = 0.5, 0.7, 0.9, 0.99
REFERENCE_ITERS = {0.5: 20, 0.7: 39, 0.9: 131, 0.99: 1375}


def _orthogonal_block(c, d, rng):
    """Linear block g(x) = c Q x with Q Haar-orthogonal: ||g(a) - g(b)|| = c ||a - b|| exactly,
    so the fixed-point error contracts by exactly c per iteration (the worst case)."""
    Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    block = fm.IResBlock(hidden=(), coeff=c, logdet="exact")
    return block, [{"W": c * Q.T, "b": np.zeros(d)}]  # g(x) = c Q x, row form x (c Q^T)


@pytest.mark.parametrize("c", [0.5, 0.7, 0.9, 0.99])
def test_fixed_point_bound_holds_every_iteration_worst_case(c, rng):
    d = 8
    block, params = _orthogonal_block(c, d, rng)
    L = block.lipschitz_bound(params)
    assert c <= L <= c * (1 + 1e-10)
    x_star = rng.normal(size=(3, d))
    x_star /= c * np.linalg.norm(x_star, axis=1, keepdims=True)  # ||x^0 - x*|| = ||c Q x*|| = 1
    y = x_star + x_star @ params[0]["W"]  # F(x*) (b = 0)
    x, _, info = block.inverse_with_info(params, y, record=True)
    err = np.linalg.norm(info.history["iterates"] - x_star, axis=2)  # (k+1, n)
    slack = 64 * np.finfo(float).eps / (1 - c)  # rounding of y and of each step
    bound = np.minimum(info.history["a_priori"], info.history["a_posteriori"])
    assert np.all(err[1:] <= bound[1:] + slack)
    assert np.all(info.bound <= info.tol * np.maximum(1, np.linalg.norm(y, axis=1)))
    assert np.max(np.abs(x - x_star)) < 1e-13
    # exact contraction: err_k = c^k; first k with err_k <= 1e-6 is ceil(log 1e-6 / log c)
    expected = np.broadcast_to(c ** np.arange(len(err))[:, None], err.shape)
    np.testing.assert_allclose(err, expected, rtol=1e-9, atol=slack)
    k_true = int(np.argmax(np.all(err <= 1e-6, axis=1)))
    assert k_true == math.ceil(math.log(1e-6) / math.log(c))
    assert abs(k_true - REFERENCE_ITERS[c]) <= 1


@pytest.mark.parametrize("c", [0.5, 0.7, 0.9, 0.99])
def test_fixed_point_bound_holds_every_iteration_mlp(c, rng):
    """Nonlinear g: one hidden ELU layer, both weights normalised to sqrt(c), certified L = c."""
    block = fm.IResBlock(hidden=(16,), coeff=math.sqrt(c), logdet="exact")
    x_star = 2.0 * rng.normal(size=(4, 5))
    params = block.init(rng, x_star)
    L = block.lipschitz_bound(params)
    assert c * (1 - 1e-12) <= L <= c * (1 + 1e-10)
    y, _ = block.forward(params, x_star)
    x, _, info = block.inverse_with_info(params, y, record=True)
    err = np.linalg.norm(info.history["iterates"] - x_star, axis=2)
    slack = 64 * np.finfo(float).eps * (1 + np.linalg.norm(y, axis=1)) / (1 - c)
    assert np.all(err[1:] <= info.history["a_priori"][1:] + slack)
    assert np.all(err[1:] <= info.history["a_posteriori"][1:] + slack)
    assert np.all(np.linalg.norm(x - x_star, axis=1) <= info.bound + slack)
    assert np.all(np.linalg.norm(x - x_star, axis=1) <= info.residual_bound + slack)


def test_fixed_point_cap_fails_loudly(rng):
    block, params = _orthogonal_block(0.99, 4, rng)
    y = rng.normal(size=(2, 4))
    with pytest.raises(FixedPointError, match=r"did not reach the tolerance in `max_iter` = 50"):
        block.inverse_with_info(params, y, max_iter=50)
    with pytest.raises(ValueError, match=r"`lipschitz` must lie in \[0, 1\)"):
        solve_fixed_point(lambda x: x, y, 1.0, tol=1e-6, max_iter=10)


def test_lipschitz_condition_is_checked(rng):
    with pytest.raises(ValueError, match=r"`coeff` must lie in \(0, 1\)"):
        fm.IResBlock(coeff=1.0)
    # power mode with a useless state: u = bottom left singular vector, so one power iteration
    # sees sigma_min < c, nothing is rescaled and the certified bound is far above 1
    block = fm.IResBlock(hidden=(4,), coeff=0.9, logdet="exact", spectral="power")
    x = rng.normal(size=(3, 4))
    params = block.init(rng, x)
    Ws = [rng.normal(size=(4, 4)) * 3 for _ in range(2)]
    bad_u = [np.linalg.svd(W)[0][:, -1] + 1e-3 * rng.normal(size=4) for W in Ws]
    # the layers compute h W^T + b with these W (u: left singular vectors of W)
    bad = [{"W": W.T, "b": p["b"], "u": u} for W, p, u in zip(Ws, params, bad_u, strict=True)]
    with pytest.raises(ValueError, match=r"certified Lip\(g\) <= .* is not < 1"):
        block.forward(bad, x)
    with pytest.raises(ValueError, match=r"certified Lip\(g\) <= .* is not < 1"):
        block.inverse(bad, x)
    # the state converges under update_state; then the block is a certified contraction
    good = block.update_state(bad, 2000)
    assert block.lipschitz_bound(good) <= 0.81 * (1 + 1e-6)
    y, _ = block.forward(good, x)
    np.testing.assert_allclose(block.inverse(good, y)[0], x, atol=1e-13)


def test_power_mode_is_deterministic_and_state_gets_no_gradient(rng):
    block = fm.IResBlock(hidden=(6,), coeff=0.8, logdet="exact", spectral="power")
    x = rng.normal(size=(3, 4))
    params = block.init(rng, x)
    assert all(set(p) == {"W", "b", "u"} for p in params)
    y1, l1 = block.forward(params, x)
    y2, l2 = block.forward(params, x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(l1, l2)

    def loss(p):
        y, ld = block.forward(p, x)
        return anp.sum(y**2) + anp.sum(ld)

    grads = autograd.grad(loss)(params)
    assert all(np.all(g["u"] == 0) for g in grads)

    # with the state held fixed, reverse mode matches finite differences in W and b
    def with_state(wb):
        return [{**q, "u": p["u"]} for q, p in zip(wb, params, strict=True)]

    check_grads(lambda wb: loss(with_state(wb)), modes=["rev"], order=1)(
        [{"W": p["W"], "b": p["b"]} for p in params]
    )
    # init sets u to the exact top singular vectors: sigma_hat = sigma_max already
    _, _, sig = block.normalized_weights(params)
    np.testing.assert_allclose(
        sig, [np.linalg.svd(p["W"], compute_uv=False)[0] for p in params], rtol=1e-12
    )


def test_gradients_through_inverse_match_finite_differences(rng):
    block = fm.IResBlock(hidden=(5,), coeff=0.9, logdet="exact")
    x = rng.normal(size=(3, 3))
    params = block.init(rng, x)
    y, _ = block.forward(params, x)
    R = rng.normal(size=y.shape)

    def loss_params(p):
        xr, ld = block.inverse(p, y)
        return anp.sum(R * xr) + anp.sum(ld)

    def loss_y(v):
        xr, ld = block.inverse(params, v)
        return anp.sum(R * xr**2) + anp.sum(ld)

    check_grads(loss_params, modes=["rev"], order=1)(params)
    check_grads(loss_y, modes=["rev"], order=1)(y)
    # the implicit-function gradient in y is the inverse Jacobian: (I + J_g(x))^{-1}
    jac_inv = fm.testing.dense_jacobian(lambda v: block.inverse(params, v)[0], y)
    jac_fwd = fm.testing.dense_jacobian(lambda v: block.forward(params, v)[0], x)
    np.testing.assert_allclose(jac_inv, np.linalg.inv(jac_fwd), atol=1e-12)


# -- invertibility properties ----------------------------------------------------------------
_PROP_RNG = np.random.default_rng(5)
_PROP_BLOCK = fm.IResBlock(hidden=(12, 12), coeff=0.95, logdet="exact", activation="lipswish")
_PROP_PARAMS = _PROP_BLOCK.init(_PROP_RNG, _PROP_RNG.normal(size=(4, 5)))
_PROP_L = _PROP_BLOCK.lipschitz_bound(_PROP_PARAMS)
vectors = st.lists(
    st.floats(-60, 60, allow_nan=False, allow_infinity=False), min_size=5, max_size=5
)


@given(a=vectors, direction=vectors, log_scale=st.floats(-7, 2))
def test_distinct_inputs_stay_distinct(a, direction, log_scale):
    """||F(a) - F(b)|| >= (1 - L) ||a - b||: F is injective, quantitatively."""
    a = np.asarray(a)
    u = np.asarray(direction)
    if np.linalg.norm(u) == 0:
        u = np.ones(5)
    b = a + 10.0**log_scale * u / np.linalg.norm(u)
    (fa, fb), _ = _PROP_BLOCK.forward(_PROP_PARAMS, np.stack([a, b]))
    gap = np.linalg.norm(fa - fb)
    rounding = 8 * np.finfo(float).eps * (np.linalg.norm(a) + np.linalg.norm(b) + 10)
    assert gap > 0
    assert gap >= (1 - _PROP_L) * np.linalg.norm(a - b) - rounding


@given(x=vectors)
def test_inverse_of_forward_returns_input(x):
    x = np.asarray(x)[None]
    y, ld = _PROP_BLOCK.forward(_PROP_PARAMS, x)
    x_back, ld_inv, info = _PROP_BLOCK.inverse_with_info(_PROP_PARAMS, y)
    scale = max(1.0, float(np.linalg.norm(y)))
    assert np.linalg.norm(x_back - x) <= 1e-13 * scale / (1 - _PROP_L)
    assert np.all(info.bound <= info.tol * scale)
    np.testing.assert_allclose(ld_inv, -ld, rtol=1e-12, atol=1e-14)


# -- stochastic log-dets ------------------------------------------------------------------------
@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_stochastic_logdet_matches_exact(logdet, rng):
    """z-test (|z| < 4) of the batch mean against the exact log-det; L = 0.64 < 0.707 keeps the
    roulette variance finite, 40 series terms make the truncation bias <= 3e-8."""
    exact_block = fm.IResBlock(hidden=(8,), coeff=0.8, logdet="exact")
    x1 = rng.normal(size=(1, 3))
    params = exact_block.init(rng, x1)
    L = exact_block.lipschitz_bound(params)
    assert L < 0.65
    bias = fm.estimators.series_truncation_bound(L, 3, 40)
    assert bias < 3e-8
    block = fm.IResBlock(hidden=(8,), coeff=0.8, logdet=logdet, n_terms=40)
    n = 4000
    x = np.repeat(x1, n, axis=0)
    # per-sample roulette draws so that the batch holds independent estimates
    if logdet == "roulette":
        Wn, bs, _ = block.normalized_weights(params)
        from flowmath.layers.residual import _mlp, _mlp_vjp

        _, pre = _mlp(x, Wn, bs, "elu")
        est = fm.estimators.roulette_logdet(
            lambda V: _mlp_vjp(V, Wn, pre, "elu"),
            n,
            3,
            rng=np.random.default_rng(3),
            per_sample=True,
        ).logdet
    else:
        _, est = block.forward(params, x, np.random.default_rng(3))
    _, exact = exact_block.forward(params, x1)
    z = (est.mean() - exact[0]) / (est.std(ddof=1) / math.sqrt(n))
    assert abs(z) < 4, z
    # the inverse's log-det is minus the forward one with the same draws
    y, ld = block.forward(params, x[:5], np.random.default_rng(9))
    _, ld_inv = block.inverse(params, y, np.random.default_rng(9))
    np.testing.assert_allclose(ld_inv, -ld, rtol=1e-10, atol=1e-12)


def test_series_block_check_bijection(rng):
    block = fm.IResBlock(hidden=(8,), logdet="series")
    x = rng.normal(size=(3, 4))
    params = block.init(rng, x)
    report = fm.testing.check_bijection(block, params, x, np.random.default_rng(1), jacobian=False)
    # round trips and the inverse log-det (same draws) are exact; `batch_error` is not
    # applicable: a sample's probe differs between a batch and a batch of one
    assert not report.errors and report.dtype_ok
    assert (
        max(report.forward_roundtrip, report.inverse_roundtrip, report.inverse_logdet_error)
        <= 1e-10
    ), report
    y, _ = block.forward(params, x, np.random.default_rng(1))
    y0, _ = block.forward(params, x[:1], np.random.default_rng(1))
    np.testing.assert_allclose(y0, y[:1], rtol=1e-14)
    with pytest.raises(ValueError, match="`rng` must be a numpy.random.Generator"):
        block.forward(params, x)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="`logdet` must be one of"):
        fm.IResBlock(logdet="hutchinson")
    with pytest.raises(ValueError, match="`activation` must be one of"):
        fm.IResBlock(activation="relu")
    with pytest.raises(ValueError, match="`hidden` must be a tuple of positive ints"):
        fm.IResBlock(hidden=(4, 0))
    with pytest.raises(TypeError, match="`hidden` must be"):
        fm.IResBlock(hidden=3.5)
    with pytest.raises(ValueError, match="`n_terms` must be >= 1"):
        fm.IResBlock(n_terms=0)


# -- chains -------------------------------------------------------------------------------------
def test_chain_of_blocks_in_a_flow(rng):
    chain = fm.Chain(
        [
            fm.IResBlock(hidden=(8,), logdet="exact"),
            fm.LULinear(),
            fm.IResBlock(hidden=(8,), logdet="exact"),
        ]
    )
    flow = fm.Flow(chain)
    x = rng.normal(size=(3, 3))
    params = flow.init(rng, x)
    fm.testing.check_bijection(chain, params, x).assert_ok(1e-9)
    samples = flow.sample(params, 4, np.random.default_rng(2))
    assert samples.shape == (4, 3) and np.all(np.isfinite(flow.log_prob(params, samples)))


def test_chain_with_actnorm(rng):
    """An i-ResNet: ActNorm and residual blocks alternating (needs flowmath's ActNorm)."""
    try:
        act = fm.ActNorm()
    except NotImplementedError:
        pytest.skip("ActNorm is not built yet")
    chain = fm.Chain(
        [
            act,
            fm.IResBlock(hidden=(8,), logdet="exact"),
            fm.ActNorm(),
            fm.IResBlock(hidden=(8,), logdet="exact"),
        ]
    )
    x = rng.normal(size=(3, 3)) * 2 + 1
    params = chain.init(rng, x)
    fm.testing.check_bijection(chain, params, x).assert_ok(1e-9)


def test_invert_needs_no_rng_and_checks_shapes(rng):
    block = fm.IResBlock(hidden=(8,), logdet="series")  # stochastic log-det, exact inverse map
    x = rng.normal(size=(3, 4))
    params = block.init(rng, x)
    y, _ = block.forward(params, x, np.random.default_rng(0))
    x_back, info = block.invert(params, y)
    np.testing.assert_allclose(x_back, x, atol=1e-13)
    assert info.n_iter >= 1 and np.all(
        info.bound <= info.tol * np.maximum(1, np.linalg.norm(y, axis=1))
    )
    with pytest.raises(ValueError, match=r"`y` must have shape \(n, 4\)"):
        block.invert(params, y[:, :3])
    with pytest.raises(ValueError, match="`tol` must be finite and > 0"):
        block.invert(params, y, tol=0.0)
    # float32 in, float32 out, to the float32 default tolerance (64 eps)
    x32, _ = block.invert(params, y.astype(np.float32))
    assert x32.dtype == np.float32
    np.testing.assert_allclose(x32, x, atol=1e-4)


@pytest.mark.parametrize("logdet", ["series", "roulette"])
def test_stochastic_logdet_gradients(logdet, rng):
    """With the draws fixed (same rng seed), the estimate is a smooth function of the
    parameters: reverse mode matches finite differences."""
    block = fm.IResBlock(hidden=(6,), coeff=0.8, logdet=logdet, n_terms=5)
    x = rng.normal(size=(3, 3))
    params = block.init(rng, x)
    flow = fm.Flow(block)

    def loss(p):
        return anp.mean(flow.log_prob(p, x, np.random.default_rng(7)))

    check_grads(loss, modes=["rev"], order=1)(params)


def test_fixed_point_huge_input_converges_on_measured_residual(rng):
    """y of norm 1e160: the squared norms would overflow to inf and stop the loop after one
    iteration (a 3-7 % residual); scaled norms iterate to the float64 floor."""
    block = fm.IResBlock(hidden=(8,), logdet="exact")
    x = rng.normal(size=(3, 4))
    params = block.init(rng, x)
    y = 1e160 * block.forward(params, x)[0]
    x_big, info = block.invert(params, y)
    resid = np.abs(block.forward(params, x_big)[0] - y).max() / np.abs(y).max()
    assert info.n_iter > 5 and resid < 64 * np.finfo(float).eps


def test_fixed_point_wrong_lipschitz_or_expanding_map_raises():
    y = np.ones((2, 3))
    # g = 0.9 x contracts by 0.9 per step, not by the claimed 0.1
    with pytest.raises(ValueError, match=r"`lipschitz` = 0.1 is not a Lipschitz constant"):
        solve_fixed_point(lambda x: 0.9 * x, y, 0.1, tol=1e-12, max_iter=1000)
    with pytest.raises(ValueError, match=r"`g` is not a contraction"):
        solve_fixed_point(lambda x: 2.0 * x, y, 0.5, tol=1e-12, max_iter=1000)
    # a correct claim converges: x* = y / 1.9
    x, info = solve_fixed_point(lambda x: 0.9 * x, y, 0.9, tol=1e-12, max_iter=1000)
    np.testing.assert_allclose(x, y / 1.9, rtol=1e-11)


# -- the parameter layout ----------------------------------------------------------------------
def _legacy_reference(old, x, coeff, power, act="elu"):
    """The block of earlier versions written out from its layout {"W": [...], "b": [...],
    "u": [...]} with W of shape (fan_out, fan_in): column-form g(x) = W2 phi(W1 x + b1) + b2
    on the normalised weights (SVD norm, or one power iteration from u), F(x) = x + g(x), the
    exact log-det slogdet(I + J_g) and the v^T J_g products of the series."""
    phi = fm.activations.ACTIVATIONS[act]
    Wn = []
    for i, W in enumerate(old["W"]):
        if power:
            v = W.T @ old["u"][i]
            v /= np.linalg.norm(v)
            u = W @ v
            u /= np.linalg.norm(u)
            sigma = u @ W @ v
        else:
            sigma = np.linalg.svd(W, compute_uv=False)[0]
        Wn.append(W / max(1.0, sigma / coeff))
    a = x @ Wn[0].T + old["b"][0]
    y = x + phi.fn(a) @ Wn[1].T + old["b"][1]
    J = np.einsum("oh,nh,hi->noi", Wn[1], phi.derivative(a), Wn[0])
    logdet = np.linalg.slogdet(np.eye(x.shape[1]) + J)[1]

    def vjp(V):
        return ((V @ Wn[1]) * phi.derivative(a)) @ Wn[0]

    return y, logdet, vjp


@pytest.mark.parametrize("spectral", ["exact", "power"])
def test_layout_gives_the_values_of_the_earlier_dict_of_lists(spectral):
    """The list-of-layers layout computes what the earlier dict-of-lists layout did on the same
    numbers: the test converts {"W": [W_i], "b": [b_i], "u": [u_i]} (W_i (fan_out, fan_in))
    itself to [{"W": W_i^T, "b": b_i, "u": u_i}] and compares y, the exact log-det and the
    seeded power-series log-det with the written-out map (measured over 20 seeds: <= 4.5e-16
    in y, <= 1.8e-15 in the log-dets; asserted at 1e-13); params_from_legacy converts the
    same way."""
    rng = np.random.default_rng(5)
    d, h, coeff = 4, 7, 0.9
    old = {
        "W": [rng.normal(size=(h, d)), rng.normal(size=(d, h))],
        "b": [0.1 * rng.normal(size=h), 0.1 * rng.normal(size=d)],
    }
    if spectral == "power":
        # near the top left singular vectors, so that one iteration certifies Lip(g) < 1
        old["u"] = [np.linalg.svd(W)[0][:, 0] + 0.05 * rng.normal(size=len(W)) for W in old["W"]]
    new = [{k: (old[k][i].T if k == "W" else old[k][i]) for k in old} for i in range(len(old["W"]))]
    converted = fm.layers.residual.params_from_legacy(old)
    for a, b in zip(converted, new, strict=True):
        assert set(a) == set(b)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
            assert a[k].flags.c_contiguous
    x = rng.normal(size=(6, d))
    y_ref, ld_ref, vjp_ref = _legacy_reference(old, x, coeff, spectral == "power")
    exact = fm.IResBlock(hidden=(h,), coeff=coeff, logdet="exact", spectral=spectral)
    y, ld = exact.forward(new, x)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ld, ld_ref, rtol=0, atol=1e-13)
    series = fm.IResBlock(hidden=(h,), coeff=coeff, logdet="series", spectral=spectral)
    _, ld_series = series.forward(new, x, np.random.default_rng(9))
    ref_series = fm.estimators.power_series_logdet(
        vjp_ref, 6, d, n_terms=10, n_probes=1, probe="gaussian", rng=np.random.default_rng(9)
    )
    np.testing.assert_allclose(ld_series, ref_series, rtol=0, atol=1e-13)
    x_back, _ = exact.inverse(new, y_ref)
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-12)
    if spectral == "power":  # the state advances as it did: u <- W v / ||W v||
        v = old["W"][0].T @ old["u"][0]
        u = old["W"][0] @ (v / np.linalg.norm(v))
        np.testing.assert_allclose(
            exact.update_state(new, 1)[0]["u"], u / np.linalg.norm(u), rtol=1e-14
        )


def test_earlier_layout_is_refused_with_the_converter_named(rng):
    block = fm.IResBlock(hidden=(5,), logdet="exact")
    x = rng.normal(size=(3, 4))
    params = block.init(rng, x)
    assert isinstance(params, list) and [set(p) for p in params] == [{"W", "b"}] * 2
    assert [p["W"].shape for p in params] == [(4, 5), (5, 4)]  # (fan_in, fan_out)
    old = {"W": [p["W"].T for p in params], "b": [p["b"] for p in params]}
    calls = [
        lambda: block.forward(old, x),
        lambda: block.inverse(old, x),
        lambda: block.invert(old, x),
        lambda: block.lipschitz_bound(old),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="params_from_legacy"):
            call()
    np.testing.assert_array_equal(
        block.forward(fm.layers.residual.params_from_legacy(old), x)[0],
        block.forward(params, x)[0],
    )
    # a bad leaf is still named by its path
    bad = [params[0], {**params[1], "W": params[1]["W"][:, :3]}]
    with pytest.raises(ValueError, match=r'`params\[1\]\["W"\]` must have shape \(5, 4\)'):
        block.forward(bad, x)
