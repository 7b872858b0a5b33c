r"""Log-determinant estimators for residual blocks :math:`F(x) = x + g(x)`, Lip(g) < 1.

Each of ``n`` samples has its own Jacobian :math:`J_i = \partial g / \partial x (x_i)` (``d x d``),
seen only through vector-Jacobian products: ``vjp(V)`` maps ``V`` of shape ``(n, d)`` (row ``i``
a vector for sample ``i``) to the rows :math:`v_i^\top J_i`, shape ``(n, d)``. ``vjp`` may be
traced by autograd (a closure over the layer's parameters and input); everything here is then
differentiable, written without in-place assignment.

All estimators expand

.. math::
    \log\det(I + J) = \operatorname{tr}\log(I + J)
    = \sum_{k=1}^{\infty} \frac{(-1)^{k+1}}{k} \operatorname{tr}(J^k),
    \qquad \rho(J) < 1,

and estimate every trace with ONE probe ``v`` shared by all terms (the products
:math:`v^\top J^k` come from ``k`` repeated ``vjp`` calls):

* :func:`power_series_logdet` -- the i-ResNet estimator, truncated after ``n_terms`` terms
  (biased; :func:`series_truncation_bound`, :func:`choose_n_terms`, and the exact bias and
  standard deviation for a linear block, :func:`power_series_bias_std`);
* :func:`roulette_logdet` -- the Residual Flows Russian-roulette estimator (unbiased);
* :func:`neumann_logdet` -- the roulette estimate whose autograd gradient is the Neumann-series
  gradient estimator, so that training does not backpropagate through every term;
* :func:`exact_logdet` -- the exact sibling from dense Jacobians (small ``d``).

Backends: NumPy and autograd; probes and roulette draws are made on the host with NumPy.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import numpy as np
from scipy import special

from .._checks import (
    check_choice,
    check_float_dtype,
    check_int,
    check_positive,
    check_probability,
    check_rng,
)
from .._xp import array_namespace, getval, is_box
from .trace import PROBES, check_finite_output, draw_probes

__all__ = [
    "DISTRIBUTIONS",
    "RouletteEstimate",
    "SeriesMoments",
    "choose_n_terms",
    "exact_logdet",
    "neumann_logdet",
    "power_series_bias_std",
    "power_series_logdet",
    "power_series_partial_sums",
    "roulette_logdet",
    "roulette_std",
    "roulette_survival",
    "series_truncation_bound",
]

#: Distributions of the roulette's random number of terms ``N``.
DISTRIBUTIONS = ("geometric", "poisson")


class RouletteEstimate(NamedTuple):
    """What :func:`roulette_logdet` and :func:`neumann_logdet` return.

    Attributes
    ----------
    logdet : array, shape (n,)
        The estimates of :math:`\\log\\det(I + J_i)` (an autograd tracer when ``vjp`` is traced).
    n_terms : ndarray of int, shape (n,)
        Number of series terms in sample ``i``'s estimate, ``N_i + n_exact``.
    n_matvecs : int
        Number of ``vjp`` calls made (each on the whole batch), all probes together:
        ``n_probes * (max_i N_i + n_exact)``, plus ``n_probes`` for the Neumann surrogate.
    """

    logdet: object
    n_terms: np.ndarray
    n_matvecs: int


class SeriesMoments(NamedTuple):
    """Exact moments of the power-series estimator for a fixed linear ``J``
    (see :func:`power_series_bias_std`); arrays indexed by ``n_terms - 1``."""

    logdet: float
    mean: np.ndarray
    bias: np.ndarray
    std: np.ndarray


# --------------------------------------------------------------------------------------------
# validation helpers


def _check_lipschitz(lipschitz) -> float:
    if isinstance(lipschitz, bool) or not isinstance(lipschitz, numbers.Real):
        raise TypeError(
            f"`lipschitz` must be a real number; got {type(lipschitz).__name__} {lipschitz!r}"
        )
    L = float(lipschitz)
    if not (0.0 <= L < 1.0):
        raise ValueError(
            f"`lipschitz` must lie in [0, 1) (the series converges only for Lip(g) < 1); got {L!r}"
        )
    return L


def _check_vjp_out(out, n: int, dim: int):
    shape = getattr(getval(out), "shape", None)
    if shape != (n, dim):
        raise ValueError(
            f"`vjp` must map an array of shape ({n}, {dim}) (row i a vector for sample i) to the "
            f"same shape; got {shape}"
        )
    check_finite_output(out, "vjp")
    return out


def _get_probes(rng, probes, n_probes, n, dim, probe, dtype):
    """Probes of shape (n_probes, n, dim): drawn from ``rng``, or the caller's ``probes``."""
    if probes is None:
        check_rng(rng)
        return draw_probes(rng, (n_probes, n, dim), probe, dtype)
    arr = np.asarray(probes)
    if arr.shape != (n_probes, n, dim):
        raise ValueError(
            f"`probes` must have shape (n_probes, n, dim) = ({n_probes}, {n}, {dim}); "
            f"got {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("`probes` must be finite; got non-finite values")
    return arr.astype(dtype)


def _common_args(n, dim, n_probes, probe, dtype):
    n = check_int(n, "n", minimum=1)
    dim = check_int(dim, "dim", minimum=1)
    n_probes = check_int(n_probes, "n_probes", minimum=1)
    check_choice(probe, "probe", PROBES)
    return n, dim, n_probes, check_float_dtype(dtype)


def _check_roulette_args(p, distribution, lam, n_exact):
    check_choice(distribution, "distribution", DISTRIBUTIONS)
    p = check_probability(p, "p")  # (0, 1]
    lam = check_positive(lam, "lam")
    n_exact = check_int(n_exact, "n_exact", minimum=0)
    return p, distribution, lam, n_exact


# --------------------------------------------------------------------------------------------
# the series passes


def _series_value(vjp, V, coef, n, dim):
    r"""Traced pass: :math:`\frac1m\sum_{probes}\sum_k c_k \frac{(-1)^{k+1}}{k} v^\top J^k v`.

    ``V``: probes (m, n, dim); ``coef``: (K, n) term weights (ones for the plain series).
    """
    total = 0.0
    for v in V:
        w = v
        for k in range(1, coef.shape[0] + 1):
            w = _check_vjp_out(vjp(w), n, dim)
            xp = array_namespace(w)
            total = total + ((-1.0) ** (k + 1) / k) * coef[k - 1] * xp.sum(w * v, axis=1)
    return total / V.shape[0]


def _neumann_pass(vjp, V, coef, n, dim):
    r"""Untraced series pass plus one traced ``vjp`` for the Neumann-gradient surrogate.

    Returns ``(value, surrogate)`` where ``value`` (a constant) is the series estimate and
    ``surrogate`` has value 0 and autograd gradient
    :math:`\frac1m\sum_{probes} u^\top \partial J\, v` with
    :math:`u^\top = \sum_{k=0}^{K} (-1)^k c_k v^\top J^k` (``c_0 = 1``).
    """
    value = np.zeros(n, dtype=V.dtype)
    surrogate = 0.0
    traced = None
    for v in V:
        w = v
        u = v
        for k in range(1, coef.shape[0] + 1):
            out = _check_vjp_out(vjp(w), n, dim)
            if traced is None:
                traced = is_box(out)
            # stop the gradient: these K products are never backpropagated
            w = np.asarray(getval(out))
            value = value + ((-1.0) ** (k + 1) / k) * coef[k - 1] * np.sum(w * v, axis=1)
            u = u + ((-1.0) ** k) * coef[k - 1][:, None] * w
        if traced is False:
            continue  # nothing is traced: the surrogate would be exactly zero
        s = _check_vjp_out(vjp(u), n, dim)
        xp = array_namespace(s)
        s = xp.sum(s * v, axis=1)
        if is_box(s):
            traced = True
            surrogate = surrogate + (s - getval(s))
    return value / V.shape[0], (surrogate / V.shape[0] if traced else None)


# --------------------------------------------------------------------------------------------
# power series


def power_series_logdet(
    vjp,
    n: int,
    dim: int,
    *,
    n_terms: int = 10,
    n_probes: int = 1,
    probe: str = "gaussian",
    rng=None,
    probes=None,
    dtype=np.float64,
):
    r"""Truncated power-series estimate of :math:`\log\det(I + J_i)` (i-ResNet, Algorithm 2).

    .. math::
        \widehat{\log\det}(I + J) = \frac{1}{m}\sum_{j=1}^{m}\sum_{k=1}^{n}
        \frac{(-1)^{k+1}}{k}\, v_j^\top J^k v_j
        \;=\; \frac{1}{m}\sum_{j} v_j^\top M_n v_j,
        \qquad M_n = \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k} J^k,

    with ONE probe :math:`v_j` per sample shared by all ``n`` terms. Its mean is
    :math:`\operatorname{tr} M_n`: biased by at most :func:`series_truncation_bound`
    (exact bias and standard deviation for a linear block: :func:`power_series_bias_std`).
    Costs ``n_terms * n_probes`` ``vjp`` calls; differentiable by autograd through every term.

    Parameters
    ----------
    vjp : callable
        ``vjp(V)``, ``V`` of shape ``(n, dim)``, returns the rows :math:`v_i^\top J_i`.
    n : int
        Number of samples (rows).
    dim : int
        Dimension ``d`` of each Jacobian.
    n_terms : int, optional
        Number of series terms, ``>= 1``.
    n_probes : int, optional
        Probes per sample ``m``, ``>= 1`` (the estimates are averaged).
    probe : {"gaussian", "rademacher"}, optional
    rng : numpy.random.Generator
        Source of the probes; required unless ``probes`` is given.
    probes : array of shape (n_probes, n, dim), optional
        Use these probes instead of drawing them (common random numbers; exact expectations
        with a finite isotropic set such as :math:`\sqrt{d}\, e_j`).
    dtype : float32 or float64, optional
        dtype of the probes (pass the input's dtype: float32 in, float32 out).

    Returns
    -------
    array, shape (n,)

    References
    ----------
    Behrmann, J., Grathwohl, W., Chen, R. T. Q., Duvenaud, D., Jacobsen, J.-H. (2019).
    Invertible residual networks. ICML 2019. arXiv:1811.00995.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[0.2, 0.1], [0.0, -0.3]])        # linear block g(x) = W x: J = W
    >>> est = power_series_logdet(lambda V: V @ W, 4000, 2, n_terms=20,
    ...                           rng=np.random.default_rng(0))
    >>> exact = np.linalg.slogdet(np.eye(2) + W)[1]
    >>> bool(abs(est.mean() - exact) < 4 * est.std() / np.sqrt(4000))
    True
    """
    n, dim, n_probes, dtype = _common_args(n, dim, n_probes, probe, dtype)
    n_terms = check_int(n_terms, "n_terms", minimum=1)
    V = _get_probes(rng, probes, n_probes, n, dim, probe, dtype)
    coef = np.ones((n_terms, n), dtype=dtype)
    return _series_value(vjp, V, coef, n, dim)


def power_series_partial_sums(
    vjp,
    n: int,
    dim: int,
    *,
    n_terms: int = 10,
    n_probes: int = 1,
    probe: str = "gaussian",
    rng=None,
    probes=None,
    dtype=np.float64,
):
    r"""All truncations of :func:`power_series_logdet` at once, with the same probes.

    Row ``j`` (``j = 0 .. n_terms - 1``) is the estimate with ``j + 1`` terms,
    :math:`\frac1m\sum_{probes} v^\top M_{j+1} v` -- exactly what
    :func:`power_series_logdet` returns for ``n_terms = j + 1`` and the same probes, for the cost
    of the longest one (``n_terms * n_probes`` ``vjp`` calls). Used to draw bias and standard
    deviation against the number of terms (i-ResNet, Figure 4).

    Parameters
    ----------
    Same as :func:`power_series_logdet`.

    Returns
    -------
    array, shape (n_terms, n)

    References
    ----------
    Behrmann, J. et al. (2019). Invertible residual networks. ICML 2019. arXiv:1811.00995.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[0.2, 0.1], [0.0, -0.3]])
    >>> V = np.random.default_rng(0).standard_normal((1, 5, 2))
    >>> S = power_series_partial_sums(lambda V: V @ W, 5, 2, n_terms=4, probes=V)
    >>> bool(np.allclose(S[2], power_series_logdet(lambda V: V @ W, 5, 2, n_terms=3, probes=V)))
    True
    """
    n, dim, n_probes, dtype = _common_args(n, dim, n_probes, probe, dtype)
    n_terms = check_int(n_terms, "n_terms", minimum=1)
    V = _get_probes(rng, probes, n_probes, n, dim, probe, dtype)
    partial = [0.0] * n_terms
    for v in V:
        w = v
        total = 0.0
        for k in range(1, n_terms + 1):
            w = _check_vjp_out(vjp(w), n, dim)
            xp = array_namespace(w)
            total = total + ((-1.0) ** (k + 1) / k) * xp.sum(w * v, axis=1)
            partial[k - 1] = partial[k - 1] + total
    xp = array_namespace(*partial)
    return xp.stack(partial) / n_probes


# --------------------------------------------------------------------------------------------
# Russian roulette


def roulette_survival(k, *, distribution: str = "geometric", p: float = 0.5, lam: float = 2.0):
    r"""Survival function :math:`P(N \ge k)` of the roulette's number of terms ``N``.

    * ``"geometric"``: :math:`P(N = j) = (1-p)^{j-1} p` on :math:`j \ge 1`, so
      :math:`P(N \ge k) = (1-p)^{k-1}` for :math:`k \ge 1`, :math:`\mathbb{E}N = 1/p`.
    * ``"poisson"``: :math:`N \sim \mathrm{Poisson}(\lambda)` on :math:`j \ge 0`,
      :math:`P(N \ge k) = P(k, \lambda)` (regularised lower incomplete gamma, accurate in the
      tail), :math:`\mathbb{E}N = \lambda`.

    :math:`P(N \ge k) = 1` for :math:`k \le 0` (and for :math:`k = 1` with the geometric law).

    Parameters
    ----------
    k : int or array of int
    distribution : {"geometric", "poisson"}
    p : float in (0, 1]
        Geometric success probability.
    lam : float > 0
        Poisson mean.

    Returns
    -------
    ndarray of float64, the shape of ``k``.

    References
    ----------
    Chen, R. T. Q., Behrmann, J., Duvenaud, D., Jacobsen, J.-H. (2019). Residual flows for
    invertible generative modeling. NeurIPS 2019. arXiv:1906.02735.

    Examples
    --------
    >>> roulette_survival([0, 1, 2, 3], p=0.5).tolist()
    [1.0, 1.0, 0.5, 0.25]
    """
    p, distribution, lam, _ = _check_roulette_args(p, distribution, lam, 0)
    k = np.asarray(k)
    if not np.issubdtype(k.dtype, np.integer):
        raise TypeError(f"`k` must be an integer or integer array; got dtype {k.dtype}")
    if distribution == "geometric":
        return np.power(1.0 - p, np.maximum(k, 1) - 1).astype(np.float64)
    return np.where(k <= 0, 1.0, special.gammainc(np.maximum(k, 1), lam)).astype(np.float64)


#: Default cap on the number of terms ``N + n_exact`` of one roulette estimate.
ROULETTE_MAX_TERMS = 10_000
#: A roulette law is refused when it exceeds the cap with a probability above this: a draw
#: beyond the cap is then practically impossible, and the estimate stays unbiased.
ROULETTE_CAP_PROBABILITY = 1e-12


def check_roulette_cap(
    p: float = 0.5,
    n_exact: int = 1,
    *,
    distribution: str = "geometric",
    lam: float = 2.0,
    max_terms: int = ROULETTE_MAX_TERMS,
) -> int:
    r"""Refuse a roulette law whose number of terms is not bounded in practice.

    The estimate runs :math:`N + m` terms (``m = n_exact``) with ``N`` unbounded in law; the
    law is accepted when :math:`P(N + m > 	ext{max\_terms}) \le 10^{-12}`
    (``ROULETTE_CAP_PROBABILITY``) -- for the geometric law and the default cap of 10 000
    terms, ``p >= 2.8e-3``. Returns ``max_terms``.

    Raises
    ------
    ValueError
        Naming ``p`` (or ``lam``), the tail probability and the cap.
    """
    p, distribution, lam, n_exact = _check_roulette_args(p, distribution, lam, n_exact)
    max_terms = check_int(max_terms, "max_terms", minimum=1)
    tail = float(
        roulette_survival(max_terms - n_exact + 1, distribution=distribution, p=p, lam=lam)
    )
    if tail > ROULETTE_CAP_PROBABILITY:
        arg = f"`p` = {p!r}" if distribution == "geometric" else f"`lam` = {lam!r}"
        raise ValueError(
            f"{arg} with `n_exact` = {n_exact} needs more than `max_terms` = {max_terms} terms "
            f"with probability {tail:.3g} (> {ROULETTE_CAP_PROBABILITY:g}); the mean number of "
            "terms is "
            f"{(1.0 / p if distribution == 'geometric' else lam) + n_exact:.4g}: "
            "raise `p` (lower `lam`) or `max_terms`"
        )
    return max_terms


def _draw_n(rng, size, distribution, p, lam):
    if distribution == "geometric":
        return rng.geometric(p, size=size).astype(np.int64)
    return rng.poisson(lam, size=size).astype(np.int64)


def _roulette_coef(N, n_exact, distribution, p, lam, dtype):
    """Term weights (K, n): 1 for k <= n_exact, 1[N_i >= k - n_exact] / P(N >= k - n_exact)."""
    K = int(N.max()) + n_exact
    k = np.arange(1, K + 1)[:, None]
    surv = roulette_survival(k - n_exact, distribution=distribution, p=p, lam=lam)
    keep = N[None, :] >= (k - n_exact)
    # every kept term has P(N >= k - n_exact) >= P(N = N_i) > 0
    coef = np.where(keep, 1.0 / np.where(keep, surv, 1.0), 0.0)
    return coef.astype(dtype), K


def _roulette_setup(
    rng,
    probes,
    n,
    dim,
    n_probes,
    probe,
    dtype,
    p,
    distribution,
    lam,
    n_exact,
    per_sample,
    max_terms,
):
    n, dim, n_probes, dtype = _common_args(n, dim, n_probes, probe, dtype)
    p, distribution, lam, n_exact = _check_roulette_args(p, distribution, lam, n_exact)
    max_terms = check_roulette_cap(
        p, n_exact, distribution=distribution, lam=lam, max_terms=max_terms
    )
    check_rng(rng)
    if not isinstance(per_sample, (bool, np.bool_)):
        raise TypeError(f"`per_sample` must be a bool; got {type(per_sample).__name__}")
    # probes first, then N: roulette_logdet and neumann_logdet draw identically from one seed
    V = _get_probes(rng, probes, n_probes, n, dim, probe, dtype)
    N = _draw_n(rng, n if per_sample else 1, distribution, p, lam)
    N = np.broadcast_to(N, (n,))
    if int(N.max()) + n_exact > max_terms:  # probability <= 1e-12 (check_roulette_cap)
        raise ValueError(
            f"the roulette drew N = {int(N.max())} terms, past `max_terms` = {max_terms}"
        )
    coef, K = _roulette_coef(N, n_exact, distribution, p, lam, dtype)
    return n, dim, V, coef, K, (N + n_exact).astype(np.int64)


def roulette_logdet(
    vjp,
    n: int,
    dim: int,
    *,
    p: float = 0.5,
    distribution: str = "geometric",
    lam: float = 2.0,
    n_exact: int = 1,
    n_probes: int = 1,
    probe: str = "gaussian",
    rng,
    per_sample: bool = False,
    probes=None,
    dtype=np.float64,
    max_terms: int = ROULETTE_MAX_TERMS,
) -> RouletteEstimate:
    r"""Unbiased Russian-roulette estimate of :math:`\log\det(I + J_i)` (Residual Flows, eq. 6).

    .. math::
        \widehat{\log\det}(I + J) = \sum_{k=1}^{N + m}
        \frac{(-1)^{k+1}}{k} \frac{v^\top J^k v}{P(N \ge k - m)},
        \qquad P(N \ge j) = 1 \text{ for } j \le 0 \text{ (the ``m`` exact terms)},

    with ``m = n_exact`` and ``N`` drawn from ``distribution`` (:func:`roulette_survival`).
    Term ``k`` enters exactly when :math:`N \ge k - m`, so its weight
    :math:`1/P(N \ge k - m)` makes the estimate unbiased for :math:`\rho(J) < 1`:
    :math:`\mathbb{E}_{N,v} = \sum_k (-1)^{k+1} \operatorname{tr}(J^k)/k`.

    Number of terms: :math:`N + m`, on average :math:`1/p + m` (geometric, whose support starts
    at ``N = 1``) or :math:`\lambda + m` (Poisson, support from ``N = 0``).
    Variance: finite when :math:`\sum_k (\|J\|^k/k)^2 / P(N \ge k - m) < \infty` -- for the
    geometric law when :math:`\|J\|^2 < 1 - p` (``||J|| < 0.707`` at ``p = 0.5``); for the
    Poisson law, whose tail decays factorially, it is infinite for every ``J`` that is not
    nilpotent (the diagonal terms grow like :math:`\rho(J)^{2k} k!/\lambda^k`); the mean is still
    right, and in practice the offending terms need ``N`` far beyond what is ever drawn.
    ``p = 1`` gives ``N = 1``: the deterministic, biased series with ``m + 1`` terms.

    Parameters
    ----------
    vjp, n, dim : as in :func:`power_series_logdet`.
    p : float in (0, 1], optional
        Geometric parameter (used when ``distribution="geometric"``).
    distribution : {"geometric", "poisson"}, optional
    lam : float > 0, optional
        Poisson mean (used when ``distribution="poisson"``).
    n_exact : int >= 0, optional
        Terms always computed, with weight 1.
    n_probes : int >= 1, optional
        Probes per sample; each probe shares the draw of ``N``.
    probe : {"gaussian", "rademacher"}, optional
    rng : numpy.random.Generator
        Source of the probes (drawn first) and of ``N`` (drawn second).
    per_sample : bool, optional
        ``False`` (default, as the Residual Flows code): one ``N`` for the whole batch.
        ``True``: an independent ``N_i`` per sample (the batch runs to :math:`\max_i N_i + m`
        terms; terms past a sample's own ``N_i + m`` are masked out).
    probes : array of shape (n_probes, n, dim), optional
        Use these probes instead of drawing them (``N`` is still drawn from ``rng``).
    dtype : float32 or float64, optional
        dtype of the probes and weights.
    max_terms : int, optional
        Cap on ``N + n_exact``: a law that exceeds it with probability above ``1e-12`` is
        refused with a ``ValueError`` (:func:`check_roulette_cap`), e.g. ``p = 1e-7``.

    Returns
    -------
    RouletteEstimate
        ``(logdet, n_terms, n_matvecs)``: the estimates (shape ``(n,)``; differentiable by
        autograd through every term), the number of terms per sample ``N_i + m``, and the number
        of ``vjp`` calls.

    References
    ----------
    Chen, R. T. Q., Behrmann, J., Duvenaud, D., Jacobsen, J.-H. (2019). Residual flows for
    invertible generative modeling. NeurIPS 2019. arXiv:1906.02735.

    Examples
    --------
    >>> import numpy as np
    >>> W = np.array([[0.2, 0.1], [0.0, -0.3]])
    >>> est = roulette_logdet(lambda V: V @ W, 20000, 2, rng=np.random.default_rng(0),
    ...                       per_sample=True)
    >>> exact = np.linalg.slogdet(np.eye(2) + W)[1]
    >>> bool(abs(est.logdet.mean() - exact) < 4 * est.logdet.std() / np.sqrt(20000))
    True
    >>> bool(abs(est.n_terms.mean() - (1 / 0.5 + 1)) < 0.05)
    True
    """
    n, dim, V, coef, K, n_terms = _roulette_setup(
        rng,
        probes,
        n,
        dim,
        n_probes,
        probe,
        dtype,
        p,
        distribution,
        lam,
        n_exact,
        per_sample,
        max_terms,
    )
    if K == 0:  # Poisson N = 0 and n_exact = 0: the empty sum
        value = np.zeros(n, dtype=V.dtype)
    else:
        value = _series_value(vjp, V, coef, n, dim)
    return RouletteEstimate(value, n_terms, V.shape[0] * K)


def neumann_logdet(
    vjp,
    n: int,
    dim: int,
    *,
    p: float = 0.5,
    distribution: str = "geometric",
    lam: float = 2.0,
    n_exact: int = 1,
    n_probes: int = 1,
    probe: str = "gaussian",
    rng,
    per_sample: bool = False,
    probes=None,
    dtype=np.float64,
    max_terms: int = ROULETTE_MAX_TERMS,
) -> RouletteEstimate:
    r"""Roulette log-det estimate whose autograd gradient is the Neumann-series estimator.

    The VALUE is exactly :func:`roulette_logdet`'s (same arguments, same ``rng`` state: same
    draws). The GRADIENT, with respect to whatever ``vjp`` closes over (parameters, input), is
    the unbiased Neumann-series estimator of
    :math:`\partial \log\det(I + J) = \operatorname{tr}\big((I + J)^{-1} \partial J\big)`
    (Residual Flows, Sec. 3.2, eq. 8):

    .. math::
        \widehat{\partial \log\det} = \Big[\sum_{k=0}^{N + m}
        \frac{(-1)^k}{P(N \ge k - m)} v^\top J^k\Big]\, \partial J\, v ,
        \qquad \mathbb{E}_{N, v} = \operatorname{tr}\big((I+J)^{-1}\partial J\big).

    How: the ``N + m`` products :math:`v^\top J^k` are computed once with the gradient stopped
    (``autograd.tracer.getval``) and give both the value and the vector
    :math:`u^\top = \sum_k (-1)^k c_k v^\top J^k`; one more, traced call ``s = vjp(u) . v``
    (:math:`u^\top J v`) carries the gradient, and the result is
    ``value + (s - getval(s))``. Backpropagation therefore visits ONE ``vjp`` (a
    double-backward through ``g`` once) instead of ``N + m``, and keeps no graph for the other
    terms -- the memory and time saving of the paper.

    How a layer uses it: inside ``_forward(params, x, rng)`` build
    ``vjp = lambda V: <rows V_i^T dg/dx(x_i)>`` from autograd-traced ``params`` and ``x`` (e.g.
    ``autograd.make_vjp`` of ``g`` at ``x``, or an explicit chain of the layer's weights) and
    return ``neumann_logdet(vjp, n, d, rng=rng, ...).logdet`` as the log-det; ``autograd.grad``
    of a loss containing it then uses the Neumann estimator. Outside training (``vjp`` not
    traced) it costs the same as :func:`roulette_logdet` and no extra call is made (except when
    ``N + m = 0``). Only FIRST derivatives are meaningful (the surrogate's second derivative is
    not that of the log-det).

    Parameters
    ----------
    Same as :func:`roulette_logdet`.

    Returns
    -------
    RouletteEstimate
        ``logdet`` as described; ``n_matvecs`` counts the extra traced call.

    References
    ----------
    Chen, R. T. Q., Behrmann, J., Duvenaud, D., Jacobsen, J.-H. (2019). Residual flows for
    invertible generative modeling. NeurIPS 2019. arXiv:1906.02735.

    Examples
    --------
    >>> import autograd, autograd.numpy as anp, numpy as np
    >>> W = np.array([[0.2, 0.1], [0.0, -0.3]])
    >>> def mean_logdet(W, seed):
    ...     est = neumann_logdet(lambda V: anp.dot(V, W), 20000, 2,
    ...                          rng=np.random.default_rng(seed), per_sample=True)
    ...     return anp.mean(est.logdet)
    >>> G = autograd.grad(mean_logdet)(W, 0)
    >>> bool(np.max(np.abs(G - np.linalg.inv(np.eye(2) + W).T)) < 0.05)
    True
    """
    n, dim, V, coef, K, n_terms = _roulette_setup(
        rng,
        probes,
        n,
        dim,
        n_probes,
        probe,
        dtype,
        p,
        distribution,
        lam,
        n_exact,
        per_sample,
        max_terms,
    )
    value, surrogate = _neumann_pass(vjp, V, coef, n, dim)
    calls = V.shape[0] * K + (V.shape[0] if surrogate is not None or K == 0 else 0)
    out = value if surrogate is None else value + surrogate
    return RouletteEstimate(out, n_terms, calls)


# --------------------------------------------------------------------------------------------
# exact sibling, bounds and exact moments


def exact_logdet(jac):
    r"""Exact :math:`\log|\det(I + J_i)|` from dense Jacobians (small ``d``).

    Parameters
    ----------
    jac : array, shape (n, d, d)
        The Jacobians :math:`J_i` of ``g`` (NOT of ``F = I + g``).

    Returns
    -------
    array, shape (n,)
        Differentiable by autograd (``slogdet``).

    Raises
    ------
    ValueError
        When some :math:`I + J_i` is singular.

    References
    ----------
    Behrmann, J. et al. (2019). Invertible residual networks. arXiv:1811.00995.

    Examples
    --------
    >>> import numpy as np
    >>> J = np.array([[[0.5, 0.0], [0.0, -0.5]]])
    >>> np.round(exact_logdet(J), 12).tolist() == [round(float(np.log(1.5 * 0.5)), 12)]
    True
    """
    raw = getval(jac)
    if not hasattr(raw, "shape") or raw.ndim != 3 or raw.shape[1] != raw.shape[2]:
        raise ValueError(
            f"`jac` must have shape (n, d, d); got {getattr(raw, 'shape', type(raw).__name__)}"
        )
    if raw.dtype.kind not in "fiu":
        raise TypeError(f"`jac` must be a real array; got dtype {raw.dtype}")
    check_finite_output(raw, "jac")
    xp = array_namespace(jac)
    d = raw.shape[1]
    eye = np.eye(d, dtype=raw.dtype if raw.dtype in (np.float32, np.float64) else np.float64)
    sign, logabs = xp.linalg.slogdet(eye + jac)
    if np.any(np.asarray(getval(sign)) == 0):
        raise ValueError("`jac`: I + J is singular for some sample (log|det| = -inf)")
    return logabs


def _log_series_tail(L: float, n: int) -> float:
    r""":math:`\sum_{k>n} L^k / k`, accurate also when it is tiny relative to :math:`-\ln(1-L)`."""
    if L == 0.0:
        return 0.0
    total = -math.log1p(-L)
    upper = L ** (n + 1) / ((n + 1) * (1.0 - L))  # >= the tail
    needed = math.ceil(math.log(1e-18) / math.log(L)) + 1  # terms until L^j < 1e-18
    if upper > 1e-3 * total or needed > 10_000_000:
        # no catastrophic cancellation: relative error <= eps * total / tail
        return max(total - math.fsum(L**k / k for k in range(1, n + 1)), 0.0)
    k = np.arange(n + 1, n + 1 + needed, dtype=np.float64)
    return float(math.fsum((np.exp(k * math.log(L)) / k).tolist()))


def series_truncation_bound(lipschitz: float, dim: int, n_terms: int) -> float:
    r"""Bound on the truncation error of the power series after ``n_terms`` terms.

    .. math::
        \Big|\log\det(I + J) - \sum_{k=1}^{n} \frac{(-1)^{k+1}}{k}\operatorname{tr}(J^k)\Big|
        \le d \sum_{k > n} \frac{L^k}{k}
        = d\Big(-\ln(1 - L) - \sum_{k=1}^{n} \frac{L^k}{k}\Big),
        \qquad \|J\|_2 \le L < 1,

    since :math:`|\operatorname{tr}(J^k)| \le d \|J\|_2^k`. Computed without cancellation.

    Parameters
    ----------
    lipschitz : float in [0, 1)
        ``L``, a bound on the spectral norm of ``J`` (the Lipschitz constant of ``g``).
    dim : int >= 1
    n_terms : int >= 1

    Returns
    -------
    float

    References
    ----------
    Behrmann, J. et al. (2019). Invertible residual networks. ICML 2019, Theorem 3.
    arXiv:1811.00995.

    Examples
    --------
    >>> bool(abs(series_truncation_bound(0.5, 2, 1) - 2 * (np.log(2) - 0.5)) < 1e-15)
    True
    """
    L = _check_lipschitz(lipschitz)
    dim = check_int(dim, "dim", minimum=1)
    n_terms = check_int(n_terms, "n_terms", minimum=1)
    return dim * _log_series_tail(L, n_terms)


def choose_n_terms(lipschitz: float, dim: int, bias: float, *, max_terms: int = 1_000_000) -> int:
    r"""Smallest ``n_terms >= 1`` whose :func:`series_truncation_bound` is at most ``bias``.

    Parameters
    ----------
    lipschitz : float in [0, 1)
    dim : int >= 1
    bias : float > 0
        Requested bound on the absolute bias of the power series.
    max_terms : int, optional
        Cap; a requirement needing more terms raises.

    Returns
    -------
    int

    Raises
    ------
    ValueError
        When more than ``max_terms`` terms would be needed.

    References
    ----------
    Behrmann, J. et al. (2019). Invertible residual networks. arXiv:1811.00995.

    Examples
    --------
    >>> choose_n_terms(0.5, 10, 1e-6)
    19
    """
    L = _check_lipschitz(lipschitz)
    dim = check_int(dim, "dim", minimum=1)
    bias = check_positive(bias, "bias")
    max_terms = check_int(max_terms, "max_terms", minimum=1)
    if series_truncation_bound(L, dim, 1) <= bias:
        return 1
    # upper bracket from tail <= L^{n+1} / ((n+1)(1-L)) <= L^{n+1} / (1-L)
    guess = math.log(bias * (1.0 - L) / dim) / math.log(L)
    hi = max(2, math.ceil(guess))
    if hi > max_terms:
        if series_truncation_bound(L, dim, max_terms) > bias:
            raise ValueError(
                f"`bias` = {bias!r} needs more than `max_terms` = {max_terms} terms at "
                f"`lipschitz` = {L!r}, `dim` = {dim}"
            )
        hi = max_terms
    lo = 1  # bound(lo) > bias >= bound(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if series_truncation_bound(L, dim, mid) <= bias:
            hi = mid
        else:
            lo = mid
    return hi


def power_series_bias_std(
    jac, n_terms: int, *, n_probes: int = 1, probe: str = "gaussian"
) -> SeriesMoments:
    r"""Exact mean, bias and standard deviation of the power-series estimator for a linear block.

    For :math:`g(x) = J x` the estimator with ``n`` terms is :math:`v^\top M_n v`,
    :math:`M_n = \sum_{k=1}^{n} (-1)^{k+1} J^k / k`, so

    .. math::
        \text{mean}_n = \operatorname{tr} M_n, \qquad
        \text{bias}_n = \log\det(I + J) - \operatorname{tr} M_n, \qquad
        \text{std}_n = \sqrt{2 \|\operatorname{sym} M_n\|_F^2 / m}\ \text{(Gaussian)},

    with ``m = n_probes`` (Rademacher: :math:`2(\|\operatorname{sym} M_n\|_F^2 -
    \sum_i (M_n)_{ii}^2)/m`; see :func:`~flowmath.estimators.hutchinson_variance`). Note the
    sign convention: ``bias`` is truth minus the estimator's mean.

    Parameters
    ----------
    jac : array, shape (d, d)
        ``J``; needs :math:`\det(I + J) > 0` (true when the spectral radius is below 1).
    n_terms : int >= 1
        Moments are returned for ``n = 1, ..., n_terms``.
    n_probes : int >= 1, optional
    probe : {"gaussian", "rademacher"}, optional

    Returns
    -------
    SeriesMoments
        ``(logdet, mean, bias, std)``; the last three have shape ``(n_terms,)``.

    References
    ----------
    Behrmann, J. et al. (2019). Invertible residual networks. ICML 2019, Figure 4.
    arXiv:1811.00995.

    Examples
    --------
    >>> import numpy as np
    >>> m = power_series_bias_std(np.diag([0.5, -0.5]), 2)
    >>> float(m.mean[0]), round(float(m.mean[1]), 12)
    (0.0, -0.25)
    """
    from .trace import hutchinson_variance

    J = np.asarray(getval(jac))
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"`jac` must have shape (d, d); got {J.shape}")
    J = J.astype(np.float64)
    if not np.all(np.isfinite(J)):
        raise ValueError("`jac` must be finite")
    n_terms = check_int(n_terms, "n_terms", minimum=1)
    n_probes = check_int(n_probes, "n_probes", minimum=1)
    check_choice(probe, "probe", PROBES)
    sign, logdet = np.linalg.slogdet(np.eye(J.shape[0]) + J)
    if sign <= 0:
        raise ValueError(
            f"`jac`: det(I + J) must be > 0 for log det(I + J) to be the series' limit; got sign "
            f"{sign}"
        )
    Jk = np.eye(J.shape[0])
    M = np.zeros_like(J)
    mean, std = [], []
    for k in range(1, n_terms + 1):
        Jk = Jk @ J
        M = M + ((-1.0) ** (k + 1) / k) * Jk
        mean.append(np.trace(M))
        std.append(math.sqrt(hutchinson_variance(M, probe) / n_probes))
    mean = np.array(mean)
    return SeriesMoments(float(logdet), mean, logdet - mean, np.array(std))


