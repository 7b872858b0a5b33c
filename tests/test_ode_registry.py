"""Every method and every adjoint on the registry of ODE problems (tests/ode_problems.py):
accuracy, order by regression, dense output, events, gradients (y0, params, output times),
and the solver options a scipy or torchdiffeq user expects (max_step, forced boundaries,
per-component tolerances, pytree states, the step floor, first_step, t0 == t1)."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from ode_problems import PROBLEMS, T_JUMP
from scipy.integrate import solve_ivp
from scipy.linalg import expm, expm_frechet

import flowmath as fm
from flowmath.ode import TABLEAUX, ButcherTableau

ADAPTIVE = sorted(name for name, tab in TABLEAUX.items() if tab.adaptive)
ADJOINTS = ["backsolve", "checkpoint", "direct"]
TOL = dict(rtol=1e-8, atol=1e-10)

# A user's tableau: Heun-Euler 2(1), an embedded pair without FSAL and without dense output
# (outputs become step boundaries, dense output is the cubic Hermite interpolant).
HEUN_EULER = ButcherTableau(
    name="heun-euler",
    c=[0, 1],
    A=[[0, 0], [1, 0]],
    b=[0.5, 0.5],
    order=2,
    b_embedded=[1, 0],
    embedded_order=1,
)


def _scale(exact):
    return max(1.0, float(np.abs(exact).max()))


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("method", ADAPTIVE)
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_adaptive_accuracy_and_dense_output(name, method):
    """Outputs and the dense output sol(t) on 41 points against the closed form / reference:
    within 10 rtol max(1, |y|) (largest measured ratio 4.8, dopri5's dense output on `sine`);
    sol(t_k) reproduces the outputs."""
    p = PROBLEMS[name]
    sol = fm.ode.solve(
        p.f, p.y0, p.t, p.params, method=method, dense_output=True, **TOL, **p.kwargs
    )
    exact = p.exact(p.t, p.y0, p.params)
    bound = 10 * TOL["rtol"] * _scale(exact)
    assert np.abs(sol.ys - exact).max() < bound
    tt = np.linspace(p.t[0], p.t[-1], 41)
    assert np.abs(sol(tt) - p.exact(tt, p.y0, p.params)).max() < bound
    np.testing.assert_allclose(sol(p.t), sol.ys, rtol=0, atol=1e-14 * _scale(exact))
    assert sol.n_steps == sol.n_accepted + sol.n_rejected


@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_rk4_accuracy(name):
    """RK4 with h = 0.01: global error C h^4; measured at most 3e-9 (Van der Pol)."""
    p = PROBLEMS[name]
    ys = fm.odeint(p.f, p.y0, p.t, p.params, method="rk4", step_size=0.01, **p.kwargs)
    assert np.abs(ys - p.exact(p.t, p.y0, p.params)).max() < 1e-8


@pytest.mark.parametrize("method", ["rk4", "euler"])
def test_fixed_step_without_step_size_steps_on_the_output_grid(method):
    """No ``step_size``: one step per output interval (torchdiffeq's default grid, the output
    times; documented in ``solve``), and forced boundaries add grid points. On y' = -k y one step
    of length h multiplies y by the method's stability polynomial R(-k h), so the outputs are
    the products of R over the intervals to rounding (measured at most 3 eps relative; bound
    8 eps)."""
    p = PROBLEMS["exponential"]
    k = p.params

    def R(z):
        return 1 + z + z**2 / 2 + z**3 / 6 + z**4 / 24 if method == "rk4" else 1 + z

    sol = fm.ode.solve(p.f, p.y0, p.t, k, method=method)
    want = p.y0 * np.cumprod([1.0] + [R(-k * h) for h in np.diff(p.t)])[:, None]
    np.testing.assert_allclose(sol.ys, want, rtol=8 * np.finfo(float).eps, atol=0)
    assert sol.n_steps == len(p.t) - 1
    grid = np.array([0.0, 0.3, 0.7, 2.0])  # jump_t = 0.3 splits the first interval
    sol = fm.ode.solve(p.f, p.y0, p.t, k, method=method, jump_t=[0.3])
    assert sol.n_steps == len(grid) - 1
    np.testing.assert_allclose(
        sol.ys[-1],
        p.y0 * np.prod([R(-k * h) for h in np.diff(grid)]),
        rtol=8 * np.finfo(float).eps,
        atol=0,
    )


def test_user_tableau_is_adaptive():
    """Any ButcherTableau with an embedded pair runs adaptive; without dense output its outputs
    are step ends (exact to the tolerance) and sol(t) is the cubic Hermite interpolant."""
    p = PROBLEMS["rational"]
    sol = fm.ode.solve(p.f, p.y0, p.t, p.params, method=HEUN_EULER, rtol=1e-6, atol=1e-8,
                       dense_output=True)  # fmt: skip
    exact = p.exact(p.t, p.y0, p.params)
    # second order at 1e-6: measured 2.2e-6
    assert np.abs(sol.ys - exact).max() < 1e-5
    tt = np.linspace(0.0, 3.0, 31)
    assert np.abs(sol(tt) - p.exact(tt, p.y0, p.params)).max() < 1e-5
    assert sol.method == "heun-euler" and sol.n_rejected >= 0


# ----------------------------------------------------------------------------- order


def _fixed_copy(tab, dense=True):
    return ButcherTableau(
        name=f"{tab.name}-fixed",
        c=tab.c,
        A=tab.A,
        b=tab.b,
        order=tab.order,
        dense=tab.dense if dense else None,
        dense_order=tab.dense_order if dense else None,
    )


# step sizes 2^-k in the asymptotic range (above rounding) of each method on `rational`
ORDER_STEPS = {
    "euler": (4, 5, 6, 7),
    "rk4": (3, 4, 5, 6),
    "bosh3": (4, 5, 6, 7),
    "dopri5": (3, 4, 5, 6),
    "tsit5": (3, 4, 5, 6),
    "heun-euler": (3, 4, 5, 6),
}


def test_order_registry_covers_every_tableau():
    assert set(ORDER_STEPS) == set(TABLEAUX) | {"heun-euler"}


def test_hermite_dense_output_is_exact_where_the_method_is():
    """A tableau without a continuous extension gets the cubic Hermite interpolant of the step
    ends and slopes.  On y' = 2t + 1 Heun's method is the trapezoid rule, exact for a linear
    slope, and the cubic Hermite interpolant reproduces y = t^2 + t + 1 exactly, so sol(t) at
    57 points inside the steps must equal it to rounding (measured 8.9e-16; bound 1e-13).  A
    basis function off by 0.1 % leaves an error of order 1e-4 here."""
    fixed = _fixed_copy(HEUN_EULER, dense=False)
    span = np.array([0.0, 2.0])
    sol = fm.ode.solve(
        lambda t, y, p: 2 * t + 1 + 0 * y, np.array([1.0]), span, None,
        method=fixed, step_size=0.25, dense_output=True,
    )  # fmt: skip
    tt = np.linspace(0.01, 1.99, 57)
    np.testing.assert_allclose(sol(tt)[:, 0], tt**2 + tt + 1, rtol=0, atol=1e-13)


def test_event_time_is_the_root_of_the_dense_output_to_rounding():
    """With the default xtol the located time is a zero of g on the continuous extension to a
    few ulp: |g(t_e, sol(t_e))| <= 1e-14 (measured 0), and t_e = ln 2 / k to the
    solution's accuracy at rtol 1e-12 (measured 5.9e-14; bound 1e-11)."""
    p = PROBLEMS["exponential"]
    half = fm.ode.Event(lambda t, y, k: y[0] - 0.5, terminal=False, direction=-1)
    sol = fm.ode.solve(
        p.f, p.y0, p.t, p.params, events=half, dense_output=True, rtol=1e-12, atol=1e-14
    )
    (te,) = sol.t_events[0]
    assert abs(sol(te)[0] - 0.5) <= 1e-14
    assert abs(sol.y_events[0][0][0] - 0.5) <= 1e-14
    assert abs(te - np.log(2.0) / p.params) < 1e-11


@pytest.mark.parametrize("name", sorted(ORDER_STEPS))
def test_order_on_a_nonlinear_problem(name):
    """Slope of log(error) against log(h) with fixed steps on y' = -y^2 / 2 over [0, 2]
    (nonlinear): the method's order p at the step ends, and min(p, q + 1) for the dense output
    (order q) at the midpoints of the steps (the interpolant's local error is O(h^(q+1))).

    The two 5th-order pairs have tiny principal error coefficients (that is their design): at
    the step ends their error is dominated by the O(h^6) term until rounding takes over, so the
    measured slope lies in [5, 6) (5.43 dopri5, 5.41 tsit5; their order 5 is regressed exactly
    on the linear problem in test_ode.py); their dense outputs regress to 5 within 0.25
    (measured 4.97, 4.87).  Measured otherwise: 1.01, 3.99, 3.03, 2.03 at the ends."""
    tab = HEUN_EULER if name == "heun-euler" else TABLEAUX[name]
    p = PROBLEMS["rational"]
    c, span = 0.5, np.array([0.0, 2.0])
    fixed = _fixed_copy(tab, dense=tab.dense is not None)
    hs = [2.0**-k for k in ORDER_STEPS[name]]
    errs, dense_errs = [], []
    for h in hs:
        sol = fm.ode.solve(p.f, p.y0, span, c, method=fixed, step_size=h, dense_output=True)
        errs.append(np.abs(sol.ys[-1] - p.exact(span, p.y0, c)[-1]).max())
        mids = np.arange(0.5, round(2 / h)) * h
        ref = p.exact(np.concatenate([[0.0], mids]), p.y0, c)[1:]
        dense_errs.append(np.abs(sol(mids) - ref).max())
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    if tab.order == 5:
        assert 5 - 0.1 < slope < 6, slope
    else:
        assert abs(slope - tab.order) < 0.2, slope
    q = tab.dense_order if tab.dense is not None else 3  # Hermite
    dslope = np.polyfit(np.log(hs), np.log(dense_errs), 1)[0]
    assert abs(dslope - min(tab.order, q + 1)) < 0.25, dslope


# ----------------------------------------------------------------------------- events


@pytest.mark.parametrize("method", ADAPTIVE + ["rk4"])
def test_terminal_event_time_and_state(method):
    """y = y0 e^{-k t} crosses 0.5 y0 at ln 2 / k: located on the dense output to within the
    solution's own error over the slope, 10 rtol |y| / |y'| = 7e-8 (measured 6e-12 dopri5,
    7e-9 bosh3), the state there reported, later outputs dropped."""
    p = PROBLEMS["exponential"]
    kw = dict(step_size=0.01) if method == "rk4" else TOL
    half = fm.ode.Event(lambda t, y, k: y[0] - 0.5, terminal=True, direction=-1)
    sol = fm.ode.solve(p.f, p.y0, p.t, p.params, method=method, events=half, **kw)
    t_hit = np.log(2.0) / p.params
    assert sol.status == 1 and len(sol.t_events[0]) == 1
    assert abs(sol.t_events[0][0] - t_hit) < 10 * 1e-8 * 0.5 / (0.5 * p.params)
    np.testing.assert_allclose(sol.y_events[0][0], p.y0 * 0.5, atol=1e-8)
    assert sol.ys.shape == (1, 2) and np.all(sol.t <= t_hit)  # only the output at 0


@pytest.mark.parametrize("method", ADAPTIVE)
def test_non_terminal_events_with_direction(method):
    """y = 0.2 + sin(3 t): g = y - 0.2 vanishes at k pi / 3; in [0.01, 2.5] the rising zero
    is 2 pi / 3 (direction +1), the falling one pi / 3 (direction -1); located to 1e-8."""
    p = PROBLEMS["sine"]
    up = fm.ode.Event(lambda t, y, w: y[0] - 0.2, direction=1)
    down = lambda t, y, w: y[0] - 0.2  # noqa: E731  (a plain callable, scipy's attributes)
    down.direction = -1
    t = np.array([0.01, 2.5])
    sol = fm.ode.solve(
        p.f, p.y0 + np.sin(3 * 0.01), t, p.params, method=method, events=[up, down], **TOL
    )
    np.testing.assert_allclose(sol.t_events[0], [2 * np.pi / 3], atol=1e-8)
    np.testing.assert_allclose(sol.t_events[1], [np.pi / 3], atol=1e-8)
    assert sol.status == 0 and sol.ys.shape == (2, 2)


C_TERMINAL, C_CROSS = 0.3, 1.2  # y[0] falls to 0.3 (terminal), y[1] passes 1.2 (not terminal)
EVENT_TOL = {"tight": dict(rtol=1e-10, atol=1e-12), "bosh3": dict(rtol=1e-8, atol=1e-10)}
EVENT_WEIGHTS = (0.7, -1.1, np.array([0.4, -0.9]), np.array([1.3, 0.2]), np.array([-0.5, 0.8]))


def _event_loss(t_term, t_cross, y_term, y_cross, y_out):
    a, b, w, v, u = EVENT_WEIGHTS
    return a * t_term + b * t_cross + anp.dot(w, y_term) + anp.dot(v, y_cross) + anp.dot(u, y_out)


def _event_loss_solver(y0, k, t, method, adjoint):
    p = PROBLEMS["exponential"]
    term = fm.ode.Event(lambda t, y, k: y[0] - C_TERMINAL, terminal=True, direction=-1)
    cross = fm.ode.Event(lambda t, y, k: y[1] - C_CROSS)
    kw = dict(step_size=0.01) if method == "rk4" else EVENT_TOL.get(method, EVENT_TOL["tight"])
    sol = fm.ode.solve(p.f, y0, t, k, method=method, adjoint=adjoint, events=[term, cross], **kw)
    assert sol.status == 1 and sol.ys.shape == (2, 2)  # the output at t = 2 is dropped
    return _event_loss(
        sol.t_events[0][0], sol.t_events[1][0], sol.y_events[0][0], sol.y_events[1][0], sol.ys[-1]
    )


def _event_loss_exact(y0, k, t):
    """y = y0 e^{-k (t - t0)} reaches c in component i at t0 + ln(y0_i / c) / k."""
    t_term = t[0] + anp.log(y0[0] / C_TERMINAL) / k
    t_cross = t[0] + anp.log(y0[1] / C_CROSS) / k

    def y(s):
        return y0 * anp.exp(-k * (s - t[0]))

    return _event_loss(t_term, t_cross, y(t_term), y(t_cross), y(t[1]))


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("method", ADAPTIVE + ["rk4"])
def test_event_time_and_state_gradients(method, adjoint):
    """Event times and states are differentiable (implicit function theorem, dt_e/dtheta =
    -(g_y . dy(t_e)/dtheta + g_theta) / (dg/dt)): a loss of a terminal and a non-terminal event's
    time and state and of an output before them, differentiated in y0, k and the output times
    (t0 shifts both events), against autograd of the closed form. Measured max abs errors
    (gradients are O(1)): dopri5 / tsit5 at rtol 1e-10 8.1e-11, bosh3 at rtol 1e-8 1.8e-8,
    rk4 with h = 0.01 4.3e-10; bounds about 10x: 1e-9, 2e-7, 5e-9."""
    p = PROBLEMS["exponential"]
    args = (p.y0, p.params, p.t)
    got = grad(lambda a: _event_loss_solver(*a, method, adjoint))(args)
    want = grad(lambda a: _event_loss_exact(*a))(args)
    bound = {"rk4": 5e-9, "bosh3": 2e-7}.get(method, 1e-9)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=0, atol=bound)
    # the state component that defines the terminal event is constant there: zero gradient
    dy = grad(lambda y0: fm.ode.solve(
        p.f, y0, p.t, p.params, method=method, adjoint=adjoint, step_size=0.01 if method == "rk4"
        else None, events=fm.ode.Event(lambda t, y, k: y[0] - C_TERMINAL, terminal=True),
    ).y_events[0][0][0])(p.y0)  # fmt: skip
    assert np.abs(dy).max() < 1e-12


