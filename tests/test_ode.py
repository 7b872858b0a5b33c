"""Solvers of flowmath.ode: closed forms, scipy references, empirical orders, failures, counts."""

import autograd.numpy as anp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.integrate import solve_ivp
from scipy.linalg import expm

import flowmath as fm
from flowmath.ode import (
    DOPRI5,
    EULER,
    RK4,
    TABLEAUX,
    ButcherTableau,
    ODESolverError,
    odeint,
    solve,
)
from flowmath.ode.tableau import rooted_trees


def linear(t, y, A):
    # y has shape (n, d) (a batch) or (d,); dy/dt = A y per row
    return anp.dot(y, A.T)


@pytest.fixture
def lin_problem(rng):
    A = rng.normal(size=(4, 4)) / 2.0
    y0 = rng.normal(size=(3, 4))
    return A, y0


# ----------------------------------------------------------------------------- tableaux


def test_rooted_tree_counts():
    # OEIS A000081
    assert [len(rooted_trees(p)) for p in range(1, 7)] == [1, 1, 2, 4, 9, 20]


@pytest.mark.parametrize("tab", [EULER, RK4, DOPRI5])
def test_tableau_invariants(tab):
    np.testing.assert_allclose(tab.A.sum(axis=1), tab.c, atol=1e-15)
    assert np.all(np.triu(tab.A) == 0)


def test_dopri5_dense_output_reproduces_b_and_interpolates():
    np.testing.assert_array_equal(DOPRI5.dense_weights(1.0), DOPRI5.b)
    np.testing.assert_allclose(DOPRI5.dense.sum(axis=1), DOPRI5.b, atol=1e-15)


def test_tableau_rejects_bad_data():
    with pytest.raises(ValueError, match="row sums"):
        ButcherTableau(name="bad", c=[0.0, 0.4], A=[[0, 0], [0.5, 0]], b=[0.0, 1.0], order=1)
    with pytest.raises(ValueError, match="order conditions"):
        # midpoint weights claimed to be order 3
        ButcherTableau(name="mid", c=[0.0, 0.5], A=[[0, 0], [0.5, 0]], b=[0.0, 1.0], order=3)
    with pytest.raises(ValueError, match="strictly lower"):
        ButcherTableau(name="impl", c=[1.0], A=[[1.0]], b=[1.0], order=1)
    # the genuine midpoint method is order 2
    ButcherTableau(name="mid", c=[0.0, 0.5], A=[[0, 0], [0.5, 0]], b=[0.0, 1.0], order=2)


# ----------------------------------------------------------------------------- accuracy


def test_linear_dopri5_against_expm(lin_problem):
    A, y0 = lin_problem
    t = np.linspace(0.0, 1.5, 7)
    sol = solve(linear, y0, t, A, rtol=1e-10, atol=1e-12)
    assert sol.ys.shape == (7, 3, 4)
    exact = np.stack([y0 @ expm(A * tk).T for tk in t])
    # the dense output (7 outputs, fewer steps) is 4th order but at tolerance 1e-10; measured
    # 1.5e-11
    np.testing.assert_allclose(sol.ys, exact, rtol=0, atol=1e-10)
    assert sol.n_accepted < 40  # outputs do not shorten steps


@pytest.mark.parametrize("method,h,tol", [("rk4", 1e-3, 1e-12), ("euler", 1e-4, 1e-4)])
def test_linear_fixed_step_against_expm(lin_problem, method, h, tol):
    A, y0 = lin_problem
    t = np.array([0.0, 0.3, 1.0])
    ys = odeint(linear, y0, t, A, method=method, step_size=h)
    exact = np.stack([y0 @ expm(A * tk).T for tk in t])
    np.testing.assert_allclose(ys, exact, rtol=0, atol=tol)


def lotka(t, y, p):
    a, b, c, d = p
    x, z = y[..., 0], y[..., 1]
    return anp.stack([a * x - b * x * z, d * x * z - c * z], axis=-1)