def roulette_std(
    jac,
    *,
    p: float = 0.5,
    n_exact: int = 1,
    n_probes: int = 1,
    probe: str = "gaussian",
    rtol: float = 1e-10,
    max_terms: int = 5000,
) -> float:
    r"""Exact standard deviation of :func:`roulette_logdet` (geometric ``N``) for a linear block.

    For :math:`g(x) = J x` the estimate is :math:`X = \sum_k c_k w_k(N)\, \bar a_k` with
    :math:`c_k = (-1)^{k+1}/k`, :math:`w_k = 1[N \ge k - m] / P(N \ge k - m)` and
    :math:`\bar a_k` the probe mean of :math:`v^\top J^k v` (all probes share ``N``). Since
    :math:`\mathbb{E}_N[w_k w_j] = 1 / P(N \ge \min(k, j) - m)`,

    .. math::
        \mathbb{E} X^2 = \sum_{k, j \ge 1} \frac{c_k c_j}{P(N \ge \min(k,j) - m)}
        \Big(\operatorname{tr} J^k \operatorname{tr} J^j
        + \tfrac{2}{n_p}\big[\operatorname{tr}(\operatorname{sym} J^k
        \operatorname{sym} J^j) - \delta_{\text{Rad}} \textstyle\sum_i (J^k)_{ii} (J^j)_{ii}
        \big]\Big),
        \qquad \operatorname{Var} X = \mathbb{E} X^2 - \log\det(I + J)^2 .

    The double sum converges when :math:`\|J\|_2^2 < 1 - p` (checked). It is summed until a
    rigorous bound on the remaining tail (from :math:`\|J^k\|_2 \le \|J^K\|_2
    \|J\|_2^{k-K}`) falls below ``rtol`` times the variance. ``p = 1`` is the deterministic
    series with ``m + 1`` terms (:func:`power_series_bias_std`).

    Parameters
    ----------
    jac : array, shape (d, d)
    p : float in (0, 1]
        Geometric parameter (the Poisson law gives infinite variance; see
        :func:`roulette_logdet`).
    n_exact, n_probes, probe : as in :func:`roulette_logdet`.
    rtol : float, optional
        Relative accuracy of the variance.
    max_terms : int, optional
        Cap on the truncation index; needing more raises.

    Returns
    -------
    float

    References
    ----------
    Chen, R. T. Q. et al. (2019). Residual flows for invertible generative modeling.
    arXiv:1906.02735.

    Examples
    --------
    >>> import numpy as np
    >>> roulette_std(np.zeros((3, 3)))   # log det(I) = 0 with every term zero
    0.0
    """
    J = np.asarray(getval(jac))
    if J.ndim != 2 or J.shape[0] != J.shape[1]:
        raise ValueError(f"`jac` must have shape (d, d); got {J.shape}")
    J = J.astype(np.float64)
    if not np.all(np.isfinite(J)):
        raise ValueError("`jac` must be finite")
    p = check_probability(p, "p")
    n_exact = check_int(n_exact, "n_exact", minimum=0)
    n_probes = check_int(n_probes, "n_probes", minimum=1)
    check_choice(probe, "probe", PROBES)
    rtol = check_positive(rtol, "rtol")
    max_terms = check_int(max_terms, "max_terms", minimum=1)
    d = J.shape[0]
    L = float(np.linalg.norm(J, 2))
    if L == 0.0:
        return 0.0
    if p == 1.0:
        return float(power_series_bias_std(J, n_exact + 1, n_probes=n_probes, probe=probe).std[-1])
    ratio = L * L / (1.0 - p)
    if ratio >= 1.0 or L >= 1.0:
        raise ValueError(
            f"`jac`: the roulette variance is finite only for ||J||^2 < 1 - p; got "
            f"||J|| = {L:.6g}, `p` = {p!r}"
        )
    sign, logdet = np.linalg.slogdet(np.eye(d) + J)
    if sign <= 0:
        raise ValueError("`jac`: det(I + J) must be > 0")
    A = d * (d + 4.0 / n_probes)  # bounds |tr J^k tr J^j| + 2|cross_kj| / n_p by A b_k b_j
    tr, sym, diag, c, inv_s, b = [], [], [], [], [], []
    second = 0.0
    P = np.eye(d)
    for K in range(1, max_terms + 1):
        P = P @ J
        tr.append(np.trace(P))
        sym.append((0.5 * (P + P.T)).ravel())
        diag.append(np.diag(P).copy())
        c.append((-1.0) ** (K + 1) / K)
        inv_s.append(1.0 / (1.0 - p) ** (max(K - n_exact, 1) - 1))
        b.append(float(np.linalg.norm(P, 2)))
        # pairs (K, j), j <= K: min(K, j) = j
        Sj = np.array(sym)
        cross = Sj @ sym[-1]
        if probe == "rademacher":
            cross = cross - np.array(diag) @ diag[-1]
        pair = (
            np.array(c) * c[-1] * np.array(inv_s) * (np.array(tr) * tr[-1] + 2.0 * cross / n_probes)
        )
        second += 2.0 * np.sum(pair[:-1]) + pair[-1]
        if K <= n_exact:
            continue
        first = (
            A * b[-1] * L / ((1 - L) * (K + 1)) * np.sum(np.abs(c) * np.array(b) * np.array(inv_s))
        )
        rest = (
            A
            * b[-1] ** 2
            / ((K + 1) ** 2 * (1 - L))
            * (1.0 - p) ** (-max(K - n_exact - 1, 0))
            * ratio
            / (1 - ratio)
        )
        tail = 2.0 * (first + rest)
        var = second - logdet * logdet
        if tail <= rtol * max(var, 0.0) or tail < 1e-300:
            return float(math.sqrt(max(var, 0.0)))
    raise ValueError(
        f"`max_terms` = {max_terms} too small for `rtol` = {rtol!r} at ||J|| = {L:.6g}, `p` = {p!r}"
    )
