"""Fused kernels for one-hidden-layer tanh fields on low-dimensional states (numba).

For the fields the benchmarks and the toy experiments use, ``f(z) = tanh(z W_0 + b_0) W_1 + b_1``
with ``z`` of shape ``(n, d)``, ``d`` small and ``H`` hidden units, the matrix products are
skinny and NumPy's time goes into allocating and sweeping ``(n, H)`` temporaries. These kernels
make one pass over the rows and keep a row's ``H`` activations in registers/cache:

- :func:`mlp1_forward`: ``f``.
- :func:`mlp1_vjp`: ``f`` and the VJP ``(a^T df/dz, a^T df/dW_0, a^T df/db_0, a^T df/dW_1,
  a^T df/db_1)``.
- :func:`cnf1_forward`: ``f`` and the exact divergence
  :math:`\\operatorname{tr} \\partial f/\\partial z = \\sum_k \\tanh'(p_k)\\, c_k`,
  :math:`c_k = \\sum_i W_{0,ik} W_{1,ki}`.
- :func:`cnf1_vjp`: ``f``, the divergence and the VJP of both (the divergence's needs
  :math:`\\tanh''`).

The weights are the *effective* weights at time ``t`` (:mod:`flowmath.ode.dynamics` pulls the
gradients back to the layer parameters). The reference twins are the generic NumPy paths of
:class:`~flowmath.ode.dynamics.MLPDynamics` and :class:`~flowmath.ode.dynamics.CNFDynamics`
(tests compare them to 1e-13), whose ``__call__`` is differentiated by autograd; these kernels
are used only on plain float64 NumPy arrays.
"""

from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["cnf1_forward", "cnf1_vjp", "mlp1_forward", "mlp1_vjp"]


@numba.njit(cache=True, inline="always")
def _tanh(v):
    e = math.exp(-2.0 * abs(v))
    r = (1.0 - e) / (1.0 + e)
    return -r if v < 0.0 else r


@numba.njit(cache=True)
def _mlp1_forward(z, W0, b0, W1, b1, f):
    n, d = z.shape
    H = W0.shape[1]
    dout = W1.shape[1]
    for r in range(n):
        for i in range(dout):
            f[r, i] = b1[i]
        for k in range(H):
            p = b0[k]
            for j in range(d):
                p += z[r, j] * W0[j, k]
            h = _tanh(p)
            for i in range(dout):
                f[r, i] += h * W1[k, i]


@numba.njit(cache=True)
def _mlp1_vjp(z, a, W0, b0, W1, b1, f, gz, gW0, gb0, gW1, gb1):
    n, d = z.shape
    H = W0.shape[1]
    dout = W1.shape[1]
    for r in range(n):
        for i in range(dout):
            f[r, i] = b1[i]
            gb1[i] += a[r, i]
        for j in range(d):
            gz[r, j] = 0.0
        for k in range(H):
            p = b0[k]
            for j in range(d):
                p += z[r, j] * W0[j, k]
            h = _tanh(p)
            g = 0.0
            for i in range(dout):
                f[r, i] += h * W1[k, i]
                g += a[r, i] * W1[k, i]
                gW1[k, i] += h * a[r, i]
            gp = g * (1.0 - h * h)
            gb0[k] += gp
            for j in range(d):
                gW0[j, k] += z[r, j] * gp
                gz[r, j] += gp * W0[j, k]


@numba.njit(cache=True)
def _cnf1_forward(z, W0, b0, W1, b1, c, f, tr):
    n, d = z.shape
    H = W0.shape[1]
    for r in range(n):
        for i in range(d):
            f[r, i] = b1[i]
        t = 0.0
        for k in range(H):
            p = b0[k]
            for j in range(d):
                p += z[r, j] * W0[j, k]
            h = _tanh(p)
            t += (1.0 - h * h) * c[k]
            for i in range(d):
                f[r, i] += h * W1[k, i]
        tr[r] = t


