"""Entry points: :func:`solve` (returns an :class:`~flowmath.ode.solution.ODESolution`) and
:func:`odeint` (returns the array ``ys``).  Both integrate

.. math::

    \\frac{dy}{dt} = f(t, y, \\theta), \\qquad y(t_0) = y_0,

and report ``y`` at the output times ``t`` (1-D, strictly increasing or strictly decreasing, or
all equal; ``t[0]`` is the time of ``y0``).  ``y0`` may be an array of any shape (a batch of
states is one state of shape ``(n, d)``), a Python float, or a pytree (nested dict / list /
tuple) of arrays; ``f`` receives states of that kind.  Both are differentiable by autograd with
respect to ``y0``, the parameter pytree ``params`` and the output times ``t``; see
:mod:`flowmath.ode.adjoint` for the adjoint strategies.

The package runs one way: :mod:`~flowmath.ode.tableau` (the methods as data) ->
:mod:`~flowmath.ode.step` (one step, and its differentiable twin) ->
:mod:`~flowmath.ode.controller` (error norm and step control) -> :mod:`~flowmath.ode.loop`
(the driver: counts, outputs, events, messages) -> :mod:`~flowmath.ode.adjoint` (gradient
strategies) -> :mod:`~flowmath.ode.options` (validated settings) -> this module.

The computation runs in float64 on NumPy; outputs have ``y0``'s floating dtype (float32 stays
float32, anything else becomes float64).

References
----------
Dormand, Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 6.
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.4 and II.6.
Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
arXiv:1806.07366.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from .._xp import getval, is_box
from ._layout import StateLayout, tree_flatten
from .adjoint import differentiable_solve
from .controller import MAX_FACTOR, MIN_FACTOR, SAFETY, Controller
from .loop import DEFAULT_MAX_STEPS, STEP_FLOOR_ULPS, ODESolverError, Trace
from .loop import run as _run
from .options import SolverOptions, as_events
from .solution import BackwardStats, DenseOutput, ODESolution
from .tableau import ButcherTableau

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
    """The low-level driver on flat float64 arrays (no validation, no autograd): returns
    ``(ys, counts)`` with ``ys[k] = y(t_out[k])``; see :func:`flowmath.ode.loop.run`."""
    res = _run(
        fun,
        t_out,
        y0,
        tab,
        (rtol, atol, Controller(rtol=rtol, atol=atol)) if tab.adaptive else None,
        step_size=step_size,
        first_step=first_step,
        max_steps=max_steps,
        trace=trace,
        norm_size=norm_size,
        ys=ys,
        what=what,
    )
    return res.ys, res.counts


# --------------------------------------------------------------------------- validation


def _validate_t(t):
    t = np.asarray(getval(t))
    if t.dtype.kind not in "iuf":
        raise TypeError(f"`t` must be a real array; got dtype {t.dtype}")
    t = t.astype(np.float64)
    if t.ndim != 1 or t.shape[0] < 1:
        raise ValueError(f"`t` must be a non-empty 1-D array of output times; got shape {t.shape}")
    if not np.isfinite(t).all():
        raise ValueError("`t` must be finite; got non-finite output times")
    if t.shape[0] > 1:
        d = t[1:] - t[:-1]  # (ndarray methods: this runs once per solve, small t is the rule)
        if not (d.min() > 0 or d.max() < 0 or not d.any()):
            raise ValueError(
                "`t` must be strictly increasing or strictly decreasing (or all equal: "
                f"t0 == t1 returns y0); got {t[:6].tolist()}{' ...' if t.shape[0] > 6 else ''}"
            )
    return t


def _make_flat_fun(f, params, layout):
    """``fun(t, y_flat) -> dy/dt flat`` around ``f(t, y, params)``; the first call checks that
    ``f`` returns plain values of the state's shape."""
    n = layout.size
    checked = False
    if layout.single:
        shape = layout.shape

        def fun(t, yflat):
            nonlocal checked
            out = f(t, yflat.reshape(shape), params)
            if not checked:
                _check_out(out, shape)
                checked = True
            if type(out) is np.ndarray and out.dtype == np.float64 and out.shape == shape:
                return out.reshape(n)  # the usual case: the checks below pass as they are
            arr = np.asarray(out)
            # every call, not only the first: a shape change or a complex dy/dt for a real
            # state would otherwise be reshaped or truncated to its real part silently
            if arr.shape != shape:
                raise ValueError(
                    f"`f` must return dy/dt with the shape of `y0` {shape} at every call; got "
                    f"{arr.shape} at t = {float(t)!r}"
                )
            if arr.dtype.kind not in "fiub":
                raise TypeError(
                    f"`f` must return real dy/dt for the real state `y0`; got dtype {arr.dtype} "
                    f"at t = {float(t)!r}"
                )
            return arr.astype(np.float64, copy=False).reshape(n)

        return fun

    def fun(t, yflat):
        nonlocal checked
        out = f(t, layout.unflat(yflat), params)
        if not checked:
            if any(is_box(leaf) for leaf in tree_flatten(out)[0]):
                _check_out(next(x for x in tree_flatten(out)[0] if is_box(x)), None)
            checked = True
        return layout.flat(out)

    return fun