def test_event_time_gradient_against_finite_differences():
    """d t_e / d(y0, k) of the terminal event against central differences of the solver itself
    (step e = 1e-5, rtol 1e-12; the difference's truncation, e^2/6 times a third derivative
    of order 1, is 2e-11, and the solver's own error over the step, 1e-12 / 1e-5, up to 1e-7
    where the step sequence changes): measured 4.0e-11, bound 1e-9."""
    p = PROBLEMS["exponential"]

    def t_hit(y0, k):
        ev = fm.ode.Event(lambda t, y, k: y[0] - C_TERMINAL, terminal=True)
        return fm.ode.solve(p.f, y0, p.t, k, events=ev, rtol=1e-12, atol=1e-14).t_events[0][0]

    g_y0, g_k = grad(lambda a: t_hit(*a))((p.y0, p.params))
    e = 1e-5
    fd_y0 = [(t_hit(p.y0 + e * d, p.params) - t_hit(p.y0 - e * d, p.params)) / (2 * e)
             for d in np.eye(2)]  # fmt: skip
    fd_k = (t_hit(p.y0, p.params + e) - t_hit(p.y0, p.params - e)) / (2 * e)
    np.testing.assert_allclose(g_y0, fd_y0, rtol=0, atol=1e-9)
    assert abs(g_k - fd_k) < 1e-9


