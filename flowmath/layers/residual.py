"""Invertible residual blocks (i-ResNet, Residual Flows): :class:`IResBlock`.

.. math:: F(x) = x + g(x), \\qquad g = W_L \\circ \\phi \\circ W_{L-1} \\circ \\dots \\circ
    \\phi \\circ W_1 \\ (\\text{affine maps } W_i x + b_i),

with spectrally normalised weights, is invertible when :math:`\\mathrm{Lip}(g) < 1`
(Behrmann et al. 2019, Theorem 1). Its inverse is the fixed point of
:math:`x \\mapsto y - g(x)` (Algorithm 1) and its log-determinant

.. math:: \\log\\det(I + J_g) = \\sum_{k \\ge 1} \\frac{(-1)^{k+1}}{k} \\operatorname{tr}(J_g^k)

is computed exactly from the dense Jacobian (small ``d``), by the truncated power series with
Hutchinson probes (Algorithm 2, biased) or by the Russian-roulette estimator (Residual Flows,
unbiased) — the estimators live in :mod:`flowmath.estimators`.

What flowmath adds to the published algorithms:

* ``Lip(g) < 1`` is *certified*, not assumed: the bound
  :math:`L = \\prod_i \\|\\tilde W_i\\|_2^{\\mathrm{cert}} \\prod \\mathrm{Lip}(\\phi)` uses
  :func:`flowmath.lipschitz.certified_spectral_norm` (power iteration only under-estimates), and
  a ``ValueError`` is raised when ``L >= 1``;
* the fixed-point inverse stops on the Banach *error* bound, not on the step size, and reports it
  (:meth:`IResBlock.inverse_with_info`);
* gradients through the inverse come from the implicit-function theorem (an autograd primitive).

Backends: NumPy and autograd. CuPy is not supported yet: the certificates, the exact (SVD)
normalisation and the fixed-point loop's bookkeeping run on the host with NumPy.
"""

from __future__ import annotations

import dataclasses
import math

import autograd
import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp_argnums, primitive

from .. import _counters, estimators
from .. import lipschitz as lip
from .._checks import (
    check_bool,
    check_choice,
    check_hidden,
    check_int,
    check_positive,
    check_probability,
)
from .._xp import array_namespace, getval, to_numpy
from ..activations import ACTIVATIONS as _ACT
from ..activations import check_activation
from .base import VECTOR, Bijection, Leaf, _InputMismatch, cast_tree

__all__ = [
    "FixedPointError",
    "FixedPointInfo",
    "IResBlock",
    "params_from_legacy",
    "solve_fixed_point",
]

LOGDETS = ("exact", "series", "roulette")
#: The activations of ``g`` (entries of :data:`flowmath.activations.ACTIVATIONS`, Lipschitz 1).
ACTIVATIONS = tuple(lip.ACTIVATIONS)
SPECTRAL = ("auto", "exact", "power")
#: ``spectral="auto"`` uses the exact (SVD) norm for weights whose smaller side is at most this.
AUTO_EXACT_MAX = 128


class FixedPointError(RuntimeError):
    """The fixed-point iteration hit its cap before its error bound reached the tolerance."""


@dataclasses.dataclass
class FixedPointInfo:
    """What the fixed-point inverse achieved (per sample where shaped ``(n,)``).

    Attributes
    ----------
    n_iter : int
        Evaluations of ``g`` (iterations ``x^{k+1} = y - g(x^k)``).
    lipschitz : float
        The certified ``L >= Lip(g)`` used by the bounds.
    tol : float
        Relative tolerance: the loop stops when ``bound_i <= tol * max(1, ||y_i||)``.
    bound : ndarray (n,)
        ``min(a_priori, a_posteriori)`` at the last iterate: a guaranteed bound on
        ``||x^k - x*||`` in exact arithmetic.
    a_priori : ndarray (n,)
        :math:`L^k/(1-L)\\,\\|x^1 - x^0\\|`.
    a_posteriori : ndarray (n,)
        :math:`L/(1-L)\\,\\|x^k - x^{k-1}\\|` (never larger than ``a_priori``).
    residual_bound : ndarray (n,)
        :math:`\\|y - F(x^k)\\| / (1 - L)` from the final residual (F is
        ``(1-L)``-co-Lipschitz); includes the rounding accumulated over the iterations.
    history : dict or None
        With ``record=True``: ``"iterates"`` (k+1, n, d), ``"a_priori"`` and ``"a_posteriori"``
        (k+1, n) (entry 0 is ``inf``).
    """

    n_iter: int
    lipschitz: float
    tol: float
    bound: np.ndarray
    a_priori: np.ndarray
    a_posteriori: np.ndarray
    residual_bound: np.ndarray
    history: dict | None = None


