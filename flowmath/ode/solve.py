"""ODE drivers: fixed-step and adaptive explicit Runge-Kutta with dense output and counts.

The public entry points are :func:`solve` (returns an :class:`ODESolution`) and :func:`odeint`
(returns the array ``ys``).  Both integrate

.. math::

    \\frac{dy}{dt} = f(t, y, \\theta), \\qquad y(t_0) = y_0,

and report ``y`` at the output times ``t`` (1-D, strictly increasing or strictly decreasing;
``t[0]`` is the time of ``y0``).  ``y0`` may have any shape (a batch of states is one state of
shape ``(n, d)``); ``f`` receives arrays of that shape.  Both are differentiable by autograd with
respect to ``y0`` and the parameter pytree ``params`` (nested dict / list / tuple of arrays); see
:mod:`flowmath.ode.adjoint` for the three adjoint modes.

Adaptive error control (``dopri5``)
-----------------------------------
The local error estimate of a step is ``err = h * sum_i e_i K_i`` with ``e = b - b_hat``.  It is
measured in the scaled root-mean-square norm over all entries of the state (the whole batch):

.. math::

    \\|err\\| = \\Big(\\frac{1}{N} \\sum_{j=1}^{N}
        \\Big(\\frac{err_j}{atol + rtol \\max(|y_{n,j}|, |y_{n+1,j}|)}\\Big)^2\\Big)^{1/2}

and the step is accepted when ``||err|| <= 1``.  The next step is ``h * factor`` with the standard
(elementary) controller ``factor = SAFETY * ||err||^(-1/5)`` clipped to
``[MIN_FACTOR, MAX_FACTOR]`` (no growth right after a rejection).  The first step is chosen by
Hairer's algorithm (Hairer-Norsett-Wanner II.4).  Output times inside a step are filled by the
4th-order Dormand-Prince (Shampine) interpolant, so they never shorten a step.  The computation
runs in float64; ``ys`` has ``y0``'s floating dtype.

Failure handling: a step size below ``STEP_FLOOR_ULPS`` units in the last place of ``t``, more
than ``max_steps`` attempted steps, or a non-finite derivative raises :class:`ODESolverError`
naming ``t`` and ``h``; tolerances and arguments are validated with ``ValueError``/``TypeError``
naming the argument.

References
----------
Dormand, Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 6.
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.4 and II.6.
Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
arXiv:1806.07366.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .._xp import getval, is_box
from .tableau import TABLEAUX, ButcherTableau

__all__ = [
    "BackwardStats",
    "DEFAULT_MAX_STEPS",
    "MAX_FACTOR",
    "MIN_FACTOR",
    "ODESolution",
    "ODESolverError",
    "SAFETY",
    "STEP_FLOOR_ULPS",
    "integrate",
    "odeint",
    "solve",
    "tree_flatten",
]

#: Safety factor of the step-size controller (the new step aims at SAFETY * the optimal one).
SAFETY = 0.9
#: Smallest ratio new step / old step the controller takes (after a rejection).
MIN_FACTOR = 0.2
#: Largest ratio new step / old step the controller takes.
MAX_FACTOR = 10.0
#: Step-size floor: |h| below this many units in the last place of |t| is a failure.
STEP_FLOOR_ULPS = 10.0
#: Default cap on attempted steps (accepted + rejected) of one solve.
DEFAULT_MAX_STEPS = 10_000

ADJOINTS = ("backsolve", "checkpoint", "direct")


class ODESolverError(RuntimeError):
    """The solver could not reach the end of the interval (step floor, step cap, non-finite)."""


@dataclass
class BackwardStats:
    """_Counts of the backward (gradient) pass, filled when autograd runs the VJP.

    Attributes
    ----------
    mode : str
        The adjoint mode.
    computed : bool
        ``False`` until a gradient has been computed through the solve.
    nfe : int
        Evaluations of the backward dynamics: for ``"backsolve"`` the augmented system (one call
        of ``f.vjp`` or ``make_vjp``, which returns ``f`` with the products, so these calls are
        also the ``n_vjp``); 0 for ``"checkpoint"`` and ``"direct"`` (no evaluation of ``f``
        outside a VJP: the stage inputs are stored).
    n_vjp : int
        Vector-Jacobian products ``a^T df/dy``, ``a^T df/dparams`` (each costs about one forward
        and one backward pass through ``f``): the cost of the backward pass.
    n_steps, n_accepted, n_rejected : int
        Steps of the backward integration (``"backsolve"``) or accepted forward steps replayed
        (``"checkpoint"``, ``"direct"``).
    drift : float or None
        ``"backsolve"`` only: Euclidean norm ``||z_hat(t0) - z(t0)||`` of the state reconstructed
        by integrating backwards, a diagnostic of the reverse-time reconstruction error.
    drift_max : float or None
        ``"backsolve"`` only: the largest ``||z_hat(t_k) - z(t_k)||`` over the output times (each
        reverse segment restarts from the forward value at its end).
    n_stored_states : int
        Memory of the gradient in units of one state (``y0.size`` numbers): ``len(t)`` outputs for
        ``"backsolve"``; the distinct stage inputs of the accepted steps for ``"checkpoint"``
        (``(s - 1) n + 1`` with First-Same-As-Last, ``s n + 1`` otherwise); the same count of
        traced stage inputs for ``"direct"`` (a lower bound: ``f``'s own intermediates are on
        autograd's tape too).
    fused_vjp : bool
        Whether ``f.vjp`` (the fused protocol) was used instead of autograd's ``make_vjp``.
    """

    mode: str
    computed: bool = False
    nfe: int = 0
    n_vjp: int = 0
    n_steps: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    drift: float | None = None
    drift_max: float | None = None
    n_stored_states: int = 0
    fused_vjp: bool = False

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class ODESolution:
    """Result of :func:`solve`.

    Attributes
    ----------
    ys : ndarray, shape ``(len(t),) + y0.shape``
        The solution at the output times (an autograd box while differentiating).
    t : ndarray, shape (len(t),)
    nfe : int
        Evaluations of ``f`` in the forward pass.  For ``dopri5``:
        ``nfe = 2 + 6 * n_steps`` (one for ``f(t0, y0)``, one for the initial-step selection,
        six per attempted step thanks to First-Same-As-Last), minus one when ``first_step`` is
        given; for a fixed-step method with ``s`` stages ``nfe = s * n_steps``.
    n_steps, n_accepted, n_rejected : int
        Attempted, accepted and rejected steps (``n_steps = n_accepted + n_rejected``).
    status : int
        0: reached the end of the interval (failures raise :class:`ODESolverError`).
    message : str
    backward : BackwardStats
        Filled in place when a gradient is computed through ``ys``.
    """

    ys: object
    t: np.ndarray
    method: str
    adjoint: str
    nfe: int
    n_steps: int
    n_accepted: int
    n_rejected: int
    status: int = 0
    message: str = "The solver successfully reached the end of the integration interval."
    backward: BackwardStats = field(default=None)

    def forward_stats(self) -> dict:
        return {
            "method": self.method,
            "nfe": self.nfe,
            "n_steps": self.n_steps,
            "n_accepted": self.n_accepted,
            "n_rejected": self.n_rejected,
            "status": self.status,
            "message": self.message,
        }


# --------------------------------------------------------------------------- pytrees


def tree_flatten(tree):
    """Leaves of a pytree (dict keys sorted) and a function rebuilding it from a leaf list."""
    if tree is None:
        return [], lambda leaves: None
    if is_box(tree) and isinstance(getval(tree), (dict, list, tuple)):
        # autograd boxes a container when differentiating with respect to it (DictBox,
        # SequenceBox): index it to reach boxed leaves; the rebuilt tree is a plain container.
        raw = getval(tree)
        if isinstance(raw, dict):
            tree = {k: tree[k] for k in raw}
        else:
            items = [tree[i] for i in range(len(raw))]
            kind = type(raw)
            tree = kind(items) if kind in (list, tuple) else kind(*items)
    if isinstance(tree, dict):
        keys = sorted(tree)
        parts = [tree_flatten(tree[k]) for k in keys]
        sizes = [len(p[0]) for p in parts]

        def rebuild(leaves):
            out, i = {}, 0
            for k, (_, rb), n in zip(keys, parts, sizes, strict=True):
                out[k] = rb(leaves[i : i + n])
                i += n
            return out

        return [leaf for p in parts for leaf in p[0]], rebuild
    if isinstance(tree, (list, tuple)):
        kind = type(tree)
        parts = [tree_flatten(v) for v in tree]
        sizes = [len(p[0]) for p in parts]

        def rebuild(leaves):
            out, i = [], 0
            for (_, rb), n in zip(parts, sizes, strict=True):
                out.append(rb(leaves[i : i + n]))
                i += n
            return kind(out) if kind in (list, tuple) else kind(*out)

        return [leaf for p in parts for leaf in p[0]], rebuild
    return [tree], lambda leaves: leaves[0]


# --------------------------------------------------------------------------- validation


def _check_tol(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number; got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be finite and >= 0; got {value!r}")
    return value


def validate_tolerances(rtol, atol):
    """``rtol`` in [100 eps, 1), ``atol >= 0``; returns them as floats."""
    rtol = _check_tol(rtol, "rtol")
    atol = _check_tol(atol, "atol")
    floor = 100 * np.finfo(np.float64).eps
    if rtol < floor:
        raise ValueError(
            f"`rtol` must be >= 100 * float64 eps = {floor:.3g} (smaller targets are below "
            f"rounding error); got {rtol!r}"
        )
    if rtol >= 1:
        raise ValueError(f"`rtol` must be < 1; got {rtol!r}")
    return rtol, atol


def _validate_t(t):
    if is_box(t):
        raise TypeError(
            "`t` must be a plain array: gradients with respect to `t` are not supported"
        )
    t = np.asarray(t)
    if t.dtype.kind not in "iuf":
        raise TypeError(f"`t` must be a real array; got dtype {t.dtype}")
    t = t.astype(np.float64)
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"`t` must be a non-empty 1-D array of output times; got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError("`t` must be finite; got non-finite output times")
    if t.shape[0] > 1:
        d = np.diff(t)
        if not (np.all(d > 0) or np.all(d < 0)):
            raise ValueError(
                "`t` must be strictly increasing or strictly decreasing; got "
                f"{t[:6].tolist()}{' ...' if t.shape[0] > 6 else ''}"
            )
    return t


def _validate_common(f, y0, t, method, rtol, atol, adjoint, step_size, first_step, max_steps):
    if not callable(f):
        raise TypeError(f"`f` must be callable as f(t, y, params); got {type(f).__name__}")
    if method not in TABLEAUX:
        raise ValueError(
            f"`method` must be one of {', '.join(map(repr, TABLEAUX))}; got {method!r}"
        )
    if adjoint not in ADJOINTS:
        raise ValueError(
            f"`adjoint` must be one of {', '.join(map(repr, ADJOINTS))}; got {adjoint!r}"
        )
    rtol, atol = validate_tolerances(rtol, atol)
    tab = TABLEAUX[method]
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < 1:
        raise ValueError(f"`max_steps` must be a positive integer; got {max_steps!r}")
    if tab.adaptive:
        if step_size is not None:
            raise ValueError(
                f"`step_size` applies to the fixed-step methods 'euler' and 'rk4'; got "
                f"step_size={step_size!r} with method={method!r} (use `first_step`)"
            )
        if first_step is not None:
            first_step = _check_tol(first_step, "first_step")
            if first_step == 0:
                raise ValueError("`first_step` must be > 0; got 0.0")
    else:
        if first_step is not None:
            raise ValueError(f"`first_step` applies to 'dopri5'; got it with method={method!r}")
        if step_size is not None:
            step_size = _check_tol(step_size, "step_size")
            if step_size == 0:
                raise ValueError("`step_size` must be > 0; got 0.0")
    raw = getval(y0)
    if not hasattr(raw, "shape") or not hasattr(raw, "dtype"):
        raise TypeError(f"`y0` must be an array; got {type(raw).__name__}")
    if type(raw).__module__.split(".")[0] == "cupy":
        raise TypeError(
            "`y0` must be a NumPy array: the ODE drivers run on the host (NumPy only); got a "
            "CuPy array (use cupy.asnumpy)"
        )
    if raw.dtype.kind not in "iuf":
        raise TypeError(f"`y0` must be a real array; got dtype {raw.dtype}")
    if not np.all(np.isfinite(raw)):
        raise ValueError("`y0` must be finite; got non-finite values")
    t = _validate_t(t)
    return tab, rtol, atol, t, step_size, first_step, int(max_steps)


# --------------------------------------------------------------------------- drivers


@dataclass
class _Trace:
    """What a forward pass records for the gradient: accepted steps and where outputs came from.

    ``steps[n] = (t_n, h_n, y_n, stages_n)`` (``y_n`` the flat state at the start of step ``n``,
    ``stages_n`` the list of its ``s`` stage inputs when ``store_stages``, else ``None``);
    ``node_out[m]`` lists the output indices equal to the state after ``m`` accepted steps;
    ``dense_out[n]`` lists ``(k, theta)`` for outputs interpolated inside step ``n``.
    """

    store_stages: bool = False
    steps: list = field(default_factory=list)
    node_out: dict = field(default_factory=dict)
    dense_out: dict = field(default_factory=dict)
    y_end: np.ndarray | None = None


@dataclass
class _Counts:
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


def _rms(x):
    """Root mean square, scaled so that it does not overflow for entries up to float max."""
    if not x.size:
        return 0.0
    big = float(np.max(np.abs(x)))
    if big == 0.0 or not math.isfinite(big):
        return big
    y = x / big
    return big * math.sqrt(float(np.dot(y, y)) / x.size)


def _select_initial_step(fun, t0, y0, f0, direction, interval, order, rtol, atol, m):
    """Hairer-Norsett-Wanner II.4 starting step (as in scipy); costs one evaluation of ``fun``."""
    scale = atol + np.abs(y0[:m]) * rtol
    d0 = _rms(y0[:m] / scale)
    d1 = _rms(f0[:m] / scale)
    h0 = 1e-6 if (d0 < 1e-5 or d1 < 1e-5) else 0.01 * d0 / d1
    h0 = min(h0, interval)
    f1 = fun(t0 + direction * h0, y0 + (direction * h0) * f0)
    d2 = _rms((f1[:m] - f0[:m]) / scale) / h0
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, interval)


def _record_output(trace, kind, key, value):
    if trace is not None:
        getattr(trace, kind).setdefault(key, []).append(value)


def integrate(
    fun,
    t_out,
    y0,
    tab: ButcherTableau,
    rtol,
    atol,
    *,
    step_size=None,
    first_step=None,
    max_steps=DEFAULT_MAX_STEPS,
    trace=None,
    norm_size=None,
    ys=None,
    what="state",
):
    """Integrate ``fun(t, y_flat) -> dy/dt`` (flat float64 arrays) and fill ``ys[k] = y(t_out[k])``.

    The low-level driver behind :func:`solve` (no input validation, no autograd): explicit
    Runge-Kutta steps of ``tab``, adaptive with dense output when ``tab`` has embedded weights,
    else fixed steps, each output interval split into ``ceil(|dt| / step_size)`` equal steps.

    .. math:: y_{n+1} = y_n + h \\sum_i b_i K_i, \\qquad
        K_i = f\\big(t_n + c_i h,\\, y_n + h \\textstyle\\sum_{j<i} a_{ij} K_j\\big)

    Parameters
    ----------
    fun : callable
        Right-hand side on flat float64 arrays of shape (N,); must return a new array.
    t_out : ndarray, shape (T,)
        Strictly monotone output times; ``t_out[0]`` is the time of ``y0``.
    y0 : ndarray, shape (N,)
    tab : ButcherTableau
    rtol, atol : float
        Tolerances of the adaptive error control (ignored by fixed-step tableaux).
    step_size, first_step, max_steps :
        As in :func:`solve`.
    what : str
        Name of the state in failure messages.
    norm_size : int, optional
        Error control uses the first ``norm_size`` entries only (a seminorm; the backsolve adjoint
        excludes the parameter-adjoint quadrature).  Default: all.
    trace : _Trace, optional
        Filled with the accepted steps and the output map when given.
    ys : ndarray, shape (T, N), optional
        Output buffer (allocated when omitted).

    Returns
    -------
    ys : ndarray, shape (T, N)
    counts : object
        With attributes ``nfe``, ``n_steps``, ``n_accepted``, ``n_rejected``, ``h_last`` and
        ``h_max`` (the largest accepted step).

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
    _record_output(trace, "node_out", 0, 0)
    counts = _Counts()
    if T == 1:
        if trace is not None:
            trace.y_end = y0
        return ys, counts
    # Overflow and NaN are detected explicitly (rejection, then ODESolverError naming t and h),
    # so numpy's floating-point warnings are silenced inside the drivers.
    with np.errstate(over="ignore", invalid="ignore"):
        if tab.adaptive:
            _adaptive(
                fun, t_out, y0, tab, rtol, atol, first_step, max_steps, trace, m, ys, counts, what
            )
        else:
            _fixed(fun, t_out, y0, tab, step_size, max_steps, trace, ys, counts, what)
    return ys, counts


def _nonfinite_error(method, t, h, what):
    return ODESolverError(
        f"{method}: non-finite {what} (NaN or inf) at t={t!r} with step h={h!r}; the dynamics "
        "overflow or are undefined there"
    )


def _stage_plan(tab, K):
    """What :func:`_stages` reads for ``tab``, built once per integration: the rows
    ``A[i, :i]`` (contiguous), the views ``K[:i]`` of the stage buffer and ``c`` as floats."""
    s = tab.n_stages
    A_rows = [np.ascontiguousarray(tab.A[i, :i]) for i in range(s)]
    K_rows = [K[:i] for i in range(s)]
    return A_rows, K_rows, [float(ci) for ci in tab.c]


def _stages(fun, t, y, h, K, plan, store):
    """Stages 2..s of one explicit Runge-Kutta step from ``(t, y)`` with step ``h``, ``K[0]``
    given: fills ``K[1:]`` with

    .. math:: K_i = f(t + c_i h, y_i), \\qquad y_i = y + h \\sum_{j<i} a_{ij} K_j

    and returns ``(y_s, stages)``: the last stage input (``y`` when ``s = 1``) and, when
    ``store``, the list ``[y, y_2, ..., y_s]`` of stage inputs (else ``None``)."""
    A_rows, K_rows, c = plan
    stages = [y] if store else None
    yi = y
    for i in range(1, len(c)):
        yi = y + (h * A_rows[i]) @ K_rows[i]
        K[i] = fun(t + c[i] * h, yi)
        if store:
            stages.append(yi)
    return yi, stages


def _fixed(fun, t_out, y0, tab, step_size, max_steps, trace, ys, counts, what):
    s = tab.n_stages
    # Each output interval is split into ceil(|dt| / step_size) equal steps, so outputs fall on
    # steps and the order of the method is preserved (no interpolation).
    dts = np.diff(t_out)
    if step_size is None:
        nsub = np.ones(dts.shape[0], dtype=np.int64)
    else:
        nsub = np.maximum(1, np.ceil(np.abs(dts) / step_size * (1 - 1e-12))).astype(np.int64)
    total = int(nsub.sum())
    if total > max_steps:
        raise ODESolverError(
            f"{tab.name}: step_size={step_size!r} needs {total} steps from t={t_out[0]!r} to "
            f"t={t_out[-1]!r}, more than max_steps={max_steps}; raise `max_steps` or the step"
        )
    K = np.empty((s, y0.shape[0]))
    plan = _stage_plan(tab, K)
    store = trace is not None and trace.store_stages
    y = y0
    node = 0
    for k in range(1, t_out.shape[0]):
        ta, tb, mk = t_out[k - 1], t_out[k], int(nsub[k - 1])
        for j in range(mk):
            t = ta + (tb - ta) * j / mk
            t_new = tb if j == mk - 1 else ta + (tb - ta) * (j + 1) / mk
            h = t_new - t
            K[0] = fun(t, y)
            _, stages = _stages(fun, t, y, h, K, plan, store)
            y_new = y + h * (tab.b @ K)
            counts.nfe += s
            counts.n_steps += 1
            counts.n_accepted += 1
            if not np.isfinite(y_new).all():
                raise _nonfinite_error(tab.name, float(t), float(h), what)
            if trace is not None:
                trace.steps.append((t, h, y, stages))
            y = y_new
            node += 1
            counts.h_last = h
        ys[k] = y
        _record_output(trace, "node_out", node, k)
    if trace is not None:
        trace.y_end = y


def _adaptive(fun, t_out, y0, tab, rtol, atol, first_step, max_steps, trace, m, ys, counts, what):
    s = tab.n_stages
    E = tab.error_weights
    exponent = -1.0 / (min(tab.order, tab.embedded_order) + 1)
    T = t_out.shape[0]
    t0, t_end = float(t_out[0]), float(t_out[-1])
    direction = 1.0 if t_end > t0 else -1.0
    K = np.empty((s, y0.shape[0]))
    plan = _stage_plan(tab, K)
    store = trace is not None and trace.store_stages
    K[0] = fun(t0, y0)
    counts.nfe += 1
    if not np.all(np.isfinite(K[0])):
        raise _nonfinite_error(tab.name, t0, 0.0, "derivative f(t0, y0)")
    if first_step is None:
        h_abs = _select_initial_step(
            fun, t0, y0, K[0], direction, abs(t_end - t0), tab.embedded_order, rtol, atol, m
        )
        counts.nfe += 1
    else:
        h_abs = min(first_step, abs(t_end - t0))
    t, y = t0, y0
    partial = m < y0.shape[0]
    abs_y = np.abs(y0[:m])
    scale = np.empty(m)
    k_next = 1
    node = 0
    rejected = False
    nonfinite = False
    name = tab.name if what == "state" else f"{tab.name} ({what})"
    while direction * (t_end - t) > 0:
        h_min = STEP_FLOOR_ULPS * math.ulp(abs(t))
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
        h = t_new - t
        # FSAL: the last stage input is y_{n+1} (A[-1] = b, c[-1] = 1).
        y_new, stages = _stages(fun, t, y, h, K, plan, store)
        counts.nfe += s - 1
        counts.n_steps += 1
        err = (h * E) @ K
        # scaled RMS norm over the first m entries, in a preallocated buffer
        abs_new = np.abs(y_new[:m] if partial else y_new)
        np.maximum(abs_y, abs_new, out=scale)
        scale *= rtol
        scale += atol
        q = np.divide(err[:m] if partial else err, scale, out=scale)
        err_norm = math.sqrt(float(q @ q) / m) if m else 0.0
        # K[s-1] enters err (e_s != 0), so a non-finite stage shows in err_norm; a field that
        # saturates (tanh) can still leave y_new non-finite: check it.
        ok = math.isfinite(err_norm) and bool(np.isfinite(y_new).all())
        if ok and err_norm <= 1.0:
            if err_norm == 0.0:
                factor = MAX_FACTOR
            else:
                factor = min(MAX_FACTOR, SAFETY * err_norm**exponent)
            if rejected:
                factor = min(1.0, factor)
            rejected = nonfinite = False
            while k_next < T and direction * (t_out[k_next] - t_new) <= 0:
                tk = t_out[k_next]
                if tk == t_new:
                    ys[k_next] = y_new
                    _record_output(trace, "node_out", node + 1, k_next)
                else:
                    theta = (tk - t) / h
                    ys[k_next] = y + h * (tab.dense_weights(theta) @ K)
                    _record_output(trace, "dense_out", node, (k_next, theta))
                k_next += 1
            if trace is not None:
                trace.steps.append((t, h, y, stages))
            counts.n_accepted += 1
            abs_y = abs_new
            counts.h_last = abs(h)
            counts.h_max = max(counts.h_max, abs(h))
            node += 1
            t, y = t_new, y_new
            K[0] = K[s - 1]
            h_abs = abs(h) * factor
        else:
            nonfinite = not ok
            factor = MIN_FACTOR if not ok else max(MIN_FACTOR, SAFETY * err_norm**exponent)
            h_abs = abs(h) * factor
            rejected = True
            counts.n_rejected += 1
    if trace is not None:
        trace.y_end = y


# --------------------------------------------------------------------------- entry points


def _make_flat_fun(f, params, shape, counter=None):
    """``fun(t, y_flat) -> dy/dt flat`` around ``f(t, y, params)`` with ``y`` of ``shape``."""
    n = int(np.prod(shape, dtype=np.int64))
    shape = tuple(shape)

    checked = False

    def fun(t, yflat):
        nonlocal checked
        out = f(t, yflat.reshape(shape), params)
        if not checked:
            if is_box(out):
                raise TypeError(
                    "`f` returned an autograd tracer for untraced inputs: it closes over a "
                    "variable being differentiated; pass that variable through `params` so "
                    "that the adjoint can differentiate it"
                )
            if np.shape(getval(out)) != shape:
                raise ValueError(
                    f"`f` must return dy/dt with the shape of `y0` {shape}; got "
                    f"{np.shape(getval(out))}"
                )
            checked = True
        return np.asarray(out, dtype=np.float64).reshape(n)

    return fun


def solve(
    f,
    y0,
    t,
    params=None,
    *,
    method="dopri5",
    rtol=1e-7,
    atol=1e-9,
    adjoint="backsolve",
    step_size=None,
    first_step=None,
    max_steps=DEFAULT_MAX_STEPS,
    adjoint_rtol=None,
    adjoint_atol=None,
    stats=None,
) -> ODESolution:
    """Solve ``dy/dt = f(t, y, params)`` and return an :class:`ODESolution` with counts.

    .. math::

        y(t_k) = y_0 + \\int_{t_0}^{t_k} f(s, y(s), \\theta)\\, ds, \\qquad k = 0, \\dots, T-1

    Parameters
    ----------
    f : callable
        ``f(t, y, params) -> dy/dt`` with ``y`` and the result of ``y0``'s shape.  If ``f`` has a
        method ``f.vjp(t, y, params, a) -> (dydt, a_y, a_params)`` (the fused VJP protocol:
        ``a_y = a^T df/dy`` of ``y``'s shape, ``a_params = a^T df/dparams`` with ``params``'s
        pytree structure), the ``"backsolve"`` and ``"checkpoint"`` gradients use it instead of
        autograd.
    y0 : ndarray, any shape
        State at ``t[0]``.
    t : ndarray, shape (T,)
        Strictly increasing or strictly decreasing output times.
    params : pytree, optional
        Nested dict / list / tuple of arrays passed to ``f``; differentiable.
    method : {"dopri5", "rk4", "euler"}
    rtol, atol : float
        Tolerances of ``dopri5`` (see the module docstring for the norm); validated for all methods;
        ``rtol`` must be at least ``100 * eps``.
    adjoint : {"backsolve", "checkpoint", "direct"}
        How autograd differentiates the solve; see :mod:`flowmath.ode.adjoint`.
    step_size : float, optional
        Fixed-step methods: largest step; each interval ``[t_k, t_{k+1}]`` is split into
        ``ceil(|dt| / step_size)`` equal steps.  Default: one step per output interval.
    first_step : float, optional
        ``dopri5``: initial step (default: Hairer's selection).
    max_steps : int
        Cap on attempted steps of one integration (forward, and each backward segment).
    adjoint_rtol, adjoint_atol : float, optional
        Tolerances of the reverse-time integration of ``"backsolve"`` (default ``rtol``, ``atol``).
    stats : dict, optional
        Filled with ``stats["forward"]`` (a dict of counts) now and ``stats["backward"]``
        (:meth:`BackwardStats.as_dict`) when a gradient is computed.

    Returns
    -------
    ODESolution
        ``ys`` of shape ``(T,) + y0.shape`` and dtype of ``y0`` (float64 for integer ``y0``),
        forward counts, and ``backward`` (:class:`BackwardStats`), filled in place by the
        gradient computation.

    Raises
    ------
    ODESolverError
        Step size below the floor, more than ``max_steps`` steps, or non-finite derivatives.

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
    arXiv:1806.07366.
    Dormand, Prince (1980), J. Comput. Appl. Math. 6, 19-26.

    Examples
    --------
    >>> import numpy as np
    >>> from flowmath.ode import solve
    >>> sol = solve(lambda t, y, k: -k * y, np.ones(2), np.array([0.0, 1.0]), 2.0)
    >>> bool(abs(sol.ys[-1, 0] - np.exp(-2.0)) < 1e-7)
    True
    >>> sol.nfe == 2 + 6 * sol.n_steps
    True

    Gradients, and the backward pass's counts (filled when autograd runs the VJP):

    >>> from autograd import grad
    >>> stats = {}
    >>> loss = lambda k: solve(lambda t, y, k: -k * y, np.ones(2), np.array([0.0, 1.0]), k,
    ...                        stats=stats).ys[-1].sum()
    >>> bool(abs(grad(loss)(2.0) + 2 * np.exp(-2.0)) < 1e-6)
    True
    >>> stats["backward"]["mode"], stats["backward"]["computed"], stats["backward"]["drift"] < 1e-6
    ('backsolve', True, True)
    """
    tab, rtol, atol, t, step_size, first_step, max_steps = _validate_common(
        f, y0, t, method, rtol, atol, adjoint, step_size, first_step, max_steps
    )
    a_rtol = rtol if adjoint_rtol is None else adjoint_rtol
    a_atol = atol if adjoint_atol is None else adjoint_atol
    a_rtol, a_atol = validate_tolerances(a_rtol, a_atol)
    leaves, rebuild = tree_flatten(params)
    boxed = is_box(y0) or any(is_box(leaf) for leaf in leaves)
    opts = dict(
        tab=tab,
        rtol=rtol,
        atol=atol,
        step_size=step_size,
        first_step=first_step,
        max_steps=max_steps,
        adjoint_rtol=a_rtol,
        adjoint_atol=a_atol,
    )
    backward = BackwardStats(mode=adjoint)
    if not boxed:
        y0raw = np.asarray(y0)
        out_dtype = np.float32 if y0raw.dtype == np.float32 else np.float64
        fun = _make_flat_fun(f, params, y0raw.shape)
        ys, counts = integrate(
            fun,
            t,
            y0raw.astype(np.float64).reshape(-1),
            tab,
            rtol,
            atol,
            step_size=step_size,
            first_step=first_step,
            max_steps=max_steps,
        )
        ys = ys.reshape((t.shape[0],) + y0raw.shape).astype(out_dtype, copy=False)
    else:
        from .adjoint import differentiable_solve

        ys, counts = differentiable_solve(f, y0, t, leaves, rebuild, adjoint, opts, backward, stats)
    sol = ODESolution(
        ys=ys,
        t=t,
        method=method,
        adjoint=adjoint,
        nfe=counts.nfe,
        n_steps=counts.n_steps,
        n_accepted=counts.n_accepted,
        n_rejected=counts.n_rejected,
        backward=backward,
    )
    if stats is not None:
        stats["forward"] = sol.forward_stats()
    return sol


def odeint(
    f, y0, t, params=None, *, method="dopri5", rtol=1e-7, atol=1e-9, adjoint="backsolve", **kwargs
):
    """Solve ``dy/dt = f(t, y, params)`` and return ``ys`` of shape ``(len(t),) + y0.shape``.

    Same arguments as :func:`solve` (pass ``stats={}`` to receive the forward and backward counts).

    .. math::

        y(t_k) = y_0 + \\int_{t_0}^{t_k} f(s, y(s), \\theta)\\, ds

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
    arXiv:1806.07366.

    Examples
    --------
    >>> import numpy as np
    >>> import flowmath as fm
    >>> A = np.array([[0.0, 1.0], [-1.0, 0.0]])
    >>> ys = fm.odeint(lambda t, y, A: y @ A.T, np.array([1.0, 0.0]), np.linspace(0, np.pi, 3), A)
    >>> np.round(ys[-1], 6) + 0.0
    array([-1.,  0.])
    """
    return solve(
        f, y0, t, params, method=method, rtol=rtol, atol=atol, adjoint=adjoint, **kwargs
    ).ys
