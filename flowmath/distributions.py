"""Base densities and :class:`Flow`, the density defined by a bijection and a base.

.. math:: \\log p(x) = \\log \\pi(f(x)) + \\log |\\det J_f(x)|,
    \\qquad x = f^{-1}(z),\\ z \\sim \\pi.
"""

from __future__ import annotations

import math

import numpy as np

from ._checks import check_float_dtype, check_int, check_rng
from ._xp import array_namespace, getval
from .layers.base import Bijection, sum_except_batch

__all__ = ["Flow", "StandardLogistic", "StandardNormal"]


class StandardNormal:
    """Standard normal base density :math:`\\pi(z) = (2\\pi)^{-D/2} e^{-|z|^2/2}` over every
    non-batch axis."""

    def log_prob(self, z):
        """Log-density of each sample of ``z`` (shape ``(n, ...)``), shape ``(n,)``."""
        d = int(np.prod(getval(z).shape[1:]))
        # a Python float keeps float32 batches in float32 (a 0-d float64 array would not)
        return -0.5 * sum_except_batch(z * z) - 0.5 * d * math.log(2 * math.pi)

    def sample(self, rng: np.random.Generator, shape, dtype=np.float64):
        check_rng(rng)
        dtype = check_float_dtype(dtype)
        return rng.standard_normal(tuple(shape)).astype(dtype, copy=False)

    def __repr__(self) -> str:
        return "StandardNormal()"


class StandardLogistic:
    """Standard logistic base density (NICE, Dinh et al. 2014, arXiv:1410.8516):
    :math:`\\log \\pi(z) = -\\sum_i [\\mathrm{softplus}(z_i) + \\mathrm{softplus}(-z_i)]`."""

    def log_prob(self, z):
        xp = array_namespace(z)
        # softplus(z) + softplus(-z) = |z| + 2 log(1 + e^{-|z|}), stable for all z
        a = xp.abs(z)
        return -sum_except_batch(a + 2.0 * xp.log1p(xp.exp(-a)))

    def sample(self, rng: np.random.Generator, shape, dtype=np.float64):
        check_rng(rng)
        u = rng.uniform(size=tuple(shape))
        # inverse CDF; uniform draws are in [0, 1), 0 has probability 2^-53: nudge it inside
        u = np.clip(u, np.finfo(np.float64).tiny, None)
        return (np.log(u) - np.log1p(-u)).astype(check_float_dtype(dtype), copy=False)

    def __repr__(self) -> str:
        return "StandardLogistic()"


class Flow:
    """A normalizing flow: a bijection ``layer`` (data -> latent) and a base density.

    Parameters
    ----------
    layer : Bijection
        The normalizing map ``f``; ``log_prob`` runs ``forward``, ``sample`` runs ``inverse``.
    base : StandardNormal or StandardLogistic
        The latent density ``pi``.

    Notes
    -----
    ``init`` records the data and latent event shapes (taken from the example batch) so that
    ``sample`` knows what to draw; the parameters themselves stay a pure pytree.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> flow = fm.Flow(fm.Chain([fm.AffineCoupling(), fm.LULinear()]))
    >>> x = rng.normal(size=(64, 2))
    >>> params = flow.init(rng, x)
    >>> flow.log_prob(params, x).shape
    (64,)
    >>> flow.sample(params, 3, rng).shape
    (3, 2)
    """

    def __init__(self, layer: Bijection, base=None):
        if not isinstance(layer, Bijection):
            raise TypeError(f"`layer` must be a Bijection; got {type(layer).__name__}")
        base = StandardNormal() if base is None else base
        if not (hasattr(base, "log_prob") and hasattr(base, "sample")):
            raise TypeError(
                f"`base` must provide log_prob(z) and sample(rng, shape); got {type(base).__name__}"
            )
        self.layer = layer
        self.base = base
        self.event_shape: tuple[int, ...] | None = None
        self.latent_shape: tuple[int, ...] | None = None

    def init(self, rng: np.random.Generator, x):
        params = self.layer.init(rng, x)
        self.event_shape = tuple(getval(x).shape[1:])
        self.latent_shape = tuple(self.layer._output_event_shape(self.event_shape))
        return params

    def log_prob(self, params, x, rng: np.random.Generator | None = None):
        """``log p(x)``, shape ``(n,)``."""
        z, logdet = self.layer.forward(params, x, rng)
        return self.base.log_prob(z) + logdet

    def sample(self, params, n: int, rng: np.random.Generator, *, dtype=np.float64):
        """Draw ``n`` samples ``x = f^-1(z)``, ``z ~ base``."""
        return self._draw(params, n, rng, dtype)[1]

    def sample_and_log_prob(self, params, n: int, rng: np.random.Generator, *, dtype=np.float64):
        """Samples and their log-density in one pass: ``log p(x) = log pi(z) - log|det df^-1/dz|``
        ``= log pi(z) + logdet_f(x)``, with ``log|det df^-1/dz|`` read off the inverse pass."""
        z, x, logdet_inv = self._draw(params, n, rng, dtype)
        return x, self.base.log_prob(z) - logdet_inv

    def _draw(self, params, n, rng, dtype):
        check_int(n, "n", minimum=1)
        check_rng(rng)
        dtype = check_float_dtype(dtype)  # an integer dtype would truncate the latents
        if self.latent_shape is None:
            raise ValueError("`Flow.sample` needs the event shape: call `flow.init(rng, x)` first")
        z = self.base.sample(rng, (n,) + self.latent_shape, dtype)
        x, logdet_inv = self.layer.inverse(params, z, rng if self.layer.stochastic else None)
        return z, x, logdet_inv

    def __repr__(self) -> str:
        return f"Flow({self.layer!r}, base={self.base!r})"