def _row_norm(a):
    """Euclidean norm of every row, scaled by the row's largest entry first so that it neither
    overflows (1e160 squared) nor underflows."""
    a = np.asarray(a, dtype=np.float64)
    m = np.max(np.abs(a), axis=1)
    safe = np.where(m > 0, m, 1.0)
    return m * np.sqrt(np.sum((a / safe[:, None]) ** 2, axis=1))


def _check_step(x, x_prev, step, y_norm, L, eps, k):
    """The new step ``||x^k - x^{k-1}||``, after checking it is at most ``L`` times the last
    (up to rounding): otherwise ``L`` is not a Lipschitz constant of ``g`` (or ``g`` expands)
    and every Banach bound would be wrong."""
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"`g` must return finite values; got NaN or inf at iteration {k} (the map is not "
            "a contraction, or its parameters overflow)"
        )
    new_step = _row_norm(x - x_prev)
    bad = new_step > L * step + 32 * eps * (y_norm + _row_norm(x))
    if np.any(bad):
        ratios = np.where(bad, new_step / np.maximum(step, 1e-300), -np.inf)
        i = int(np.argmax(ratios))
        what = (
            "`g` is not a contraction (a step grew)"
            if ratios[i] >= 1
            else f"`lipschitz` = {L!r} is not a Lipschitz constant of `g`"
        )
        raise ValueError(
            f"{what}: at iteration {k} the step of sample {i} shrank only by a factor "
            f"{ratios[i]:.4g} > `lipschitz` = {L:.6g}; the Banach error bounds would be wrong"
        )
    return new_step


def solve_fixed_point(g, y, lipschitz: float, *, tol: float, max_iter: int, record: bool = False):
    """Solve ``x + g(x) = y`` row-wise by :math:`x^{k+1} = y - g(x^k)`, :math:`x^0 = y`.

    Stops when, for every row, the Banach bound

    .. math:: \\|x^k - x^*\\| \\le \\min\\Big(\\frac{L^k}{1-L}\\|x^1 - x^0\\|,\\;
        \\frac{L}{1-L}\\|x^k - x^{k-1}\\|\\Big)

    is at most ``tol * max(1, ||y_i||)`` — an error bound, not a step size.

    Every step is checked against the contraction the bounds assume,
    :math:`\\|x^{k+1} - x^k\\| \\le L \\|x^k - x^{k-1}\\| + \\delta` (``delta = 32 eps
    (||y_i|| + ||x_i||)`` for rounding), and the answer against its *measured* residual,
    :math:`\\|y - x - g(x)\\| / (1 - L)
    \\le \\max(\\text{tol} \\max(1, \\|y_i\\|), \\delta / (1 - L))`:
    a wrong ``lipschitz`` or an expanding ``g`` raises instead of returning its last iterate.
    Norms are computed scaled, so that ``y`` of any finite magnitude works.

    Parameters
    ----------
    g : callable
        ``(n, d) -> (n, d)``, a contraction with constant ``lipschitz`` in each row.
    y : ndarray, shape (n, d)
    lipschitz : float in [0, 1)
    tol : float > 0
    max_iter : int >= 1
    record : bool
        Keep the iterates and the bounds of every iteration in ``info.history``.

    Returns
    -------
    x : ndarray (n, d)
    info : FixedPointInfo

    Raises
    ------
    FixedPointError
        When ``max_iter`` evaluations do not bring the bound below the tolerance (the message
        gives the bound achieved and the a priori count needed), or when the measured residual
        of the answer misses the tolerance.
    ValueError
        When a step shrinks by less than ``lipschitz`` promises (``lipschitz`` is not a Lipschitz
        constant of ``g``, or ``g`` expands), or ``g`` returns non-finite values.

    References
    ----------
    Behrmann et al., "Invertible residual networks", 2019, arXiv:1811.00995, Algorithm 1.
    """
    L = float(lipschitz)
    if not 0.0 <= L < 1.0:
        raise ValueError(f"`lipschitz` must lie in [0, 1) for a contraction; got {L!r}")
    y = np.asarray(y)
    y_norm = _row_norm(y)
    scale = np.maximum(1.0, y_norm)
    thresh = tol * scale
    eps = float(np.finfo(y.dtype).eps) if y.dtype.kind == "f" else float(np.finfo(float).eps)
    x_prev = y
    x = y - g(y)
    k = 1
    d0 = _row_norm(x - x_prev)
    step = d0
    hist_x = [y, x] if record else None
    hist_pri = [np.full(len(y), np.inf)] if record else None
    hist_post = [np.full(len(y), np.inf)] if record else None
    while True:
        a_priori = L**k / (1.0 - L) * d0
        a_post = L / (1.0 - L) * _row_norm(x - x_prev)
        bound = np.minimum(a_priori, a_post)
        if record:
            hist_pri.append(a_priori)
            hist_post.append(a_post)
        if np.all(bound <= thresh):
            break
        if k >= max_iter:
            worst = int(np.argmax(bound / thresh))
            need = (
                math.log(thresh[worst] * (1 - L) / d0[worst]) / math.log(L)
                if L > 0 and d0[worst] > 0
                else 0.0
            )
            raise FixedPointError(
                f"fixed-point inverse did not reach the tolerance in `max_iter` = {max_iter} "
                f"iterations: error bound {bound[worst]:.3e} > {thresh[worst]:.3e} at sample "
                f"{worst} (certified Lip(g) <= {L:.6f}; the a priori bound needs about "
                f"{math.ceil(need)} iterations)"
            )
        x_prev = x
        x = y - g(x)
        k += 1
        step = _check_step(x, x_prev, step, y_norm, L, eps, k)
        if record:
            hist_x.append(x)
    _counters.record(fixed_point_solves=1, fixed_point_iterations=k)
    resid = _row_norm(y - x - g(x)) / (1.0 - L)
    floor = 32 * eps * (y_norm + _row_norm(x)) / (1.0 - L)  # what rounding alone leaves
    miss = ~(resid <= np.maximum(thresh, floor))
    if np.any(miss):
        i = int(np.argmax(np.where(miss, resid / thresh, -np.inf)))
        raise FixedPointError(
            "fixed-point inverse missed its tolerance on the measured residual: "
            f"||y - x - g(x)|| / (1 - L) = {resid[i]:.3e} > {thresh[i]:.3e} at sample {i} "
            f"after {k} iterations (`lipschitz` = {L:.6g} may be too small)"
        )
    history = None
    if record:
        history = {
            "iterates": np.stack(hist_x),
            "a_priori": np.stack(hist_pri),
            "a_posteriori": np.stack(hist_post),
        }
    info = FixedPointInfo(k, L, float(tol), bound, a_priori, a_post, resid, history)
    return x, info


