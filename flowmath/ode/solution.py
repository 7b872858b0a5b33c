"""What a solve returns: :class:`ODESolution` (outputs, counts, events, dense output) and
:class:`BackwardStats` (the gradient pass's counts, filled when autograd runs the VJP).

The dense output :class:`DenseOutput` evaluates the solve's continuous extension after the
solve: on each accepted step :math:`[t_n, t_n + h_n]`,

.. math:: y(t_n + \\theta h_n) = y_n + h_n \\sum_i w_i(\\theta) K_{n,i}, \\qquad
    \\theta \\in [0, 1],

with the tableau's weights (Dormand-Prince: Shampine's 4th-order interpolant; RK4: its free
3rd-order extension; FSAL pairs without one: the cubic Hermite interpolant), or the cubic
Hermite interpolant through the step's ends and their derivatives otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["BackwardStats", "DenseOutput", "ODESolution"]


@dataclass
class BackwardStats:
    """Counts of the backward (gradient) pass, filled when autograd runs the VJP.

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
        outside a VJP: the stage inputs are stored).  Gradients with respect to the output
        times add one evaluation of ``f`` per output time.
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


class DenseOutput:
    """The continuous extension of a solve, callable after it: ``sol(t)`` (see the module
    docstring).  ``t`` a scalar or an array of times inside the integrated interval; the
    result has the state's shape (a pytree for pytree states), with a leading axis for an array
    ``t``.  Plain NumPy: not differentiable."""

    def __init__(self, tab, steps, Ks, f_end, layout, fun, t0=None, y0=None):
        self.tab = tab
        self._t0, self._y0 = t0, y0  # the answer at t0 when no step was taken (t0 == t1)
        self._t = np.array([st[0] for st in steps])
        self._h = np.array([st[1] for st in steps])
        self._y = [st[2] for st in steps]
        self._K = Ks
        self._layout = layout
        self._fun = fun
        self._f_end = f_end
        if len(steps):
            t_first, t_last = self._t[0], self._t[-1] + self._h[-1]
            self.t_min, self.t_max = min(t_first, t_last), max(t_first, t_last)
        else:
            self.t_min = self.t_max = None
        self._direction = 1.0 if (len(steps) and self._h[0] > 0) else -1.0

    def _y_end(self, n):
        """State at the end of step ``n`` (the next step's start, or the last result)."""
        if n + 1 < len(self._y):
            return self._y[n + 1]
        return self._y[n] + self._h[n] * (self.tab.b @ self._K[n])

    def _f_at_end(self, n):
        if n + 1 < len(self._K):
            return self._K[n + 1][0]
        if self._f_end is None:
            self._f_end = self._fun(self._t[n] + self._h[n], self._y_end(n))
        return self._f_end

    def _eval_flat(self, tq):
        if self.t_min is None:
            if self._t0 is not None and tq == self._t0:
                return self._y0
            raise ValueError(
                f"`t` must be the solve's only time {self._t0!r} (t0 == t1: no step); got {tq!r}"
            )
        slack = 1e-12 * max(1.0, abs(self.t_min), abs(self.t_max))  # rounding of the grid
        if not self.t_min - slack <= tq <= self.t_max + slack:
            raise ValueError(
                f"`t` must lie in the integrated interval [{self.t_min!r}, {self.t_max!r}]; "
                f"got {tq!r}"
            )
        starts = self._direction * self._t
        n = int(np.searchsorted(starts, self._direction * tq, side="right")) - 1
        n = min(max(n, 0), len(self._t) - 1)
        h = self._h[n]
        theta = (tq - self._t[n]) / h
        y, K = self._y[n], self._K[n]
        if self.tab.continuous:
            return y + h * (self.tab.dense_weights(theta) @ K)
        y1, f0, f1 = self._y_end(n), K[0], self._f_at_end(n)
        h00 = 1 - theta * theta * (3 - 2 * theta)
        h10 = theta * (1 - theta) ** 2
        h01 = theta * theta * (3 - 2 * theta)
        h11 = theta * theta * (theta - 1)
        return h00 * y + h01 * y1 + h * (h10 * f0 + h11 * f1)

    def __call__(self, t):
        tq = np.asarray(t, dtype=np.float64)
        if tq.ndim == 0:
            out = self._eval_flat(float(tq))
            return self._layout.cast(self._layout.unflat(out))
        flat = np.stack([self._eval_flat(float(x)) for x in tq.ravel()])
        return self._layout.cast(self._layout.unflat(flat, lead=tq.shape))


@dataclass
class ODESolution:
    """Result of :func:`flowmath.ode.solve`.

    Attributes
    ----------
    ys : ndarray, shape ``(len(t),) + y0.shape``, or a pytree of such
        The solution at the output times (an autograd box while differentiating).  After a
        terminal event only the outputs up to the event are present (``len(sol.t)`` of them).
    t : ndarray, shape (len(ys),)
    nfe : int
        Evaluations of ``f`` in the forward pass.  For ``dopri5``:
        ``nfe = 2 + 6 * n_steps`` (one for ``f(t0, y0)``, one for the initial-step selection,
        six per attempted step thanks to First-Same-As-Last), minus one when ``first_step`` is
        given, plus one per forced step boundary crossed; for a fixed-step method with ``s``
        stages ``nfe = s * n_steps``.
    n_steps, n_accepted, n_rejected : int
        Attempted, accepted and rejected steps (``n_steps = n_accepted + n_rejected``).
    status : int
        0: reached the end of the interval; 1: a terminal event stopped the integration
        (failures raise :class:`~flowmath.ode.ODESolverError`).
    message : str
    t_events, y_events : list of ndarray or None
        Per event function, the times (shape ``(n_e,)``) and states (``(n_e,) + y0.shape``) of
        its located zeros; ``None`` without events.
    backward : BackwardStats
        Filled in place when a gradient is computed through ``ys``.
    sol : DenseOutput or None
        The continuous extension (``dense_output=True``); ``solution(t)`` calls it.
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
    t_events: list | None = None
    y_events: list | None = None
    sol: DenseOutput | None = None

    def __call__(self, t):
        """The dense output at ``t`` (requires ``dense_output=True``)."""
        if self.sol is None:
            raise ValueError(
                "this solution has no dense output; solve with `dense_output=True` to evaluate "
                "it at arbitrary times"
            )
        return self.sol(t)

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
