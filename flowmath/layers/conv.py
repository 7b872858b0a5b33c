"""Invertible convolutions on images ``(n, c, h, w)``: Glow's 1x1 convolution, the periodic
(circular) convolution inverted in the Fourier domain, and the emerging convolution.

Costs per sample, ``d = c h w`` (the table of docs/theory.rst):

* ``InvConv1x1``: forward ``O(c^2 h w)`` (one BLAS product), inverse ``O(c^3 + c^2 h w)``,
  log-det ``O(c)`` with LU, ``O(c^3)`` with a full matrix;
* ``PeriodicConv2d``: forward and inverse ``O(c^2 d + c d log(hw))`` plus ``O(c^3 hw)`` for
  the per-frequency matrices; log-det ``O(c^3 hw + c^2 hw log(hw))``: ``O(d log d)`` at fixed c;
* ``EmergingConv2d``: forward and inverse ``O(c^2 k^2 d)``, log-det ``O(c)``.

Every layer here fixes the channel count (and kernel size) at
``init`` but accepts any height and width afterwards. ``InvConv1x1`` and ``PeriodicConv2d`` are
written against the array namespace (NumPy and autograd are tested; the CuPy path for forward and
inverse is written but untested, no GPU having been available); ``EmergingConv2d`` is
NumPy/autograd only (its numba inverse has a plain array twin,
:func:`flowmath.kernels.emerging.ar_solve_reference`, that accepts ``xp=cupy``).
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np
import scipy.linalg
import scipy.linalg.lapack
from autograd.scipy.linalg import solve_triangular

from .._checks import check_bool, check_int
from .._xp import array_namespace, getval, is_box, to_numpy
from ..kernels.emerging import ar_conv, ar_mask, ar_solve, reverse_order
from .base import IMAGE, Bijection, Leaf

__all__ = ["EmergingConv2d", "InvConv1x1", "PeriodicConv2d"]

#: A matrix whose reciprocal condition number is below ``SINGULAR_RCOND_FACTOR * eps`` of the
#: working dtype is treated as singular (its inverse and log-det would be meaningless).
SINGULAR_RCOND_FACTOR = 64.0


def _rcond_threshold(dtype) -> float:
    return SINGULAR_RCOND_FACTOR * float(np.finfo(np.dtype(dtype)).eps)


def _check_kernel_size(kernel_size) -> int:
    k = check_int(kernel_size, "kernel_size", minimum=1)
    if k % 2 == 0:
        raise ValueError(f"`kernel_size` must be odd (the kernel needs a centre tap); got {k}")
    return k


def _rcond_1norm(w) -> float:
    """LAPACK's estimate of ``1 / (||W||_1 ||W^-1||_1)`` from an LU factorisation (``getrf`` +
    ``gecon``: ``O(c^3 / 3)`` flops, several times cheaper than an SVD); 0 when ``W`` is
    exactly singular."""
    w = np.asarray(w, dtype=np.float64)
    if not np.all(np.isfinite(w)):
        return 0.0
    getrf, gecon = scipy.linalg.lapack.get_lapack_funcs(("getrf", "gecon"), (w,))
    lu, _, info = getrf(w)
    if info > 0:
        return 0.0
    rcond, _ = gecon(lu, float(np.abs(w).sum(axis=0).max()), norm="1")
    return float(rcond)


def _check_log_range(log_v, name):
    """``exp(log_v)`` must be finite and non-zero in the working dtype (checked before ``exp``
    so that an overflow is a clear ``ValueError``, not a warning followed by inf/NaN)."""
    raw = to_numpy(log_v)
    info = np.finfo(raw.dtype)
    lo, hi = float(np.log(info.tiny)), float(np.log(info.max))
    if raw.size and not (raw.min() > lo and raw.max() < hi):
        raise ValueError(
            f"`{name}` must lie in ({lo:.4g}, {hi:.4g}) so that its exp is finite and non-zero "
            f"in {raw.dtype}; got values in [{float(raw.min()):.4g}, {float(raw.max()):.4g}]"
        )


#: ``perm`` and ``sign`` are read rounded (to integers, to +-1); a value further than this from
#: its rounding is not one the layer made (finite-difference checks perturb by ~1e-6).
_FROZEN_ATOL = 1e-3


def _is_permutation(values):
    """``perm`` (float indices, rounded on read) must be a permutation of ``0..c-1``."""
    c = values.shape[0]
    if not np.array_equal(np.sort(np.rint(values)), np.arange(c)) or np.any(
        np.abs(values - np.rint(values)) > _FROZEN_ATOL
    ):
        return f"hold a permutation of 0..{c - 1} (the frozen row permutation P); got {values}"
    return None


def _is_sign(values):
    """``sign`` must be +1 or -1 entrywise: a 0 would make ``W`` singular with a finite
    log-det (``log_s`` carries the magnitude)."""
    if not np.all(np.abs(np.abs(values) - 1.0) <= _FROZEN_ATOL):
        return f"hold only +1 or -1 (the frozen signs of the LU diagonal); got {values}"
    return None


def _logdet_vector(value, x):
    """Broadcast a per-sample constant log-det to shape ``(n,)`` in ``x``'s dtype."""
    xp = array_namespace(value, x)
    return value * xp.ones(x.shape[0], dtype=getval(x).dtype)


