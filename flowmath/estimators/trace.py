"""Trace estimators from matrix-vector products: exact, Hutchinson and Hutch++.

A matrix ``A`` (``dim x dim``) is seen only through ``matvec(V)``: ``V`` holds vectors as the
*rows* of an ``(m, dim)`` array and ``matvec`` returns the rows ``(A v_i)^T``, i.e. ``V @ A.T``
for an explicit matrix. Every stochastic estimator here has its exact sibling
(:func:`exact_trace`) and, where one exists, an analytic variance (:func:`hutchinson_variance`).

Backends: the estimators run on whatever ``matvec`` returns (NumPy, autograd tracers — so they
are differentiable by :mod:`autograd` — or CuPy when the probes are moved by ``matvec``); probes
are drawn on the host with NumPy.
"""

from __future__ import annotations

import numbers

import numpy as np

from .._checks import check_choice, check_float_dtype, check_int, check_rng
from .._xp import array_namespace, getval, to_numpy

__all__ = [
    "PROBES",
    "draw_probes",
    "exact_trace",
    "hutchinson_trace",
    "hutchinson_variance",
    "hutchpp_trace",
]

#: Probe distributions: both have ``E[v v^T] = I``, so ``E[v^T A v] = tr A``.
PROBES = ("gaussian", "rademacher")


def draw_probes(rng: np.random.Generator, shape, probe: str = "gaussian", dtype=np.float64):
    r"""Draw isotropic probe vectors, :math:`\mathbb{E}[v v^\top] = I`.

    Parameters
    ----------
    rng : numpy.random.Generator
        The source of randomness.
    shape : tuple of int
        Shape of the returned array; the last axis is the vector dimension.
    probe : {"gaussian", "rademacher"}
        ``"gaussian"``: i.i.d. standard normal entries. ``"rademacher"``: i.i.d. uniform signs.
    dtype : float32 or float64

    Returns
    -------
    ndarray of ``shape`` and ``dtype``.

    Examples
    --------
    >>> import numpy as np
    >>> v = draw_probes(np.random.default_rng(0), (2, 3), "rademacher")
    >>> sorted(set(np.abs(v).ravel().tolist()))
    [1.0]
    """
    check_rng(rng)
    check_choice(probe, "probe", PROBES)
    dt = check_float_dtype(dtype)
    shape = _check_shape(shape)
    if probe == "gaussian":
        return rng.standard_normal(shape).astype(dt, copy=False)
    return (2 * rng.integers(0, 2, size=shape) - 1).astype(dt)


