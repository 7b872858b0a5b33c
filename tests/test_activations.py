"""flowmath.activations: every derivative against autograd and finite differences, every
Lipschitz constant against a measured sup |phi'|, and every former table resolving to it."""

import array_api_strict
import autograd
import numpy as np
import pytest
from scipy.optimize import minimize_scalar

import flowmath as fm
from flowmath import activations as A
from flowmath import lipschitz as lip
from flowmath import nets
from flowmath.kernels import coupling_mlp, made
from flowmath.layers import residual

NAMES = sorted(A.ACTIVATIONS)
# points away from the kinks of relu and elu at 0 (their derivatives jump there)
X = np.concatenate([np.linspace(-30.0, -1e-3, 400), np.linspace(1e-3, 30.0, 400)])


def test_table_is_complete_and_codes_are_distinct():
    assert NAMES == ["elu", "lipswish", "relu", "softplus", "tanh"]
    assert list(A.ACTIVATIONS) == NAMES  # sorted, as the docs list them
    codes = [a.code for a in A.ACTIVATIONS.values()]
    assert len(set(codes)) == len(codes)
    for name, a in A.ACTIVATIONS.items():
        assert a.name == name and a(X) is not None


@pytest.mark.parametrize("name", NAMES)
def test_derivative_against_autograd_and_central_differences(name):
    """phi' against autograd's derivative of phi (measured agreement <= 2.3e-15, asserted at
    1e-14 relative + absolute) and against central differences with h = 1e-5 (truncation
    h^2 |phi'''| / 6 < 2e-11, rounding |phi(x)| eps / h <= 30 * 2.2e-16 / 1e-5 = 6.7e-10;
    measured <= 3.4e-10, LipSwish at |x| = 30; asserted at 1e-8)."""
    a = A.ACTIVATIONS[name]
    auto = autograd.elementwise_grad(a.fn)(X)
    np.testing.assert_allclose(a.derivative(X), auto, rtol=1e-14, atol=1e-14)
    h = 1e-5
    fd = (a.fn(X + h) - a.fn(X - h)) / (2 * h)
    np.testing.assert_allclose(a.derivative(X), fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", [n for n in NAMES if A.ACTIVATIONS[n].second_derivative])
def test_second_derivative_against_autograd_and_central_differences(name):
    """phi'' against autograd's second derivative of phi (measured <= 2.1e-15, asserted at
    1e-13 relative + 1e-14 absolute) and against central differences of the table's phi'
    (h = 1e-5; measured <= 1.5e-10, asserted at 1e-8 as above)."""
    a = A.ACTIVATIONS[name]
    auto = autograd.elementwise_grad(autograd.elementwise_grad(a.fn))(X)
    np.testing.assert_allclose(a.second_derivative(X), auto, rtol=1e-13, atol=1e-14)
    h = 1e-5
    fd = (a.derivative(X + h) - a.derivative(X - h)) / (2 * h)
    np.testing.assert_allclose(a.second_derivative(X), fd, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", [n for n in NAMES if A.ACTIVATIONS[n].derivative_from_output])
def test_derivative_from_output(name):
    """phi'(x) recovered from y = phi(x) (measured <= 1.1e-16 absolute; asserted at 1e-14)."""
    a = A.ACTIVATIONS[name]
    np.testing.assert_allclose(a.derivative_from_output(a.fn(X)), a.derivative(X), atol=1e-14)


def _lipswish_sup():
    """sup |phi'| of LipSwish from its closed form, maximised by scipy (not from the table):
    phi'(z) = s(z)(1 + z(1 - s(z))) / 1.1, maximal near z = 2.4."""

    def d(z):
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s)) / 1.1

    top = minimize_scalar(
        lambda z: -d(z), bounds=(0.0, 6.0), method="bounded", options={"xatol": 1e-10}
    )
    low = minimize_scalar(d, bounds=(-6.0, 0.0), method="bounded", options={"xatol": 1e-10})
    return max(-top.fun, abs(low.fun))