def test_nonlinear_against_solve_ivp():
    p = np.array([1.5, 1.0, 3.0, 1.0])
    y0 = np.array([1.0, 1.0])
    t = np.linspace(0.0, 5.0, 11)
    ref = solve_ivp(
        lambda t, y: lotka(t, y, p), (0, 5), y0, method="DOP853", t_eval=t, rtol=1e-12, atol=1e-12
    ).y.T
    sol = solve(lotka, y0, t, p, rtol=1e-9, atol=1e-11)
    # global error of a tolerance-1e-9 solve over a few periods: measured 3.4e-9
    np.testing.assert_allclose(sol.ys, ref, rtol=0, atol=1e-8)
    assert sol.status == 0


def test_decreasing_times_invert_the_flow():
    p = np.array([1.5, 1.0, 3.0, 1.0])
    y0 = np.array([1.0, 1.0])
    fwd = odeint(lotka, y0, np.array([0.0, 0.7, 2.0]), p, rtol=1e-10, atol=1e-12)
    back = odeint(lotka, fwd[-1], np.array([2.0, 0.7, 0.0]), p, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(back[::-1], fwd, atol=1e-8)
    ref = solve_ivp(
        lambda t, y: lotka(t, y, p),
        (2.0, 0.0),
        fwd[-1],
        t_eval=[0.7, 0.0],
        rtol=1e-12,
        atol=1e-12,
        method="DOP853",
    ).y.T
    np.testing.assert_allclose(back[1:], ref, atol=1e-8)


def test_output_shape_dtype_and_single_time(lin_problem):
    A, y0 = lin_problem
    ys = odeint(linear, y0, np.array([0.0]), A)
    np.testing.assert_array_equal(ys, y0[None])
    ys32 = odeint(linear, y0.astype(np.float32), np.array([0.0, 1.0]), A.astype(np.float32))
    assert ys32.dtype == np.float32 and ys32.shape == (2, 3, 4)
    assert odeint(linear, y0, np.array([0.0, 1.0]), A).dtype == np.float64
    assert fm.odeint is odeint


# Registry of the methods (every entry of TABLEAUX must appear): step sizes 2^-k in the
# asymptotic range above rounding; adaptive tableaux are tested through their propagated
# weights `b` on the uniform grid.
ORDER_GRIDS = {
    "euler": (5, 6, 7, 8),
    "rk4": (3, 4, 5, 6),
    "bosh3": (4, 5, 6, 7),
    "dopri5": (3, 4, 5, 6),
    "tsit5": (4, 5, 6),  # its error constant is small: below 2^-6 rounding shows
}


def test_order_registry_covers_every_method():
    assert set(ORDER_GRIDS) == set(TABLEAUX)


@pytest.mark.parametrize("name", sorted(ORDER_GRIDS))
def test_empirical_order_by_regression(name):
    """Slope of log(error) against log(h) on a damped oscillator equals the tableau's order."""
    from flowmath.ode.solve import integrate

    tab = TABLEAUX[name]
    fixed = ButcherTableau(name=f"{name}-fixed", c=tab.c, A=tab.A, b=tab.b, order=tab.order)
    A = np.array([[-0.5, 1.0], [-1.0, -0.2]])
    y0 = np.array([1.0, 0.5])
    exact = expm(A) @ y0
    hs = [2.0**-k for k in ORDER_GRIDS[name]]
    errs = []
    for h in hs:
        ys, counts = integrate(
            lambda t, y: A @ y, np.array([0.0, 1.0]), y0, fixed, 1e-6, 1e-6, step_size=h
        )
        assert counts.n_steps == round(1 / h)
        errs.append(np.abs(ys[-1] - exact).max())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    # measured 1.003, 4.05, 4.98
    assert abs(slope - tab.order) < 0.1, slope


def test_public_fixed_step_methods_keep_their_order():
    """The same through the public API (`step_size=`), Euler and RK4."""
    A = np.array([[-0.5, 1.0], [-1.0, -0.2]])
    y0 = np.array([1.0, 0.5])
    exact = expm(A) @ y0
    for method, p in (("euler", 1), ("rk4", 4)):
        hs = [2.0**-k for k in ORDER_GRIDS[method]]
        errs = [
            np.abs(
                odeint(linear, y0, np.array([0.0, 1.0]), A, method=method, step_size=h)[-1] - exact
            ).max()
            for h in hs
        ]
        assert abs(np.polyfit(np.log(hs), np.log(errs), 1)[0] - p) < 0.1


def test_dopri5_error_tracks_tolerance():
    # adaptive: error ~ C * tol^(5/5) roughly; check error decreases monotonically and stays
    # within a modest factor of the tolerance on a smooth problem
    p = np.array([1.5, 1.0, 3.0, 1.0])
    y0 = np.array([1.0, 1.0])
    ref = solve_ivp(
        lambda t, y: lotka(t, y, p), (0, 2), y0, method="DOP853", rtol=1e-13, atol=1e-13
    ).y[:, -1]
    errs = []
    for tol in [1e-4, 1e-6, 1e-8, 1e-10]:
        ys = odeint(lotka, y0, np.array([0.0, 2.0]), p, rtol=tol, atol=tol)
        errs.append(np.abs(ys[-1] - ref).max())
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:], strict=False))
    assert errs[-1] < 1e-8


