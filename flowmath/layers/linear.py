"""Invertible linear layers on vectors, each at the cost the theory promises.

All map a batch ``x`` of shape ``(n, d)`` to ``y = x W^T + b`` (``y_i = W x_i + b``), with

.. math:: \\log |\\det J| = \\log |\\det W|.

=====================  ==================  ====================
layer                  inverse             log-det
=====================  ==================  ====================
FullLinear             O(d^3) (LU solve)   O(d^3) (slogdet)
DiagonalLinear         O(d)                O(d)
TriangularLinear       O(d^2) (subst.)     O(d) (diagonal)
BlockDiagonalLinear    O(c^2 d) (blocks)   O(c^2 d)
LULinear               O(d^2) (2 subst.)   O(d): sum log|s|
=====================  ==================  ====================

Parametrisations keep the structured layers invertible for every parameter value (diagonals
are ``exp`` of a free parameter); the full and block layers hold plain matrices and raise a
``ValueError`` when a weight is singular rather than returning inf or NaN.

References
----------
Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039 (the LU parametrisation).
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
from autograd.scipy.linalg import solve_triangular

from .._checks import check_bool, check_int, check_permutation
from .._xp import getval, to_numpy
from .base import VECTOR, Bijection, Leaf

__all__ = ["BlockDiagonalLinear", "DiagonalLinear", "FullLinear", "LULinear", "TriangularLinear"]


def _affine(x, W, b):
    return anp.dot(x, anp.transpose(W)) + b


def _ones(x, value):
    """``value`` broadcast to the batch, shape ``(n,)``, in ``x``'s dtype."""
    return anp.zeros(x.shape[0], dtype=getval(x).dtype) + value


#: A weight whose 1-norm reciprocal condition number is below ``RCOND_FACTOR * eps`` of the
#: working dtype is treated as singular (the threshold of ``InvConv1x1(lu=False)``): its inverse
#: would lose every digit and its log-det would be meaningless.
RCOND_FACTOR = 64.0


def _check_conditioning(W, name, layer):
    """Raise unless every (stacked) matrix ``W`` has 1-norm reciprocal condition number
    ``1 / (||W||_1 ||W^-1||_1) > 64 eps`` of its dtype (exact, from the inverse: these layers'
    inverse and log-det cost O(c^3) per block already)."""
    w = to_numpy(W)
    threshold = RCOND_FACTOR * float(np.finfo(w.dtype).eps)
    w64 = w.astype(np.float64).reshape((-1,) + w.shape[-2:])
    try:
        with np.errstate(all="ignore"):
            inv = np.linalg.inv(w64)
            rcond = 1.0 / (
                np.abs(w64).sum(axis=1).max(axis=1) * np.abs(inv).sum(axis=1).max(axis=1)
            )
        rcond = np.where(np.isfinite(rcond), rcond, 0.0)
    except np.linalg.LinAlgError:
        rcond = np.zeros(len(w64))
    worst = int(np.argmin(rcond))
    if not rcond[worst] > threshold:
        where = f" (block {worst})" if w.ndim == 3 else ""
        raise ValueError(
            f'`params["{name}"]` must be non-singular for {layer}; got 1-norm reciprocal '
            f"condition number {rcond[worst]:.3g}{where} (<= {threshold:.3g} = {RCOND_FACTOR:g} "
            "eps): the map is not numerically invertible and its log-det is meaningless"
        )


class FullLinear(Bijection):
    """Dense ``y = W x + b``; inverse by an LU solve, log-det by ``slogdet`` (both O(d^3)).

    ``init`` draws ``W = Q diag(exp(e))`` with ``Q`` a Haar-random orthogonal matrix and
    ``e ~ N(0, 0.3^2)``: a generic, well-conditioned map.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.FullLinear()
    >>> x = rng.normal(size=(4, 3))
    >>> params = layer.init(rng, x)
    >>> y, logdet = layer.forward(params, x)
    >>> bool(np.allclose(logdet, np.linalg.slogdet(params["W"])[1]))
    True
    """

    event_ndims = VECTOR

    def _init(self, rng, x):
        d = x.shape[1]
        q, r = np.linalg.qr(rng.normal(size=(d, d)))
        q = q * np.sign(np.diag(r))
        W = q * np.exp(0.3 * rng.normal(size=d))
        return {"W": W, "b": 0.1 * rng.normal(size=d)}

    def _param_spec(self, event_shape):
        (d,) = event_shape
        return {"W": Leaf((d, d)), "b": Leaf((d,))}

    def _event_shape(self, params):
        return (getval(params["W"]).shape[0],)

    def _logdet(self, W):
        _check_conditioning(W, "W", "FullLinear")
        return anp.linalg.slogdet(W)[1]

    def _forward(self, params, x, rng):
        W = params["W"]
        return _affine(x, W, params["b"]), _ones(x, self._logdet(W))

    def _inverse(self, params, y, rng):
        W = params["W"]
        logabs = self._logdet(W)
        x = anp.transpose(anp.linalg.solve(W, anp.transpose(y - params["b"])))
        return x, _ones(y, -logabs)