def test_event_time_gradient_refused_at_a_tangential_crossing():
    """v = (t - 1)^3 crosses 0 at t = 1 with dv/dt = 0 there: t_e is not differentiable in v0
    (t_e = 1 + (-v0)^(1/3) - ...), so its gradient raises instead of returning a huge number."""

    def f(t, y, p):
        return anp.array([1.0, 3.0 * (t - 1.0) ** 2]) + 0.0 * y

    ev = fm.ode.Event(lambda t, y, p: y[1], terminal=True)

    def t_hit(y0):
        return fm.ode.solve(f, y0, np.array([0.0, 2.0]), None, events=ev).t_events[0][0]

    y0 = np.array([0.0, -1.0])
    assert abs(t_hit(y0) - 1.0) < 1e-4  # a triple zero: located to (error of v)^(1/3)
    with pytest.raises(ValueError, match="not differentiable"):
        grad(t_hit)(y0)


def test_event_function_closing_over_a_traced_variable_is_refused():
    p = PROBLEMS["exponential"]

    def t_hit(c):
        ev = fm.ode.Event(lambda t, y, k: y[0] - c, terminal=True)
        return fm.ode.solve(p.f, p.y0, p.t, p.params, events=ev).t_events[0][0]

    with pytest.raises(TypeError, match="pass that variable through `params`"):
        grad(t_hit)(0.3)