# ---------------------------------------------------------------------------------------------
# the residual branch g: an MLP in row form, a = h W + b (W of shape (fan_in, fan_out), as in
# flowmath.nets)
# ---------------------------------------------------------------------------------------------
def _mlp(x, Ws, bs, act):
    """g(x) and the pre-activations of the hidden layers."""
    phi = _ACT[act].fn
    xp = array_namespace(x, Ws, bs)
    h = x
    pre = []
    last = len(Ws) - 1
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        a = xp.dot(h, W) + b
        if i < last:
            pre.append(a)
            h = phi(a)
        else:
            h = a
    return h, pre


def _mlp_host(x, Ws, bs, act):
    """g(x) for plain NumPy arrays with in-place activations (the fixed-point loop; never
    differentiated by autograd — the primitive's VJP uses :func:`_mlp`)."""
    last = len(Ws) - 1
    h = x
    for i, (W, b) in enumerate(zip(Ws, bs, strict=True)):
        a = h @ W
        a += b
        if i < last:
            if act == "elu":
                neg = np.minimum(a, 0.0)
                np.expm1(neg, out=neg)
                np.maximum(a, 0.0, out=a)
                a += neg
            else:
                a = _ACT[act].fn(a)
        h = a
    return h


def _mlp_vjp(V, Ws, pre, act):
    """Rows :math:`v_i^\\top J_g(x_i)`:
    ``((V W_L^T) * phi'(a_{L-1})) W_{L-1}^T ... W_1^T``."""
    dphi = _ACT[act].derivative
    xp = array_namespace(V, Ws, pre)
    h = xp.dot(V, Ws[-1].T)
    for W, a in zip(reversed(Ws[:-1]), reversed(pre), strict=True):
        h = xp.dot(h * dphi(a), W.T)
    return h


def _mlp_vjp_slopes(V, WTs, slopes):
    """:func:`_mlp_vjp` with the slopes ``phi'(a_i)`` precomputed and the transposed weights
    ``W_i^T`` given."""
    xp = array_namespace(V, WTs, slopes)
    h = xp.dot(V, WTs[-1])
    for WT, s in zip(reversed(WTs[:-1]), reversed(slopes), strict=True):
        h = xp.dot(h * s, WT)
    return h


def _mlp_jacobian(Ws, pre, act):
    """Dense per-sample Jacobians of g, shape (n, d, d):
    :math:`J_g = W_L^\\top \\operatorname{diag}(\\phi'(a_{L-1})) \\cdots W_1^\\top`."""
    dphi = _ACT[act].derivative
    xp = array_namespace(Ws, pre)
    J = Ws[0].T
    for W, a in zip(Ws[1:], pre, strict=True):
        J = xp.matmul(W.T, dphi(a)[:, :, None] * J)
    if J.ndim == 2:  # no hidden layer: the same J for every sample
        raise AssertionError("handled by the caller")
    return J