@numba.njit(cache=True)
def _cnf1_vjp(z, af, at, W0, b0, W1, b1, c, f, tr, gz, gW0, gb0, gW1, gb1, gc):
    n, d = z.shape
    H = W0.shape[1]
    for r in range(n):
        for i in range(d):
            f[r, i] = b1[i]
            gb1[i] += af[r, i]
            gz[r, i] = 0.0
        t = 0.0
        ar = at[r]
        for k in range(H):
            p = b0[k]
            for j in range(d):
                p += z[r, j] * W0[j, k]
            h = _tanh(p)
            s = 1.0 - h * h
            dd = -2.0 * h * s
            t += s * c[k]
            g = 0.0
            for i in range(d):
                f[r, i] += h * W1[k, i]
                g += af[r, i] * W1[k, i]
                gW1[k, i] += h * af[r, i]
            gp = g * s + ar * c[k] * dd
            gc[k] += s * ar
            gb0[k] += gp
            for j in range(d):
                gW0[j, k] += z[r, j] * gp
                gz[r, j] += gp * W0[j, k]
        tr[r] = t


def _c(x):
    return np.ascontiguousarray(x, dtype=np.float64)


def mlp1_forward(z, W0, b0, W1, b1):
    """``tanh(z W0 + b0) W1 + b1`` for ``z`` of shape ``(n, d)``."""
    z, W0, b0, W1, b1 = map(_c, (z, W0, b0, W1, b1))
    f = np.empty((z.shape[0], W1.shape[1]))
    _mlp1_forward(z, W0, b0, W1, b1, f)
    return f


def mlp1_vjp(z, a, W0, b0, W1, b1):
    """``(f, gz, gW0, gb0, gW1, gb1)``: the value and the VJP with cotangent ``a``."""
    z, a, W0, b0, W1, b1 = map(_c, (z, a, W0, b0, W1, b1))
    f = np.empty((z.shape[0], W1.shape[1]))
    gz = np.empty_like(z)
    gW0, gb0, gW1, gb1 = (np.zeros_like(W0), np.zeros_like(b0), np.zeros_like(W1),
                          np.zeros_like(b1))
    _mlp1_vjp(z, a, W0, b0, W1, b1, f, gz, gW0, gb0, gW1, gb1)
    return f, gz, gW0, gb0, gW1, gb1


def cnf1_forward(z, W0, b0, W1, b1):
    """``(f, tr)``: the field and its exact divergence, shapes ``(n, d)`` and ``(n,)``."""
    z, W0, b0, W1, b1 = map(_c, (z, W0, b0, W1, b1))
    c = np.sum(W0 * W1.T, axis=0)
    f = np.empty_like(z)
    tr = np.empty(z.shape[0])
    _cnf1_forward(z, W0, b0, W1, b1, c, f, tr)
    return f, tr


def cnf1_vjp(z, af, at, W0, b0, W1, b1):
    """``(f, tr, gz, gW0, gb0, gW1, gb1)``: value and VJP of ``[f, tr]`` with cotangents
    ``(af, at)``; the weights' gradients include the path through ``c = diag(W0 W1)``."""
    z, af, at, W0, b0, W1, b1 = map(_c, (z, af, at, W0, b0, W1, b1))
    c = np.sum(W0 * W1.T, axis=0)
    f = np.empty_like(z)
    tr = np.empty(z.shape[0])
    gz = np.empty_like(z)
    gW0, gb0, gW1, gb1, gc = (np.zeros_like(W0), np.zeros_like(b0), np.zeros_like(W1),
                              np.zeros_like(b1), np.zeros_like(c))
    _cnf1_vjp(z, af, at, W0, b0, W1, b1, c, f, tr, gz, gW0, gb0, gW1, gb1, gc)
    gW0 += gc[None, :] * W1.T
    gW1 += gc[:, None] * W0.T
    return f, tr, gz, gW0, gb0, gW1, gb1