# ----------------------------------------------------------------------------- gradients

GRAD_PROBLEMS = ["exponential", "rational", "sine", "jump"]


def _loss_weights(p):
    return np.random.default_rng(7).normal(size=(len(p.t),) + p.y0.shape)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("name", GRAD_PROBLEMS)
def test_gradients_against_the_closed_form(name, adjoint):
    """L = sum_k w_k . y(t_k): dL/dy0, dL/dparams and dL/dt (every output time) through each
    adjoint against autograd of the closed form, relative to max(1, |exact|): below 2e-9 at rtol
    1e-10 (measured at most 1.6e-10: sine's dL/dw through checkpoint and direct)."""
    p = PROBLEMS[name]
    w = _loss_weights(p)
    kw = dict(rtol=1e-10, atol=1e-12, adjoint=adjoint, **p.kwargs)

    def loss(y0, params, t):
        return anp.sum(w * fm.odeint(p.f, y0, t, params, **kw))

    def exact(y0, params, t):
        return anp.sum(w * p.exact(t, y0, params))

    argnums = (0, 2) if p.params is None else (0, 1, 2)
    got = grad(loss, argnums)(p.y0, p.params, p.t)
    want = grad(exact, argnums)(p.y0, p.params, p.t)
    for g, e in zip(got, want, strict=True):
        e = np.asarray(e)
        assert np.abs(np.asarray(g) - e).max() <= 2e-9 * max(1.0, np.abs(e).max()), (g, e)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_linear_gradients_in_A_y0_and_t(adjoint):
    """y' = A y: dL/dA by expm_frechet, dL/dy0 = sum expm(A t_k)^T w_k,
    dL/dt_k = w_k . A y_k (k >= 1) and dL/dt_0 = -sum_k w_k . expm(A t_k) A y0."""
    p = PROBLEMS["linear"]
    A, y0, t = p.params, p.y0, p.t
    w = _loss_weights(p)
    kw = dict(rtol=1e-10, atol=1e-12, adjoint=adjoint)
    gA, gy, gt = grad(lambda A, y, t: anp.sum(w * fm.odeint(p.f, y, t, A, **kw)), (0, 1, 2))(
        A, y0, t
    )
    eA = sum(expm_frechet(A.T * tk, np.outer(wk, y0), compute_expm=False) * tk
             for tk, wk in zip(t, w, strict=True))  # fmt: skip
    ey = sum(expm(A * tk).T @ wk for tk, wk in zip(t, w, strict=True))
    et = np.array([wk @ A @ expm(A * tk) @ y0 for tk, wk in zip(t, w, strict=True)])
    et[0] = -sum(wk @ expm(A * tk) @ A @ y0 for tk, wk in zip(t[1:], w[1:], strict=True))
    for g, e in ((gA, eA), (gy, ey), (gt, et)):
        # measured relative errors below 1e-10
        assert np.abs(g - e).max() < 1e-8 * np.abs(e).max()


