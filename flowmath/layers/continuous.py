"""Continuous normalizing flows: the flow map of a neural ODE as a layer (:class:`CNF`)."""

from __future__ import annotations

import numbers

import numpy as np

from .._checks import check_bool, check_choice, check_hidden, check_positive, check_rng
from .._xp import array_namespace, getval
from ..ode.dynamics import ACTIVATIONS, TIME_MODES, CNFDynamics, MLPDynamics
from ..ode.options import SolverOptions
from .base import VECTOR, Bijection, Leaf, cast_tree

__all__ = ["CNF"]

TRACES = ("exact", "hutchinson")
PROBES = ("gaussian", "rademacher")


class CNF(Bijection):
    """Continuous normalizing flow: ``forward`` is the time-``t1`` flow map of a neural ODE.

    With :math:`\\dot z = f(t, z)` and :math:`z(0) = x`, ``forward`` returns :math:`z(t_1)` and,
    by the instantaneous change of variables (Chen et al. 2018, Theorem 1),

    .. math:: \\log\\left|\\det \\frac{\\partial z(t_1)}{\\partial x}\\right|
        = \\int_0^{t_1} \\operatorname{tr} \\frac{\\partial f}{\\partial z}(t, z(t))\\, dt,
        \\qquad \\log p(x) = \\log \\pi(z(t_1)) + \\int_0^{t_1} \\operatorname{tr}
        \\frac{\\partial f}{\\partial z}\\, dt.

    Both are integrated together as the state ``[z, l]`` of shape ``(n, d + 1)`` (see
    :class:`flowmath.ode.dynamics.CNFDynamics`). ``inverse`` integrates the same system from
    ``t1`` back to 0, so its log-det is minus the forward one up to the solver tolerance. For a
    linear field :math:`f = A z` the log-det is :math:`t_1 \\operatorname{tr} A` exactly.

    Parameters
    ----------
    hidden : tuple of int
        Hidden widths of the MLP field (``()`` gives the affine field ``f = z W + b + t u``).
    t1 : float
        Integration time, > 0.
    trace : {"exact", "hutchinson"}
        ``"exact"``: all ``d`` directions (the log-det is exact up to the solver tolerance).
        ``"hutchinson"``: :math:`\\varepsilon^\\top (\\partial f/\\partial z) \\varepsilon` with one
        probe per sample drawn once per solve from ``rng`` and reused at every ``t`` (FFJORD,
        Algorithm 1): an unbiased estimate of the log-det; the layer is then ``stochastic``.
    probe : {"gaussian", "rademacher"}
        Distribution of Hutchinson's probes (ignored for the exact trace).
    time : {"concat", "concat-squash"}
        How the MLP sees ``t`` (:class:`flowmath.ode.dynamics.MLPDynamics`).
    activation : {"tanh", "softplus"}
    method : str or ButcherTableau
        ODE solver (:class:`flowmath.ode.SolverOptions`); a fixed-step one (no embedded pair,
        e.g. ``rk4``, ``euler``) needs ``step_size``.
    rtol, atol : float
        Tolerances of the adaptive solver (mixed error per component ``atol + rtol |y|``).
    adjoint : str or adjoint object
        How gradients are computed (``"backsolve"``, ``"checkpoint"``, ``"direct"`` or
        ``fm.ode.Backsolve(...)``, ...; :func:`flowmath.odeint`).
    step_size : float, optional
        Step of the fixed-step methods.
    options : SolverOptions, optional
        All the solver settings as one object (then pass none of ``method``, ``rtol``,
        ``atol``, ``adjoint``, ``step_size``).
    identity_init : bool
        Start from ``f = 0`` (the identity map) instead of a generic random field.
    init_scale : float
        Weights are drawn :math:`N(0, \\text{init\\_scale}^2/\\text{fan\\_in})`.

    Notes
    -----
    ``params`` is the list of layer dicts of :class:`~flowmath.ode.dynamics.MLPDynamics`.
    float32 inputs are integrated in float64 (a float32 state cannot meet tolerances below
    ~1e-6, and the adaptive step control would stall) and the outputs are cast back.

    References
    ----------
    Chen, Rubanova, Bettencourt, Duvenaud, "Neural Ordinary Differential Equations",
    NeurIPS 2018, arXiv:1806.07366.
    Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud, "FFJORD: Free-form Continuous Dynamics
    for Scalable Reversible Generative Models", ICLR 2019, arXiv:1810.01367.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.CNF(hidden=(8,), t1=0.5)
    >>> x = rng.normal(size=(4, 2))
    >>> params = layer.init(rng, x)
    >>> z, logdet = layer.forward(params, x)
    >>> x_back, minus = layer.inverse(params, z)
    >>> bool(np.allclose(x_back, x, atol=1e-6) and np.allclose(minus, -logdet, atol=1e-6))
    True
    """

    event_ndims = VECTOR
    free_form = True
    free_form_reason = (
        "any (Lipschitz) field f(t, z): the log-det needs only tr(df/dz) along the path, so no "
        "structure is imposed on the network"
    )

    def __init__(
        self,
        hidden=(64, 64),
        t1: float = 1.0,
        trace: str = "exact",
        probe: str = "gaussian",
        *,
        time: str = "concat",
        activation: str = "tanh",
        method: str = "dopri5",
        rtol: float = 1e-7,
        atol: float = 1e-9,
        adjoint: str = "backsolve",
        step_size: float | None = None,
        identity_init: bool = False,
        init_scale: float = 1.0,
        options: SolverOptions | None = None,
    ):
        self.field = MLPDynamics(
            check_hidden(hidden),
            time=check_choice(time, "time", TIME_MODES),
            activation=check_choice(activation, "activation", ACTIVATIONS),
        )
        self.hidden = self.field.hidden
        self.t1 = check_positive(t1, "t1")
        self.trace = check_choice(trace, "trace", TRACES)
        self.probe = check_choice(probe, "probe", PROBES)
        if options is None:
            options = SolverOptions(
                method=method, rtol=rtol, atol=atol, adjoint=adjoint, step_size=step_size
            )
        elif not isinstance(options, SolverOptions):
            raise TypeError(f"`options` must be a SolverOptions; got {type(options).__name__}")
        if not options.tableau.adaptive and options.step_size is None:
            # [0, t1] in one step of a fixed-step method is almost never what is meant
            raise ValueError(
                f"`step_size` must be given for the fixed-step method={options.tableau.name!r}; "
                "got None"
            )
        self.options = options
        self.method = options.tableau.name
        self.rtol, self.atol = options.rtol, options.atol
        self.adjoint = options.adjoint.name
        self.step_size = options.step_size
        self.identity_init = check_bool(identity_init, "identity_init")
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real):
            raise TypeError(f"`init_scale` must be a real number; got {type(init_scale).__name__}")
        self.init_scale = check_positive(init_scale, "init_scale")

    @property
    def stochastic(self) -> bool:  # type: ignore[override]
        return self.trace == "hutchinson"

    def __repr__(self) -> str:
        return (
            f"CNF(hidden={self.hidden!r}, t1={self.t1!r}, trace={self.trace!r}, "
            f"probe={self.probe!r}, time={self.field.time!r}, "
            f"activation={self.field.activation!r}, method={self.method!r}, "
            f"rtol={self.rtol!r}, atol={self.atol!r}, adjoint={self.adjoint!r})"
        )

    # -- contract ------------------------------------------------------------------------------
    def _init(self, rng, x):
        d = getval(x).shape[1]
        params = self.field.init(rng, d, scale=self.init_scale)
        if self.identity_init:
            params[-1] = {k: np.zeros_like(v) for k, v in params[-1].items()}
        return params

    def _param_spec(self, event_shape):
        (d,) = event_shape
        widths = (d, *self.hidden, d)
        extra = ("u",) if self.field.time == "concat" else ("gate_w", "gate_b", "bias_t")
        return [
            {"W": Leaf((a, b)), "b": Leaf((b,)), **{k: Leaf((b,)) for k in extra}}
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        ]

    def _event_shape(self, params):
        return (self.field.check_params(params),)

    def draw_probe(self, rng: np.random.Generator, shape, dtype=np.float64):
        """Hutchinson probes of the given shape: standard normal or Rademacher (+-1) entries.

        ``forward`` and ``inverse`` draw their probes with exactly this call, shape ``(n, d)``,
        before anything else from ``rng``."""
        check_rng(rng)
        if self.probe == "gaussian":
            return rng.standard_normal(shape).astype(dtype, copy=False)
        return (2.0 * rng.integers(0, 2, size=shape) - 1.0).astype(dtype, copy=False)

    def dynamics(self, n: int, d: int, rng: np.random.Generator | None = None):
        """The augmented field :class:`~flowmath.ode.dynamics.CNFDynamics` one solve uses
        (a fresh probe from ``rng`` for the Hutchinson trace)."""
        probe = self.draw_probe(rng, (n, d)) if self.stochastic else None
        return CNFDynamics(self.field, probe)

    def solver_options(self) -> dict:
        """Keyword arguments passed to :func:`flowmath.odeint`: ``{"options": SolverOptions}``."""
        return {"options": self.options}

    def _integrate(self, params, x, rng, t0, t1):
        from .. import ode  # the solver package; imported late so its import order is free

        dtype = getval(x).dtype
        xp = array_namespace(x, params)
        n, d = getval(x).shape
        x64 = x if dtype == np.float64 else x.astype(np.float64)
        p64 = cast_tree(params, np.float64)
        field = self.dynamics(n, d, rng)
        y0 = xp.concatenate([x64, xp.zeros((n, 1))], axis=1)
        ys = ode.odeint(field, y0, np.array([t0, t1]), p64, **self.solver_options())
        y1 = ys[-1]
        out, logdet = y1[:, :d], y1[:, d]
        if dtype != np.float64:
            out, logdet = out.astype(dtype), logdet.astype(dtype)
        return out, logdet

    def _forward(self, params, x, rng):
        return self._integrate(params, x, rng, 0.0, self.t1)

    def _inverse(self, params, y, rng):
        # the same system backwards in time: l(0) - l(t1) = -int_0^t1 tr(df/dz) dt
        return self._integrate(params, y, rng, self.t1, 0.0)
