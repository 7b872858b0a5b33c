"""Built-in ODE dynamics: fused VJPs against autograd, the divergence against dense Jacobians."""

import autograd
import numpy as np
import pytest

from flowmath.ode import dynamics
from flowmath.ode.dynamics import CNFDynamics, MLPDynamics

HIDDEN = [(), (7,), (6, 5), (4, 5, 3)]
MODES = ["concat", "concat-squash"]
ACTS = ["tanh", "softplus"]


def _flat(tree):
    return np.concatenate([np.ravel(tree[i][k]) for i in range(len(tree)) for k in sorted(tree[i])])


def _autograd_vjp(fn, t, y, params, a):
    """Reference VJP: autograd.make_vjp of ``fn`` with respect to ``(y, params)``."""
    vjp, value = autograd.make_vjp(lambda yp: fn(t, yp[0], yp[1]))((y, params))
    a_y, a_p = vjp(a)
    return value, a_y, a_p


def _rel(a, b):
    return np.max(np.abs(a - b)) / max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("time", MODES)
@pytest.mark.parametrize("act", ACTS)
def test_mlp_vjp_matches_autograd(hidden, time, act):
    rng = np.random.default_rng(1)
    d, n, t = 3, 5, 0.37
    f = MLPDynamics(hidden, time=time, activation=act)
    params = f.init(rng, d)
    y, a = rng.normal(size=(2, n, d))
    value, a_y, a_p = _autograd_vjp(f, t, y, params, a)
    dydt, b_y, b_p = f.vjp(t, y, params, a)
    assert _rel(dydt, value) < 1e-14
    assert _rel(b_y, a_y) < 1e-12
    assert _rel(_flat(b_p), _flat(a_p)) < 1e-12


def test_mlp_any_leading_shape():
    """States of shape (..., d): the field acts row-wise."""
    rng = np.random.default_rng(2)
    f = MLPDynamics((5,))
    params = f.init(rng, 3)
    y = rng.normal(size=(2, 4, 3))
    a = rng.normal(size=y.shape)
    np.testing.assert_allclose(
        f(0.1, y, params), f(0.1, y.reshape(8, 3), params).reshape(y.shape), rtol=1e-15, atol=1e-15
    )
    _, a_y, _ = f.vjp(0.1, y, params, a)
    _, a_y2, _ = f.vjp(0.1, y.reshape(8, 3), params, a.reshape(8, 3))
    np.testing.assert_allclose(a_y, a_y2.reshape(y.shape), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("time", MODES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("trace", ["exact", "hutchinson"])
def test_cnf_vjp_matches_autograd(hidden, time, act, trace):
    """The augmented field's fused VJP, second derivatives of the MLP included, to 1e-12."""
    rng = np.random.default_rng(3)
    d, n, t = 3, 4, 0.61
    fld = MLPDynamics(hidden, time=time, activation=act)
    params = fld.init(rng, d)
    probe = rng.normal(size=(n, d)) if trace == "hutchinson" else None
    g = CNFDynamics(fld, probe)
    y, a = rng.normal(size=(2, n, d + 1))
    value, a_y, a_p = _autograd_vjp(g, t, y, params, a)
    dydt, b_y, b_p = g.vjp(t, y, params, a)
    assert _rel(dydt, value) < 1e-14
    assert _rel(b_y, a_y) < 1e-12
    assert np.all(b_y[:, d] == 0.0)
    assert _rel(_flat(b_p), _flat(a_p)) < 1e-12


@pytest.mark.parametrize("hidden", HIDDEN, ids=str)
@pytest.mark.parametrize("time", MODES)
def test_divergence_against_dense_jacobian(hidden, time):
    """Exact trace = tr of the autograd Jacobian; Hutchinson = eps^T J eps, per sample."""
    rng = np.random.default_rng(4)
    d, n, t = 4, 3, 0.8
    fld = MLPDynamics(hidden, time=time)
    params = fld.init(rng, d)
    z = rng.normal(size=(n, d))
    eps = rng.normal(size=(n, d))
    _, tr = CNFDynamics(fld).divergence(t, z, params)
    _, est = CNFDynamics(fld, eps).divergence(t, z, params)
    for i in range(n):
        J = autograd.jacobian(lambda v: fld(t, v[None, :], params)[0])(z[i])
        assert abs(tr[i] - np.trace(J)) < 1e-13 * max(1.0, abs(np.trace(J)))
        assert abs(est[i] - eps[i] @ J @ eps[i]) < 1e-13 * max(1.0, abs(eps[i] @ J @ eps[i]))
    # the augmented field's first d columns are the field itself: bitwise when both run the same
    # evaluation; with one hidden layer, where NumPy has a SIMD tanh, the field runs NumPy and
    # the CNF its row-wise kernel (dynamics.FUSED_FORWARD): to rounding (measured 2.2e-16
    # relative to max(1, |f|), bound 4 eps)
    y = np.concatenate([z, rng.normal(size=(n, 1))], axis=1)
    aug = CNFDynamics(fld)(t, y, params)[:, :d]
    if len(hidden) == 1 and not dynamics.FUSED_FORWARD:
        eps4 = 4 * np.finfo(float).eps
        np.testing.assert_allclose(aug, fld(t, z, params), rtol=eps4, atol=eps4)
    else:
        np.testing.assert_array_equal(aug, fld(t, z, params))


def test_concat_equals_concatenated_input():
    """concat: W_e = W, b_e = b + t u is the linear layer on [h, t] (FFJORD ConcatLinear)."""
    rng = np.random.default_rng(5)
    fld = MLPDynamics((), time="concat")
    params = fld.init(rng, 3)
    z, t = rng.normal(size=(4, 3)), 0.3
    W_full = np.vstack([params[0]["W"], params[0]["u"][None, :]])
    ref = np.hstack([z, np.full((4, 1), t)]) @ W_full + params[0]["b"]
    np.testing.assert_allclose(fld(t, z, params), ref, rtol=1e-15, atol=1e-15)


def test_concat_squash_formula():
    """concat-squash: (h W + b) * sigmoid(t g + g0) + t c (FFJORD ConcatSquashLinear)."""
    rng = np.random.default_rng(6)
    fld = MLPDynamics((), time="concat-squash")
    p = fld.init(rng, 3)
    z, t = rng.normal(size=(4, 3)), -0.7
    gate = 1.0 / (1.0 + np.exp(-(t * p[0]["gate_w"] + p[0]["gate_b"])))
    ref = (z @ p[0]["W"] + p[0]["b"]) * gate + t * p[0]["bias_t"]
    np.testing.assert_allclose(fld(t, z, p), ref, rtol=1e-14, atol=1e-15)


def test_bad_arguments():
    with pytest.raises(ValueError, match="`time` must be one of"):
        MLPDynamics(time="film")
    with pytest.raises(ValueError, match="`activation` must be one of"):
        MLPDynamics(activation="relu")
    with pytest.raises(ValueError, match=r"`hidden\[1\]` must be >= 1"):
        MLPDynamics((3, 0))
    with pytest.raises(TypeError, match="`field` must be an MLPDynamics"):
        CNFDynamics(lambda t, y, p: y)
    fld = MLPDynamics((3,))
    params = fld.init(np.random.default_rng(0), 2)
    assert fld.check_params(params) == 2
    with pytest.raises(ValueError, match="`params` were made for states of dimension 2"):
        fld.check_params(params, 3)
    with pytest.raises(ValueError, match="`params` must be a list of 2 layer dicts"):
        fld.check_params(params[:1])