# ----------------------------------------------------------------------------- counts


def test_dopri5_counts_fsal(lin_problem):
    A, y0 = lin_problem
    calls = []

    def f(t, y, A):
        calls.append(t)
        return linear(t, y, A)

    sol = solve(f, y0, np.linspace(0, 3, 4), A, rtol=1e-8, atol=1e-10)
    assert sol.nfe == len(calls) == 2 + 6 * sol.n_steps
    assert sol.n_steps == sol.n_accepted + sol.n_rejected
    calls.clear()
    sol = solve(f, y0, np.linspace(0, 3, 4), A, first_step=0.01)
    assert sol.nfe == len(calls) == 1 + 6 * sol.n_steps


def test_rejections_happen_and_are_counted():
    # a huge first step is rejected at least once
    p = np.array([1.5, 1.0, 3.0, 1.0])
    sol = solve(lotka, np.array([1.0, 1.0]), np.array([0.0, 5.0]), p, first_step=4.0)
    assert sol.n_rejected >= 1
    assert sol.nfe == 1 + 6 * sol.n_steps


def test_fixed_counts(lin_problem):
    A, y0 = lin_problem
    sol = solve(linear, y0, np.array([0.0, 0.5, 1.0]), A, method="rk4", step_size=0.1)
    assert sol.n_steps == 10 and sol.nfe == 40 and sol.n_rejected == 0
    sol = solve(linear, y0, np.array([0.0, 0.5, 1.0]), A, method="euler")
    assert sol.n_steps == 2 and sol.nfe == 2


# ----------------------------------------------------------------------------- failures


def test_blowup_hits_step_floor():
    # dy/dt = y^2, y(0) = 1 blows up at t = 1
    msg = r"step size h=.* at t=(0\.9999|1\.0000).* fell below the floor"
    with pytest.raises(ODESolverError, match=msg):
        odeint(lambda t, y, p: y**2, np.array([1.0]), np.array([0.0, 2.0]))


def test_max_steps_cap():
    with pytest.raises(ODESolverError, match=r"max_steps=5 steps .*\(stopped at t=.*, h="):
        odeint(
            lotka,
            np.array([1.0, 1.0]),
            np.array([0.0, 50.0]),
            np.array([1.5, 1.0, 3.0, 1.0]),
            max_steps=5,
        )
    with pytest.raises(ODESolverError, match="max_steps"):
        odeint(
            linear,
            np.ones(2),
            np.array([0.0, 1.0]),
            np.eye(2),
            method="euler",
            step_size=1e-3,
            max_steps=10,
        )