# ---------------------------------------------------------------------------------------------
# the fixed-point inverse as an autograd primitive (implicit-function theorem)
# ---------------------------------------------------------------------------------------------
class _Solve:
    """Non-differentiable settings of one fixed-point solve; collects its info."""

    def __init__(self, act, L, tol, max_iter, record):
        self.act, self.L, self.tol, self.max_iter, self.record = act, L, tol, max_iter, record
        self.info = None
        self.adjoint_info = None


@primitive
def _fixed_point(spec, y, *wb):
    k = len(wb) // 2
    Ws, bs = list(wb[:k]), list(wb[k:])

    if array_namespace(y, Ws, bs) is np:

        def g(x):
            return _mlp_host(x, Ws, bs, spec.act)
    else:  # CuPy

        def g(x):
            return _mlp(x, Ws, bs, spec.act)[0]

    x, spec.info = solve_fixed_point(
        g, y, spec.L, tol=spec.tol, max_iter=spec.max_iter, record=spec.record
    )
    return x


def _fixed_point_vjp(argnums, x, args, kwargs):
    """Implicit-function theorem: with ``x + g(x, theta) = y``,
    :math:`\\bar y = (I + J_g)^{-\\top} \\bar x` (solved by the same contraction,
    :math:`w \\leftarrow \\bar x - J_g^\\top w`) and
    :math:`\\bar\\theta = -(\\partial g / \\partial \\theta)^\\top \\bar y`."""
    spec, y, *wb = args
    k = len(wb) // 2
    Ws, bs = list(wb[:k]), list(wb[k:])
    _, pre = _mlp(x, Ws, bs, spec.act)

    def vjp(gbar):
        w, spec.adjoint_info = solve_fixed_point(
            lambda w: _mlp_vjp(w, Ws, pre, spec.act),
            gbar,
            spec.L,
            tol=spec.tol,
            max_iter=spec.max_iter,
        )
        grads = []
        theta_nums = [a - 2 for a in argnums if a >= 2]
        if theta_nums:

            def inner(*theta):
                return anp.sum(w * _mlp(x, list(theta[:k]), list(theta[k:]), spec.act)[0])

            gtheta = autograd.grad(lambda th: inner(*th))(tuple(wb))
        for a in argnums:
            if a == 0:
                grads.append(None)
            elif a == 1:
                grads.append(w)
            else:
                grads.append(-gtheta[a - 2])
        return tuple(grads)

    return vjp


defvjp_argnums(_fixed_point, _fixed_point_vjp)


