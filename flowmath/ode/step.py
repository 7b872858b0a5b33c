"""One explicit Runge-Kutta step as pure functions of a Butcher tableau.

.. math::

    K_i = f\\Big(t + c_i h,\\; y + h \\sum_{j<i} a_{ij} K_j\\Big), \\qquad
    y_{n+1} = y + h \\sum_i b_i K_i, \\qquad
    \\mathrm{err} = h \\sum_i (b_i - \\hat b_i) K_i,

and the continuous extension :math:`y(t + \\theta h) = y + h \\sum_i w_i(\\theta) K_i`.

:func:`stages` is the NumPy step the drivers call on flat float64 states (the stage buffer
``K`` preallocated, the rows of ``A`` prepared once by :func:`stage_plan`); :func:`traced_step`
is its differentiable twin, written with autograd.numpy operations for the ``"direct"`` adjoint.
Both take the stage-1 derivative ``K_1`` from the caller (First-Same-As-Last reuse).

References
----------
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.1-II.6.
"""

from __future__ import annotations

import numpy as np

from .tableau import ButcherTableau

__all__ = ["combine", "dense_point", "stage_plan", "stage_time", "stages", "traced_step"]


# per tableau (by identity; the tableau is kept alive with its entry): the rows of A and c
_ROWS: dict = {}


def stage_plan(tab: ButcherTableau, K: np.ndarray):
    """What :func:`stages` reads for ``tab``, built once per integration: the rows
    ``A[i, :i]`` (contiguous; made once per tableau), the views ``K[:i]`` of the stage buffer
    ``K`` (shape ``(s, N)``) and ``c`` as Python floats."""
    s = tab.n_stages
    entry = _ROWS.get(id(tab))
    if entry is None or entry[0] is not tab:
        if len(_ROWS) >= 64:  # user tableaux made in a loop: keep the cache bounded
            _ROWS.clear()
        A_rows = [np.ascontiguousarray(tab.A[i, :i]) for i in range(s)]
        entry = _ROWS[id(tab)] = (tab, A_rows, [float(ci) for ci in tab.c])
    return entry[1], [K[:i] for i in range(s)], entry[2]


def stage_time(t, ci, h, t_cap):
    """``t + c_i h``, held at ``t_cap`` (the left limit of a forced boundary the step ends on,
    one ulp before it) when it would reach past it."""
    ti = t + ci * h
    if t_cap is not None and (ti - t_cap) * h > 0:
        return t_cap
    return ti


def stages(fun, t, y, h, K, plan, store, t_cap=None):
    """Stages 2..s of one explicit Runge-Kutta step from ``(t, y)`` with step ``h``, ``K[0]``
    given: fills ``K[1:]`` (shape ``(s, N)``) with

    .. math:: K_i = f(t + c_i h, y_i), \\qquad y_i = y + h \\sum_{j<i} a_{ij} K_j

    and returns ``(y_s, inputs)``: the last stage input (``y`` when ``s = 1``) and, when
    ``store``, the list ``[y, y_2, ..., y_s]`` of stage inputs (else ``None``).  ``t_cap``: see
    :func:`stage_time` (a step ending on a discontinuity of ``f`` sees its left side)."""
    A_rows, K_rows, c = plan
    inputs = [y] if store else None
    yi = y
    for i in range(1, len(c)):
        yi = y + (h * A_rows[i]) @ K_rows[i]
        ti = t + c[i] * h if t_cap is None else stage_time(t, c[i], h, t_cap)
        K[i] = fun(ti, yi)
        if store:
            inputs.append(yi)
    return yi, inputs


def dense_point(tab: ButcherTableau, y, h, K, theta):
    """``y + h w(theta) @ K``: the continuous extension at ``t + theta h`` (``theta = 1`` gives
    the step's result bitwise, since ``w(1) = b``)."""
    return y + h * (tab.dense_weights(theta) @ K)


def combine(base, h, weights, K):
    """``base + h * sum_j weights[j] K[j]`` over the nonzero weights, with autograd.numpy
    operations (traced when ``base`` or ``K`` are boxes)."""
    acc = None
    for wj, Kj in zip(weights, K, strict=False):
        if wj != 0:
            term = wj * Kj
            acc = term if acc is None else acc + term
    return base if acc is None else base + h * acc


def traced_step(f, t, y, h, tab: ButcherTableau, K1, t1=None, t_cap=None):
    """The differentiable twin of :func:`stages`: one step from ``(t, y)`` traced by autograd.

    ``K1`` is ``f(t, y)`` when known (First-Same-As-Last), else ``None`` (evaluated here, at
    ``t1`` when given: the right-hand limit after a forced step boundary).  Returns
    ``(y_new, K, n_evaluations)`` with ``K`` the list of the ``s`` stage derivatives."""
    A, c = tab.A, tab.c
    n_f = 0
    if K1 is None:
        K1 = f(t if t1 is None else t1, y)
        n_f += 1
    K = [K1]
    yi = y
    for i in range(1, tab.n_stages):
        yi = combine(y, h, A[i, :i], K)
        K.append(f(stage_time(t, c[i], h, t_cap), yi))
        n_f += 1
    y_new = yi if tab.fsal else combine(y, h, tab.b, K)
    return y_new, K, n_f