def _check_shape(shape) -> tuple:
    """A probe shape: a tuple of non-negative ints (a bare int is one axis)."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)) or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape
    ):
        raise TypeError(f"`shape` must be a tuple of ints; got {shape!r}")
    if any(s < 0 for s in shape):
        raise ValueError(f"`shape` must have non-negative sizes; got {tuple(shape)}")
    return tuple(int(s) for s in shape)


def check_finite_output(out, name: str) -> None:
    """Refuse NaN or inf from a user callable (a ``matvec`` or ``vjp``): a NaN would otherwise
    come out of the estimate as a number-shaped answer."""
    raw = to_numpy(out)
    if raw.size and not np.all(np.isfinite(raw)):
        bad = int(raw.size - np.count_nonzero(np.isfinite(raw)))
        raise ValueError(
            f"`{name}` must return finite values; got {bad} non-finite value(s) (NaN or inf) "
            f"out of {raw.size}"
        )


def _apply(matvec, V, dim: int):
    """Call ``matvec`` and check it returned the rows ``(A v_i)^T``, shape ``V.shape``."""
    out = matvec(V)
    shape = getattr(getval(out), "shape", None)
    if shape != V.shape:
        raise ValueError(
            f"`matvec` must map an array of shape {V.shape} (vectors as rows, dim = {dim}) to "
            f"the same shape; got {shape}"
        )
    check_finite_output(out, "matvec")
    return out


def exact_trace(matvec, dim: int, *, dtype=np.float64):
    r"""Exact trace from ``dim`` matrix-vector products with the unit vectors.

    .. math:: \operatorname{tr} A = \sum_{i=1}^{d} e_i^\top A e_i .

    Parameters
    ----------
    matvec : callable
        ``matvec(V)`` with ``V`` of shape ``(m, dim)`` returns the rows ``(A v_i)^T``.
        Called once with the identity (``m = dim``).
    dim : int
        The dimension ``d`` of ``A``.
    dtype : float32 or float64, optional
        dtype of the unit vectors.

    Returns
    -------
    float (or a 0-d array / autograd tracer when ``matvec`` returns one)

    References
    ----------
    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines. Commun. Stat. Simul. Comput. 18(3).

    Examples
    --------
    >>> import numpy as np
    >>> A = np.arange(9.0).reshape(3, 3)
    >>> float(exact_trace(lambda V: V @ A.T, 3))
    12.0
    """
    dim = check_int(dim, "dim", minimum=1)
    dt = check_float_dtype(dtype)
    eye = np.eye(dim, dtype=dt)
    AE = _apply(matvec, eye, dim)
    xp = array_namespace(AE)
    # row i of AE is (A e_i)^T; its i-th entry is A_ii
    return xp.sum(AE * eye)


def hutchinson_trace(
    matvec, dim: int, *, n_probes: int = 1, probe: str = "rademacher", rng, dtype=np.float64
):
    r"""Hutchinson's unbiased trace estimator.

    .. math::
        \widehat{\operatorname{tr}} A = \frac{1}{m} \sum_{i=1}^{m} v_i^\top A v_i, \qquad
        \mathbb{E}[v v^\top] = I \;\Rightarrow\; \mathbb{E}\,\widehat{\operatorname{tr}} A
        = \operatorname{tr} A .

    The single-probe variance is :func:`hutchinson_variance`; the mean of ``m`` probes has that
    variance divided by ``m``.

    Parameters
    ----------
    matvec : callable
        ``matvec(V)`` takes the probes as the rows of an ``(n_probes, dim)`` array and returns
        the rows ``(A v_i)^T`` (``V @ A.T`` for an explicit ``A``). Called once.
    dim : int
        The dimension ``d`` of ``A``.
    n_probes : int, optional
        Number of probes ``m`` (matrix-vector products), ``>= 1``.
    probe : {"rademacher", "gaussian"}, optional
        Probe distribution (see :func:`draw_probes`).
    rng : numpy.random.Generator
        Source of the probes (required).
    dtype : float32 or float64, optional
        dtype of the probes.

    Returns
    -------
    float (or a 0-d array / autograd tracer when ``matvec`` returns one)
        The mean of the ``n_probes`` single-probe estimates ``v_i^T A v_i``.

    References
    ----------
    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines. Commun. Stat. Simul. Comput. 18(3).

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag([1.0, 2.0, 3.0])   # Rademacher probes are exact on diagonal matrices
    >>> float(hutchinson_trace(lambda V: V @ A.T, 3, rng=np.random.default_rng(0)))
    6.0
    """
    dim = check_int(dim, "dim", minimum=1)
    n_probes = check_int(n_probes, "n_probes", minimum=1)
    check_choice(probe, "probe", PROBES)
    check_rng(rng)
    V = draw_probes(rng, (n_probes, dim), probe, dtype)
    AV = _apply(matvec, V, dim)
    xp = array_namespace(AV)
    return xp.mean(xp.sum(V * AV, axis=1))


def hutchpp_trace(
    matvec, dim: int, *, n_matvecs: int, rng, probe: str = "rademacher", dtype=np.float64
):
    r"""Hutch++: a low-rank sketch plus Hutchinson on the deflated remainder, same budget.

    With ``k = n_matvecs // 3`` sketch vectors ``S`` and ``l = n_matvecs - 2k`` probes ``G``,
    ``Q = orth(A S)`` and :math:`P = Q Q^\top`:

    .. math::
        \widehat{\operatorname{tr}} A = \operatorname{tr}(Q^\top A Q)
        + \frac{1}{l} \sum_{j=1}^{l} g_j^\top (I - P) A (I - P) g_j ,

    which is unbiased because :math:`\operatorname{tr}((I-P)A(I-P)) = \operatorname{tr} A -
    \operatorname{tr}(Q^\top A Q)` for any ``Q`` independent of ``G``. Exactly ``n_matvecs``
    products are used (``k`` for ``A S``, ``k`` for ``A Q``, ``l`` for the remainder); when the
    top of the spectrum dominates, the variance falls like ``1/n_matvecs^2`` instead of
    Hutchinson's ``1/n_matvecs`` (for symmetric positive semi-definite ``A``).

    Parameters
    ----------
    matvec : callable
        As in :func:`hutchinson_trace` (vectors as rows). Called three times.
    dim : int
        The dimension ``d`` of ``A``.
    n_matvecs : int
        Budget of matrix-vector products, ``>= 3``.
    rng : numpy.random.Generator
        Source of ``S`` and ``G``.
    probe : {"rademacher", "gaussian"}, optional
        Distribution of the entries of ``S`` and ``G``.
    dtype : float32 or float64, optional

    Returns
    -------
    float
        Not differentiable by autograd (the orthonormalisation runs in NumPy).

    References
    ----------
    Meyer, R. A., Musco, C., Musco, C., Woodruff, D. P. (2021). Hutch++: Optimal stochastic trace
    estimation. SOSA 2021. arXiv:2010.09649.

    Examples
    --------
    >>> import numpy as np
    >>> A = np.diag([5.0, 1.0, 0.1, 0.01])     # k = 4 >= dim: the sketch captures all of A
    >>> round(float(hutchpp_trace(lambda V: V @ A.T, 4, n_matvecs=12,
    ...                           rng=np.random.default_rng(0))), 10)
    6.11
    """
    dim = check_int(dim, "dim", minimum=1)
    n_matvecs = check_int(n_matvecs, "n_matvecs", minimum=3)
    check_choice(probe, "probe", PROBES)
    check_rng(rng)
    k = n_matvecs // 3
    l = n_matvecs - 2 * k
    S = draw_probes(rng, (k, dim), probe, dtype)
    G = draw_probes(rng, (l, dim), probe, dtype)
    AS = np.asarray(getval(_apply(matvec, S, dim)))
    # columns of Q: an orthonormal basis of range(A S); rows of Q.T are the vectors fed to matvec
    Q, _ = np.linalg.qr(AS.T)
    Qt = np.ascontiguousarray(Q.T)
    AQ = np.asarray(getval(_apply(matvec, Qt, dim)))
    sketch = np.sum(Qt * AQ)
    G_perp = G - (G @ Q) @ Qt
    AG = np.asarray(getval(_apply(matvec, G_perp, dim)))
    remainder = np.sum(G_perp * AG) / l
    return sketch + remainder


def hutchinson_variance(A, probe: str = "gaussian") -> float:
    r"""Analytic variance of the single-probe Hutchinson estimate :math:`v^\top A v`.

    With :math:`A_s = (A + A^\top)/2`:

    .. math::
        \operatorname{Var}_{\text{Gauss}} = 2 \|A_s\|_F^2, \qquad
        \operatorname{Var}_{\text{Rademacher}} = 2 \Big(\|A_s\|_F^2 - \sum_i A_{ii}^2\Big).

    Divide by ``n_probes`` for the mean of independent probes.

    Parameters
    ----------
    A : array_like, shape (d, d)
    probe : {"gaussian", "rademacher"}, optional

    Returns
    -------
    float

    References
    ----------
    Hutchinson, M. F. (1989). Commun. Stat. Simul. Comput. 18(3). Avron, H., Toledo, S. (2011).
    Randomized algorithms for estimating the trace of an implicit symmetric positive
    semi-definite matrix. J. ACM 58(2).

    Examples
    --------
    >>> import numpy as np
    >>> A = np.array([[1.0, 2.0], [0.0, 3.0]])
    >>> hutchinson_variance(A, "gaussian"), hutchinson_variance(A, "rademacher")
    (24.0, 4.0)
    """
    check_choice(probe, "probe", PROBES)
    A = np.asarray(getval(A))
    if (
        A.ndim != 2
        or A.shape[0] != A.shape[1]
        or not (np.issubdtype(A.dtype, np.floating) or np.issubdtype(A.dtype, np.integer))
    ):
        raise ValueError(
            f"`A` must be a square real 2-D array; got shape {A.shape}, dtype {A.dtype}"
        )
    A = A.astype(np.float64)
    sym = 0.5 * (A + A.T)
    fro2 = float(np.sum(sym * sym))
    if probe == "gaussian":
        return 2.0 * fro2
    return 2.0 * (fro2 - float(np.sum(np.diag(A) ** 2)))
