"""Ordinary differential equations: Runge-Kutta solvers with dense output, counts and adjoints.

``fm.odeint(f, y0, t, params, *, method="dopri5", rtol=1e-7, atol=1e-9, adjoint="backsolve")``
returns ``ys`` of shape ``(len(t),) + y0.shape``; ``fm.ode.solve`` takes the same arguments and
returns an :class:`ODESolution` with the forward counts, events, dense output ``sol(t)`` and,
once a gradient has been computed, the backward counts in ``solution.backward``
(:class:`BackwardStats`); ``odeint(..., stats={})`` fills ``stats["forward"]`` and, when the
gradient runs, ``stats["backward"]``.  The settings travel as one validated
:class:`SolverOptions`; the adjoints are strategy objects (:class:`Backsolve`,
:class:`Checkpoint`, :class:`Direct`; the strings are aliases); ``method=`` takes any
:class:`ButcherTableau`.

Layout, imports running one way (each module imports only those before it): ``tableau`` (the
methods as data) -> ``step`` (one step, pure, and its differentiable twin) -> ``controller``
(error norm, step factor, first step) -> ``loop`` (the driver: counts, outputs, forced
boundaries, events, messages) -> ``adjoint`` (the gradient strategies) -> ``options``
(:class:`SolverOptions`, :class:`Event`: validation) -> ``solve`` (the entry points).
``_layout`` (state pytrees as flat vectors; the pytree functions are
:mod:`flowmath._pytree`'s), ``solution`` (result objects) and ``dynamics`` (the built-in fields)
import none of the others.

Dynamics may provide a fused vector-Jacobian product ``f.vjp(t, y, params, a) -> (dydt, a^T
df/dy, a^T df/dparams)`` (``a_params`` with the pytree structure of ``params``); the
``"backsolve"`` and ``"checkpoint"`` gradients then call it instead of ``autograd.make_vjp``.
Gradients flow through ``y0``, ``params`` and ``t`` only (a traced variable captured by ``f`` is an
error); second derivatives need ``adjoint="direct"``.  The drivers run on NumPy in float64.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
arXiv:1806.07366.
"""

from .adjoint import AbstractAdjoint, Backsolve, Checkpoint, Direct
from .controller import MAX_FACTOR, MIN_FACTOR, SAFETY, Controller
from .dynamics import CNFDynamics, MLPDynamics
from .loop import DEFAULT_MAX_STEPS, STEP_FLOOR_ULPS, ODESolverError
from .options import Event, SolverOptions
from .solution import BackwardStats, DenseOutput, ODESolution
from .solve import odeint, solve
from .tableau import BOSH3, DOPRI5, EULER, RK4, TABLEAUX, TSIT5, ButcherTableau

__all__ = [
    "AbstractAdjoint",
    "BOSH3",
    "BackwardStats",
    "Backsolve",
    "ButcherTableau",
    "CNFDynamics",
    "Checkpoint",
    "Controller",
    "DEFAULT_MAX_STEPS",
    "DOPRI5",
    "DenseOutput",
    "Direct",
    "EULER",
    "Event",
    "MAX_FACTOR",
    "MIN_FACTOR",
    "MLPDynamics",
    "ODESolution",
    "ODESolverError",
    "RK4",
    "SAFETY",
    "STEP_FLOOR_ULPS",
    "SolverOptions",
    "TABLEAUX",
    "TSIT5",
    "odeint",
    "solve",
]