#: sup |phi'| from the mathematics: 1 for relu, tanh (at 0), softplus (x -> inf) and elu; for
#: LipSwish the maximum of its closed-form derivative.
EXACT_SUP = {"elu": 1.0, "relu": 1.0, "softplus": 1.0, "tanh": 1.0, "lipswish": _lipswish_sup()}


@pytest.mark.parametrize("name", NAMES)
def test_lipschitz_constant_against_measured_sup(name):
    """The table's constant bounds sup |phi'| measured by central differences of phi (not the
    table's phi') on a grid of step 1e-4 over [-40, 40], which contains 0 (tanh's maximum),
    reaches softplus' sigma(40) = 1 - 4e-18 and passes within 5e-5 of LipSwish's maximiser
    (where phi'' = 0, so the miss is below |phi'''| (5e-5)^2 < 1e-9); h = 1e-5 (rounding
    40 eps / h = 8.9e-10). Measured: 1 + 3.2e-10 for relu, elu and softplus, 1 - 3.3e-11 for
    tanh, 0.99985393 for LipSwish; asserted: equal to the exact sup to 1e-8, and the table's
    bound exceeds it only by LipSwish's stated slack 1 - 0.9998539."""
    a = A.ACTIVATIONS[name]
    x = np.linspace(-40.0, 40.0, 800_001)
    h = 1e-5
    measured = np.max(np.abs((a.fn(x + h) - a.fn(x - h)) / (2 * h)))
    assert abs(measured - EXACT_SUP[name]) < 1e-8, (measured, EXACT_SUP[name])
    assert measured <= a.lipschitz + 1e-8
    slack = 1.0 - 0.9998539 + 1e-7 if name == "lipswish" else 1e-8
    assert a.lipschitz - measured <= slack, (a.lipschitz, measured)


@pytest.mark.parametrize("name", NAMES)
def test_dtype_and_array_api_namespace(name):
    """float32 in -> float32 out, and the same values on array-api-strict as on NumPy."""
    a = A.ACTIVATIONS[name]
    x32 = X.astype(np.float32)
    fns = [a.fn, a.derivative, a.second_derivative]
    for f in filter(None, fns):
        assert f(x32).dtype == np.float32, f.__name__
    if a.derivative_from_output:
        assert a.derivative_from_output(a.fn(x32)).dtype == np.float32
    xs = array_api_strict.asarray(X)
    for f in filter(None, fns):
        out = f(xs)
        assert type(out) is type(xs)
        np.testing.assert_array_equal(np.asarray(out), f(X))


def test_tanh_vjp_is_bounded_at_large_inputs():
    g = autograd.elementwise_grad(A.tanh)(np.array([-1e4, -100.0, 0.0, 100.0], np.float32))
    assert g.dtype == np.float32 and np.all(np.isfinite(g))
    np.testing.assert_array_equal(g, [0.0, 0.0, 1.0, 0.0])


def test_former_tables_resolve_to_the_one_table():
    """Every table that existed before (lipschitz, nets, kernels.made, kernels.coupling_mlp, the
    residual block) resolves to the same functions, constants and codes."""
    for name, (phi, dphi, L) in lip.ACTIVATIONS.items():
        a = A.ACTIVATIONS[name]
        assert phi is a.fn and dphi is a.derivative and L == a.lipschitz
    assert lip.elu is A.elu and lip.elu_derivative is A.elu_derivative
    assert lip.lipswish is A.lipswish and lip.lipswish_derivative is A.lipswish_derivative
    assert lip.LIPSWISH_SCALE == A.LIPSWISH_SCALE
    assert nets.relu is A.relu and nets.tanh is A.tanh
    assert made.ACTIVATIONS == {"relu": 0, "tanh": 1}  # the codes the numba kernel branches on
    for name, code in made.ACTIVATIONS.items():
        assert A.ACTIVATIONS[name].code == code
    assert set(coupling_mlp.ACTIVATIONS) <= set(A.ACTIVATIONS)
    assert residual.ACTIVATIONS == tuple(lip.ACTIVATIONS)
    from flowmath.ode import dynamics

    assert set(dynamics.ACTIVATIONS) <= set(A.ACTIVATIONS)
    assert all(A.ACTIVATIONS[n].second_derivative for n in dynamics.ACTIVATIONS)