class DiagonalLinear(Bijection):
    """Elementwise scale and shift ``y = exp(log_scale) * x + b``; O(d) both ways.

    .. math:: \\log|\\det J| = \\sum_i \\mathrm{log\\_scale}_i.
    """

    event_ndims = VECTOR
    free_form = False
    free_form_reason = "a diagonal Jacobian"

    def _init(self, rng, x):
        d = x.shape[1]
        return {"log_scale": 0.3 * rng.normal(size=d), "b": 0.1 * rng.normal(size=d)}

    def _param_spec(self, event_shape):
        (d,) = event_shape
        return {"log_scale": Leaf((d,), log=True), "b": Leaf((d,))}

    def _event_shape(self, params):
        return (getval(params["log_scale"]).shape[0],)

    def _forward(self, params, x, rng):
        s = params["log_scale"]
        return anp.exp(s) * x + params["b"], _ones(x, anp.sum(s))

    def _inverse(self, params, y, rng):
        s = params["log_scale"]
        return (y - params["b"]) * anp.exp(-s), _ones(y, -anp.sum(s))


class TriangularLinear(Bijection):
    """Triangular ``W = T + diag(exp(log_diag))`` with ``T`` strictly lower (or upper).

    Inverse by substitution in O(d^2); log-det ``sum(log_diag)`` in O(d).

    Parameters
    ----------
    lower : bool
        Lower (default) or upper triangular.
    """

    event_ndims = VECTOR
    free_form = False
    free_form_reason = "a triangular Jacobian"

    def __init__(self, lower: bool = True):
        self.lower = check_bool(lower, "lower")

    def _init(self, rng, x):
        d = x.shape[1]
        return {
            "T": rng.normal(size=(d, d)) / np.sqrt(d),
            "log_diag": 0.3 * rng.normal(size=d),
            "b": 0.1 * rng.normal(size=d),
        }

    def _param_spec(self, event_shape):
        (d,) = event_shape
        return {"T": Leaf((d, d)), "log_diag": Leaf((d,), log=True), "b": Leaf((d,))}

    def _event_shape(self, params):
        return (getval(params["log_diag"]).shape[0],)

    def _weight(self, params):
        T = params["T"]
        strict = anp.tril(T, -1) if self.lower else anp.triu(T, 1)
        return strict + anp.diag(anp.exp(params["log_diag"]))

    def _forward(self, params, x, rng):
        return _affine(x, self._weight(params), params["b"]), _ones(x, anp.sum(params["log_diag"]))

    def _inverse(self, params, y, rng):
        W = self._weight(params)
        # solve W x^T = (y - b)^T by substitution: O(d^2) per sample
        xt = solve_triangular(
            W, anp.transpose(y - params["b"]), lower=self.lower, check_finite=False
        )  # an overflow gives inf, reported by the base class with the layer's name
        return anp.transpose(xt), _ones(y, -anp.sum(params["log_diag"]))


