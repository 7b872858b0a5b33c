"""The driver loop: fixed-step and adaptive explicit Runge-Kutta integration on flat states.

:func:`run` owns the loop, the counts, the outputs (on step ends or by the continuous extension
inside a step, so outputs never shorten a step), the forced step boundaries, the events, the
record of the accepted steps for dense output and the adjoints, and the failure messages.  It
takes plain flat float64 arrays and no autograd; the step is :func:`flowmath.ode.step.stages`,
the step control :class:`flowmath.ode.controller.Controller`.

Step-size floor (as scipy): a step proposed by the controller or by ``first_step`` below
``STEP_FLOOR_ULPS`` units in the last place of ``t`` is raised to that floor; a step that is
*rejected* down to below the floor is a failure (the problem is stiff or the solution blows
up), as is a non-finite state or derivative that persists, or more than ``max_steps`` attempted
steps: each raises :class:`ODESolverError` naming ``t`` and ``h``.

Forced step boundaries ``jump_t`` (known discontinuities of ``f`` in ``t``): steps end exactly
there, and the next step starts with a fresh evaluation of ``f`` just past the boundary (one
ulp in the direction of integration), so that a First-Same-As-Last stage evaluated at the left
limit is not reused.

Events ``g(t, y) = 0``: after every accepted step the sign of each event function at the step's
end is compared with its sign at the start; a change (in the requested direction) is located
on the continuous extension by Brent's method to ``xtol`` in ``t``.  A terminal event stops the
integration there: outputs after it are not produced.

References
----------
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.4, II.6.
Shampine, Thompson (2000), "Event location for ordinary differential equations", Comput.
Math. Appl. 39.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import _counters
from .controller import select_initial_step
from .step import stage_plan, stages
from .tableau import ButcherTableau

__all__ = [
    "DEFAULT_MAX_STEPS",
    "STEP_FLOOR_ULPS",
    "Counts",
    "LoopResult",
    "ODESolverError",
    "Trace",
    "run",
]

#: Step-size floor: steps are at least this many units in the last place of ``|t|`` (scipy's 10).
STEP_FLOOR_ULPS = 10.0
#: Default cap on attempted steps (accepted + rejected) of one solve.
DEFAULT_MAX_STEPS = 10_000


class ODESolverError(RuntimeError):
    """The solver could not reach the end of the interval (step floor, step cap, non-finite)."""


@dataclass
class Trace:
    """What a forward pass records: the accepted steps and where the outputs came from.

    ``steps[n] = (t_n, h_n, y_n, inputs_n, t_first_n, t_cap_n)``: ``y_n`` the flat state at
    the start of step ``n``, ``inputs_n`` the list of its ``s`` stage inputs when
    ``store_stages`` (else ``None``), ``t_first_n`` the time at which its first stage was
    evaluated when that was a fresh evaluation (``t_n``, or just past a forced boundary),
    ``None`` when it was reused from the previous step (First-Same-As-Last); ``t_cap_n`` the
    left limit of the forced boundary the step ends on (its stage times are held there), else
    ``None``.  ``node_out[m]`` lists the output indices equal to the state after ``m``
    accepted steps; ``dense_out[n]`` lists ``(k, theta)`` for outputs
    interpolated inside step ``n``.  ``store_K`` keeps each accepted step's stage derivatives
    ``K`` (shape ``(s, N)``) in ``Ks`` (dense output after the solve).
    """

    store_stages: bool = False
    store_K: bool = False
    steps: list = field(default_factory=list)
    Ks: list = field(default_factory=list)
    node_out: dict = field(default_factory=dict)
    dense_out: dict = field(default_factory=dict)
    y_end: np.ndarray | None = None
    f_end: np.ndarray | None = None


@dataclass
class Counts:
    nfe: int = 0
    n_steps: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    h_last: float = 0.0
    h_max: float = 0.0  # largest accepted |h|

    def add(self, other):
        self.nfe += other.nfe
        self.n_steps += other.n_steps
        self.n_accepted += other.n_accepted
        self.n_rejected += other.n_rejected


@dataclass
class LoopResult:
    """``ys[k] = y(t_out[k])`` for ``k < n_out`` (``n_out < T`` after a terminal event), the
    counts, and the located events: per event function the arrays of times and flat states."""

    ys: np.ndarray
    counts: Counts
    n_out: int
    t_events: list
    y_events: list
    terminated: bool = False
    event_where: list = field(default_factory=list)


def _record(trace, kind, key, value):
    if trace is not None:
        getattr(trace, kind).setdefault(key, []).append(value)


def _nonfinite_error(method, t, h, what):
    return ODESolverError(
        f"{method}: non-finite {what} (NaN or inf) at t={t!r} with step h={h!r}; the dynamics "
        "overflow or are undefined there"
    )


def _left_limit(tj, direction):
    """The last float before the forced boundary ``tj`` in the direction of integration."""
    return float(np.nextafter(tj, tj - direction))


def _step_floor(t):
    return STEP_FLOOR_ULPS * math.ulp(abs(t))


class _Events:
    """Sign tracking and location of the events of one integration."""

    def __init__(self, events, t0, y0):
        self.events = events
        self.g = np.array([ev(t0, y0) for ev in events], dtype=np.float64)
        self.t_found = [[] for _ in events]
        self.y_found = [[] for _ in events]
        # per event found: (index of its step, theta in the step, h, |g(t_new) - g(t)|)
        self.where = [[] for _ in events]
        self.n_terminal = [0 for _ in events]

    def check(self, t, h, y, y_new, t_new, interp, node):
        """Events in the step ``[t, t_new]`` (the ``node``-th accepted step); returns the time
        and state of the first terminal event (or ``None``)."""
        from scipy.optimize import brentq

        g_new = np.array([ev(t_new, y_new) for ev in self.events], dtype=np.float64)
        hits = []
        for j, ev in enumerate(self.events):
            g0, g1 = self.g[j], g_new[j]
            if not (math.isfinite(g0) and math.isfinite(g1)):
                raise ODESolverError(f"event function {j} is not finite at t={t_new!r}")
            up, down = g0 < 0 <= g1 or g0 <= 0 < g1, g0 > 0 >= g1 or g0 >= 0 > g1
            if g0 == 0:  # a root at the start of the step was reported by the previous one
                continue
            if not ((up and ev.direction >= 0) or (down and ev.direction <= 0)):
                continue
            if g1 == 0:
                theta = 1.0
            else:

                def gth(th, ev=ev):
                    return ev(t + th * h, interp(th))

                xtol = max(ev.xtol / abs(h), 4 * np.finfo(float).eps)
                theta = brentq(gth, 0.0, 1.0, xtol=xtol, rtol=4 * np.finfo(float).eps)
            hits.append((theta, j, abs(g1 - g0)))
        self.g = g_new
        stop = None
        for theta, j, dg in sorted(hits):
            te = t_new if theta == 1.0 else t + theta * h
            ye = y_new if theta == 1.0 else interp(theta)
            self.t_found[j].append(te)
            self.y_found[j].append(ye)
            self.where[j].append((node, theta, float(h), dg))
            ev = self.events[j]
            if ev.terminal:
                self.n_terminal[j] += 1
                if self.n_terminal[j] >= ev.terminal:
                    stop = (te, ye, theta)
                    break
        return stop


def run(
    fun,
    t_out,
    y0,
    tab: ButcherTableau,
    controller=None,
    *,
    step_size=None,
    first_step=None,
    max_step=math.inf,
    max_steps=DEFAULT_MAX_STEPS,
    jump_t=(),
    events=(),
    trace=None,
    norm_size=None,
    ys=None,
    what="state",
) -> LoopResult:
    """Integrate ``fun(t, y_flat) -> dy/dt`` (flat float64 arrays) and fill ``ys[k] = y(t_out[k])``.

    No input validation and no autograd (see :func:`flowmath.ode.solve` for both): explicit
    Runge-Kutta steps of ``tab``, adaptive with ``controller`` when ``tab`` has embedded weights,
    else fixed steps, each output interval (cut at ``jump_t``) split into
    ``ceil(|dt| / step_size)`` equal steps.

    .. math:: y_{n+1} = y_n + h \\sum_i b_i K_i, \\qquad
        K_i = f\\big(t_n + c_i h,\\, y_n + h \\textstyle\\sum_{j<i} a_{ij} K_j\\big)

    Parameters
    ----------
    fun : callable
        Right-hand side on flat float64 arrays of shape (N,); must return a new array.
    t_out : ndarray, shape (T,)
        Monotone output times; ``t_out[0]`` is the time of ``y0``.
    y0 : ndarray, shape (N,)
    tab : ButcherTableau
    controller : tuple, optional
        ``(rtol, atol, Controller)`` with the tolerances bound to the flat state (scalars or
        arrays of ``norm_size`` entries); required when ``tab.adaptive``.
    step_size, first_step, max_step, max_steps, jump_t :
        As in :func:`flowmath.ode.solve` (validated there).
    events : sequence
        Event objects with ``__call__(t, y_flat)``, ``terminal``, ``direction``, ``xtol``.
    norm_size : int, optional
        Error control uses the first ``norm_size`` entries only (a seminorm; the backsolve adjoint
        excludes the parameter-adjoint quadrature).  Default: all.
    trace : Trace, optional
        Filled with the accepted steps and the output map when given.
    ys : ndarray, shape (T, N), optional
        Output buffer (allocated when omitted).
    what : str
        Name of the state in failure messages.

    Returns
    -------
    LoopResult

    References
    ----------
    Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.4.
    """
    n = y0.shape[0]
    m = n if norm_size is None else norm_size
    T = t_out.shape[0]
    if ys is None:
        ys = np.empty((T, n))
    ys[0] = y0
    _record(trace, "node_out", 0, 0)
    counts = Counts()
    res = LoopResult(ys, counts, T, [], [])
    k = 1
    while k < T and t_out[k] == t_out[0]:  # t0 == t1: outputs equal y0
        ys[k] = y0
        _record(trace, "node_out", 0, k)
        k += 1
    ev = _Events(events, float(t_out[0]), y0) if events else None
    if k < T:
        # Overflow and NaN are detected explicitly (rejection, then ODESolverError naming t and
        # h), so numpy's floating-point warnings are silenced inside the drivers.
        with np.errstate(over="ignore", invalid="ignore"):
            if tab.adaptive:
                _adaptive(
                    fun, t_out, y0, tab, controller, first_step, max_step, max_steps, jump_t,
                    ev, trace, m, res, what, k,
                )  # fmt: skip
            else:
                _fixed(fun, t_out, y0, tab, step_size, max_steps, jump_t, ev, trace, res, what)
    elif trace is not None:
        trace.y_end = y0
    if ev is not None:
        res.t_events = [np.array(x) for x in ev.t_found]
        res.y_events = [np.array(x).reshape(len(x), n) for x in ev.y_found]
        res.event_where = ev.where
    if k < T:  # a solve ran: report it to flowmath.testing.count_iterations
        _counters.record(ode_solves=1, ode_steps=counts.n_steps, ode_nfe=counts.nfe)
    return res


def _interp(tab, t, y, h, K, y_new, f_new):
    """The continuous extension inside a step: the tableau's own (weights on ``K``) or, without
    one, the cubic Hermite interpolant through both ends and their derivatives."""
    if tab.continuous:
        w_cache = K.copy()

        def interp(theta):
            return y + h * (tab.dense_weights(theta) @ w_cache)

        return interp
    f0 = K[0].copy()

    def interp(theta):
        h00 = 1 - theta * theta * (3 - 2 * theta)
        h10 = theta * (1 - theta) ** 2
        h01 = theta * theta * (3 - 2 * theta)
        h11 = theta * theta * (theta - 1)
        return h00 * y + h01 * y_new + h * (h10 * f0 + h11 * f_new)

    return interp


def _fixed(fun, t_out, y0, tab, step_size, max_steps, jump_t, ev, trace, res, what):
    s = tab.n_stages
    counts, ys = res.counts, res.ys
    # The grid: output times and forced boundaries; each of its intervals is split into
    # ceil(|dt| / step_size) equal steps, so outputs fall on steps and the order of the method
    # is preserved (no interpolation).
    direction = 1.0 if t_out[-1] > t_out[0] else -1.0
    jumps = [tj for tj in jump_t if direction * (tj - t_out[0]) > 0]
    jumps = [tj for tj in jumps if direction * (t_out[-1] - tj) > 0]
    if jumps:
        grid = np.unique(np.concatenate([t_out, jumps]))
        grid = grid if direction > 0 else grid[::-1]
    else:
        grid = t_out
    jump_set = set(jumps)
    dts = np.diff(grid)
    if step_size is None:
        nsub = (dts != 0).astype(np.int64)
    else:
        nsub = np.where(
            dts == 0, 0, np.maximum(1, np.ceil(np.abs(dts) / step_size * (1 - 1e-12)))
        ).astype(np.int64)
    total = int(nsub.sum())
    if total > max_steps:
        raise ODESolverError(
            f"{tab.name}: step_size={step_size!r} needs {total} steps from t={t_out[0]!r} to "
            f"t={t_out[-1]!r}, more than max_steps={max_steps}; raise `max_steps` or the step"
        )
    K = np.empty((s, y0.shape[0]))
    plan = stage_plan(tab, K)
    store = trace is not None and trace.store_stages
    y = y0
    node = 0
    k_out = 1
    f_next = None  # f(t, y) at the coming step's start when an event check computed it
    for g in range(1, grid.shape[0]):
        ta, tb, mk = grid[g - 1], grid[g], int(nsub[g - 1])
        for j in range(mk):
            t = ta + (tb - ta) * j / mk
            t_new = tb if j == mk - 1 else ta + (tb - ta) * (j + 1) / mk
            h = t_new - t
            # just past a forced boundary, f is evaluated on the side the step lies on
            t_first = float(np.nextafter(t, t + direction)) if (j == 0 and ta in jump_set) else t
            if f_next is not None and t_first == t:
                K[0] = f_next
                counts.nfe -= 1  # counted when the event check evaluated it
            else:
                K[0] = fun(t_first, y)
            f_next = None
            t_cap = _left_limit(tb, direction) if (j == mk - 1 and tb in jump_set) else None
            _, inputs = stages(fun, t, y, h, K, plan, store, t_cap)
            y_new = y + h * (tab.b @ K)
            counts.nfe += s
            counts.n_steps += 1
            counts.n_accepted += 1
            if not np.isfinite(y_new).all():
                raise _nonfinite_error(tab.name, float(t), float(h), what)
            if trace is not None:
                trace.steps.append((t, h, y, inputs, t_first, t_cap))
                if trace.store_K:
                    trace.Ks.append(K.copy())
            if ev is not None:
                f_new = fun(t_new, y_new)
                counts.nfe += 1
                f_next = f_new
                stop = ev.check(t, h, y, y_new, t_new, _interp(tab, t, y, h, K, y_new, f_new), node)
                if stop is not None:
                    te, ye, theta = stop
                    _finish_terminal(tab, t_out, k_out, t, h, y, K, te, theta, node, trace, res)
                    return
            y = y_new
            node += 1
            counts.h_last = h
        while k_out < t_out.shape[0] and t_out[k_out] == tb:
            ys[k_out] = y
            _record(trace, "node_out", node, k_out)
            k_out += 1
    if trace is not None:
        trace.y_end = y


def _finish_terminal(tab, t_out, k_next, t, h, y, K, te, theta, node, trace, res):
    """Outputs of the last step up to a terminal event at ``te`` (``theta`` inside the step),
    then stop: ``res.n_out`` outputs were produced."""
    direction = 1.0 if h > 0 else -1.0
    T = t_out.shape[0]
    while k_next < T and direction * (t_out[k_next] - te) <= 0:
        th = (t_out[k_next] - t) / h
        if th == 1.0:
            res.ys[k_next] = y + h * (tab.b @ K)
            _record(trace, "node_out", node + 1, k_next)
        elif not tab.continuous:
            raise ODESolverError(
                f"{tab.name}: an output time {t_out[k_next]!r} falls inside the step of a "
                "terminal event and the tableau has no continuous extension"
            )
        else:
            res.ys[k_next] = y + h * (tab.dense_weights(th) @ K)
            _record(trace, "dense_out", node, (k_next, th))
        k_next += 1
    res.n_out = k_next
    res.terminated = True
    if trace is not None:
        trace.y_end = None


def _adaptive(
    fun, t_out, y0, tab, controller, first_step, max_step, max_steps, jump_t, ev, trace, m, res,
    what, k_next,
):  # fmt: skip
    rtol, atol, ctl = controller
    counts, ys = res.counts, res.ys
    s = tab.n_stages
    E = tab.error_weights
    exponent = tab.error_exponent
    safety, min_factor, max_factor, beta = ctl.safety, ctl.min_factor, ctl.max_factor, ctl.beta
    if beta:
        exponent = exponent + 0.75 * beta
    err_old = 1e-4
    T = t_out.shape[0]
    t0, t_end = float(t_out[0]), float(t_out[-1])
    direction = 1.0 if t_end > t0 else -1.0
    jumps = sorted(
        (float(tj) for tj in jump_t if direction * (tj - t0) > 0 and direction * (t_end - tj) > 0),
        key=lambda x: direction * x,
    )
    j_next = 0
    fsal = tab.fsal
    # outputs inside a step come from the continuous extension; without one, outputs are
    # forced step boundaries (the solution there is a step's result)
    stops = jumps
    if not tab.continuous:
        stops = sorted(
            set(jumps) | set(float(x) for x in t_out[k_next:-1]), key=lambda x: direction * x
        )
    jump_set = set(jumps)
    K = np.empty((s, y0.shape[0]))
    plan = stage_plan(tab, K)
    store = trace is not None and trace.store_stages
    store_K = trace is not None and trace.store_K
    K[0] = fun(t0, y0)
    counts.nfe += 1
    if not np.all(np.isfinite(K[0])):
        raise _nonfinite_error(tab.name, t0, 0.0, "derivative f(t0, y0)")
    if first_step is None:
        h_abs = select_initial_step(
            fun, t0, y0, K[0], direction, abs(t_end - t0), tab.embedded_order, rtol, atol, m
        )
        counts.nfe += 1
    else:
        h_abs = min(first_step, abs(t_end - t0))
    t, y = t0, y0
    t_first = t0  # time of the fresh first-stage evaluation of the coming step (None: reused)
    partial = m < y0.shape[0]
    abs_y = np.abs(y0[:m])
    scale = np.empty(m)
    node = 0
    rejected = False
    nonfinite = False
    name = tab.name if what == "state" else f"{tab.name} ({what})"
    while direction * (t_end - t) > 0:
        h_min = _step_floor(t)
        if h_abs > max_step:
            h_abs = max_step
        elif h_abs < h_min and not rejected and math.isfinite(h_abs):
            h_abs = h_min  # scipy's clamp: a proposed step is never below 10 ulp(t)
        if h_abs < h_min or not math.isfinite(h_abs):
            why = (
                "the state or its derivative became non-finite (NaN or inf) and every smaller "
                "step failed too"
                if nonfinite
                else "the problem is stiff or the solution blows up"
            )
            raise ODESolverError(
                f"{name}: step size h={direction * h_abs!r} at t={t!r} fell below the "
                f"floor {h_min:.3g} ({STEP_FLOOR_ULPS:g} ulp of t): {why}"
            )
        if counts.n_steps >= max_steps:
            raise ODESolverError(
                f"{name}: max_steps={max_steps} steps taken without reaching t={t_end!r} "
                f"(stopped at t={t!r}, h={direction * h_abs!r}); raise `max_steps`, or the "
                "problem is stiff"
            )
        t_new = t + direction * h_abs
        if direction * (t_end - t_new) <= h_min:
            t_new = t_end
        while j_next < len(stops) and direction * (stops[j_next] - t) <= 0:
            j_next += 1
        if j_next < len(stops) and direction * (t_new - stops[j_next]) >= 0:
            t_new = stops[j_next]  # a forced step boundary
        h = t_new - t
        t_cap = _left_limit(t_new, direction) if t_new in jump_set else None
        y_new, inputs = stages(fun, t, y, h, K, plan, store, t_cap)
        counts.nfe += s - 1
        counts.n_steps += 1
        if not fsal:
            y_new = y + h * (tab.b @ K)
        err = (h * E) @ K
        # scaled RMS norm over the first m entries, in a preallocated buffer
        abs_new = np.abs(y_new[:m] if partial else y_new)
        np.maximum(abs_y, abs_new, out=scale)
        scale *= rtol  # scalars, or arrays of m entries (per-component tolerances)
        scale += atol
        q = np.divide(err[:m] if partial else err, scale, out=scale)
        err_norm = math.sqrt(float(q @ q) / m) if m else 0.0
        # K[s-1] enters err (e_s != 0), so a non-finite stage shows in err_norm; a field that
        # saturates (tanh) can still leave y_new non-finite: check it.
        ok = math.isfinite(err_norm) and bool(np.isfinite(y_new).all())
        if ok and err_norm <= 1.0:
            if err_norm == 0.0:
                factor = max_factor
            elif beta:
                factor = min(max_factor, safety * err_norm**exponent * err_old**beta)
            else:
                factor = min(max_factor, safety * err_norm**exponent)
            if rejected:
                factor = min(1.0, factor)
            err_old = max(err_norm, 1e-4)
            rejected = nonfinite = False
            at_jump = t_new in jump_set
            if fsal and not at_jump:
                f_new = K[s - 1]
                t_first_next = None
            else:
                # the next step's first stage: after a forced boundary, just past it
                t_first_next = float(np.nextafter(t_new, t_new + direction)) if at_jump else t_new
                f_new = fun(t_first_next, y_new) if direction * (t_end - t_new) > 0 else None
                if f_new is not None:
                    counts.nfe += 1
            stop = None
            if ev is not None:
                fe = f_new if (f_new is not None and not at_jump) else fun(t_new, y_new)
                if fe is not f_new:
                    counts.nfe += 1
                stop = ev.check(t, h, y, y_new, t_new, _interp(tab, t, y, h, K, y_new, fe), node)
            if stop is not None:
                if trace is not None:
                    trace.steps.append((t, h, y, inputs, t_first, t_cap))
                    if store_K:
                        trace.Ks.append(K.copy())
                counts.n_accepted += 1
                te, ye, theta = stop
                _finish_terminal(tab, t_out, k_next, t, h, y, K, te, theta, node, trace, res)
                return
            while k_next < T and direction * (t_out[k_next] - t_new) <= 0:
                tk = t_out[k_next]
                if tk == t_new:
                    ys[k_next] = y_new
                    _record(trace, "node_out", node + 1, k_next)
                else:
                    theta = (tk - t) / h
                    ys[k_next] = y + h * (tab.dense_weights(theta) @ K)
                    _record(trace, "dense_out", node, (k_next, theta))
                k_next += 1
            if trace is not None:
                trace.steps.append((t, h, y, inputs, t_first, t_cap))
                if store_K:
                    trace.Ks.append(K.copy())
            counts.n_accepted += 1
            abs_y = abs_new
            counts.h_last = abs(h)
            counts.h_max = max(counts.h_max, abs(h))
            node += 1
            t, y = t_new, y_new
            t_first = t_first_next
            if f_new is not None:
                K[0] = f_new
            h_abs = abs(h) * factor
        else:
            nonfinite = not ok
            factor = min_factor if not ok else max(min_factor, safety * err_norm**exponent)
            h_abs = abs(h) * factor
            rejected = True
            counts.n_rejected += 1
    if trace is not None:
        trace.y_end = y
        trace.f_end = K[0] if fsal else None
