"""The solver's settings as one validated object, :class:`SolverOptions`, and events.

Every caller of the solvers (``fm.odeint``, ``fm.ode.solve``, the :class:`~flowmath.CNF`
layer, the experiments) builds or passes a :class:`SolverOptions`; validation happens once,
here, with messages naming the argument.  :meth:`SolverOptions.bind` adds what depends on the
problem (per-component tolerances broadcast to the state, ``first_step`` within the interval)
and runs the driver loop (:func:`flowmath.ode.loop.run`).

An :class:`Event` is a function ``g(t, y, params)`` whose zeros are located on the dense output
(see :mod:`flowmath.ode.loop`); plain callables are accepted with scipy's attributes
``terminal`` and ``direction``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import numpy as np

from .._checks import check_positive
from .adjoint import AbstractAdjoint, as_adjoint
from .controller import Controller
from .loop import DEFAULT_MAX_STEPS, run
from .tableau import TABLEAUX, ButcherTableau

__all__ = ["Event", "SolverOptions", "as_events"]

_DEFAULTS = dict(rtol=1e-7, atol=1e-9)


@dataclass(frozen=True, eq=False)
class SolverOptions:
    """Validated settings of one ODE solve (the keyword arguments of :func:`flowmath.ode.solve`).

    Parameters
    ----------
    method : str or ButcherTableau
        ``"dopri5"`` (default), ``"tsit5"``, ``"bosh3"`` (adaptive), ``"rk4"``, ``"euler"``
        (fixed step), or any :class:`ButcherTableau` (adaptive when it carries an embedded pair).
    rtol, atol : float or array
        Tolerances of the adaptive methods (arrays: per component, broadcast to ``y0``'s shape);
        validated for every method.  ``rtol`` in ``[100 eps, 1)``, ``atol >= 0``.
    adjoint : str or AbstractAdjoint
        ``Backsolve(rtol=..., atol=...)``, ``Checkpoint()``, ``Direct()`` or the strings
        ``"backsolve"``, ``"checkpoint"``, ``"direct"``.
    step_size : float, optional
        Fixed-step methods: largest step (each interval between output times and forced
        boundaries is split into ``ceil(|dt| / step_size)`` equal steps; default one step each).
    first_step : float, optional
        Adaptive methods: initial step, in ``(0, |t_end - t_0|]`` (default: Hairer's selection);
        a step below 10 ulp of ``t`` is raised to that floor, as scipy does.
    max_step : float
        Adaptive methods: largest step (default ``inf``).
    max_steps : int
        Cap on attempted steps of one integration (forward, and each backward segment).
    jump_t : array, optional
        Forced step boundaries (known discontinuities of ``f`` in ``t``): steps end there and
        restart with a fresh evaluation of ``f`` just past them.
    controller : Controller, optional
        The step-size controller (tolerances, safety, factors, PI coefficient); when given,
        ``rtol`` and ``atol`` stay at their defaults (the controller carries them).
    dense_output : bool
        Keep every accepted step for the dense output ``sol(t)`` after the solve.
    adjoint_rtol, adjoint_atol : float, optional
        The backsolve adjoint's tolerances (same as ``Backsolve(rtol=..., atol=...)``).

    Examples
    --------
    >>> from flowmath.ode import SolverOptions
    >>> SolverOptions(method="tsit5", rtol=1e-6).tableau.name
    'tsit5'
    >>> SolverOptions(method="rk4", first_step=0.1)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: `first_step` applies to the adaptive methods; got it with method='rk4' ...
    """

    method: str | ButcherTableau = "dopri5"
    rtol: float | np.ndarray = 1e-7
    atol: float | np.ndarray = 1e-9
    adjoint: str | AbstractAdjoint = "backsolve"
    step_size: float | None = None
    first_step: float | None = None
    max_step: float = math.inf
    max_steps: int = DEFAULT_MAX_STEPS
    jump_t: tuple = ()
    controller: Controller | None = None
    dense_output: bool = False
    adjoint_rtol: float | None = None
    adjoint_atol: float | None = None
    tableau: ButcherTableau = field(init=False, default=None)

    def __post_init__(self):
        put = object.__setattr__
        method = self.method
        if isinstance(method, ButcherTableau):
            tab = method
        elif isinstance(method, str) and method in TABLEAUX:
            tab = TABLEAUX[method]
        else:
            raise (ValueError if isinstance(method, str) else TypeError)(
                f"`method` must be one of {', '.join(map(repr, TABLEAUX))} or a ButcherTableau; "
                f"got {method!r}"
            )
        put(self, "tableau", tab)
        ctl = self.controller
        if ctl is None:
            ctl = Controller(rtol=self.rtol, atol=self.atol)
        elif not isinstance(ctl, Controller):
            raise TypeError(f"`controller` must be a Controller; got {type(ctl).__name__}")
        elif not (_is_default(self.rtol, "rtol") and _is_default(self.atol, "atol")):
            raise ValueError(
                "pass the tolerances once: either `rtol` / `atol` or Controller(rtol=..., atol=...)"
            )
        put(self, "controller", ctl)
        put(self, "rtol", ctl.rtol)
        put(self, "atol", ctl.atol)
        put(self, "adjoint", as_adjoint(self.adjoint, self.adjoint_rtol, self.adjoint_atol))
        ms = self.max_steps
        if isinstance(ms, bool) or not isinstance(ms, numbers.Integral) or ms < 1:
            raise ValueError(f"`max_steps` must be a positive integer; got {ms!r}")
        put(self, "max_steps", int(ms))
        name = tab.name
        if tab.adaptive:
            if self.step_size is not None:
                raise ValueError(
                    f"`step_size` applies to the fixed-step methods 'euler' and 'rk4'; got "
                    f"step_size={self.step_size!r} with method={name!r} (use `first_step` or "
                    "`max_step`)"
                )
            if self.first_step is not None:
                put(self, "first_step", check_positive(self.first_step, "first_step"))
            max_step = self.max_step
            if isinstance(max_step, bool) or not isinstance(max_step, numbers.Real):
                raise TypeError(f"`max_step` must be a real number; got {max_step!r}")
            if not max_step > 0:
                raise ValueError(f"`max_step` must be > 0; got {max_step!r}")
            put(self, "max_step", float(max_step))
        else:
            if self.first_step is not None:
                raise ValueError(
                    f"`first_step` applies to the adaptive methods; got it with method={name!r} "
                    "(use `step_size`)"
                )
            if self.max_step != math.inf:
                raise ValueError(
                    f"`max_step` applies to the adaptive methods; got it with method={name!r} "
                    "(use `step_size`)"
                )
            if self.step_size is not None:
                step = check_positive(self.step_size, "step_size")
                put(self, "step_size", step)
        jt = self.jump_t
        if jt is None or (isinstance(jt, tuple) and not jt):
            put(self, "jump_t", ())
        else:
            try:
                arr = np.asarray(jt, dtype=np.float64).reshape(-1)
            except (TypeError, ValueError):
                raise TypeError(
                    f"`jump_t` must be an array of times (real numbers); got {jt!r}"
                ) from None
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"`jump_t` must be finite times; got {jt!r}")
            put(self, "jump_t", tuple(float(x) for x in np.unique(arr)))
        if not isinstance(self.dense_output, (bool, np.bool_)):
            raise TypeError(f"`dense_output` must be a bool; got {self.dense_output!r}")

    @property
    def adaptive(self) -> bool:
        return self.tableau.adaptive

    def bind(self, shape, size, t) -> _Bound:
        """The options for a flat state of ``size`` entries (``shape``: ``y0``'s, None for a
        pytree) and the output times ``t``: tolerances broadcast, ``first_step`` checked against
        the interval (as scipy: a first step longer than the interval is an error)."""
        rtol, atol = self.controller.bind(shape, size)
        if self.first_step is not None and t.shape[0] > 1:
            span = abs(float(t[-1]) - float(t[0]))
            if self.first_step > span:
                raise ValueError(
                    f"`first_step` must not exceed the integration interval |t[-1] - t[0]| = "
                    f"{span!r}; got {self.first_step!r}"
                )
        return _Bound(self, rtol, atol)


def _is_default(value, key):
    return not isinstance(value, np.ndarray) and value == _DEFAULTS[key]


class _Bound:
    """:class:`SolverOptions` bound to one problem's flat state: runs the driver loop."""

    def __init__(self, options: SolverOptions, rtol, atol, first_step=None):
        self.options = options
        self.tableau = options.tableau
        self.adjoint = options.adjoint
        self.dense_output = options.dense_output
        self.rtol, self.atol = rtol, atol
        self.first_step = options.first_step if first_step is None else first_step

    def run(self, fun, t_out, y0, *, trace=None, events=(), first_step=None, **kw):
        o = self.options
        return run(
            fun,
            t_out,
            y0,
            o.tableau,
            (self.rtol, self.atol, o.controller),
            step_size=o.step_size,
            first_step=self.first_step if first_step is None else first_step,
            max_step=o.max_step,
            max_steps=o.max_steps,
            jump_t=o.jump_t,
            events=events,
            trace=trace,
            **kw,
        )

    def backward_options(self, n) -> _Bound:
        """The options of the backsolve adjoint's augmented system ``[z, a, a_theta]``: its
        tolerances (per-component ones cover ``z`` and ``a`` alike), no events."""
        adj = self.adjoint
        rtol = self.rtol if adj.rtol is None else adj.rtol
        atol = self.atol if adj.atol is None else adj.atol
        rtol = np.concatenate([rtol, rtol]) if np.ndim(rtol) else rtol
        atol = np.concatenate([atol, atol]) if np.ndim(atol) else atol
        return _Bound(self.options, rtol, atol)


@dataclass(frozen=True)
class Event:
    """An event function ``fn(t, y, params) -> float`` whose zeros the solver locates.

    Parameters
    ----------
    fn : callable
    terminal : bool or int
        Stop the integration at the first zero (``True``), or at the ``terminal``-th.
    direction : float
        ``> 0``: only zeros where ``fn`` increases; ``< 0``: decreases; 0: both.
    xtol : float
        Absolute tolerance in ``t`` of the located zero (default: 4 eps relative to the step).

    Notes
    -----
    Under autograd the located times and states (``t_events``, ``y_events``) are differentiable
    with respect to ``y0``, ``params`` and ``t[0]`` through every adjoint, by the implicit
    function theorem on ``fn(t_e, y(t_e), params) = 0`` (:mod:`flowmath.ode.adjoint`); ``fn``
    must take what it differentiates through ``params`` (a closed-over traced variable raises),
    and a zero where ``fn`` does not change along the solution (``dfn/dt = 0``) raises when its
    gradient is asked for.

    Examples
    --------
    A falling ball, ``y = [height, velocity]``, hits the ground at ``t = sqrt(2 h0 / g)``:

    >>> import numpy as np, flowmath as fm
    >>> ground = fm.ode.Event(lambda t, y, p: y[0], terminal=True, direction=-1)
    >>> sol = fm.ode.solve(lambda t, y, g: np.array([y[1], -g]), np.array([1.0, 0.0]),
    ...                    np.array([0.0, 2.0]), 9.81, events=ground)
    >>> bool(abs(sol.t_events[0][0] - np.sqrt(2 / 9.81)) < 1e-12), sol.status
    (True, 1)
    """

    fn: object
    terminal: bool | int = False
    direction: float = 0.0
    xtol: float = 0.0

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"`events` must be callables fn(t, y, params); got {self.fn!r}")
        term = self.terminal
        if isinstance(term, (bool, np.bool_)):
            term = int(bool(term))
        elif not isinstance(term, numbers.Integral) or term < 0:
            raise ValueError(f"`terminal` must be a bool or a count >= 0; got {self.terminal!r}")
        object.__setattr__(self, "terminal", int(term))
        if isinstance(self.direction, bool) or not isinstance(self.direction, numbers.Real):
            raise TypeError(f"`direction` must be a real number; got {self.direction!r}")
        object.__setattr__(self, "direction", float(np.sign(self.direction)))
        object.__setattr__(self, "xtol", check_positive(self.xtol, "xtol", allow_zero=True))


def as_events(events) -> tuple:
    """``events`` (None, one callable or Event, or a sequence of them) as a tuple of Events;
    plain callables take scipy's attributes ``terminal`` and ``direction`` when present."""
    if events is None:
        return ()
    if callable(events) or isinstance(events, Event):
        events = [events]
    if isinstance(events, (str, bytes)) or not isinstance(events, (list, tuple)):
        raise TypeError(
            "`events` must be a callable fn(t, y, params), an fm.ode.Event or a list of them; "
            f"got {type(events).__name__} {events!r}"
        )
    out = []
    for ev in events:
        if not isinstance(ev, Event):
            ev = Event(
                ev,
                terminal=getattr(ev, "terminal", False),
                direction=getattr(ev, "direction", 0.0),
            )
        out.append(ev)
    return tuple(out)
