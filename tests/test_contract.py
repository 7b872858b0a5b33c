"""Contract tests for every registered layer (tests/cases/*.py): brute-force Jacobian checks in
float64 and float32, gradients of the log-likelihood, and bad-input messages."""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from registry import all_cases

import flowmath as fm
from flowmath.testing import check_grads

CASES = all_cases()
IDS = [c.id for c in CASES]


def _setup(case, seed, n, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = case.data(rng, (n,) + case.shape).astype(dtype)
    layer = case.make()
    params = layer.init(rng, x)
    return layer, params, x, (np.random.default_rng(seed + 1) if case.needs_rng else None)


@pytest.mark.parametrize("case", CASES, ids=IDS)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3))
def test_check_bijection_float64(case, seed, n):
    layer, params, x, rng = _setup(case, seed, n)
    fm.testing.check_bijection(layer, params, x, rng).assert_ok(case.tol64)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.float32], ids=[c.id for c in CASES if c.float32]
)
def test_check_bijection_float32(case):
    layer, params, x, rng = _setup(case, 3, 2, np.float32)
    y, ld = layer.forward(params, x, rng)
    assert y.dtype == np.float32 and ld.dtype == np.float32
    fm.testing.check_bijection(layer, params, x, rng).assert_ok(case.tol32)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.grads], ids=[c.id for c in CASES if c.grads]
)
def test_log_likelihood_gradients(case):
    """check_grads (finite differences against reverse mode) on the mean log-likelihood of a
    flow with respect to its parameters."""
    layer, params, x, rng = _setup(case, 5, 3)
    flow = fm.Flow(layer)
    flow.init(np.random.default_rng(0), x)  # records shapes only; params come from above

    def loss(p):
        r = None if rng is None else np.random.default_rng(7)
        return anp.mean(flow.log_prob(p, x, r))

    check_grads(loss, modes=["rev"], order=1)(params)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_input_gradient_matches_jacobian(case):
    """Reverse mode through a batch agrees with the dense per-sample Jacobian:
    d sum(y^2)/dx_i = 2 J_i^T y_i."""
    layer, params, x, rng = _setup(case, 11, 2)

    def forward(v):
        r = None if rng is None else np.random.default_rng(7)
        return layer.forward(params, v, r)[0]

    g = autograd.grad(lambda v: anp.sum(forward(v) ** 2))(x)
    y = forward(x)
    jac = fm.testing.dense_jacobian(forward, x)  # (n, D_out, D_in)
    expected = np.einsum("noi,no->ni", jac, 2 * y.reshape(len(x), -1)).reshape(x.shape)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(g, expected, rtol=0, atol=1e-10 * scale)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bad_inputs(case):
    layer, params, x, rng = _setup(case, 13, 2)
    bad = x.copy()
    bad.flat[0] = np.nan
    with pytest.raises(ValueError, match="`x` must be finite"):
        layer.forward(params, bad, rng)
    with pytest.raises(ValueError, match=r"`x` must be"):
        layer.forward(params, x[0], rng)  # batch axis missing
    with pytest.raises(TypeError, match="`x` must be a real"):
        layer.forward(params, x.astype(complex), rng)
    with pytest.raises(TypeError, match="`x` must be an array"):
        layer.forward(params, x.tolist(), rng)
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator"):
        layer.init(42, x)
    y, _ = layer.forward(params, x, rng)
    bad_y = np.array(y, copy=True)
    bad_y.flat[-1] = np.inf
    with pytest.raises(ValueError, match="`y` must be finite"):
        layer.inverse(params, bad_y, rng)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_init_is_not_identity(case):
    """DESIGN 2.1: init draws a generic map, so that a Jacobian check right after init means
    something."""
    layer, params, x, rng = _setup(case, 17, 2)
    y, ld = layer.forward(params, x, rng)
    if y.shape == x.shape:
        assert not (np.allclose(y, x) and np.allclose(ld, 0.0)), "init gave the identity map"
