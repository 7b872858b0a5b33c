"""Inverse of a masked autoregressive convolution by back-substitution (emerging convolutions).

An autoregressive convolution (Hoogeboom et al., 2019) acts on one image ``x`` of shape
``(c, h, w)`` as

.. math::

    (A x)_{o,i,j} = d_o\\, x_{o,i,j}
        + \\sum_{(a,b) \\prec (p,p)} \\sum_{c'} w_{o,c',a,b}\\, x_{c', i+a-p, j+b-p}
        + \\sum_{c' < o} w_{o,c',p,p}\\, x_{c',i,j},

with zero padding, ``p = k // 2`` and ``(a, b) < (p, p)`` in raster order (``a < p``, or
``a = p`` and ``b < p``). Ordering the unknowns by pixel in raster order, then by channel, the
Jacobian ``A`` is lower triangular with ``d_o`` on the diagonal, so ``A x = y`` is solved by
forward substitution, one pixel and one channel at a time (:func:`_ar_solve_kernel`, a numba
kernel). Only the masked positions of ``w`` are read; ``w[o, o, p, p]`` is ignored (``d`` takes
its place).

This module holds the three pieces the house rules ask for:

* ``_ar_solve_kernel`` -- the private numba kernel (plain arrays in, plain array out);
* :func:`ar_solve` -- the autograd primitive around it, with VJPs with respect to ``w``, ``d``
  and ``y`` written in :mod:`autograd.numpy` (they call :func:`ar_solve` again, so second
  derivatives work);
* :func:`ar_solve_reference` -- the plain array twin (a pixel loop vectorised over the batch,
  with a per-pixel triangular solve), the reference in tests and the CuPy path;

plus :func:`ar_conv`, the forward map ``x -> A x`` in :mod:`autograd.numpy`, and
:func:`ar_mask`, the mask.

The transpose needed by the VJP is itself an autoregressive convolution after reversing the
order of pixels and channels: with ``R`` that reversal,
``A^T = R A'' R`` where ``A''`` has kernel ``w''[o, c] = w[C-1-c, C-1-o]`` (same spatial taps)
and diagonal ``d[::-1]``. Hence ``A^{-T} g = R\\, \\mathrm{ar\\_solve}(w'', d[::-1], R g)``.

References
----------
Hoogeboom, E., van den Berg, R., Welling, M. (2019). Emerging convolutions for generative
normalizing flows. ICML 2019. arXiv:1901.11137.
"""

from __future__ import annotations

import autograd.numpy as anp
import numba
import numpy as np
from autograd.extend import defvjp, primitive

from .._xp import getval
from .conv_cm import conv2d_cm, swap01

__all__ = [
    "ar_conv",
    "ar_conv_reference",
    "ar_mask",
    "ar_solve",
    "ar_solve_reference",
    "reverse_order",
]


def ar_mask(c: int, k: int, dtype=np.float64) -> np.ndarray:
    """0/1 mask of shape ``(c, c, k, k)``: the taps an autoregressive convolution may use.

    All channels at the spatial offsets before the centre in raster order, and at the centre
    the strictly lower channels ``c' < o``. The centre diagonal is excluded (it is ``d``).
    """
    p = k // 2
    mask = np.zeros((c, c, k, k), dtype=dtype)
    mask[:, :, :p, :] = 1.0
    mask[:, :, p, :p] = 1.0
    mask[:, :, p, p] = np.tril(np.ones((c, c), dtype=dtype), -1)
    return mask


def reverse_order(z):
    """``R z``: reverse channels and both spatial axes of a batch ``(n, c, h, w)``."""
    return z[:, ::-1, ::-1, ::-1]


def _transposed_kernel(w, d):
    """Kernel and diagonal ``(w'', d'')`` with ``A_{w,d}^T = R A_{w'',d''} R``."""
    return anp.transpose(w[::-1, ::-1], (1, 0, 2, 3)), d[::-1]


