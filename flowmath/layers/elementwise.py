"""Elementwise invertible nonlinearities with analytic inverses and log-dets.

Each acts on every entry of a vector ``(n, d)`` or image ``(n, c, h, w)`` batch; the Jacobian
is diagonal, so

.. math:: \\log|\\det J_f(x)| = \\sum_i \\log |f'(x_i)|.

Inverses whose domain is not all of R (``ELU``, ``Sigmoid``) and forwards restricted to the
unit interval (``Logit``) raise a ``ValueError`` naming the offending input instead of
returning NaN. None of these layers has parameters: ``init`` returns an empty dict.
"""

from __future__ import annotations

import math
import numbers

import autograd.numpy as anp
import numpy as np

from .._checks import check_in_open_interval, check_positive
from .._xp import array_namespace, getval, to_numpy
from .base import ANY, Bijection, sum_except_batch

__all__ = ["ELU", "LeakyReLU", "Logit", "Sigmoid"]


def _softplus(x):
    """log(1 + e^x), stable for all x (in the namespace of ``x``)."""
    return array_namespace(x).logaddexp(0.0, x)


class _Elementwise(Bijection):
    event_ndims = ANY

    def _init(self, rng, x):
        return {}

    def _param_spec(self, event_shape):
        return {}


class ELU(_Elementwise):
    """Exponential linear unit, invertible for ``alpha > 0``.

    .. math:: f(x) = x \\ (x > 0), \\qquad \\alpha (e^x - 1) \\ (x \\le 0);
        \\qquad f^{-1}(y) = \\log(1 + y/\\alpha) \\ (-\\alpha < y \\le 0).

    The inverse exists on ``y > -alpha`` only. ELU is a bijection of R onto (-alpha, inf), not
    onto R: a flow whose last layer is an ELU puts mass only on the latent points it reaches, so
    its density integrates to ``pi(f(R)) < 1`` (measured by quadrature in the tests:
    1 - Phi(-1) = 0.8413 for a standard normal base and alpha = 1).

    References
    ----------
    Clevert, Unterthiner & Hochreiter, "Fast and accurate deep network learning by exponential
    linear units (ELUs)", 2015, arXiv:1511.07289.
    """

    def __init__(self, alpha: float = 1.0):
        self.alpha = check_positive(alpha, "alpha")

    def _forward(self, params, x, rng):
        a, xp = self.alpha, array_namespace(x)
        neg = xp.minimum(x, 0.0)  # exp of the positive part would overflow for large x
        y = xp.where(x > 0, x, a * xp.expm1(neg))
        logdet = sum_except_batch(xp.where(x > 0, 0.0, math.log(a) + neg))
        return y, logdet

    def _inverse(self, params, y, rng):
        a = self.alpha
        check_in_open_interval(y, -a, math.inf, "y")
        xp = array_namespace(y)
        neg = xp.minimum(y, 0.0)
        x = xp.where(y > 0, y, xp.log1p(neg / a))
        logdet = -sum_except_batch(xp.where(y > 0, 0.0, math.log(a) + xp.log1p(neg / a)))
        return x, logdet


class LeakyReLU(_Elementwise):
    """Leaky ReLU ``f(x) = x`` for ``x >= 0`` and ``a x`` otherwise, invertible for ``a > 0``.

    .. math:: \\log|\\det J| = \\log a \\cdot \\#\\{i : x_i < 0\\}.
    """

    def __init__(self, negative_slope: float = 0.01):
        self.negative_slope = check_positive(negative_slope, "negative_slope")

    def _apply(self, x, slope):
        raw = getval(x)
        n_negative = sum_except_batch((raw < 0).astype(raw.dtype))  # piecewise constant in x
        return anp.where(x >= 0, x, slope * x), n_negative * math.log(slope)

    def _forward(self, params, x, rng):
        return self._apply(x, self.negative_slope)

    def _inverse(self, params, y, rng):
        return self._apply(y, 1.0 / self.negative_slope)