def _check_out(out, shape):
    if is_box(out):
        raise TypeError(
            "`f` returned an autograd tracer for untraced inputs: it closes over a variable "
            "being differentiated; pass that variable through `params` so that the adjoint can "
            "differentiate it"
        )
    if np.shape(getval(out)) != shape:
        raise ValueError(
            f"`f` must return dy/dt with the shape of `y0` {shape}; got {np.shape(getval(out))}"
        )


class _FlatEvent:
    """An :class:`~flowmath.ode.options.Event` on flat states (what the loop calls)."""

    def __init__(self, ev, layout, params):
        self.fn, self.layout, self.params = ev.fn, layout, params
        self.terminal, self.direction, self.xtol = ev.terminal, ev.direction, ev.xtol

    def __call__(self, t, yflat):
        out = self.fn(t, self.layout.unflat(yflat), self.params)
        if is_box(out):
            raise TypeError(
                "an event function returned an autograd tracer: it closes over a variable being "
                "differentiated; pass that variable through `params` so that the event time's "
                "gradient includes it"
            )
        if np.ndim(out) != 0:
            raise TypeError(
                f"`events` functions must return a real scalar g(t, y, params); got shape "
                f"{np.shape(out)}"
            )
        try:
            return float(out)
        except (TypeError, ValueError):
            raise TypeError(
                f"`events` functions must return a real scalar g(t, y, params); got "
                f"{type(out).__name__} {out!r}"
            ) from None


_KEYWORD_DEFAULTS = dict(
    method="dopri5",
    rtol=1e-7,
    atol=1e-9,
    adjoint="backsolve",
    step_size=None,
    first_step=None,
    max_step=math.inf,
    max_steps=DEFAULT_MAX_STEPS,
    jump_t=None,
    controller=None,
    dense_output=False,
    adjoint_rtol=None,
    adjoint_atol=None,
)


@functools.lru_cache(maxsize=128)
def _cached_options(key) -> SolverOptions:
    return SolverOptions(**{k: v for k, _, v in key})


def _options(options, kwargs) -> SolverOptions:
    if options is None:
        # SolverOptions is frozen: settings made only of hashable scalars (the usual call) are
        # validated once and shared (the type is part of the key, so True never stands for 1)
        key = tuple((k, type(v), v) for k, v in kwargs.items())
        try:
            hash(key)
        except TypeError:  # per-component tolerance arrays, jump_t lists: validate each time
            return SolverOptions(**kwargs)
        return _cached_options(key)
    if not isinstance(options, SolverOptions):
        raise TypeError(f"`options` must be a SolverOptions; got {type(options).__name__}")
    changed = [
        k
        for k, v in kwargs.items()
        if not (
            v is _KEYWORD_DEFAULTS[k]
            or (type(v) is type(_KEYWORD_DEFAULTS[k]) and v == _KEYWORD_DEFAULTS[k])
        )
    ]
    if changed:
        raise TypeError(
            "pass the solver settings either as `options` or as keywords; got `options` and "
            + ", ".join(f"`{k}`" for k in changed)
        )
    return options