def _channel_matmul(weight, x):
    """``y[n, :, i, j] = weight @ x[n, :, i, j]``: one batched ``matmul`` of ``weight``
    ``(c_out, c)`` with the ``(n, c, h w)`` view of a contiguous batch (no copy in; the result
    is contiguous ``(n, c_out, h, w)``, in ``x``'s dtype when ``weight`` has it).

    ``tensordot`` (the previous formula) copied ``x`` to ``(c, n h w)`` and handed back a
    transposed view, which every later elementwise pass then read with strides.
    """
    xp = array_namespace(weight, x)
    n, c, h, w = x.shape
    y = xp.matmul(weight, xp.reshape(x, (n, c, h * w)))
    return xp.reshape(y, (n, getval(weight).shape[0], h, w))


def _random_orthogonal(rng, c):
    q, r = np.linalg.qr(rng.normal(size=(c, c)))
    return q * np.sign(np.diag(r))


class InvConv1x1(Bijection):
    """Glow's invertible 1x1 convolution: one ``c x c`` matrix applied at every pixel.

    .. math::

        y_{:,i,j} = W x_{:,i,j}, \\qquad
        \\log|\\det J| = h\\,w\\,\\log|\\det W|
        \\;\\overset{\\text{LU}}{=}\\; h\\,w \\sum_{k=1}^{c} \\log|s_k|,
        \\qquad W = P L (U + \\operatorname{diag}(s)).

    Parameters
    ----------
    lu : bool, default True
        ``True``: the LU parametrisation of Glow, with parameters ``lower`` (strictly lower part
        used; ``L`` has a unit diagonal), ``upper`` (strictly upper part used), ``log_s`` and the
        frozen ``perm`` (the row permutation ``P`` as float indices: ``(P z)_i = z_{perm_i}``) and
        ``sign`` (the signs of ``s``), ``s = sign * exp(log_s)``. ``perm`` and ``sign`` are read
        as constants (rounded to integers and to +-1), so they receive a zero gradient and an
        optimiser leaves them unchanged (they are Glow's non-trainable buffers). Log-det
        ``O(c)``, inverse by two triangular solves ``O(c^3)`` and one product ``O(c^2 d)``;
        ``W`` is never singular.
        ``False``: a full matrix ``weight``; log-det by ``slogdet`` ``O(c^3)``, inverse by
        ``inv`` ``O(c^3)`` then one product; a (numerically) singular ``weight`` (LAPACK's
        1-norm reciprocal condition estimate below ``64 eps``) raises ``ValueError``.

    Notes
    -----
    Input shape ``(n, c, h, w)``; ``c`` is fixed at ``init``, ``h`` and ``w`` are free. ``init``
    draws ``W = Q \\operatorname{diag}(e^{g})`` with ``Q`` Haar-orthogonal and ``g ~ N(0, 0.3^2)``
    (generic, well conditioned, ``log|det W| != 0``) and, with ``lu=True``, stores its LU factors
    with partial pivoting (``scipy.linalg.lu``).

    References
    ----------
    Kingma, D. P., Dhariwal, P. (2018). Glow: Generative flow with invertible 1x1 convolutions.
    NeurIPS 2018. arXiv:1807.03039.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 3, 4, 4))
    >>> layer = fm.InvConv1x1()
    >>> params = layer.init(rng, x)
    >>> y, logdet = layer.forward(params, x)
    >>> x_back, minus = layer.inverse(params, y)
    >>> bool(np.allclose(x_back, x) and np.allclose(minus, -logdet))
    True
    """

    event_ndims = IMAGE
    free_form = False
    free_form_reason = "the same c x c matrix at every pixel (block-diagonal Jacobian)"
    # W is invertible, so every input entry reaches an output through a non-zero weight: a
    # NaN/inf input makes the output non-finite, and forward checks the output alone
    _nonfinite_propagates = True

    def __init__(self, lu: bool = True):
        self.lu = check_bool(lu, "lu")

    def _init(self, rng, x):
        c = x.shape[1]
        w0 = _random_orthogonal(rng, c) * np.exp(0.3 * rng.normal(size=c))
        if not self.lu:
            return {"weight": w0}
        return self.lu_parameters(w0)

    @staticmethod
    def lu_parameters(weight):
        """The ``lu=True`` parameters that represent a given ``c x c`` weight exactly.

        ``weight = P L (U + diag(sign * exp(log_s)))`` from LU with partial pivoting
        (``scipy.linalg.lu``); ``P`` and the signs are stored as float leaves that are rounded
        on read, so they receive zero gradient.
        """
        p, lower, upper = scipy.linalg.lu(np.asarray(weight, dtype=np.float64))
        s = np.diag(upper)
        return {
            "perm": np.argmax(p, axis=1).astype(np.float64),
            "sign": np.sign(s),
            "lower": np.tril(lower, -1),
            "upper": np.triu(upper, 1),
            "log_s": np.log(np.abs(s)),
        }

    def _param_spec(self, event_shape):
        c = event_shape[0]
        if not self.lu:
            return {"weight": Leaf((c, c))}
        return {
            "perm": Leaf((c,), values=_is_permutation),
            "sign": Leaf((c,), values=_is_sign),
            "lower": Leaf((c, c)),
            "upper": Leaf((c, c)),
            "log_s": Leaf((c,), log=True),
        }

    def _event_shape(self, params):
        key = "lower" if self.lu else "weight"
        return (getval(params[key]).shape[0], None, None)

    # -- the matrix and its pieces -------------------------------------------------------------
    @staticmethod
    def _lu_parts(params):
        xp = array_namespace(params)
        lower, upper, log_s = params["lower"], params["upper"], params["log_s"]
        c = getval(log_s).shape[0]
        dtype = getval(log_s).dtype
        perm = np.rint(to_numpy(params["perm"])).astype(np.intp)
        sign = np.sign(to_numpy(params["sign"])).astype(dtype)  # frozen: rounded to +-1
        _check_log_range(log_s, "params['log_s']")
        s = xp.asarray(sign) * xp.exp(log_s)
        eye = xp.asarray(np.eye(c, dtype=dtype))
        l_mat = xp.tril(lower, -1) + eye
        u_mat = xp.triu(upper, 1) + s[:, None] * eye
        return perm, l_mat, u_mat, log_s

    def _check_full(self, weight):
        w = to_numpy(weight)
        rcond = _rcond_1norm(w)
        threshold = _rcond_threshold(w.dtype)
        if not rcond > threshold:
            raise ValueError(
                f"`params['weight']` must be a non-singular {w.shape[0]}x{w.shape[0]} matrix; got "
                f"1-norm reciprocal condition number {rcond:.3g} (<= {threshold:.3g}): the 1x1 "
                "convolution is not invertible and its log-det is -inf"
            )

    def weight(self, params):
        """The ``c x c`` matrix ``W`` the parameters stand for."""
        if not self.lu:
            return params["weight"]
        perm, l_mat, u_mat, _ = self._lu_parts(params)
        xp = array_namespace(params)
        return xp.matmul(l_mat, u_mat)[xp.asarray(perm)]

    def _logdet(self, params, x):
        hw = x.shape[2] * x.shape[3]
        xp = array_namespace(params, x)
        if self.lu:
            return hw * xp.sum(params["log_s"])
        self._check_full(params["weight"])
        return hw * xp.linalg.slogdet(params["weight"])[1]

    def _forward(self, params, x, rng):
        w = self.weight(params)
        return _channel_matmul(w, x), _logdet_vector(self._logdet(params, x), x)

    def _inverse(self, params, y, rng):
        xp = array_namespace(params, y)
        if self.lu:
            perm, l_mat, u_mat, _ = self._lu_parts(params)
            c = perm.shape[0]
            # W^-1 = U'^-1 L^-1 P^T: two triangular solves on P^T, O(c^3)
            pt = np.eye(c, dtype=getval(l_mat).dtype)[perm].T
            if xp is np or xp is anp:
                # check_finite=False: an overflow gives inf, which the base class reports
                # with the layer's name instead of SciPy's anonymous "must not contain infs"
                w_inv = solve_triangular(
                    u_mat,
                    solve_triangular(l_mat, pt, lower=True, check_finite=False),
                    lower=False,
                    check_finite=False,
                )
            else:  # pragma: no cover - CuPy: no batched triangular solve needed for c x c
                w_inv = xp.linalg.inv(self.weight(params))
        else:
            self._check_full(params["weight"])
            w_inv = xp.linalg.inv(params["weight"])
        return _channel_matmul(w_inv, y), -_logdet_vector(self._logdet(params, y), y)