def test_non_finite_states_detected():
    def f(t, y, p):
        return np.where(t > 0.5, np.nan, -y)

    with pytest.raises(ODESolverError, match="non-finite"):
        odeint(f, np.ones(2), np.array([0.0, 1.0]))
    with pytest.raises(ODESolverError, match=r"non-finite .* at t=0\.5"):
        odeint(f, np.ones(2), np.array([0.0, 1.0]), method="rk4", step_size=0.25)
    with pytest.raises(ODESolverError, match="non-finite"):
        odeint(lambda t, y, p: np.full_like(y, np.inf), np.ones(2), np.array([0.0, 1.0]))
    # a bounded field whose state overflows: every stage is finite, the error estimate is 0,
    # only the state itself is inf
    with pytest.raises(ODESolverError, match="non-finite"):
        odeint(
            lambda t, y, p: np.full_like(y, 1e308),
            np.full(2, 1e308),
            np.array([0.0, 10.0]),
            first_step=1.0,
        )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rtol=-1.0), "`rtol` must be finite and > 0"),
        (dict(rtol=1e-20), "`rtol` must be >= 100"),
        (dict(rtol=2.0), "`rtol` must be < 1"),
        (dict(atol=np.nan), "`atol` must be finite"),
        (dict(method="rk45"), "`method` must be one of"),
        (dict(adjoint="bogus"), "`adjoint` must be one of"),
        (dict(step_size=0.1), "`step_size` applies to the fixed-step"),
        (dict(method="rk4", step_size=-0.1), "`step_size` must be finite and > 0"),
        (dict(method="rk4", step_size=0.0), "`step_size` must be finite and > 0"),
        (dict(max_steps=0), "`max_steps` must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        odeint(linear, np.ones(2), np.array([0.0, 1.0]), np.eye(2), **kwargs)


def test_bad_times_and_shapes():
    with pytest.raises(ValueError, match="`t` must be strictly increasing or strictly decreasing"):
        odeint(linear, np.ones(2), np.array([0.0, 1.0, 0.5]), np.eye(2))
    with pytest.raises(ValueError, match="`t` must be a non-empty 1-D"):
        odeint(linear, np.ones(2), np.zeros((2, 2)), np.eye(2))
    with pytest.raises(ValueError, match="`y0` must be finite"):
        odeint(linear, np.array([np.nan, 1.0]), np.array([0.0, 1.0]), np.eye(2))
    with pytest.raises(ValueError, match=r"`f` must return dy/dt with the shape of `y0` \(2,\)"):
        odeint(lambda t, y, p: np.ones(3), np.ones(2), np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="`rtol` must be a real number"):
        odeint(linear, np.ones(2), np.array([0.0, 1.0]), np.eye(2), rtol="1e-3")


def test_output_times_do_not_shorten_steps(lin_problem):
    """Dense output: 200 output times cost no extra step or evaluation, and the interpolant
    (4th order) stays within a small multiple of the tolerance of the exact flow."""
    A, y0 = lin_problem
    ends = solve(linear, y0, np.array([0.0, 2.0]), A, rtol=1e-9, atol=1e-11)
    t = np.linspace(0.0, 2.0, 200)
    many = solve(linear, y0, t, A, rtol=1e-9, atol=1e-11)
    assert (many.n_steps, many.nfe) == (ends.n_steps, ends.nfe)
    np.testing.assert_array_equal(many.ys[-1], ends.ys[-1])
    exact = np.stack([y0 @ expm(A * tk).T for tk in t])
    # measured 2.6e-10 here; the bound is 10 * rtol * max|y|
    assert np.abs(many.ys - exact).max() < 10 * 1e-9 * np.abs(exact).max()


@given(
    shape=st.sampled_from([(3,), (2, 3), (2, 1, 3)]),
    tol=st.sampled_from([1e-5, 1e-8, 1e-11]),
    backwards=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_any_shape_direction_tolerance(shape, tol, backwards, seed):
    """dopri5 against expm for random 3 x 3 systems, any batch shape, both directions: the
    global error stays within 10 * tol * max(1, |y|) (largest ratio seen over 180 random cases:
    1.04)."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(3, 3)) / 2
    y0 = rng.normal(size=shape)
    t = np.linspace(0.0, 1.3, 5)
    if backwards:
        t = t[::-1] + 0.4
    sol = solve(linear, y0, t, A, rtol=tol, atol=tol)
    exact = np.stack([y0 @ expm(A * (tk - t[0])).T for tk in t])
    scale = max(1.0, np.abs(exact).max())
    assert np.abs(sol.ys - exact).max() < 10 * tol * scale
    assert sol.nfe == 2 + 6 * sol.n_steps