@pytest.mark.parametrize("kernel", [False, True])
def test_ode_dynamics_use_the_table(kernel, monkeypatch):
    """The CNF dynamics' activation values and derivatives are the table's: softplus exactly
    (the same functions); tanh on both of its paths: numpy.tanh (bitwise) and the numba kernel,
    whose absolute error delta is below 2.3e-16 (its docstring), so phi' = 1 - h^2 is off by
    at most 2 delta + eps and phi'' = -2 h (1 - h^2) by 4 delta + 2 eps = 1.4e-15 (measured
    2.2e-16, 4.4e-16, 8.6e-16; asserted 1e-15, 1e-15, 2e-15)."""
    from flowmath.kernels import cnf_tanh
    from flowmath.ode import dynamics

    monkeypatch.setattr(cnf_tanh, "USE_KERNEL", kernel)
    sp = A.ACTIVATIONS["softplus"]
    h = dynamics._act(np, "softplus", X)
    np.testing.assert_array_equal(h, sp.fn(X))
    d1, d2 = dynamics._act_derivs(np, "softplus", X, h)
    np.testing.assert_array_equal(d1, sp.derivative(X))
    np.testing.assert_allclose(d2, sp.second_derivative(X), rtol=0, atol=1e-16)
    th = A.ACTIVATIONS["tanh"]
    h, d1, d2 = dynamics._act_np("tanh", X, 2)
    np.testing.assert_allclose(h, th.fn(X), rtol=0, atol=1e-15)
    np.testing.assert_allclose(d1, th.derivative(X), rtol=0, atol=1e-15)
    np.testing.assert_allclose(d2, th.second_derivative(X), rtol=0, atol=2e-15)


def test_made_reference_uses_the_table():
    """The MADE twin's hidden activation is the table's function (relu and tanh give the
    network written out with them)."""
    rng = np.random.default_rng(0)
    perm = np.arange(3)
    masks = made.made_masks(perm, (5,))
    net = nets.mlp_init(rng, [3, 5, 6])
    x = rng.normal(size=(4, 3))
    for name in made.ACTIVATIONS:
        phi = A.ACTIVATIONS[name].fn
        h = phi(x @ (net[0]["W"] * masks[0]) + net[0]["b"])
        out = h @ (net[1]["W"] * masks[1]) + net[1]["b"]
        mu, r = made.made_apply(net, masks, x, name)
        np.testing.assert_array_equal(np.hstack([mu, r]), out)


@pytest.mark.parametrize(
    "make, valid",
    [
        (lambda a: fm.AffineCoupling(activation=a), "'relu', 'tanh'"),
        (lambda a: fm.MAF(activation=a), "'relu', 'tanh'"),
        (lambda a: fm.IResBlock(activation=a), "'elu', 'lipswish'"),
        (lambda a: fm.CNF(activation=a), "'tanh', 'softplus'"),
    ],
)
def test_unknown_activation_lists_the_valid_ones(make, valid):
    with pytest.raises(ValueError, match=f"`activation` must be one of {valid}; got 'swish'"):
        make("swish")


def test_check_activation_messages():
    with pytest.raises(ValueError, match="one of 'elu', 'lipswish', 'relu', 'softplus', 'tanh'"):
        A.get("swish")
    with pytest.raises(ValueError, match=r"`act` must be one of .*got 3"):
        A.get(3, "act")
    with pytest.raises(ValueError, match="in flowmath.activations, but this layer"):
        fm.AffineCoupling(activation="elu")