def test_time_gradient_of_a_learned_end_time():
    """FFJORD learns its end time: d/dT of y(T) = f(T, y(T)) through each adjoint."""
    p = PROBLEMS["rational"]
    for adjoint in ADJOINTS:
        g = grad(
            lambda T, a=adjoint: fm.odeint(p.f, p.y0, anp.array([0.0, T]), 2.0, adjoint=a)[-1, 0]
        )(1.5)
        y = 1.0 / (1 + 2.0 * 1.5)
        assert abs(g - (-2.0 * y**2)) < 1e-6


# ----------------------------------------------------------------------------- options


def test_pytree_state_matches_the_array_state_and_differentiates():
    """A dict state {x, v} of the oscillator x'' = -w^2 x gives bitwise the outputs of the
    stacked array state, and the same gradients."""

    def f_tree(t, y, w):
        return {"v": -(w**2) * y["x"], "x": y["v"]}

    def f_arr(t, y, w):  # [v, x] in the dict's sorted-key order
        return anp.stack([-(w**2) * y[1], y[0]])

    t = np.array([0.0, 0.5, 1.0])
    tree0 = {"x": np.array([1.0, 0.5]), "v": np.array([0.0, 0.2])}
    arr0 = np.stack([tree0["v"], tree0["x"]])
    ys_tree = fm.odeint(f_tree, tree0, t, 2.0)
    ys_arr = fm.odeint(f_arr, arr0, t, 2.0)
    np.testing.assert_array_equal(ys_tree["v"], ys_arr[:, 0])
    np.testing.assert_array_equal(ys_tree["x"], ys_arr[:, 1])
    np.testing.assert_allclose(
        ys_tree["x"][-1], np.cos(2.0) * tree0["x"] + np.sin(2.0) / 2 * tree0["v"], atol=1e-7
    )
    for adjoint in ADJOINTS:
        g_tree = grad(lambda w, a=adjoint: anp.sum(fm.odeint(f_tree, tree0, t, w, adjoint=a)["x"]))(
            2.0
        )
        g_arr = grad(lambda w, a=adjoint: anp.sum(fm.odeint(f_arr, arr0, t, w, adjoint=a)[:, 1]))(
            2.0
        )
        assert abs(g_tree - g_arr) < 1e-12 * abs(g_arr)