def ar_conv(w, d, x):
    """The forward map ``A x`` (autograd-differentiable in all arguments).

    The masked kernel is one ``'same'`` zero-padded convolution, computed in the channel-major
    layout as a single GEMM over the batch and the pixels
    (:func:`flowmath.kernels.conv_cm.conv2d_cm`), plus the diagonal ``d x``.

    Parameters
    ----------
    w : ndarray, shape (c, c, k, k)
        Kernel; only the positions of :func:`ar_mask` are used.
    d : ndarray, shape (c,)
        The centre taps on the diagonal (non-zero for an invertible map).
    x : ndarray, shape (n, c, h, w)

    Returns
    -------
    ndarray, shape (n, c, h, w)
    """
    c, k = w.shape[0], w.shape[2]
    wm = w * ar_mask(c, k, getval(w).dtype)
    return swap01(conv2d_cm(swap01(x), wm)) + d[None, :, None, None] * x


def ar_conv_reference(w, d, x):
    """The previous formula of :func:`ar_conv`: a per-sample im2col of slices of the padded
    input (``anp.stack``) and one batched product (the twin the tests compare with)."""
    c, k = w.shape[0], w.shape[2]
    n, _, h, wd = x.shape
    p = k // 2
    wm = w * ar_mask(c, k, getval(w).dtype)
    xpad = anp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="constant")
    # im2col over the k*k offsets, then one matrix product: (c, c*k*k) @ (n, c*k*k, h*w)
    cols = anp.stack(
        [xpad[:, :, a : a + h, b : b + wd] for a in range(k) for b in range(k)], axis=2
    )
    cols = anp.reshape(cols, (n, c * k * k, h * wd))
    y = anp.matmul(anp.reshape(wm, (c, c * k * k)), cols)
    return anp.reshape(y, (n, c, h, wd)) + d[None, :, None, None] * x


def _weight_grad(gy, x, k):
    """``G[o, c, a, b] = sum_{n,i,j} gy[n, o, i, j] x[n, c, i+a-p, j+b-p]`` (zero padded)."""
    n, c, h, wd = x.shape
    p = k // 2
    xpad = anp.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), mode="constant")
    rows = []
    for a in range(k):
        cols = [
            anp.tensordot(gy, xpad[:, :, a : a + h, b : b + wd], axes=([0, 2, 3], [0, 2, 3]))
            for b in range(k)
        ]
        rows.append(anp.stack(cols, axis=-1))
    return anp.stack(rows, axis=-2)


@numba.njit(cache=True)
def _ar_solve_kernel(w, d, y):  # pragma: no cover - compiled; its .py_func is tested
    n, c, h, wd = y.shape
    k = w.shape[2]
    p = k // 2
    x = np.empty_like(y)
    for s in range(n):
        for i in range(h):
            for j in range(wd):
                for o in range(c):
                    acc = y[s, o, i, j]
                    for a in range(p + 1):
                        ii = i + a - p
                        if ii < 0:
                            continue
                        bmax = k if a < p else p  # before the centre in raster order
                        for b in range(bmax):
                            jj = j + b - p
                            if jj < 0 or jj >= wd:
                                continue
                            for q in range(c):
                                acc -= w[o, q, a, b] * x[s, q, ii, jj]
                    for q in range(o):  # centre tap, strictly lower channels
                        acc -= w[o, q, p, p] * x[s, q, i, j]
                    x[s, o, i, j] = acc / d[o]
    return x


