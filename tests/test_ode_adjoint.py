"""Gradients through flowmath.ode: backsolve, checkpoint and direct against exact references."""

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from scipy.linalg import expm, expm_frechet

from flowmath.ode import odeint, solve

ADJOINTS = ["backsolve", "checkpoint", "direct"]


def linear(t, y, A):
    return anp.dot(y, A.T)


def mlp(t, y, p):
    """Small time-dependent tanh MLP, params a nested pytree (dict with a list)."""
    (W1, b1), (W2, b2) = p["layers"]
    h = anp.tanh(anp.dot(y, W1) + b1 + t * p["u"])
    return anp.dot(h, W2) + b2


class FusedMLP:
    """The same MLP with a hand-written fused VJP (the protocol f.vjp)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, t, y, p):
        return mlp(t, y, p)

    def vjp(self, t, y, p, a):
        self.calls += 1
        (W1, b1), (W2, b2) = p["layers"]
        pre = y @ W1 + b1 + t * p["u"]
        h = np.tanh(pre)
        dydt = h @ W2 + b2
        gh = a @ W2.T
        gpre = gh * (1 - h**2)
        a_y = gpre @ W1.T
        a_p = {
            "layers": [(y.T @ gpre, gpre.sum(0)), (h.T @ a, a.sum(0))],
            "u": t * gpre.sum(0),
        }
        return dydt, a_y, a_p


def mlp_params(rng, d=2, hidden=8):
    return {
        "layers": [
            (rng.normal(size=(d, hidden)) / np.sqrt(d), 0.1 * rng.normal(size=hidden)),
            (rng.normal(size=(hidden, d)) / np.sqrt(hidden), 0.1 * rng.normal(size=d)),
        ],
        "u": rng.normal(size=hidden),
    }


def tree_leaves(tree):
    from flowmath._pytree import flatten, unflatten

    leaves, struct = flatten(tree)
    return leaves, lambda new: unflatten(struct, new)


# ----------------------------------------------------------------------------- linear: exact


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_linear_gradient_against_expm_frechet(rng, adjoint):
    """L = c^T z(1), dz/dt = A z: dL/dA = L_expm(A^T, c z0^T) (Frechet derivative)."""
    A = rng.normal(size=(4, 4)) / 2
    z0 = rng.normal(size=4)
    c = rng.normal(size=4)
    exact_A = expm_frechet(A.T, np.outer(c, z0), compute_expm=False)
    exact_z0 = expm(A).T @ c
    stats = {}

    def loss(A, z0):
        return anp.dot(
            c,
            odeint(
                linear,
                z0,
                np.array([0.0, 1.0]),
                A,
                rtol=1e-10,
                atol=1e-12,
                adjoint=adjoint,
                stats=stats,
            )[-1],
        )

    gA = grad(loss, 0)(A, z0)
    gz = grad(loss, 1)(A, z0)
    scale = np.abs(exact_A).max()
    # solver tolerance 1e-10: measured relative errors 4e-11 (backsolve), 5e-11 (others)
    assert np.abs(gA - exact_A).max() / scale < 5e-10
    assert np.abs(gz - exact_z0).max() / np.abs(exact_z0).max() < 5e-10
    assert stats["backward"]["computed"] and stats["backward"]["mode"] == adjoint


def test_backsolve_drift_and_counts(rng):
    A = rng.normal(size=(3, 3)) / 2
    z0 = rng.normal(size=3)
    box = []

    def loss(z0):
        sol = solve(linear, z0, np.linspace(0, 1, 4), A, adjoint="backsolve")
        box.append(sol)
        return anp.sum(sol.ys**2)

    grad(loss)(z0)
    bw = box[0].backward
    assert bw.computed and bw.mode == "backsolve"
    assert bw.drift is not None and bw.drift < 1e-6
    assert bw.drift <= bw.drift_max < 1e-6  # each segment restarts from the forward value
    assert bw.nfe == bw.n_vjp > 0 and bw.n_steps == bw.n_accepted + bw.n_rejected
    # 3 backward segments, each pays f(t_k) (first step from the forward pass, no probe):
    # nfe = 3 + 6 * steps
    assert bw.nfe == 3 + 6 * bw.n_steps
    assert bw.n_stored_states == 4
    assert not box[0].backward.fused_vjp


def test_checkpoint_counts(rng):
    A = rng.normal(size=(3, 3)) / 2
    box = []

    def loss(z0):
        sol = solve(linear, z0, np.array([0.0, 1.0]), A, adjoint="checkpoint")
        box.append(sol)
        return anp.sum(sol.ys[-1] ** 2)

    grad(loss)(np.ones(3))
    sol = box[0]
    bw = sol.backward
    assert bw.n_accepted == sol.n_accepted and bw.n_stored_states == 6 * sol.n_accepted + 1
    # per step 6 VJPs (stage 7 has b_7 = 0 and no dense output here); stages are stored, so no
    # evaluation of f without its VJP
    assert bw.nfe == 0 and bw.n_vjp == 6 * sol.n_accepted


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "method,kw", [("dopri5", {}), ("rk4", {"step_size": 0.1}), ("euler", {"step_size": 0.05})]
)
def test_checkpoint_equals_direct_to_rounding(rng, method, kw):
    """Both are the exact gradient of the same discrete solve (dense outputs included)."""
    p = mlp_params(rng)
    z0 = rng.normal(size=(5, 2))
    t = np.array([0.0, 0.13, 0.5, 0.77, 1.0])
    w = rng.normal(size=(len(t), 5, 2))

    def loss(z0, p, adjoint, f=mlp):
        ys = odeint(f, z0, t, p, method=method, adjoint=adjoint, rtol=1e-6, atol=1e-8, **kw)
        return anp.sum(w * anp.tanh(ys))

    g_dir = grad(loss, (0, 1))(z0, p, "direct")
    g_chk = grad(loss, (0, 1))(z0, p, "checkpoint")
    g_fus = grad(loss, (0, 1))(z0, p, "checkpoint", FusedMLP())
    for a, b in [(g_dir, g_chk), (g_dir, g_fus)]:
        la, lb = tree_leaves(a)[0], tree_leaves(b)[0]
        for x, y in zip(la, lb, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_mlp_gradients_against_finite_differences(rng, adjoint):
    p = mlp_params(rng)
    z0 = rng.normal(size=(3, 2))
    t = np.array([0.0, 0.4, 1.0])
    kw = dict(rtol=1e-10, atol=1e-12, adjoint=adjoint)

    def loss(z0, p):
        ys = odeint(mlp, z0, t, p, **kw)
        return anp.sum(ys[1] ** 2) + anp.sum(anp.sin(ys[-1]))

    gz, gp = grad(loss, (0, 1))(z0, p)
    leaves, rebuild = tree_leaves(p)
    gleaves = tree_leaves(gp)[0]
    eps = 1e-6
    # central differences along two random directions in every leaf and in z0
    for _ in range(2):
        dz = rng.normal(size=z0.shape)
        fd = (loss(z0 + eps * dz, p) - loss(z0 - eps * dz, p)) / (2 * eps)
        # measured discrepancy 1.7e-8 (central differences of an adaptive solve at 1e-10)
        assert abs(fd - np.sum(gz * dz)) < 1e-7 * max(1.0, abs(fd))
        dirs = [rng.normal(size=np.shape(leaf)) for leaf in leaves]
        pp = rebuild([leaf + eps * d for leaf, d in zip(leaves, dirs, strict=True)])
        pm = rebuild([leaf - eps * d for leaf, d in zip(leaves, dirs, strict=True)])
        fd = (loss(z0, pp) - loss(z0, pm)) / (2 * eps)
        an = sum(np.sum(g * d) for g, d in zip(gleaves, dirs, strict=True))
        assert abs(fd - an) < 1e-7 * max(1.0, abs(fd))


def test_fused_vjp_matches_autograd_backsolve(rng):
    p = mlp_params(rng)
    z0 = rng.normal(size=(4, 2))
    t = np.array([0.0, 1.0])
    fused = FusedMLP()

    def loss(z0, p, f):
        return anp.sum(odeint(f, z0, t, p, adjoint="backsolve", rtol=1e-8, atol=1e-10) ** 2)

    g_ref = grad(loss, (0, 1))(z0, p, mlp)
    g_fus = grad(loss, (0, 1))(z0, p, fused)
    assert fused.calls > 0
    for x, y in zip(tree_leaves(g_ref)[0], tree_leaves(g_fus)[0], strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_decreasing_times_gradient(rng, adjoint):
    A = rng.normal(size=(3, 3)) / 2
    z1 = rng.normal(size=3)
    c = rng.normal(size=3)

    def loss(A):
        return anp.dot(
            c,
            odeint(linear, z1, np.array([1.0, 0.0]), A, rtol=1e-10, atol=1e-12, adjoint=adjoint)[
                -1
            ],
        )

    # z(0) = expm(-A) z1, dL/dA = -L_expm(-A^T, c z1^T)
    exact = -expm_frechet(-A.T, np.outer(c, z1), compute_expm=False)
    # measured 2e-11 relative
    assert np.abs(grad(loss)(A) - exact).max() < 2e-10 * np.abs(exact).max()


def test_float32_gradients_keep_dtype(rng):
    A = (rng.normal(size=(2, 2)) / 2).astype(np.float32)
    z0 = rng.normal(size=2).astype(np.float32)
    t = np.array([0.0, 1.0])
    for adjoint in ADJOINTS:

        def loss(z, A, adjoint=adjoint):
            return anp.sum(odeint(linear, z, t, A, adjoint=adjoint)[-1])

        g, gA = grad(loss, (0, 1))(z0, A)
        assert g.dtype == np.float32 and gA.dtype == np.float32


def test_no_tracing_without_boxes(rng):
    """A plain call returns a plain ndarray and leaves the backward stats empty."""
    sol = solve(linear, np.ones(2), np.array([0.0, 1.0]), np.eye(2))
    assert type(sol.ys) is np.ndarray and not sol.backward.computed


def test_second_order_direct_and_clear_error_otherwise(rng):
    """d^2/dk^2 of y(1) = y0 exp(-k): direct supports it; the primitive modes say so."""

    def y1(k, adjoint):
        f = lambda t, y, k: -k * y  # noqa: E731
        return odeint(
            f, np.ones(1), np.array([0.0, 1.0]), k, adjoint=adjoint, rtol=1e-10, atol=1e-12
        )[-1, 0]

    h = grad(grad(lambda k: y1(k, "direct")))(0.7)
    assert abs(h - np.exp(-0.7)) < 1e-8
    for adjoint in ("backsolve", "checkpoint"):
        with pytest.raises(NotImplementedError, match="use adjoint='direct'"):
            grad(grad(lambda k, a=adjoint: y1(k, a)))(0.7)


def test_any_state_shape_and_batch_independence(rng):
    """States of any shape: a (2, 3, 2) state of independent linear systems equals each solved
    alone, and its gradient matches the per-block exact one."""
    A = rng.normal(size=(2, 2)) / 2
    y0 = rng.normal(size=(2, 3, 2))
    t = np.array([0.0, 0.5, 1.0])
    ys = odeint(linear, y0, t, A, rtol=1e-10, atol=1e-12)
    assert ys.shape == (3, 2, 3, 2)
    np.testing.assert_allclose(ys[-1], y0 @ expm(A).T, atol=1e-9)
    g = grad(lambda y: anp.sum(odeint(linear, y, t, A, rtol=1e-10, atol=1e-12)[-1]))(y0)
    np.testing.assert_allclose(g, np.broadcast_to(expm(A).T @ np.ones(2), y0.shape), atol=1e-9)


def test_backward_failure_names_the_adjoint_system(rng):
    """The backward integration has its own tolerances and the same step cap; hitting the cap
    names the augmented system, t and h."""
    from flowmath.ode import ODESolverError

    A = rng.normal(size=(3, 3)) / 2
    sol = solve(linear, np.ones(3), np.array([0.0, 1.0]), A, rtol=1e-4, atol=1e-6)
    cap = sol.n_steps + 1

    def loss(y0):
        ys = odeint(
            linear,
            y0,
            np.array([0.0, 1.0]),
            A,
            rtol=1e-4,
            atol=1e-6,
            max_steps=cap,
            adjoint_rtol=1e-12,
            adjoint_atol=1e-14,
        )
        return anp.sum(ys[-1])

    msg = r"augmented adjoint state \[z, a, a_theta\]\): max_steps=.*stopped at t=.*, h="
    with pytest.raises(ODESolverError, match=msg):
        grad(loss)(np.ones(3))


@pytest.mark.parametrize("adjoint", ["backsolve", "checkpoint"])
def test_forward_is_not_traced_and_stats_dict(rng, adjoint):
    """Under autograd the whole solve is one primitive: f only ever sees plain arrays, and the
    `stats` dict receives the forward counts at once and the backward counts with the gradient."""
    from autograd.tracer import Box

    A = rng.normal(size=(3, 3)) / 2
    seen = []

    def f(t, y, A):
        seen.append(isinstance(y, Box) or isinstance(A, Box))
        return linear(t, y, A)

    stats = {}

    def loss(A):
        ys = odeint(f, np.ones(3), np.array([0.0, 1.0]), A, adjoint=adjoint, stats=stats)
        assert set(stats) == {"forward"}
        return anp.sum(ys**2)

    grad(loss)(A)
    fw, bw = stats["forward"], stats["backward"]
    # the forward calls come first (the backward ones go through make_vjp, traced by design)
    assert len(seen) > fw["nfe"] and not any(seen[: fw["nfe"]]) and all(seen[fw["nfe"] :])
    assert fw["nfe"] == 2 + 6 * fw["n_steps"] and fw["status"] == 0
    assert bw["computed"] and bw["mode"] == adjoint and bw["n_vjp"] > 0


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_jacobian_of_the_flow_map_is_expm(rng, adjoint):
    """autograd.jacobian runs the VJP once per output entry on the same solve: d z(1) / d z0 =
    expm(A) (what check_bijection's dense Jacobian of a CNF relies on)."""
    from autograd import jacobian

    A = rng.normal(size=(3, 3)) / 2
    J = jacobian(
        lambda z: odeint(
            linear, z, np.array([0.0, 1.0]), A, rtol=1e-10, atol=1e-12, adjoint=adjoint
        )[-1]
    )(rng.normal(size=3))
    # measured 1e-12 to 1.3e-11 at tolerance 1e-10
    np.testing.assert_allclose(J, expm(A), rtol=0, atol=1e-10)


@pytest.mark.parametrize("adjoint", ADJOINTS)
def test_integer_leaves_in_params_are_constants(adjoint):
    """A pytree may carry integer leaves (configuration); they are not differentiated."""

    def f(t, y, p):
        return -p["k"] * y ** p["power"] * p["mask"]

    def loss(k):
        p = {"k": k, "power": 1, "mask": np.array([1, 1])}
        ys = odeint(f, np.ones(2), np.array([0.0, 1.0]), p, adjoint=adjoint, rtol=1e-10, atol=1e-12)
        return anp.sum(ys[-1])

    # d/dk of 2 exp(-k) at k = 2
    assert abs(grad(loss)(2.0) + 2 * np.exp(-2.0)) < 1e-9


def test_closure_over_a_traced_variable_is_refused(rng):
    """Gradients flow through `params` only; a traced variable captured by `f` would get a
    silently wrong (zero) gradient, so it is an error."""
    A = rng.normal(size=(2, 2))

    def loss(A):
        return anp.sum(odeint(lambda t, y, p: anp.dot(A, y), np.ones(2), np.array([0.0, 1.0])))

    with pytest.raises(TypeError, match="pass that variable through `params`"):
        grad(loss)(A)


def test_multi_vjp_equals_autograd_make_vjp_bitwise(rng):
    """The generic path's reverse pass (one root per argument) gives autograd.make_vjp's
    cotangents bitwise, zeros for an argument the output does not depend on."""
    from autograd import make_vjp

    from flowmath.ode.adjoint import multi_vjp

    p = mlp_params(rng)
    (W1, b1), (W2, b2) = p["layers"]
    y, a, unused = rng.normal(size=(5, 2)), rng.normal(size=(5, 2)), rng.normal(size=3)

    def f(y, W1, b1, W2, b2, u, k, unused):
        return k * mlp(0.3, y, {"layers": [(W1, b1), (W2, b2)], "u": u})

    args = [y, W1, b1, W2, b2, p["u"], 1.5, unused]
    vjp, val = multi_vjp(f, args)
    ref_vjp, ref_val = make_vjp(f, argnum=tuple(range(len(args))))(*args)
    np.testing.assert_array_equal(val, ref_val)
    for got, want in zip(vjp(a), ref_vjp(a), strict=True):
        np.testing.assert_array_equal(got, want)
    assert np.all(vjp(a)[-1] == 0)