def test_per_component_tolerances():
    """Two copies of one problem, one component tight and one loose: the tight one is as
    accurate as a solve with the tight tolerances everywhere, at fewer evaluations than that
    solve; a tolerance array of the wrong shape is refused naming `rtol`."""
    p = PROBLEMS["rational"]
    t = p.t
    exact = p.exact(t, p.y0, p.params)
    mixed = fm.ode.solve(p.f, p.y0, t, p.params, rtol=np.array([1e-10, 1e-3]),
                         atol=np.array([1e-12, 1e-3]))  # fmt: skip
    tight = fm.ode.solve(p.f, p.y0, t, p.params, rtol=1e-10, atol=1e-12)
    loose = fm.ode.solve(p.f, p.y0, t, p.params, rtol=1e-3, atol=1e-3)
    assert np.abs(mixed.ys[:, 0] - exact[:, 0]).max() < 1e-8
    assert loose.nfe < mixed.nfe <= tight.nfe
    with pytest.raises(ValueError, match="`rtol` per component must broadcast"):
        fm.odeint(p.f, p.y0, t, p.params, rtol=np.full(3, 1e-6))


def test_max_step_and_forced_boundaries():
    """max_step caps every accepted step; jump_t makes steps end on the discontinuity: the
    error at the tolerance with no rejection there (measured 6.1e-9 at rtol 1e-8 with 111
    evaluations and no rejection, against 8.3e-7, 320 evaluations and 20 rejections without)."""
    p = PROBLEMS["exponential"]
    sol = fm.ode.solve(p.f, p.y0, p.t, p.params, max_step=0.05, dense_output=True)
    assert np.all(np.abs(sol.sol._h) <= 0.05 * (1 + 1e-12)) and sol.n_accepted >= 40
    q = PROBLEMS["jump"]
    exact = q.exact(q.t, q.y0, q.params)
    with_jump = fm.ode.solve(q.f, q.y0, q.t, **TOL, jump_t=[T_JUMP], dense_output=True)
    without = fm.ode.solve(q.f, q.y0, q.t, **TOL)
    assert np.abs(with_jump.ys - exact).max() < 10 * TOL["rtol"] * _scale(exact)
    assert with_jump.n_rejected < without.n_rejected and with_jump.nfe < without.nfe
    assert T_JUMP in set(with_jump.sol._t)  # a step starts on the boundary
    # fixed-step methods split the intervals at the boundary too
    ys = fm.odeint(q.f, q.y0, q.t, method="rk4", step_size=0.05, jump_t=[T_JUMP])
    assert np.abs(ys - exact).max() < 1e-6


def test_step_floor_clamp_as_scipy():
    """At t = 1e9 a proposed step below 10 ulp(t) is raised to it (scipy: 50 evaluations);
    first_step = 1e-20 works; a first step longer than the interval is refused."""
    f = lambda t, y, p: 0 * y  # noqa: E731
    t = np.array([1e9, 1e9 + 10])
    sol = fm.ode.solve(f, np.ones(3), t)
    ref = solve_ivp(lambda t, y: 0 * y, (t[0], t[1]), np.ones(3), method="RK45")
    assert sol.nfe == ref.nfev == 50
    np.testing.assert_array_equal(sol.ys[-1], np.ones(3))
    ys = fm.odeint(lambda t, y, p: -y, np.ones(2), np.array([0.0, 1.0]), first_step=1e-20)
    np.testing.assert_allclose(ys[-1], np.exp(-1.0), rtol=1e-7)
    with pytest.raises(ValueError, match="`first_step` must not exceed the integration interval"):
        fm.odeint(lambda t, y, p: -y, np.ones(2), np.array([0.0, 1.0]), first_step=2.0)