# --------------------------------------------------------------------------- entry points


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
    max_step=math.inf,
    max_steps=DEFAULT_MAX_STEPS,
    jump_t=None,
    controller=None,
    events=None,
    dense_output=False,
    adjoint_rtol=None,
    adjoint_atol=None,
    stats=None,
    options=None,
) -> ODESolution:
    """Solve ``dy/dt = f(t, y, params)`` and return an :class:`ODESolution` with counts.

    .. math::

        y(t_k) = y_0 + \\int_{t_0}^{t_k} f(s, y(s), \\theta)\\, ds, \\qquad k = 0, \\dots, T-1

    Parameters
    ----------
    f : callable
        ``f(t, y, params) -> dy/dt`` with ``y`` and the result of ``y0``'s shape (pytree
        states: the same pytree).  If ``f`` has a method ``f.vjp(t, y, params, a) -> (dydt,
        a_y, a_params)`` (the fused VJP protocol: ``a_y = a^T df/dy`` of ``y``'s shape,
        ``a_params = a^T df/dparams`` with ``params``'s pytree structure), the backsolve and
        checkpoint gradients use it instead of autograd.
    y0 : ndarray (any shape), float, or pytree of ndarrays
        State at ``t[0]``.
    t : ndarray, shape (T,)
        Strictly increasing or strictly decreasing output times (or all equal: the outputs are
        ``y0``); differentiable.
    params : pytree, optional
        Nested dict / list / tuple of arrays passed to ``f``; differentiable.
    method : str or ButcherTableau
        ``"dopri5"``, ``"tsit5"``, ``"bosh3"`` (adaptive), ``"rk4"``, ``"euler"`` (fixed step),
        or any :class:`~flowmath.ode.ButcherTableau` (adaptive when it has an embedded pair).
    rtol, atol : float or array
        Tolerances (see :mod:`flowmath.ode.controller` for the norm); arrays are per component
        and broadcast to ``y0``'s shape; ``rtol`` must be at least ``100 * eps``.
    adjoint : str or adjoint object
        ``"backsolve"`` / ``Backsolve(rtol=..., atol=...)``, ``"checkpoint"`` / ``Checkpoint()``,
        ``"direct"`` / ``Direct()``; see :mod:`flowmath.ode.adjoint`.
    step_size : float, optional
        Fixed-step methods: largest step; each interval between output times (and forced
        boundaries) is split into ``ceil(|dt| / step_size)`` equal steps.  Default: one step per
        interval.
    first_step : float, optional
        Adaptive methods: initial step in ``(0, |t[-1] - t[0]|]`` (default: Hairer's selection).
    max_step : float
        Adaptive methods: largest step.
    max_steps : int
        Cap on attempted steps of one integration (forward, and each backward segment).
    jump_t : array, optional
        Forced step boundaries (discontinuities of ``f`` in ``t``).
    controller : Controller, optional
        Step-size controller (tolerances, safety, factors, PI coefficient ``beta``).
    events : callable, Event, or sequence of them, optional
        Event functions ``g(t, y, params)``; their zeros are located on the dense output and
        reported in ``t_events``, ``y_events``; a terminal one stops the solve (outputs after it
        are dropped; ``status = 1``).  Under autograd the located times and states are
        differentiable (implicit function theorem, every adjoint; see
        :mod:`flowmath.ode.adjoint`).
    dense_output : bool
        Keep the steps so that ``sol(t)`` evaluates the solution at any ``t`` after the solve.
    adjoint_rtol, adjoint_atol : float, optional
        Tolerances of the backsolve adjoint (same as ``Backsolve(rtol=..., atol=...)``).
    stats : dict, optional
        Filled with ``stats["forward"]`` (a dict of counts) now and ``stats["backward"]``
        (:meth:`BackwardStats.as_dict`) when a gradient is computed.
    options : SolverOptions, optional
        All of the solver settings above as one validated object (then pass none of them).

    Returns
    -------
    ODESolution
        ``ys`` of shape ``(T,) + y0.shape`` and dtype of ``y0`` (float64 for integer ``y0``),
        forward counts, events, dense output, and ``backward`` (:class:`BackwardStats`), filled
        in place by the gradient computation.

    Raises
    ------
    ODESolverError
        Step size rejected below the floor, more than ``max_steps`` steps, or non-finite
        derivatives.

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

    Dense output after the solve:

    >>> sol = solve(lambda t, y, k: -k * y, 1.0, np.array([0.0, 1.0]), 2.0, dense_output=True)
    >>> bool(abs(sol(0.3) - np.exp(-0.6)) < 1e-7)
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
    opts = _options(
        options,
        dict(
            method=method,
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
            step_size=step_size,
            first_step=first_step,
            max_step=max_step,
            max_steps=max_steps,
            jump_t=jump_t,
            controller=controller,
            dense_output=dense_output,
            adjoint_rtol=adjoint_rtol,
            adjoint_atol=adjoint_atol,
        ),
    )
    if not callable(f):
        raise TypeError(f"`f` must be callable as f(t, y, params); got {type(f).__name__}")
    layout = StateLayout(y0)
    t_raw = _validate_t(t)
    bound = opts.bind(layout.shape, layout.size, t_raw)
    leaves, rebuild = tree_flatten(params)
    boxed_y0 = any(is_box(leaf) for leaf in layout.leaves)
    boxed = boxed_y0 or is_box(t) or any(is_box(leaf) for leaf in leaves)
    backward = BackwardStats(mode=opts.adjoint.name)
    params_raw = rebuild([getval(leaf) for leaf in leaves]) if boxed else params
    fun = _make_flat_fun(f, params_raw, layout)
    evs = tuple(_FlatEvent(ev, layout, params_raw) for ev in as_events(events))
    trace = None
    if not boxed:
        y0flat = layout.flat(y0)
        trace = Trace(store_K=True) if opts.dense_output else None
        res = bound.run(fun, t_raw, y0flat, trace=trace, events=evs)
        ys = layout.cast(layout.unflat(res.ys[: res.n_out], lead=(res.n_out,)))
    else:
        ys_flat, ctx = differentiable_solve(
            f, fun, layout, y0, t, t_raw, leaves, rebuild, bound, backward, stats, evs
        )
        res, trace = ctx.result, ctx.trace
        ys = layout.unflat_traced(ys_flat)
    counts = res.counts
    sol = ODESolution(
        ys=ys,
        t=t_raw[: res.n_out],
        method=opts.tableau.name,
        adjoint=opts.adjoint.name,
        nfe=counts.nfe,
        n_steps=counts.n_steps,
        n_accepted=counts.n_accepted,
        n_rejected=counts.n_rejected,
        backward=backward,
    )
    if evs:
        sol.t_events = res.t_events
        sol.y_events = [layout.cast(layout.unflat(ye, lead=(ye.shape[0],))) for ye in res.y_events]
        if boxed and ctx.event_rows:  # traced: differentiable by the implicit function theorem
            for j, (te, ye) in enumerate(zip(ctx.t_events, ctx.y_events, strict=True)):
                if te is not None:
                    sol.t_events[j] = te
                    sol.y_events[j] = layout.unflat_traced(ye)
    if res.terminated:
        sol.status = 1
        sol.message = "A termination event occurred."
    if opts.dense_output:
        sol.sol = DenseOutput(
            opts.tableau, trace.steps, trace.Ks, trace.f_end, layout, fun,
            t0=float(t_raw[0]), y0=layout.flat(layout.values(y0)),
        )  # fmt: skip
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