class PeriodicConv2d(Bijection):
    """Circular (periodic) ``c -> c`` cross-correlation, inverted in the Fourier domain.

    With the kernel zero-padded to ``h x w`` (tap ``(a, b)`` placed at
    ``((a - p) mod h, (b - p) mod w)``, ``p = k // 2``) and ``\\hat K_{oc}(u, v)`` its 2-D DFT,

    .. math::

        y_{o,i,j} = \\sum_{c,a,b} w_{o,c,a,b}\\, x_{c,\\,(i+a-p) \\bmod h,\\,(j+b-p) \\bmod w},
        \\qquad \\hat y(u, v) = \\overline{\\hat K(u, v)}\\, \\hat x(u, v),

        \\log|\\det J| = \\sum_{u=0}^{h-1} \\sum_{v=0}^{w-1} \\log|\\det \\hat K(u, v)|,

    (conjugate because it is a cross-correlation of real signals; the conjugate has the same
    modulus of determinant). The inverse solves the ``h w`` systems
    ``\\overline{\\hat K(u,v)} \\hat x(u,v) = \\hat y(u,v)`` and transforms back.

    Parameters
    ----------
    kernel_size : int, default 3
        Odd. A kernel larger than the image wraps around (taps landing on the same position
        add), which is still a circular convolution.

    Notes
    -----
    Input ``(n, c, h, w)``; the parameters ``{"weight": (c, c, k, k)}`` fix ``c`` and ``k``, any
    ``h, w`` work. Costs: forward ``O(c^2 d + c d log(hw))``, inverse
    ``O(c^3 hw + c^2 d + c d log(hw))``, log-det ``O(c^3 hw + c^2 hw log(hw))`` -- for a fixed
    ``c``, ``O(d log d)``. A kernel for which some ``\\hat K(u, v)`` is (numerically) singular
    raises ``ValueError``. ``init`` draws a centre tap ``Q diag(e^g)`` (``Q`` orthogonal) and
    random off-centre taps scaled so that the sum of their spectral norms is half the smallest
    singular value of the centre: then every ``\\hat K(u, v)`` is invertible, for every image
    size.

    References
    ----------
    Karami, M., Schuurmans, D., Sohl-Dickstein, J., Dinh, L., Duckworth, D. (2019). Invertible
    convolutional flow. NeurIPS 2019.
    Hoogeboom, E., van den Berg, R., Welling, M. (2019). Emerging convolutions for generative
    normalizing flows (periodic convolutions, section 3.3). ICML 2019. arXiv:1901.11137.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 2, 5, 4))
    >>> layer = fm.PeriodicConv2d()
    >>> params = layer.init(rng, x)
    >>> y, logdet = layer.forward(params, x)
    >>> x_back, _ = layer.inverse(params, y)
    >>> bool(np.allclose(x_back, x))
    True
    """

    event_ndims = IMAGE

    def __init__(self, kernel_size: int = 3):
        self.kernel_size = _check_kernel_size(kernel_size)

    def _init(self, rng, x):
        c, k = x.shape[1], self.kernel_size
        p = k // 2
        centre = _random_orthogonal(rng, c) * np.exp(0.3 * rng.normal(size=c))
        sigma_min = np.linalg.svd(centre, compute_uv=False)[-1]
        weight = rng.normal(size=(c, c, k, k))
        weight[:, :, p, p] = 0.0
        norms = sum(np.linalg.norm(weight[:, :, a, b], 2) for a in range(k) for b in range(k))
        if norms > 0:
            weight *= 0.5 * sigma_min / norms
        weight[:, :, p, p] = centre
        return {"weight": weight}

    def _param_spec(self, event_shape):
        c, k = event_shape[0], self.kernel_size
        return {"weight": Leaf((c, c, k, k))}

    def _event_shape(self, params):
        return (getval(params["weight"]).shape[0], None, None)

    def _check_weight(self, weight):
        w = to_numpy(weight)
        if w.ndim != 4 or w.shape[0] != w.shape[1] or w.shape[2] != w.shape[3]:
            raise ValueError(f"`params['weight']` must have shape (c, c, k, k); got {w.shape}")
        if w.shape[2] != self.kernel_size:
            raise ValueError(
                f"`params['weight']` must have kernel size {self.kernel_size} (the layer's "
                f"`kernel_size`); got shape {w.shape}"
            )

    def fourier_matrices(self, params, h, w):
        """``M(u, v) = conj(K^(u, v))``, shape ``(h, w, c, c)``: the per-frequency matrices with
        ``y^(u, v) = M(u, v) x^(u, v)`` (complex, in the complex dtype matching the weight's)."""
        weight = params["weight"]
        self._check_weight(weight)
        xp = array_namespace(weight)
        c, k = getval(weight).shape[0], self.kernel_size
        p = k // 2
        # scatter of the k*k taps onto the periodic h x w grid (taps on one position add)
        scatter = np.zeros((k * k, h * w), dtype=getval(weight).dtype)
        for a in range(k):
            for b in range(k):
                scatter[a * k + b, ((a - p) % h) * w + (b - p) % w] += 1.0
        padded = xp.reshape(
            xp.matmul(xp.reshape(weight, (c, c, k * k)), xp.asarray(scatter)), (c, c, h, w)
        )
        khat = xp.fft.fft2(padded)  # over the last two axes
        return xp.conj(xp.transpose(khat, (2, 3, 0, 1)))

    def _checked_logdet(self, mats, dtype):
        """``sum log|det M(u, v)|``, after checking every ``M(u, v)`` is non-singular."""
        raw = to_numpy(mats)
        # M(-u, -v) = conj M(u, v) (real kernel): the same singular values, so the columns
        # v <= w/2 hold every distinct one
        sv = np.linalg.svd(raw[:, : raw.shape[1] // 2 + 1], compute_uv=False)  # (h, w/2+1, c)
        smax = float(sv[..., 0].max())
        rcond = sv[..., -1] / smax if smax > 0 else np.zeros(sv.shape[:-1])
        threshold = _rcond_threshold(dtype)
        if not np.all(rcond > threshold):
            u, v = np.unravel_index(int(np.argmin(rcond)), rcond.shape)
            raise ValueError(
                "`params['weight']` must give non-singular per-frequency matrices K^(u, v); got "
                f"smallest singular value / largest = {float(rcond[u, v]):.3g} "
                f"(<= {threshold:.3g}) "
                f"at frequency (u, v) = ({u}, {v}): the circular convolution is not invertible"
            )
        xp = array_namespace(mats)
        return xp.sum(xp.linalg.slogdet(mats)[1])

    @staticmethod
    def _real_path(params, x, xp) -> bool:
        """Plain NumPy arrays (nothing traced): the real-FFT path of :meth:`_apply`."""
        return xp is np and not is_box(params) and not is_box(x) and not is_box(params["weight"])

    def _apply(self, mats, x, inverse):
        """``y^(u, v) = M(u, v) x^(u, v)`` (or the solve, ``inverse``) on the half spectrum of the
        real FFT: ``x`` real makes ``x^`` conjugate-symmetric, and ``M(-u, -v) = conj M(u, v)``
        (the kernel is real), so ``y^`` is too and ``y = irfft2`` of its columns ``v <= w/2``:
        half the transforms, products and solves of the full complex FFT. Plain NumPy only
        (autograd's real-FFT VJPs need even sizes and compute in float64)."""
        n, c, h, w = x.shape
        nf = w // 2 + 1
        half = np.ascontiguousarray(mats[:, :nf]).reshape(h * nf, c, c)
        xhat = np.fft.rfft2(x).reshape(n, c, h * nf).transpose(2, 1, 0)  # (h nf, c, n)
        yhat = np.linalg.solve(half, xhat) if inverse else np.matmul(half, xhat)
        y = np.fft.irfft2(yhat.transpose(2, 1, 0).reshape(n, c, h, nf), s=(h, w))
        return y.astype(x.dtype, copy=False)

    def _forward(self, params, x, rng):
        xp = array_namespace(params, x)
        n, c, h, w = x.shape
        dtype = getval(x).dtype
        mats = self.fourier_matrices(params, h, w)
        logdet = self._checked_logdet(mats, dtype)
        if self._real_path(params, x, xp):
            return self._apply(mats, x, False), _logdet_vector(logdet.astype(dtype), x)
        xhat = xp.transpose(xp.reshape(xp.fft.fft2(x), (n, c, h * w)), (2, 1, 0))  # (hw, c, n)
        yhat = xp.matmul(xp.reshape(mats, (h * w, c, c)), xhat)
        yhat = xp.reshape(xp.transpose(yhat, (2, 1, 0)), (n, c, h, w))
        y = xp.real(xp.fft.ifft2(yhat)).astype(dtype)
        return y, _logdet_vector(logdet.astype(dtype), x)

    def _inverse(self, params, y, rng):
        xp = array_namespace(params, y)
        n, c, h, w = y.shape
        dtype = getval(y).dtype
        mats = self.fourier_matrices(params, h, w)
        logdet = self._checked_logdet(mats, dtype)
        if self._real_path(params, y, xp):
            return self._apply(mats, y, True), -_logdet_vector(logdet.astype(dtype), y)
        yhat = xp.transpose(xp.reshape(xp.fft.fft2(y), (n, c, h * w)), (2, 1, 0))  # (hw, c, n)
        xhat = xp.linalg.solve(xp.reshape(mats, (h * w, c, c)), yhat)
        xhat = xp.reshape(xp.transpose(xhat, (2, 1, 0)), (n, c, h, w))
        x = xp.real(xp.fft.ifft2(xhat)).astype(dtype)
        return x, -_logdet_vector(logdet.astype(dtype), y)


class EmergingConv2d(Bijection):
    """Emerging convolution: two masked autoregressive ``k x k`` convolutions with complementary
    masks (Hoogeboom et al., 2019), zero padding.

    .. math::

        f = R \\circ A_2 \\circ R \\circ A_1, \\qquad
        \\log|\\det J_f| = h\\,w \\sum_{o=1}^{c} \\left(\\log d^{(1)}_o + \\log d^{(2)}_o\\right),

    where each ``A`` is an autoregressive convolution (:mod:`flowmath.kernels.emerging`):
    pixel ``(i, j)`` of channel ``o`` of its output depends on the pixels before ``(i, j)`` in
    raster order, on channels ``< o`` at ``(i, j)``, and on ``x_{o,i,j}`` through the centre tap
    ``d_o = exp(log_d_o) > 0``; its Jacobian is triangular with the centre taps on the diagonal.
    ``R`` reverses the order of pixels and channels, so ``R A_2 R`` is the autoregressive
    convolution with the complementary mask (kernel ``w2[::-1, ::-1, ::-1, ::-1]``): the two
    together have a full ``k x k`` receptive field. The inverse is ``A_1^{-1} R A_2^{-1} R``,
    each ``A^{-1}`` by sequential back-substitution in a numba kernel,
    :func:`flowmath.kernels.emerging.ar_solve` (autograd primitive with VJPs).

    Parameters
    ----------
    kernel_size : int, default 3
        Odd.

    Notes
    -----
    Parameters ``{"w1", "w2": (c, c, k, k), "log_d1", "log_d2": (c,)}``; only the masked taps of
    ``w1``, ``w2`` are used (the others receive zero gradient). Forward and inverse cost
    ``O(c^2 k^2 d)``, log-det ``O(c)``. ``init`` draws random taps scaled so that, for each
    output channel, the sum of the absolute off-diagonal taps is half the smallest centre tap:
    ``A`` is then strictly diagonally dominant and its inverse is bounded for every image size
    (an autoregressive inverse is a recursive filter; with large taps it can grow
    geometrically along the raster order).

    References
    ----------
    Hoogeboom, E., van den Berg, R., Welling, M. (2019). Emerging convolutions for generative
    normalizing flows. ICML 2019. arXiv:1901.11137.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 3, 4, 5))
    >>> layer = fm.EmergingConv2d()
    >>> params = layer.init(rng, x)
    >>> y, logdet = layer.forward(params, x)
    >>> x_back, minus = layer.inverse(params, y)
    >>> bool(np.allclose(x_back, x) and np.allclose(minus, -logdet))
    True
    """

    event_ndims = IMAGE

    def __init__(self, kernel_size: int = 3):
        self.kernel_size = _check_kernel_size(kernel_size)

    def _init(self, rng, x):
        c, k = x.shape[1], self.kernel_size
        mask = ar_mask(c, k)
        params = {}
        for i in (1, 2):
            log_d = 0.3 * rng.normal(size=c)
            w = rng.normal(size=(c, c, k, k)) * mask
            row_sums = np.abs(w).reshape(c, -1).sum(axis=1)
            scale = 0.5 * np.exp(log_d.min()) / max(float(row_sums.max()), 1e-300)
            params[f"w{i}"] = w * scale
            params[f"log_d{i}"] = log_d
        return params

    def _param_spec(self, event_shape):
        c, k = event_shape[0], self.kernel_size
        w, log_d = Leaf((c, c, k, k)), Leaf((c,), log=True)
        return {"w1": w, "log_d1": log_d, "w2": w, "log_d2": log_d}

    def _event_shape(self, params):
        return (getval(params["log_d1"]).shape[0], None, None)

    def _parts(self, params):
        xp = array_namespace(params)
        out = []
        for i in (1, 2):
            w, log_d = params[f"w{i}"], params[f"log_d{i}"]
            c = getval(log_d).shape[0]
            if getval(w).shape != (c, c, self.kernel_size, self.kernel_size):
                raise ValueError(
                    f"`params['w{i}']` must have shape ({c}, {c}, {self.kernel_size}, "
                    f"{self.kernel_size}); got {getval(w).shape}"
                )
            _check_log_range(log_d, f"params['log_d{i}']")
            d = xp.exp(log_d)
            out.append((w, d, log_d))
        return out

    def _logdet(self, parts, x):
        xp = array_namespace(parts, x)
        hw = x.shape[2] * x.shape[3]
        total = hw * (xp.sum(parts[0][2]) + xp.sum(parts[1][2]))
        return _logdet_vector(total, x)

    def _forward(self, params, x, rng):
        parts = self._parts(params)
        (w1, d1, _), (w2, d2, _) = parts
        z = ar_conv(w1, d1, x)
        y = reverse_order(ar_conv(w2, d2, reverse_order(z)))
        return y, self._logdet(parts, x)

    #: The inverse's own round trip ``f(f^-1(y))`` must match ``y`` to this many ``eps`` of the
    #: dtype (relative to ``max(1, max|y|)``): back-substitution through large taps grows
    #: geometrically along the raster order and can return finite garbage.
    ROUNDTRIP_EPS = 1e3

    def _inverse(self, params, y, rng):
        parts = self._parts(params)
        (w1, d1, _), (w2, d2, _) = parts
        z = reverse_order(ar_solve(w2, d2, reverse_order(y)))
        x = ar_solve(w1, d1, z)
        self._check_roundtrip(params, x, y)
        return x, -self._logdet(parts, y)

    def _check_roundtrip(self, params, x, y):
        """One forward convolution on the plain values (not traced): O(c^2 k^2 d), the cost of
        the inverse itself."""
        xv, yv = to_numpy(x), to_numpy(y)
        if not np.all(np.isfinite(xv)):
            return  # reported by the base class as a non-finite output
        raw = {k: to_numpy(v) for k, v in getval(params).items()}
        y_again = self._forward(raw, xv, None)[0]
        err = float(np.max(np.abs(y_again - yv))) / max(1.0, float(np.max(np.abs(yv))))
        limit = self.ROUNDTRIP_EPS * float(np.finfo(yv.dtype).eps)
        if not err <= limit:
            raise ValueError(
                "`params` make EmergingConv2d's inverse numerically unstable for this `y`: its "
                f"round trip f(f^-1(y)) misses y by {err:.3g} relative (> {limit:.3g} = "
                f"{self.ROUNDTRIP_EPS:g} eps); the back-substitution amplifies rounding "
                "(taps too large against the centre taps d)"
            )