def test_named_tuple_state_and_params():
    """Named tuples are pytrees (flowmath._pytree): the state and the parameters come back as
    the same named tuple, bitwise the outputs of the stacked array state; gradients flow into
    a leaf of the parameter tuple."""
    from collections import namedtuple

    State = namedtuple("State", "x v")
    Rates = namedtuple("Rates", "w damping")

    def f(t, y, p):
        return State(x=y.v, v=-(p.w**2) * y.x - p.damping * y.v)

    def f_arr(t, y, p):
        return anp.stack([y[1], -(p.w**2) * y[0] - p.damping * y[1]])

    t = np.array([0.0, 0.5, 1.0])
    y0 = State(x=np.array([1.0, 0.5]), v=np.array([0.0, 0.2]))
    rates = Rates(w=2.0, damping=0.1)
    ys = fm.odeint(f, y0, t, rates)
    ys_arr = fm.odeint(f_arr, np.stack([y0.x, y0.v]), t, rates)
    assert type(ys) is State
    np.testing.assert_array_equal(ys.x, ys_arr[:, 0])
    np.testing.assert_array_equal(ys.v, ys_arr[:, 1])
    # autograd differentiates dicts, lists and tuples, not named tuples: a leaf inside one
    g = grad(lambda w: anp.sum(fm.odeint(f, y0, t, Rates(w, 0.1)).x[-1]))(2.0)
    g_arr = grad(
        lambda w: anp.sum(fm.odeint(f_arr, np.stack([y0.x, y0.v]), t, Rates(w, 0.1))[-1, 0])
    )(2.0)
    assert abs(g - g_arr) < 1e-12 * abs(g_arr)


def test_equal_times_float_state_and_pi_controller():
    ys = fm.odeint(lambda t, y, p: -y, np.ones(2), np.array([0.5, 0.5]))
    np.testing.assert_array_equal(ys, np.ones((2, 2)))
    sol = fm.ode.solve(lambda t, y, p: -y, np.ones(2), np.array([0.5, 0.5]), dense_output=True)
    np.testing.assert_array_equal(sol(0.5), np.ones(2))
    assert sol.nfe == 0 and sol.n_steps == 0
    ys = fm.odeint(lambda t, y, k: -k * y, 1.0, np.array([0.0, 1.0]), 2.0)
    assert ys.shape == (2,) and abs(ys[-1] - np.exp(-2.0)) < 1e-7
    assert (
        abs(
            grad(lambda y0: fm.odeint(lambda t, y, k: -k * y, y0, np.array([0.0, 1.0]), 2.0)[-1])(
                1.0
            )
            - np.exp(-2.0)
        )
        < 1e-7
    )
    p = PROBLEMS["vanderpol"]
    ctl = fm.ode.Controller(rtol=1e-8, atol=1e-10, beta=0.04)
    sol = fm.ode.solve(p.f, p.y0, p.t, p.params, controller=ctl)
    exact = p.exact(p.t, p.y0, p.params)
    assert np.abs(sol.ys - exact).max() < 10 * 1e-8 * _scale(exact)


def test_options_object_is_the_one_validation():
    """SolverOptions carries every setting; solve, odeint and CNF take it; keywords next to it,
    unknown methods, bad adjoints and fixed-step misuse are refused naming the argument."""
    opts = fm.ode.SolverOptions(method="tsit5", rtol=1e-9, atol=1e-11, adjoint=fm.ode.Checkpoint())
    p = PROBLEMS["rational"]
    a = fm.ode.solve(p.f, p.y0, p.t, p.params, options=opts)
    b = fm.ode.solve(p.f, p.y0, p.t, p.params, method="tsit5", rtol=1e-9, atol=1e-11)
    np.testing.assert_array_equal(a.ys, b.ys)
    assert a.adjoint == "checkpoint" and a.method == "tsit5"
    with pytest.raises(TypeError, match="either as `options` or as keywords"):
        fm.ode.solve(p.f, p.y0, p.t, p.params, options=opts, rtol=1e-3)
    with pytest.raises(ValueError, match="`method` must be one of"):
        fm.ode.SolverOptions(method="rk45")
    with pytest.raises(TypeError, match="`adjoint` must be"):
        fm.ode.SolverOptions(adjoint=3)
    with pytest.raises(ValueError, match="`max_step` applies to the adaptive methods"):
        fm.ode.SolverOptions(method="rk4", max_step=0.1)
    with pytest.raises(ValueError, match="pass the backward tolerances once"):
        fm.ode.SolverOptions(adjoint=fm.ode.Backsolve(rtol=1e-6), adjoint_rtol=1e-6)
    layer = fm.CNF(hidden=(4,), options=fm.ode.SolverOptions(method="tsit5", rtol=1e-6))
    assert layer.method == "tsit5" and layer.solver_options()["options"].tableau is fm.ode.TSIT5
    with pytest.raises(ValueError, match="`step_size` must be given"):
        fm.CNF(method=fm.ode.RK4)