# ---------------------------------------------------------------------------------------------
# the layer
# ---------------------------------------------------------------------------------------------
class IResBlock(Bijection):
    """Invertible residual block :math:`F(x) = x + g(x)` with a spectrally normalised MLP ``g``.

    .. math:: g(x) = \\phi(\\dots \\phi(x \\tilde W_1 + b_1) \\dots) \\tilde W_L + b_L, \\qquad
        \\tilde W_i = W_i / \\max(1, \\hat\\sigma_i / c),


        \\mathrm{Lip}(g) \\le L = \\prod_i \\|\\tilde W_i\\|_2^{\\mathrm{cert}}
        \\prod \\mathrm{Lip}(\\phi) \\le c^{\\,\\mathrm{len(hidden)}+1} \\ (\\text{exact norms}),

        \\log|\\det J_F(x)| = \\log\\det(I + J_g(x)).

    Parameters
    ----------
    hidden : tuple of int
        Hidden widths of ``g``; ``()`` gives a linear ``g(x) = W x + b``.
    coeff : float in (0, 1)
        Spectral-normalisation coefficient ``c`` of every weight.
    logdet : {"exact", "series", "roulette"}
        ``"exact"``: ``slogdet`` of the dense per-sample Jacobian (:func:`flowmath.estimators.
        exact_logdet`, small ``d``). ``"series"``: ``n_terms`` terms of the power series with
        ``n_probes`` probes (:func:`flowmath.estimators.power_series_logdet`, biased by at most
        :func:`flowmath.estimators.series_truncation_bound` with ``L`` above). ``"roulette"``:
        :func:`flowmath.estimators.roulette_logdet` (unbiased; geometric ``p = roulette_p``,
        ``n_exact`` terms always). The last two are stochastic (``rng`` required).
    n_terms, n_probes : int
        Series terms and Hutchinson probes.
    activation : {"elu", "lipswish"}
        :func:`flowmath.activations.elu` or :func:`flowmath.activations.lipswish` (Lipschitz 1).
    spectral : {"auto", "exact", "power"}
        How :math:`\\hat\\sigma` is obtained. ``"exact"``: :func:`flowmath.lipschitz.
        spectral_norm` (SVD; differentiable; no state). ``"power"``: ``n_power_iterations``
        power iterations per call started from the state ``u`` stored in each layer's dict —
        a deterministic function of ``(params, x)``; ``u`` receives no gradient (its gradient is
        zero, so Adam leaves it unchanged) and is advanced by :meth:`update_state`, which a
        training loop calls after each step. ``"auto"`` (default): ``"exact"`` when every
        weight's smaller side is at most 128, else ``"power"`` (decided at ``init``; the
        parameters show which: power mode has ``"u"`` in every layer).
    n_power_iterations : int
        Power iterations per call in power mode (the state makes one enough once warm).
    probe : {"gaussian", "rademacher"}
    roulette_p, n_exact : float, int
        Roulette parameters.
    neumann_gradient : bool
        With ``logdet="roulette"``: use :func:`flowmath.estimators.neumann_logdet`, whose value
        is the roulette estimate and whose *gradient* is the Neumann-series estimator
        (Residual Flows Sec. 3.2; cheaper; not the derivative of the value).
    check_lipschitz : bool
        Certify ``L < 1`` in ``forward`` too (``inverse`` always does: it needs ``L``). The
        certificate costs :math:`O(m n^2)` per weight and is cached by content.
    tol : float, optional
        Relative tolerance of the fixed-point inverse (default ``64 * eps`` of the dtype:
        1.4e-14 in float64, 7.6e-6 in float32).
    max_iter : int
        Iteration cap of the fixed-point inverse.

    Notes
    -----
    ``params`` is flowmath's one MLP layout (as :func:`flowmath.nets.mlp_init`): a list with
    one dict per layer, ``[{"W": (fan_in, fan_out), "b": (fan_out,)}, ...]``, the layer
    computing ``h W + b``; in power mode each dict also holds ``"u"`` (``(fan_out,)``, the
    power-iteration estimate of the top left singular vector of ``W^T``). The weights are *raw*:
    the normalisation is part of the map, so the parameters stay a plain pytree that Adam can
    update. :func:`params_from_legacy` converts the layout of earlier versions
    (``{"W": [...], "b": [...], "u": [...]}`` with ``W`` of shape ``(fan_out, fan_in)``).

    References
    ----------
    Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible residual networks", 2019,
    arXiv:1811.00995.
    Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows for invertible generative modeling",
    2019, arXiv:1906.02735.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> block = fm.IResBlock(hidden=(16,), logdet="exact")
    >>> x = rng.normal(size=(4, 3))
    >>> params = block.init(rng, x)
    >>> y, logdet = block.forward(params, x)
    >>> x_back, info = block.inverse_with_info(params, y)[::2]
    >>> bool(np.max(np.abs(x_back - x)) < 1e-12), bool(np.all(info.bound <= 1e-12))
    (True, True)
    """

    event_ndims = VECTOR
    free_form = True
    free_form_reason = (
        "any residual branch g with Lip(g) < 1: the Jacobian I + J_g is dense, the constraint "
        "is on the Lipschitz constant, not on the structure"
    )

    def __init__(
        self,
        hidden=(64, 64),
        coeff: float = 0.9,
        logdet: str = "series",
        n_terms: int = 10,
        n_probes: int = 1,
        *,
        activation: str = "elu",
        spectral: str = "auto",
        n_power_iterations: int = 1,
        probe: str = "gaussian",
        roulette_p: float = 0.5,
        n_exact: int = 1,
        neumann_gradient: bool = False,
        check_lipschitz: bool = True,
        tol: float | None = None,
        max_iter: int = 100_000,
    ):
        self.hidden = check_hidden(hidden)
        coeff = check_positive(coeff, "coeff")
        if coeff >= 1.0:
            raise ValueError(
                f"`coeff` must lie in (0, 1): the block is invertible only when Lip(g) < 1 "
                f"(Behrmann et al. 2019, Theorem 1); got {coeff!r}"
            )
        self.coeff = coeff
        self.logdet = check_choice(logdet, "logdet", LOGDETS)
        self.n_terms = check_int(n_terms, "n_terms", minimum=1)
        self.n_probes = check_int(n_probes, "n_probes", minimum=1)
        self.activation = check_activation(activation, "activation", ACTIVATIONS)
        self.spectral = check_choice(spectral, "spectral", SPECTRAL)
        self.n_power_iterations = check_int(n_power_iterations, "n_power_iterations", minimum=1)
        self.probe = check_choice(probe, "probe", estimators.PROBES)
        self.roulette_p = check_probability(roulette_p, "roulette_p")  # (0, 1]
        self.n_exact = check_int(n_exact, "n_exact", minimum=0)
        if self.logdet == "roulette":
            # the number of terms must be capped in practice (estimators.roulette_logdet)
            estimators.check_roulette_cap(self.roulette_p, self.n_exact)
        self.neumann_gradient = check_bool(neumann_gradient, "neumann_gradient")
        self.check_lipschitz = check_bool(check_lipschitz, "check_lipschitz")
        self.tol = None if tol is None else check_positive(tol, "tol")
        self.max_iter = check_int(max_iter, "max_iter", minimum=1)

    @property
    def stochastic(self):  # type: ignore[override]
        return self.logdet != "exact"

    # -- parameters -----------------------------------------------------------------------------
    def _uses_power(self, shapes):
        return self.spectral == "power" or (
            self.spectral == "auto" and any(min(s) > AUTO_EXACT_MAX for s in shapes)
        )

    def _init(self, rng, x):
        d = x.shape[1]
        sizes = (d, *self.hidden, d)
        params = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            # drawn as (fan_out, fan_in) and transposed: the same numbers for a seed as before
            W = np.ascontiguousarray((rng.normal(size=(fan_out, fan_in)) / math.sqrt(fan_in)).T)
            params.append({"W": W, "b": 0.1 * rng.normal(size=fan_out)})
        if self._uses_power([p["W"].shape for p in params]):
            for p in params:
                p["u"] = _top_left_singular_vector(p["W"].T)
        return params

    def _param_spec(self, event_shape):
        (d,) = event_shape
        sizes = (d, *self.hidden, d)
        shapes = list(zip(sizes[:-1], sizes[1:], strict=True))
        state = self._uses_power(shapes)
        return [
            {"W": Leaf(s), "b": Leaf((s[1],)), **({"u": Leaf((s[1],))} if state else {})}
            for s in shapes
        ]

    def _check_params(self, params, event_shape, path, dtype):
        _refuse_legacy(params, path)
        super()._check_params(params, event_shape, path, dtype)

    def _event_shape(self, params):
        params = getval(params)
        n = len(self.hidden) + 1
        _refuse_legacy(params, "params")
        if (
            not isinstance(params, (list, tuple))
            or len(params) != n
            or not all(isinstance(getval(p), dict) and "W" in getval(p) for p in params)
        ):
            got = type(params).__name__
            if isinstance(params, (list, tuple)):
                got += f" of length {len(params)}"
            raise ValueError(
                f"`params` must be a list of {n} layer dicts {{'W', 'b'}} for hidden="
                f"{self.hidden} (from IResBlock.init); got {got}"
            )
        return (getval(getval(params[0])["W"]).shape[0],)

    def _power_mode(self, params):
        params = getval(params)
        if self.spectral == "exact":
            return False
        has_u = "u" in getval(params[0])
        if self.spectral == "power" and not has_u:
            raise ValueError(
                "`params` must hold the power-iteration state 'u' in every layer for "
                "spectral='power' (use IResBlock.init)"
            )
        return has_u

    def update_state(self, params, n_iter: int | None = None):
        """Advance the power-iteration state: returns new params with ``u`` after ``n_iter``
        (default ``n_power_iterations``) more iterations; the weights are shared, not copied.
        Without a state (exact mode) the params are returned unchanged."""
        if not isinstance(params, (list, tuple)) or not all(
            isinstance(p, dict) and "u" in p for p in params
        ):
            return params
        if n_iter is None:
            n_iter = self.n_power_iterations
        n_iter = check_int(n_iter, "n_iter", minimum=1)
        return [
            {**p, "u": lip.power_iteration(getval(p["W"]).T, getval(p["u"]), n_iter)[1]}
            for p in params
        ]

    # -- the normalised map ---------------------------------------------------------------------
    def normalized_weights(self, params):
        """``(W~, b, sigma_hat)``: the weights the map uses (``(fan_in, fan_out)`` each), the
        biases, the estimates."""
        _refuse_legacy(params, "params")
        layers = _as_list(params)
        Ws = [p["W"] for p in layers]
        bs = [p["b"] for p in layers]
        power = self._power_mode(params)
        out, sigmas = [], []
        for i, W in enumerate(Ws):
            if power:
                # power iteration on W^T (u lives in the output space, as b does)
                WnT, _, sigma = lip.spectral_normalize(
                    W.T, getval(layers[i]["u"]), self.coeff, self.n_power_iterations
                )
                Wn = WnT.T
            else:
                xp = array_namespace(W)
                sigma = lip.spectral_norm(W)
                Wn = W / xp.maximum(1.0, sigma / self.coeff)
            out.append(Wn)
            sigmas.append(float(getval(sigma)))
        return out, bs, sigmas

    def lipschitz_bound(self, params) -> float:
        """Certified upper bound ``L`` on ``Lip(g)`` for these parameters:
        :math:`\\prod_i \\|\\tilde W_i\\|^{\\mathrm{cert}}_2 \\,
        \\mathrm{Lip}(\\phi)^{\\#\\mathrm{hidden}}`
        (``gram`` certificates of the weights actually used, cached by content)."""
        Wn, _, _ = self.normalized_weights(params)
        return self._certified_L(Wn)

    def _certified_L(self, Wn):
        L = 1.0
        for W in Wn:
            L *= lip.cached_certified_spectral_norm(to_numpy(getval(W)))
        L *= _ACT[self.activation].lipschitz ** len(self.hidden)
        return L * (1.0 + 8 * len(Wn) * np.finfo(np.float64).eps)

    def _require_contraction(self, L, what):
        if not L < 1.0:
            raise ValueError(
                f"certified Lip(g) <= {L:.6g} is not < 1, so {what} (Behrmann et al. 2019, "
                "Theorem 1): the spectral-normalisation estimate is too low — advance the "
                "power-iteration state with `update_state(params)` or use spectral='exact'"
            )

    # -- forward ----------------------------------------------------------------------------------
    def _forward(self, params, x, rng):
        Wn, bs, _ = self.normalized_weights(params)
        if self.check_lipschitz:
            L = self._certified_L(Wn)
            self._require_contraction(
                L, "the block is not certified invertible and its log-det series may diverge"
            )
        gx, pre = _mlp(x, Wn, bs, self.activation)
        y = x + gx
        return y, self._logdet(x, Wn, pre, rng)

    def _logdet(self, x, Wn, pre, rng):
        n, d = getval(x).shape
        dtype = getval(x).dtype
        xp = array_namespace(x, Wn)
        if self.logdet == "exact":
            if not pre:  # linear g: one Jacobian (W^T) for all samples
                ld = estimators.exact_logdet(Wn[0].T[None])
                return ld * xp.ones(n, dtype=dtype)
            return estimators.exact_logdet(_mlp_jacobian(Wn, pre, self.activation))

        # phi'(a) once for all terms (not once per vjp call); every term multiplies by each
        # W^T, so plain NumPy weights are transposed into contiguous copies once (W6: the
        # row-major products are 3-8 % faster than on the transposed views, the copies cost
        # 1.4 ms per weight against ~11 ms per product)
        dphi = _ACT[self.activation].derivative
        slopes = [dphi(a) for a in pre]
        WTs = [np.ascontiguousarray(W.T) if type(W) is np.ndarray else W.T for W in Wn]

        def vjp(V):
            return _mlp_vjp_slopes(V, WTs, slopes)

        if self.logdet == "series":
            return estimators.power_series_logdet(
                vjp,
                n,
                d,
                n_terms=self.n_terms,
                n_probes=self.n_probes,
                probe=self.probe,
                rng=rng,
                dtype=dtype,
            )
        fn = estimators.neumann_logdet if self.neumann_gradient else estimators.roulette_logdet
        return fn(
            vjp,
            n,
            d,
            p=self.roulette_p,
            n_exact=self.n_exact,
            n_probes=self.n_probes,
            probe=self.probe,
            rng=rng,
            dtype=dtype,
        ).logdet

    # -- inverse ----------------------------------------------------------------------------------
    def _default_tol(self, dtype):
        return self.tol if self.tol is not None else 64 * float(np.finfo(dtype).eps)

    def _solve(self, params, y, tol, max_iter, record):
        Wn, bs, _ = self.normalized_weights(params)
        L = self._certified_L(Wn)
        self._require_contraction(L, "the fixed-point iteration is not a certified contraction")
        dtype = getval(y).dtype
        spec = _Solve(
            self.activation,
            L,
            self._default_tol(dtype) if tol is None else tol,
            self.max_iter if max_iter is None else max_iter,
            record,
        )
        x = _fixed_point(spec, y, *Wn, *bs)
        return x, spec.info

    def _inverse(self, params, y, rng):
        x, _ = self._solve(params, y, None, None, False)
        _, ld = self._forward(params, x, rng)
        return x, -ld

    def invert(
        self,
        params,
        y,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        record: bool = False,
    ):
        """The fixed-point inverse alone (no log-det): ``(x, info)``.

        Differentiable by autograd in ``params`` and ``y`` (implicit-function theorem). Use it
        for sampling when the log-det is not needed; :meth:`inverse_with_info` adds it.

        Parameters
        ----------
        params : pytree
        y : ndarray, shape (n, d)
        tol : float, optional
            Relative tolerance: stop when the Banach bound of every row is at most
            ``tol * max(1, ||y_i||)`` (default: the layer's ``tol``, else ``64 * eps``).
        max_iter : int, optional
            Iteration cap (default: the layer's ``max_iter``); exceeding it raises
            :class:`FixedPointError`.
        record : bool
            Keep every iterate and bound in ``info.history``.

        Returns
        -------
        x : ndarray (n, d)
        info : FixedPointInfo
        """
        # the inverse map draws nothing: validate as the base class does, without `rng`
        y = self._validate_x(y, "y")
        try:  # the declared parameter spec, as for every public call
            self._check_params(params, tuple(getval(y).shape[1:]), "params", getval(y).dtype)
        except _InputMismatch as mismatch:
            raise ValueError(
                f"`y` must have shape (n, {mismatch.expected[0]}) to match the parameters; "
                f"got {getval(y).shape}"
            ) from None
        params = cast_tree(params, getval(y).dtype)
        if tol is not None:
            tol = check_positive(tol, "tol")
        if max_iter is not None:
            max_iter = check_int(max_iter, "max_iter", minimum=1)
        return self._solve(params, y, tol, max_iter, record)

    def inverse_with_info(
        self,
        params,
        y,
        rng=None,
        *,
        tol: float | None = None,
        max_iter: int | None = None,
        record: bool = False,
    ):
        """:meth:`inverse` plus what the fixed-point iteration achieved.

        Returns
        -------
        x : ndarray (n, d)
        logdet : ndarray (n,)
            Minus the forward log-det at the recovered ``x``.
        info : FixedPointInfo
            Iterations, certified ``L``, the Banach bounds and the residual bound per sample
            (and the iterates with ``record=True``).
        """
        y, params = self._validate_call(params, y, rng, "y")
        if tol is not None:
            tol = check_positive(tol, "tol")
        if max_iter is not None:
            max_iter = check_int(max_iter, "max_iter", minimum=1)
        x, info = self._solve(params, y, tol, max_iter, record)
        _, ld = self._forward(params, x, rng)
        return x, -ld, info


