"""Registry of ODE test problems with closed forms or trusted references.

Each :class:`Problem` carries ``f(t, y, params)`` (autograd-numpy, so that every adjoint can
differentiate it), ``y0``, ``params``, output times ``t`` and ``exact(t, y0, params)``: the
solution at the times ``t`` (shape ``(len(t),) + y0.shape``), written with autograd.numpy so
that ``autograd`` gives the exact gradients with respect to ``y0``, ``params`` and ``t``
(``exact_differentiable``), or a reference computed once by scipy's DOP853 at rtol = atol =
1e-13 (Van der Pol: its global error there is below 1e-11, far below the tolerances tested).

- ``linear``: y' = A y, y(t) = expm(A (t - t0)) y0 (scipy.linalg.expm; not differentiated in A
  by autograd, so its gradients are tested separately against expm_frechet).
- ``exponential``: y' = -k y, y = y0 exp(-k (t - t0)).
- ``rational``: y' = -c y^2, y = y0 / (1 + c y0 (t - t0)) (nonlinear in y).
- ``sine``: y' = w cos(w t) (non-autonomous), y = y0 + sin(w t) - sin(w t0).
- ``vanderpol``: x'' = mu (1 - x^2) x' - x, mu = 1 (nonlinear, non-stiff), scipy reference.
- ``jump``: y' = k(t) y with k = -1 before t_j = 0.9 and +0.5 after (f jumps in t): a known
  discontinuity, y = y0 exp(-(t_j - t0)) exp(0.5 (t - t_j)) after it; solved with
  ``jump_t=[t_j]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import autograd.numpy as anp
import numpy as np
from scipy.integrate import solve_ivp
from scipy.linalg import expm

__all__ = ["PROBLEMS", "Problem"]


@dataclass(frozen=True)
class Problem:
    name: str
    f: object
    y0: np.ndarray
    params: object
    t: np.ndarray
    exact: object
    exact_differentiable: bool = True
    kwargs: dict = field(default_factory=dict)  # solver options the problem needs (jump_t)


def _linear():
    rng = np.random.default_rng(20261201)
    A = rng.normal(size=(3, 3)) / 2

    def f(t, y, A):
        return anp.dot(A, y)

    def exact(t, y0, A):
        return np.stack([expm(A * (tk - t[0])) @ y0 for tk in t])

    return Problem("linear", f, rng.normal(size=3), A, np.array([0.0, 0.4, 1.3]), exact, False)


def _exponential():
    def f(t, y, k):
        return -k * y

    def exact(t, y0, k):
        return y0 * anp.exp(-k * (t - t[0]))[:, None]

    return Problem("exponential", f, np.array([1.0, 2.0]), 1.5, np.array([0.0, 0.7, 2.0]), exact)


def _rational():
    def f(t, y, c):
        return -c * y**2

    def exact(t, y0, c):
        return y0 / (1.0 + c * y0 * (t - t[0])[:, None])

    return Problem("rational", f, np.array([1.0, 0.5]), 2.0, np.array([0.0, 0.5, 1.5, 3.0]), exact)


def _sine():
    def f(t, y, w):
        return w * anp.cos(w * t) * anp.ones_like(y)

    def exact(t, y0, w):
        return y0 + (anp.sin(w * t) - anp.sin(w * t[0]))[:, None]

    return Problem("sine", f, np.array([0.2, -0.1]), 3.0, np.array([0.0, 0.3, 1.1, 2.5]), exact)


@cache
def _vdp_reference(t_key, y0_key, mu):
    t = np.array(t_key)
    sol = solve_ivp(
        lambda t, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
        (t[0], t[-1]),
        np.array(y0_key),
        method="DOP853",
        t_eval=t,
        rtol=1e-13,
        atol=1e-13,
    )
    return sol.y.T


def _vanderpol():
    def f(t, y, mu):
        x, v = y[0], y[1]
        return anp.stack([v, mu * (1 - x**2) * v - x])

    def exact(t, y0, mu):
        return _vdp_reference(tuple(np.asarray(t)), tuple(np.asarray(y0)), float(mu))

    return Problem(
        "vanderpol", f, np.array([2.0, 0.0]), 1.0, np.array([0.0, 1.0, 2.5, 4.0]), exact, False
    )


T_JUMP = 0.9


def _jump():
    def f(t, y, p):
        return (-1.0 if t < T_JUMP else 0.5) * y

    def exact(t, y0, p):
        before = anp.exp(-(anp.minimum(t, T_JUMP) - t[0]))
        after = anp.exp(0.5 * anp.maximum(t - T_JUMP, 0.0))
        return y0 * (before * after)[:, None]

    return Problem(
        "jump",
        f,
        np.array([1.0, 3.0]),
        None,
        np.array([0.0, 0.5, 1.4, 2.0]),
        exact,
        True,
        {"jump_t": [T_JUMP]},
    )


PROBLEMS = {
    p.name: p for p in (_linear(), _exponential(), _rational(), _sine(), _vanderpol(), _jump())
}