def test_dense_output_pytree_dtype_and_refusals():
    """sol(t) returns the state's kind (pytree leaves, float32 stays float32); outside the
    integrated interval, or without dense_output=True, it refuses naming what to do."""
    p = PROBLEMS["exponential"]

    def f_tree(t, y, k):
        return {"a": -k * y["a"], "b": -k * y["b"]}

    y0 = {"a": np.ones(2, dtype=np.float32), "b": np.full((2, 1), 2.0)}
    sol = fm.ode.solve(f_tree, y0, p.t, p.params, dense_output=True, **TOL)
    mid = sol(np.array([0.3, 1.2]))
    assert mid["a"].dtype == np.float32 and mid["a"].shape == (2, 2)
    assert mid["b"].dtype == np.float64 and mid["b"].shape == (2, 2, 1)
    np.testing.assert_allclose(
        mid["b"][:, 0, 0], 2 * np.exp(-1.5 * np.array([0.3, 1.2])), rtol=1e-7
    )
    with pytest.raises(ValueError, match="`t` must lie in the integrated interval"):
        sol(2.5)
    plain = fm.ode.solve(p.f, p.y0, p.t, p.params)
    with pytest.raises(ValueError, match="solve with `dense_output=True`"):
        plain(0.3)
    with pytest.raises(TypeError, match="`events` must be callables"):
        fm.ode.solve(p.f, p.y0, p.t, p.params, events=[3.0])
    with pytest.raises(TypeError, match="`events` must be a callable"):
        fm.ode.solve(p.f, p.y0, p.t, p.params, events=3)
    with pytest.raises(TypeError, match=r"`events` functions must return a real scalar.*\(2,\)"):
        fm.ode.solve(p.f, p.y0, p.t, p.params, events=lambda t, y, k: y)
    with pytest.raises(TypeError, match="`events` functions must return a real scalar"):
        fm.ode.solve(p.f, p.y0, p.t, p.params, events=lambda t, y, k: "a")
    with pytest.raises(TypeError, match="`jump_t` must be an array of times"):
        fm.ode.solve(p.f, p.y0, p.t, p.params, jump_t="a")


# settings per method for the gradient sweep, and the bound on the relative gradient error
# (10x the largest measured over the three adjoints, in brackets)
GRAD_SETTINGS = {
    "euler": (dict(step_size=1e-2), 7e-2),  # first order: [7.1e-3]
    "rk4": (dict(step_size=2e-2), 7e-7),  # [6.9e-8, backsolve]
    "bosh3": (dict(rtol=1e-7, atol=1e-9), 3e-6),  # [2.2e-7]
    "dopri5": (dict(rtol=1e-9, atol=1e-11), 3e-9),  # [2.6e-10]
    "tsit5": (dict(rtol=1e-9, atol=1e-11), 2e-8),  # [1.9e-9]
}


def test_gradient_settings_cover_every_method():
    assert set(GRAD_SETTINGS) == set(TABLEAUX)


@pytest.mark.parametrize("adjoint", ADJOINTS)
@pytest.mark.parametrize("method", sorted(GRAD_SETTINGS))
def test_gradients_every_method_and_adjoint(method, adjoint):
    """dL/dy0, dL/dc and dL/dt on y' = -c y^2 for every method and every adjoint against
    autograd of the closed form; the error follows the method's own accuracy."""
    p = PROBLEMS["rational"]
    w = _loss_weights(p)
    kw, bound = GRAD_SETTINGS[method]

    def loss(y0, c, t):
        return anp.sum(w * fm.odeint(p.f, y0, t, c, method=method, adjoint=adjoint, **kw))

    got = grad(loss, (0, 1, 2))(p.y0, p.params, p.t)
    want = grad(lambda y0, c, t: anp.sum(w * p.exact(t, y0, c)), (0, 1, 2))(p.y0, p.params, p.t)
    for g, e in zip(got, want, strict=True):
        e = np.asarray(e)
        assert np.abs(np.asarray(g) - e).max() <= bound * max(1.0, np.abs(e).max())