def _checked(w, d, y):
    """Shapes, dtypes and contiguity before the kernel (it indexes without bounds checks):
    ``y`` ``(n, c, h, w)`` float32/float64, ``w`` ``(c, c, k, k)`` with ``k`` odd, ``d`` ``(c,)``
    non-zero; returns C-contiguous ``w, d`` in ``y``'s dtype and ``y``."""
    y = np.asarray(y)
    if y.dtype not in (np.float32, np.float64):
        raise TypeError(f"`y` must be a float32 or float64 array; got dtype {y.dtype}")
    if y.ndim != 4:
        raise ValueError(f"`y` must have shape (n, c, h, w); got {y.shape}")
    c = y.shape[1]
    w, d = np.asarray(w), np.asarray(d)
    if w.dtype.kind != "f" or d.dtype.kind != "f":
        raise TypeError(f"`w` and `d` must be real floating arrays; got {w.dtype}, {d.dtype}")
    if w.ndim != 4 or w.shape[:2] != (c, c) or w.shape[2] != w.shape[3] or w.shape[2] % 2 == 0:
        raise ValueError(f"`w` must have shape ({c}, {c}, k, k) with k odd; got {w.shape}")
    if d.shape != (c,):
        raise ValueError(f"`d` must have shape ({c},); got {d.shape}")
    if not np.all(d != 0):
        raise ValueError("`d` must be non-zero (the diagonal of a triangular system)")
    return (
        np.ascontiguousarray(w, dtype=y.dtype),
        np.ascontiguousarray(d, dtype=y.dtype),
        np.ascontiguousarray(y),
    )


@primitive
def ar_solve(w, d, y):
    """Solve ``A_{w,d} x = y`` for ``x`` by forward substitution (numba kernel).

    Parameters
    ----------
    w : ndarray, shape (c, c, k, k)
        Kernel (``k`` odd); only the positions of :func:`ar_mask` are read.
    d : ndarray, shape (c,)
        Non-zero centre taps.
    y : ndarray, shape (n, c, h, w)

    Returns
    -------
    ndarray, shape (n, c, h, w)
        In the dtype of ``y`` (``w`` and ``d`` are cast to it).

    Notes
    -----
    Cost ``O(n c^2 k^2 h w)``: linear in the number of pixels, like the forward convolution.
    Differentiable by autograd in all three arguments (to any order).
    """
    w, d, y = _checked(w, d, y)
    return _ar_solve_kernel(w, d, y)


def _solve_transpose(w, d, g):
    """``A_{w,d}^{-T} g`` (through :func:`ar_solve`, so it is differentiable again)."""
    wt, dt = _transposed_kernel(w, d)
    return reverse_order(ar_solve(wt, dt, reverse_order(g)))


def _vjp_w(ans, w, d, y):
    c, k = w.shape[0], w.shape[2]
    mask = ar_mask(c, k, ans.dtype)

    def vjp(g):
        gy = _solve_transpose(w, d, g)
        return -_weight_grad(gy, ans, k) * mask

    return vjp


def _vjp_d(ans, w, d, y):
    def vjp(g):
        gy = _solve_transpose(w, d, g)
        return -anp.sum(gy * ans, axis=(0, 2, 3))

    return vjp


def _vjp_y(ans, w, d, y):
    return lambda g: _solve_transpose(w, d, g)


defvjp(ar_solve, _vjp_w, _vjp_d, _vjp_y)


def ar_solve_reference(w, d, y, xp=np):
    """Plain array twin of :func:`ar_solve` (the test reference and the CuPy path).

    Visits the pixels in raster order; at each, subtracts the contribution of the pixels already
    solved (vectorised over the batch and channels) and solves the ``c x c`` lower-triangular
    system of the centre taps. ``xp`` is :mod:`numpy` or :mod:`cupy`. Not differentiable.
    """
    n, c, h, wd = y.shape
    k = w.shape[2]
    p = k // 2
    w = xp.asarray(w, dtype=y.dtype)
    centre = xp.tril(w[:, :, p, p], -1) + xp.diag(xp.asarray(d, dtype=y.dtype))
    centre_inv = xp.linalg.inv(centre)
    x = xp.zeros_like(y)
    for i in range(h):
        for j in range(wd):
            rhs = y[:, :, i, j].copy()
            for a in range(p + 1):
                ii = i + a - p
                if ii < 0:
                    continue
                for b in range(k if a < p else p):
                    jj = j + b - p
                    if 0 <= jj < wd:
                        rhs -= x[:, :, ii, jj] @ w[:, :, a, b].T
            x[:, :, i, j] = rhs @ centre_inv.T
    return x
