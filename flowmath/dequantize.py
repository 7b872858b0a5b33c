"""Dequantisation: continuous densities as models of discrete data, and bits per dimension.

Discrete data ``x`` in ``{0, ..., K-1}^D`` (``K = levels``) are modelled by a continuous density
``p`` on ``[0, 1)^D`` through the probability of the cell of ``x``:

.. math:: P(x) = \\int_{[0,1)^D} p\\Big(\\frac{x + u}{K}\\Big) K^{-D}\\, du
    = \\mathbb{E}_{q(u \\mid x)}\\Big[\\frac{p((x + u)/K)\\, K^{-D}}{q(u \\mid x)}\\Big].

Jensen's inequality gives the evidence lower bound (ELBO) for any density ``q(u|x)`` on
``[0, 1)^D``; ``q = U(0, 1)^D`` is *uniform dequantisation* (Theis et al. 2016):

.. math:: \\log P(x) \\ge \\mathbb{E}_{q}[\\log p(y) - \\log q(u \\mid x)] - D \\ln K,
    \\qquad y = (x + u)/K,

with equality iff ``q(u|x)`` is ``p`` restricted to the cell. :class:`UniformDequantizer` is
``q = U(0,1)``; :class:`VariationalDequantizer` is a conditional flow ``q(u|x)`` (Ho et al.
2019) that contains the uniform one as the special case of zero parameters. :func:`elbo`
estimates the bound, :func:`importance_weighted_log_prob` the tighter ``S``-sample
importance-weighted bound, which increases with ``S`` towards ``log P(x)`` (Burda et al. 2016).
:func:`bits_per_dim` converts (negative) log-likelihoods in nats to bits per dimension.

Every function that takes a model takes it as a ``log_prob`` callable mapping a batch ``y`` of
shape ``(n, ...)`` to ``log p(y)`` of shape ``(n,)``, e.g. ``lambda y: flow.log_prob(params, y)``
for a :class:`flowmath.Flow`; everything is differentiable by autograd with respect to the
parameters the callable closes over and to the dequantizer's parameters (NumPy only, no CuPy).

References
----------
Theis, van den Oord and Bethge (2016), A note on the evaluation of generative models,
arXiv:1511.01844. Ho, Chen, Srinivas, Duan and Abbeel (2019), Flow++, arXiv:1902.00275.
Burda, Grosse and Salakhutdinov (2016), Importance weighted autoencoders, arXiv:1509.00519.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import autograd.numpy as anp
import numpy as np
from autograd.scipy.special import logsumexp

from ._checks import _shape_str, check_array, check_int, check_rng
from ._xp import getval, to_numpy
from .layers.base import Bijection

__all__ = [
    "UniformDequantizer",
    "VariationalDequantizer",
    "bits_per_dim",
    "elbo",
    "importance_weighted_log_prob",
    "uniform_dequantize",
]


_CHUNK_ELEMENTS = 1 << 22  # dequantised values drawn per model call in elbo / importance sampling


# -- validation ----------------------------------------------------------------------------------
def _check_levels(levels) -> int:
    return check_int(levels, "levels", minimum=2)


def _check_discrete(x, levels: int, name: str = "x"):
    """``x`` batch-first, integer-valued in ``0..levels-1``; returns (x as float, dtype)."""
    raw = getval(x)
    if not hasattr(raw, "shape") or not hasattr(raw, "dtype"):
        raise TypeError(f"`{name}` must be an array; got {type(raw).__name__}")
    if raw.ndim < 2 or raw.shape[0] == 0:
        raise ValueError(
            f"`{name}` must have shape (n, ...) with n >= 1 and at least one event axis; "
            f"got {_shape_str(raw.shape)}"
        )
    dtype = check_array(x, name)
    values = to_numpy(x)
    if not np.all(values == np.floor(values)):
        raise ValueError(f"`{name}` must hold integer values (discrete data); got non-integers")
    lo, hi = values.min(), values.max()
    if lo < 0 or hi > levels - 1:
        raise ValueError(
            f"`{name}` must lie in 0..{levels - 1} for `levels` = {levels}; got range [{lo}, {hi}]"
        )
    return np.asarray(values, dtype=dtype), dtype


def _call_log_prob(log_prob, y, n):
    out = log_prob(y)
    shape = getattr(getval(out), "shape", None)
    if shape != (n,):
        raise ValueError(
            f"`log_prob` must map a batch of {n} samples to an array of shape ({n},); "
            f"got {'a ' + type(getval(out)).__name__ if shape is None else _shape_str(shape)}"
        )
    return out


def _event_size(x) -> int:
    return int(np.prod(getval(x).shape[1:]))


# -- uniform dequantisation ----------------------------------------------------------------------
def uniform_dequantize(x, levels: int, rng: np.random.Generator):
    """Uniformly dequantised data ``y = (x + u) / K``, ``u ~ U[0, 1)^D``.

    .. math:: y = \\frac{x + u}{K} \\in [0, 1)^D, \\qquad u \\sim U[0, 1)^D.

    Parameters
    ----------
    x : ndarray, shape (n, ...)
        Integer-valued data in ``0 .. levels - 1`` (any integer or floating dtype; float32 input
        gives float32 output, anything else float64).
    levels : int
        Number of levels ``K`` (e.g. 256 for 8-bit images).
    rng : numpy.random.Generator

    Returns
    -------
    y : ndarray, same shape as ``x``

    References
    ----------
    Theis, van den Oord and Bethge (2016), arXiv:1511.01844.

    Examples
    --------
    >>> import numpy as np
    >>> from flowmath.dequantize import uniform_dequantize
    >>> y = uniform_dequantize(np.array([[0, 255]]), 256, np.random.default_rng(0))
    >>> bool(0 <= y[0, 0] < 1 / 256 and 255 / 256 <= y[0, 1] < 1)
    True
    """
    levels = _check_levels(levels)
    check_rng(rng)
    xf, dtype = _check_discrete(x, levels)
    u = rng.uniform(size=xf.shape).astype(dtype, copy=False)
    return (xf + u) / dtype.type(levels)


# -- dequantizers: q(u | x) ----------------------------------------------------------------------
class UniformDequantizer:
    """The uniform dequantizer ``q(u|x) = U[0, 1)^D`` (no parameters; ``log q = 0``).

    It has the interface of :class:`VariationalDequantizer`: ``init`` returns ``None``,
    ``sample`` returns ``(u, log_q)`` and ``log_prob`` evaluates ``log q(u|x)``.
    """

    def init(self, rng: np.random.Generator, x, levels: int):
        check_rng(rng)
        return None

    def sample(self, params, x, levels: int, rng: np.random.Generator):
        """``(u, log_q)``: ``u ~ U[0,1)`` of the shape and dtype of ``x``; ``log_q`` zeros (n,)."""
        check_rng(rng)
        xf, _ = _check_discrete(x, _check_levels(levels))
        u = rng.uniform(size=xf.shape).astype(xf.dtype, copy=False)
        return u, np.zeros(xf.shape[0], dtype=xf.dtype)

    def log_prob(self, params, x, levels: int, u):
        """``log q(u|x) = 0`` on ``[0, 1)^D``."""
        u = to_numpy(u)
        if np.any((u < 0) | (u > 1)):
            raise ValueError("`u` must lie in [0, 1] where the uniform density is supported")
        return np.zeros(u.shape[0], dtype=u.dtype)

    def __repr__(self) -> str:
        return "UniformDequantizer()"


def _softplus(a):
    return anp.logaddexp(0.0, a)


class VariationalDequantizer:
    """A conditional flow ``q(u|x)`` on ``(0, 1)^D`` for variational dequantisation.

    Sampling pushes standard logistic noise through an optional unconditional bijection ``g``,
    an affine map whose shift and log-scale an MLP computes from ``x``, and a sigmoid:

    .. math:: \\varepsilon \\sim \\mathrm{Logistic}(0, 1)^D,\\quad w = g^{-1}(\\varepsilon),\\quad
        z = \\mu(x) + e^{s(x)} \\odot w,\\quad u = \\sigma(z),

    .. math:: \\log q(u \\mid x) = \\log \\pi(\\varepsilon) + \\log|\\det J_g(w)|
        - \\sum_i s_i(x) - \\sum_i \\log \\sigma'(z_i).

    Why this family: the standard logistic density is :math:`\\sigma'`, so with ``g`` absent and
    ``mu = s = 0`` the sigmoid maps it to exactly ``U(0,1)`` and ``log q = 0``; uniform
    dequantisation is the special case of zero parameters, and :meth:`init` starts there (the
    MLP's last layer is zero), so training can only tighten the bound from the uniform one. The
    sigmoid keeps ``u`` in the cell for every parameter value (Flow++ uses the same final
    sigmoid).

    Parameters
    ----------
    hidden : tuple of int
        Hidden widths of the conditioner MLP (tanh); ``()`` gives an affine conditioner.
    layer : Bijection, optional
        An unconditional vector bijection ``g`` acting on the flattened noise ``(n, D)`` (e.g.
        ``fm.Chain([fm.LULinear(), ...])``) to correlate the coordinates of ``u``. With a layer,
        the zero-parameter ``q`` is no longer uniform (``g`` is drawn generic at ``init``).

    Notes
    -----
    Images ``(n, c, h, w)`` are flattened to ``(n, D)`` inside ``q``; ``u`` comes back in the
    shape of ``x``. The conditioner sees ``2 x / (K - 1) - 1``.

    References
    ----------
    Ho, Chen, Srinivas, Duan and Abbeel (2019), Flow++: Improving flow-based generative models
    with variational dequantization and architecture design, arXiv:1902.00275.

    Examples
    --------
    >>> import numpy as np
    >>> from flowmath.dequantize import VariationalDequantizer
    >>> rng = np.random.default_rng(0)
    >>> x = rng.integers(0, 4, size=(5, 3))
    >>> q = VariationalDequantizer(hidden=(8,))
    >>> params = q.init(rng, x, 4)
    >>> u, log_q = q.sample(params, x, 4, rng)
    >>> u.shape, bool(np.allclose(log_q, 0.0))
    ((5, 3), True)
    """

    def __init__(self, hidden=(64, 64), layer: Bijection | None = None):
        hidden = tuple(hidden)
        for i, h in enumerate(hidden):
            check_int(h, f"hidden[{i}]", minimum=1)
        if layer is not None and not isinstance(layer, Bijection):
            raise TypeError(f"`layer` must be a Bijection or None; got {type(layer).__name__}")
        self.hidden = hidden
        self.layer = layer

    def init(self, rng: np.random.Generator, x, levels: int):
        """Parameters ``{"net": [{"W": (fan_in, fan_out), "b": (fan_out,)}, ...]}`` (flowmath's
        MLP layout, as :func:`flowmath.nets.mlp_init`; plus ``"layer"`` with a layer); the last
        MLP layer is zero, so that ``q`` starts uniform when there is no layer."""
        check_rng(rng)
        levels = _check_levels(levels)
        xf, dtype = _check_discrete(x, levels)
        d = _event_size(xf)
        widths = (d,) + self.hidden
        net = []
        for fan_in, fan_out in zip(widths[:-1], widths[1:], strict=True):
            w = rng.standard_normal((fan_in, fan_out)) / math.sqrt(fan_in)
            net.append({"W": w.astype(dtype), "b": np.zeros(fan_out, dtype)})
        net.append({"W": np.zeros((widths[-1], 2 * d), dtype), "b": np.zeros(2 * d, dtype)})
        params = {"net": net}  # no None leaves: autograd cannot differentiate through them
        if self.layer is not None:
            eps = rng.logistic(size=(xf.shape[0], d)).astype(dtype)
            params["layer"] = self.layer.init(rng, eps)
        return params

    def _shift_logscale(self, params, xf, levels):
        n = xf.shape[0]
        d = _event_size(xf)
        h = 2.0 * anp.reshape(xf, (n, d)) / (levels - 1) - 1.0
        net = params["net"]
        for k in range(len(net) - 1):
            h = anp.tanh(anp.dot(h, net[k]["W"]) + net[k]["b"])
        out = anp.dot(h, net[-1]["W"]) + net[-1]["b"]
        return out[:, :d], out[:, d:]

    def sample(self, params, x, levels: int, rng: np.random.Generator):
        """Draw ``u ~ q(u|x)`` (shape of ``x``) with ``log q(u|x)`` (shape ``(n,)``).

        Differentiable with respect to ``params`` (reparametrisation). The logistic noise is
        ``logit(v)``, ``v ~ U[0,1)`` (``v = 0``, probability 2^-53, is nudged to the smallest
        normal float), so that with zero parameters ``u`` reproduces ``v`` to rounding.
        """
        check_rng(rng)
        levels = _check_levels(levels)
        xf, _ = _check_discrete(x, levels)
        n, d = xf.shape[0], _event_size(xf)
        v = rng.uniform(size=(n, d))
        v = np.clip(v, np.finfo(np.float64).tiny, None).astype(xf.dtype, copy=False)
        eps = np.log(v) - np.log1p(-v)
        # log pi(eps) for the standard logistic: -softplus(eps) - softplus(-eps) = log sigma'(eps)
        log_q = -anp.sum(_softplus(eps) + _softplus(-eps), axis=1)
        w = eps
        if self.layer is not None:
            w, logdet_inv = self.layer.inverse(params["layer"], eps)
            log_q = log_q - logdet_inv  # log|det J_g(w)| = -log|det J_{g^-1}(eps)|
        mu, s = self._shift_logscale(params, xf, levels)
        z = mu + anp.exp(s) * w
        u = 1.0 / (1.0 + anp.exp(-z))
        log_q = log_q - anp.sum(s, axis=1) + anp.sum(_softplus(z) + _softplus(-z), axis=1)
        return anp.reshape(u, xf.shape), log_q

    def log_prob(self, params, x, levels: int, u):
        """``log q(u|x)`` for given ``u`` in ``(0, 1)^D`` (shape of ``x``), shape ``(n,)``."""
        levels = _check_levels(levels)
        xf, _ = _check_discrete(x, levels)
        n, d = xf.shape[0], _event_size(xf)
        uu = to_numpy(u)
        if uu.shape != xf.shape:
            raise ValueError(
                f"`u` must have the shape of `x` {_shape_str(xf.shape)}; got {_shape_str(uu.shape)}"
            )
        if np.any((uu <= 0) | (uu >= 1)):
            raise ValueError("`u` must lie in the open interval (0, 1) where q is supported")
        u = anp.reshape(u, (n, d))
        z = anp.log(u) - anp.log1p(-u)
        mu, s = self._shift_logscale(params, xf, levels)
        w = (z - mu) * anp.exp(-s)
        log_q = -anp.sum(s, axis=1) + anp.sum(_softplus(z) + _softplus(-z), axis=1)
        eps = w
        if self.layer is not None:
            eps, logdet = self.layer.forward(params["layer"], w)
            log_q = log_q + logdet
        return log_q - anp.sum(_softplus(eps) + _softplus(-eps), axis=1)

    def __repr__(self) -> str:
        return f"VariationalDequantizer(hidden={self.hidden!r}, layer={self.layer!r})"


def _log_weights(log_prob, x, levels, rng, dequantizer, params, n_samples):
    """The ``(n_samples, n)`` log importance weights ``log p(y) - D ln K - log q(u|x)``."""
    levels = _check_levels(levels)
    check_rng(rng)
    if not callable(log_prob):
        raise TypeError(
            f"`log_prob` must be callable (y -> log p(y)); got {type(log_prob).__name__}"
        )
    n_samples = check_int(n_samples, "n_samples", minimum=1)
    xf, dtype = _check_discrete(x, levels)
    if dequantizer is None:
        dequantizer = UniformDequantizer()
    if not (hasattr(dequantizer, "sample") and hasattr(dequantizer, "log_prob")):
        raise TypeError(
            f"`dequantizer` must provide sample(params, x, levels, rng) and log_prob(...); "
            f"got {type(dequantizer).__name__}"
        )
    n, d = xf.shape[0], _event_size(xf)
    shift = d * math.log(levels)
    # Draw the samples in chunks of k copies of the batch (one model call per chunk, memory
    # bounded by _CHUNK_ELEMENTS); the random stream is consumed sample by sample in the same
    # order whatever the chunking, so a given seed gives nested sample sets for growing S.
    chunk = max(1, _CHUNK_ELEMENTS // (n * d))
    rows = []
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        xs = np.tile(xf, (k,) + (1,) * (xf.ndim - 1))
        u, log_q = dequantizer.sample(params, xs, levels, rng)
        y = (xs + u) / levels
        logw = _call_log_prob(log_prob, y, k * n) - shift - log_q
        rows.append(anp.reshape(logw, (k, n)))
        done += k
    return rows[0] if len(rows) == 1 else anp.concatenate(rows, axis=0)


def elbo(
    log_prob: Callable,
    x,
    levels: int,
    rng: np.random.Generator,
    *,
    dequantizer=None,
    params=None,
    n_samples: int = 1,
):
    """Monte Carlo estimate of the dequantisation lower bound on ``log P(x)`` (nats), per sample.

    .. math:: \\mathcal{L}(x) = \\mathbb{E}_{u \\sim q(\\cdot\\mid x)}\\big[\\log p\\big(
        \\tfrac{x + u}{K}\\big) - \\log q(u \\mid x)\\big] - D \\ln K \\;\\le\\; \\log P(x),

    estimated by the mean over ``n_samples`` draws (unbiased for the bound). With
    ``dequantizer=None`` (:class:`UniformDequantizer`) this is the uniform dequantisation bound
    :math:`\\mathbb{E}_u \\log p(y) - D\\ln K`.

    Parameters
    ----------
    log_prob : callable
        ``y`` (shape ``(n, ...)``, values in ``[0, 1)``) -> ``log p(y)`` (shape ``(n,)``).
    x : ndarray, shape (n, ...)
        Integer-valued data in ``0 .. levels - 1``.
    levels : int
        Number of levels ``K``.
    rng : numpy.random.Generator
    dequantizer : UniformDequantizer or VariationalDequantizer, optional
        ``q(u|x)``; default uniform.
    params : pytree, optional
        The dequantizer's parameters (``None`` for the uniform one).
    n_samples : int
        Number of draws of ``u`` per data point averaged.

    Returns
    -------
    ndarray, shape (n,)
        Differentiable by autograd (reparametrisation) in the model's and ``q``'s parameters.

    References
    ----------
    Theis et al. (2016), arXiv:1511.01844; Ho et al. (2019), Flow++, arXiv:1902.00275.

    Examples
    --------
    The uniform density on the unit cube scores exactly ``-D ln K``, i.e. ``log2 K`` bits/dim:

    >>> import numpy as np
    >>> from flowmath.dequantize import bits_per_dim, elbo
    >>> x = np.zeros((4, 3), dtype=int)
    >>> bound = elbo(lambda y: np.zeros(len(y)), x, 16, np.random.default_rng(0))
    >>> bits_per_dim(bound, 3).tolist()
    [4.0, 4.0, 4.0, 4.0]
    """
    logw = _log_weights(log_prob, x, levels, rng, dequantizer, params, n_samples)
    return anp.mean(logw, axis=0)


def importance_weighted_log_prob(
    log_prob: Callable,
    x,
    levels: int,
    rng: np.random.Generator,
    *,
    n_samples: int,
    dequantizer=None,
    params=None,
):
    """The ``S``-sample importance-weighted estimate of ``log P(x)`` (nats), per sample.

    .. math:: \\hat{\\mathcal{L}}_S(x) = \\log \\frac{1}{S} \\sum_{s=1}^{S}
        \\frac{p((x + u_s)/K)\\, K^{-D}}{q(u_s \\mid x)}, \\qquad u_s \\sim q(\\cdot \\mid x).

    The average inside the log is an unbiased estimate of ``P(x)``, so by Jensen
    :math:`\\mathbb{E}\\hat{\\mathcal{L}}_S \\le \\log P(x)`; the expectation is non-decreasing in
    ``S`` (Burda et al. 2016, Theorem 1), equals :func:`elbo`'s bound at ``S = 1`` and converges
    to ``log P(x)`` as ``S -> inf`` when the weights are bounded, with gap
    :math:`\\approx \\mathrm{Var}(w) / (2 S P(x)^2)` for large ``S``.

    Parameters
    ----------
    log_prob, x, levels, rng, dequantizer, params
        As in :func:`elbo`.
    n_samples : int
        ``S``, the number of importance samples per data point.

    Returns
    -------
    ndarray, shape (n,)

    References
    ----------
    Burda, Grosse and Salakhutdinov (2016), Importance weighted autoencoders, arXiv:1509.00519;
    Ho et al. (2019), Flow++, arXiv:1902.00275 (its test log-likelihoods use this estimate).
    """
    logw = _log_weights(log_prob, x, levels, rng, dequantizer, params, n_samples)
    return logsumexp(logw, axis=0) - math.log(logw.shape[0])


def bits_per_dim(log_p, dim: int, levels: int | None = None):
    """Negative log-likelihood in bits per dimension.

    .. math:: \\mathrm{bpd} = -\\frac{\\log P(x)}{D \\ln 2}
        \\quad\\text{or, for a density of } y = (x + u)/K \\text{ on } [0,1)^D:\\quad
        \\mathrm{bpd} = -\\frac{\\log p(y) - D \\ln K}{D \\ln 2}.

    Parameters
    ----------
    log_p : float or ndarray
        Log-likelihoods in nats: of the discrete data (``levels=None``; e.g. the output of
        :func:`elbo`), or the log-density of data rescaled to ``[0, 1)^D`` (``levels=K``: the
        ``D ln K`` of the rescaling is subtracted first).
    dim : int
        ``D``, the number of dimensions (e.g. 784 for MNIST).
    levels : int, optional
        ``K``.

    Returns
    -------
    float or ndarray, the shape of ``log_p``

    References
    ----------
    Theis et al. (2016), arXiv:1511.01844; Dinh, Krueger and Bengio (2014), NICE,
    arXiv:1410.8516 (their 1980.50 nats on MNIST is 4.356 bits/dim).

    Examples
    --------
    >>> from flowmath.dequantize import bits_per_dim
    >>> round(float(bits_per_dim(1980.50, 784, levels=256)), 3)
    4.356
    """
    dim = check_int(dim, "dim", minimum=1)
    shift = 0.0 if levels is None else dim * math.log(_check_levels(levels))
    return -(log_p - shift) / (dim * math.log(2.0))