class Logit(_Elementwise):
    """Logit with RealNVP's boundary shrink (Dinh et al. 2016, arXiv:1605.08803, Sec. 4.1):

    .. math:: p = \\alpha + (1 - 2\\alpha) x, \\qquad f(x) = \\log p - \\log(1 - p),
        \\qquad \\log|f'(x)| = \\log(1 - 2\\alpha) - \\log p - \\log(1 - p).

    Maps data in the unit interval to R (the forward direction normalises data). The domain is
    where ``0 < p < 1``: the open interval

    .. math:: \\Big(-\\frac{\\alpha}{1 - 2\\alpha},\\ \\frac{1 - \\alpha}{1 - 2\\alpha}\\Big),

    which is (0, 1) for ``alpha = 0`` and contains the closed interval [0, 1] for
    ``0 < alpha < 1/2``. ``f`` maps it onto all of R, so the inverse of every real ``y`` lands in
    the forward's domain and a flow ending in ``Logit`` scores its own samples (restricted to
    [0, 1], ``f`` would reach only ``[logit(alpha), logit(1 - alpha)]``). The inverse raises
    for ``|y|`` so large that ``sigmoid(y)`` rounds to 0 or 1 (about 37 in float64, 17 in
    float32), where it would land on the boundary.
    """

    def __init__(self, alpha: float = 0.0):
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
            raise TypeError(f"`alpha` must be a real number; got {type(alpha).__name__}")
        if not 0.0 <= alpha < 0.5:
            raise ValueError(f"`alpha` must lie in [0, 0.5); got {alpha!r}")
        self.alpha = float(alpha)

    def domain(self):
        """The open interval ``(lo, hi)`` on which the forward is defined (``0 < p < 1``)."""
        a = self.alpha
        return 0.0 - a / (1.0 - 2.0 * a), (1.0 - a) / (1.0 - 2.0 * a)

    def _forward(self, params, x, rng):
        a = self.alpha
        lo, hi = self.domain()
        check_in_open_interval(x, lo, hi, "x")
        p = a + (1.0 - 2.0 * a) * x
        xp = array_namespace(p)
        logp, log1mp = xp.log(p), xp.log1p(-p)
        if not np.all((to_numpy(p) > 0.0) & (to_numpy(p) < 1.0)):
            raise ValueError(
                f"`x` must lie in the open interval ({lo}, {hi}) of Logit(alpha={a}); got values "
                "that round to its boundary (p = alpha + (1 - 2 alpha) x is 0 or 1)"
            )
        return logp - log1mp, sum_except_batch(math.log(1.0 - 2.0 * a) - logp - log1mp)

    def _inverse(self, params, y, rng):
        a = self.alpha
        # log sigma(y) = -softplus(-y), log(1 - sigma(y)) = -softplus(y)
        sig = array_namespace(y).exp(-_softplus(-y))
        raw = to_numpy(sig)
        if not np.all((raw > 0.0) & (raw < 1.0)):
            big = float(np.abs(to_numpy(y)).max())
            raise ValueError(
                f"`y` must be small enough in magnitude that sigmoid(y) is neither 0 nor 1 in "
                f"{raw.dtype} (the inverse would land on the boundary of Logit's domain); got "
                f"|y| up to {big:.4g}"
            )
        x = (sig - a) / (1.0 - 2.0 * a)
        logdet = sum_except_batch(-_softplus(-y) - _softplus(y) - math.log(1.0 - 2.0 * a))
        return x, logdet


class Sigmoid(_Elementwise):
    """Logistic sigmoid ``f(x) = 1 / (1 + e^{-x})``, inverse the logit on (0, 1).

    .. math:: \\log|f'(x)| = -\\mathrm{softplus}(-x) - \\mathrm{softplus}(x).
    """

    def _forward(self, params, x, rng):
        y = array_namespace(x).exp(-_softplus(-x))
        return y, sum_except_batch(-_softplus(-x) - _softplus(x))

    def _inverse(self, params, y, rng):
        check_in_open_interval(y, 0.0, 1.0, "y")
        xp = array_namespace(y)
        logy, log1my = xp.log(y), xp.log1p(-y)
        return logy - log1my, -sum_except_batch(logy + log1my)