class BlockDiagonalLinear(Bijection):
    """Block-diagonal ``W = diag(W_1, ..., W_{d/c})`` with dense ``c x c`` blocks.

    Inverse and log-det cost O(c^3 d / c) = O(c^2 d) for the factorisations plus O(c d) per
    sample; the lecture's O(c^3 d) (docs/theory.rst) is an upper bound.

    Parameters
    ----------
    block_size : int
        ``c``; the dimension ``d`` of the data must be a multiple of it.
    """

    event_ndims = VECTOR
    free_form = False
    free_form_reason = "a block-diagonal Jacobian"

    def __init__(self, block_size: int = 2):
        self.block_size = check_int(block_size, "block_size", minimum=1)

    def _init(self, rng, x):
        d, c = x.shape[1], self.block_size
        if d % c:
            raise ValueError(
                f"`x` must have a feature size divisible by `block_size`={c}; got shape {x.shape}"
            )
        q, r = np.linalg.qr(rng.normal(size=(d // c, c, c)))
        q = q * np.sign(np.diagonal(r, axis1=1, axis2=2))[:, None, :]
        W = q * np.exp(0.3 * rng.normal(size=(d // c, 1, c)))
        return {"W": W, "b": 0.1 * rng.normal(size=d)}

    def _param_spec(self, event_shape):
        (d,) = event_shape
        c = self.block_size
        if d % c:
            raise ValueError(
                f"`x` must have a feature size divisible by `block_size`={c}; got {d} features"
            )
        return {"W": Leaf((d // c, c, c)), "b": Leaf((d,))}

    def _event_shape(self, params):
        nb, c, _ = getval(params["W"]).shape
        return (nb * c,)

    def _logdet(self, W):
        _check_conditioning(W, "W", "BlockDiagonalLinear")
        return anp.sum(anp.linalg.slogdet(W)[1])

    def _forward(self, params, x, rng):
        W = params["W"]
        nb, c, _ = getval(W).shape
        xb = anp.reshape(x, (x.shape[0], nb, c))
        y = anp.einsum("nbj,bij->nbi", xb, W)
        return anp.reshape(y, x.shape) + params["b"], _ones(x, self._logdet(W))

    def _inverse(self, params, y, rng):
        W = params["W"]
        nb, c, _ = getval(W).shape
        logabs = self._logdet(W)
        yb = anp.transpose(anp.reshape(y - params["b"], (y.shape[0], nb, c)), (1, 2, 0))
        xb = anp.linalg.solve(W, yb)  # (nb, c, n)
        x = anp.reshape(anp.transpose(xb, (2, 0, 1)), y.shape)
        return x, _ones(y, -logabs)


class LULinear(Bijection):
    """LU-factorised ``W = P L (U + diag(exp(log_s)))`` (Glow, Kingma & Dhariwal 2018).

    ``L`` is unit lower triangular, ``U`` strictly upper triangular and ``P`` a fixed
    permutation. Inverse by two triangular substitutions, O(d^2); log-det in O(d):

    .. math:: \\log|\\det W| = \\sum_i \\mathrm{log\\_s}_i.

    Parameters
    ----------
    permutation : "reverse", "identity" or a sequence of ints
        ``P`` is a hyperparameter (a pytree of parameters must hold only differentiable
        floats). ``"reverse"`` (default) reverses the features. With ``s = exp(log_s) > 0``
        every invertible ``W`` with ``sign det W = sign det P`` whose permuted leading minors do
        not vanish is reachable — all such matrices but a set of measure zero.

    References
    ----------
    Kingma & Dhariwal, "Glow: Generative flow with invertible 1x1 convolutions", 2018,
    arXiv:1807.03039, Section 3.2.
    """

    event_ndims = VECTOR
    free_form = False
    free_form_reason = "a product of triangular factors (W = P L (U + diag s))"

    def __init__(self, permutation="reverse"):
        if isinstance(permutation, str):
            if permutation not in ("reverse", "identity"):
                raise ValueError(
                    "`permutation` must be 'reverse', 'identity' or a sequence of ints; "
                    f"got {permutation!r}"
                )
            self.permutation = permutation
        else:
            perm = check_permutation(permutation, "permutation", ("reverse", "identity"))
            self.permutation = tuple(int(i) for i in perm)

    def _perm(self, d):
        if self.permutation == "reverse":
            return np.arange(d)[::-1].copy()
        if self.permutation == "identity":
            return np.arange(d)
        if len(self.permutation) != d:
            raise ValueError(
                f"`x` must have {len(self.permutation)} features to match `permutation`; got {d}"
            )
        return np.asarray(self.permutation)

    def _init(self, rng, x):
        d = x.shape[1]
        self._perm(d)
        return {
            "L": rng.normal(size=(d, d)) / np.sqrt(d),
            "U": rng.normal(size=(d, d)) / np.sqrt(d),
            "log_s": 0.3 * rng.normal(size=d),
            "b": 0.1 * rng.normal(size=d),
        }

    def _param_spec(self, event_shape):
        (d,) = event_shape
        self._perm(d)
        return {
            "L": Leaf((d, d)),
            "U": Leaf((d, d)),
            "log_s": Leaf((d,), log=True),
            "b": Leaf((d,)),
        }

    def _event_shape(self, params):
        return (getval(params["log_s"]).shape[0],)

    def _factors(self, params):
        d = getval(params["log_s"]).shape[0]
        eye = np.eye(d, dtype=getval(params["log_s"]).dtype)
        L = anp.tril(params["L"], -1) + eye
        U = anp.triu(params["U"], 1) + anp.diag(anp.exp(params["log_s"]))
        return L, U

    def weight(self, params):
        """The dense ``W = P L U`` (for checks and plots)."""
        L, U = self._factors(params)
        d = getval(L).shape[0]
        return anp.dot(L, U)[np.argsort(self._perm(d))]

    def _forward(self, params, x, rng):
        L, U = self._factors(params)
        d = x.shape[1]
        # y = P L U x + b, batched on rows: (x U^T L^T) then permute features
        z = anp.dot(anp.dot(x, anp.transpose(U)), anp.transpose(L))
        y = z[:, np.argsort(self._perm(d))] + params["b"]
        return y, _ones(x, anp.sum(params["log_s"]))

    def _inverse(self, params, y, rng):
        L, U = self._factors(params)
        d = y.shape[1]
        z = (y - params["b"])[:, self._perm(d)]
        # check_finite=False: an overflow gives inf, reported by the base class by name
        w = solve_triangular(
            L, anp.transpose(z), lower=True, unit_diagonal=True, check_finite=False
        )
        xt = solve_triangular(U, w, lower=False, check_finite=False)
        return anp.transpose(xt), _ones(y, -anp.sum(params["log_s"]))