def _as_list(seq):
    """A list of the items of a list, tuple or autograd SequenceBox."""
    return [seq[i] for i in range(len(seq))]


def _refuse_legacy(params, path):
    params = getval(params)
    if isinstance(params, dict) and "W" in params:
        raise ValueError(
            f"`{path}` is in the IResBlock layout of earlier versions (a dict of lists "
            "{'W': [...], 'b': [...]}); flowmath's MLP layout is a list of layer dicts "
            "[{'W': (fan_in, fan_out), 'b': (fan_out,)}, ...]: convert it with "
            "flowmath.layers.residual.params_from_legacy"
        )


def params_from_legacy(params):
    """Convert :class:`IResBlock` parameters from the layout of earlier versions,
    ``{"W": [W_1..W_L], "b": [b_1..b_L]}`` (plus ``"u": [u_1..u_L]``) with ``W_i`` of shape
    ``(fan_out, fan_in)``, to flowmath's MLP layout ``[{"W": W_1^T, "b": b_1 (, "u": u_1)},
    ...]``. The map, its log-determinant and its power-iteration state are unchanged (the
    weights are copied, contiguous).

    Examples
    --------
    >>> import numpy as np
    >>> old = {"W": [np.ones((4, 3)), np.ones((3, 4))], "b": [np.zeros(4), np.zeros(3)]}
    >>> [p["W"].shape for p in params_from_legacy(old)]
    [(3, 4), (4, 3)]
    """
    if not isinstance(params, dict) or "W" not in params or "b" not in params:
        raise ValueError(
            "`params` must be the earlier IResBlock layout, a dict with lists 'W' and 'b' "
            f"(and 'u'); got {type(params).__name__}"
        )
    keys = [k for k in ("W", "b", "u") if k in params]
    lengths = {k: len(params[k]) for k in keys}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"`params` lists must have one entry per layer; got lengths {lengths}")
    out = []
    for i in range(lengths["W"]):
        layer = {"W": np.ascontiguousarray(np.asarray(params["W"][i]).T)}
        layer["b"] = np.array(params["b"][i])
        if "u" in params:
            layer["u"] = np.array(params["u"][i])
        out.append(layer)
    return out


def _top_left_singular_vector(W):
    """Exact top left singular vector (init of the power-iteration state), via the smaller
    Gram matrix."""
    m, n = W.shape
    if m <= n:
        _, vecs = np.linalg.eigh(W @ W.T)
        return vecs[:, -1]
    _, vecs = np.linalg.eigh(W.T @ W)
    u = W @ vecs[:, -1]
    return u / np.linalg.norm(u)
