"""Ordinary differential equations: Runge-Kutta solvers with dense output, counts and adjoints.

``fm.odeint(f, y0, t, params, *, method="dopri5", rtol=1e-7, atol=1e-9, adjoint="backsolve")``
returns ``ys`` of shape ``(len(t),) + y0.shape``; ``fm.ode.solve`` takes the same arguments and
returns an :class:`ODESolution` with the forward counts and, once a gradient has been computed,
the backward counts in ``solution.backward`` (:class:`BackwardStats`); ``odeint(..., stats={})``
fills ``stats["forward"]`` and, when the gradient runs, ``stats["backward"]``.  See
:mod:`flowmath.ode.solve` for the error norm and step control and :mod:`flowmath.ode.adjoint`
for the three gradient modes.

Dynamics may provide a fused vector-Jacobian product ``f.vjp(t, y, params, a) -> (dydt, a^T
df/dy, a^T df/dparams)`` (``a_params`` with the pytree structure of ``params``); the
``"backsolve"`` and ``"checkpoint"`` gradients then call it instead of ``autograd.make_vjp``.
Gradients flow through ``y0`` and ``params`` only (a traced variable captured by ``f`` is an
error); second derivatives need ``adjoint="direct"``.  The drivers run on NumPy in float64.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
arXiv:1806.07366.
"""

from .dynamics import CNFDynamics, MLPDynamics
from .solve import (
    DEFAULT_MAX_STEPS,
    MAX_FACTOR,
    MIN_FACTOR,
    SAFETY,
    STEP_FLOOR_ULPS,
    BackwardStats,
    ODESolution,
    ODESolverError,
    odeint,
    solve,
)
from .tableau import DOPRI5, EULER, RK4, TABLEAUX, ButcherTableau

__all__ = [
    "BackwardStats",
    "ButcherTableau",
    "CNFDynamics",
    "DEFAULT_MAX_STEPS",
    "DOPRI5",
    "EULER",
    "MAX_FACTOR",
    "MIN_FACTOR",
    "MLPDynamics",
    "ODESolution",
    "ODESolverError",
    "RK4",
    "SAFETY",
    "STEP_FLOOR_ULPS",
    "TABLEAUX",
    "odeint",
    "solve",
]
