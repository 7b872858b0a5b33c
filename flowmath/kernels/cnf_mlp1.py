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

**Where NumPy has a SIMD tanh** (``flowmath.kernels.cnf_tanh.USE_KERNEL`` false, decided per
machine from NumPy's dispatch), :func:`mlp1_vjp`, :func:`cnf1_forward` and :func:`cnf1_vjp` take
the activations ``h = tanh(z W_0 + b_0)`` from one BLAS product and NumPy's tanh (in place: one
``(n, H)`` array) and fuse the rest row by row; elsewhere they compute ``h`` themselves with the
scalar formula of :mod:`flowmath.kernels.cnf_tanh`. Measured on an AVX-512 EPYC, alternating
in one process (1 thread): W2's gradient 12.4 ms (hybrid) against 14.5 (the NumPy VJP) and 23.8
(the all-numba kernel), W3's CNF training step 16.1 against 22.9 and 29.2; with glibc's
allocator unsettled (the NumPy paths then fault their temporaries back in on every call) 12.7
against 31.5 and 24.4, 15.9 against 83.8 and 24.7. :func:`mlp1_forward` keeps its scalar tanh
and is not used there (``flowmath.ode.dynamics.FUSED_FORWARD``): the NumPy forward is as fast.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from . import cnf_tanh as _cnf_tanh

__all__ = ["cnf1_forward", "cnf1_vjp", "mlp1_forward", "mlp1_vjp"]


# reassociation and contraction only (vectorised sums, FMA); no assumptions about NaN or inf, so
# a non-finite state still propagates to the solver's check
_FM = {"reassoc", "contract"}


@numba.njit(cache=True, inline="always")
def _tanh(v):
    e = math.exp(-2.0 * abs(v))
    r = (1.0 - e) / (1.0 + e)
    return -r if v < 0.0 else r


@numba.njit(cache=True, fastmath=_FM, inline="always")
def _hidden(z, r, W0, b0, hbuf):
    """``hbuf = tanh(z[r] W0 + b0)`` (inner loops run along the contiguous hidden axis)."""
    d = z.shape[1]
    H = W0.shape[1]
    for k in range(H):
        hbuf[k] = b0[k]
    for j in range(d):
        zj = z[r, j]
        for k in range(H):
            hbuf[k] += zj * W0[j, k]
    for k in range(H):
        hbuf[k] = _tanh(hbuf[k])


@numba.njit(cache=True, fastmath=_FM)  # an ordinary call: inline="always" measured 1-2 % slower
def _output(hbuf, r, W1T, b1, f):
    """``f[r] = hbuf W1 + b1``."""
    dout, H = W1T.shape
    for i in range(dout):
        acc = b1[i]
        for k in range(H):
            acc += hbuf[k] * W1T[i, k]
        f[r, i] = acc


@numba.njit(cache=True, fastmath=_FM, inline="always")
def _output_vjp(hbuf, a, r, W1T, b1, f, gbuf, gW1T, gb1):
    """:func:`_output` and its VJP with cotangent ``a[r]``: accumulates ``gW1T``, ``gb1`` and
    sets ``gbuf`` to the cotangent of the activations, ``a[r] W1^T``."""
    dout, H = W1T.shape
    for k in range(H):
        gbuf[k] = 0.0
    for i in range(dout):
        ai = a[r, i]
        gb1[i] += ai
        acc = b1[i]
        for k in range(H):
            acc += hbuf[k] * W1T[i, k]
            gbuf[k] += ai * W1T[i, k]
            gW1T[i, k] += hbuf[k] * ai
        f[r, i] = acc


@numba.njit(cache=True, fastmath=_FM, inline="always")
def _hidden_vjp(z, r, W0, gbuf, gz, gW0):
    """VJP of the pre-activation ``z[r] W0 + b0`` with cotangent ``gbuf``: accumulates ``gW0``
    and sets ``gz[r]`` (``b0``'s share, ``gbuf`` itself, is the caller's)."""
    d, H = W0.shape
    for j in range(d):
        zj = z[r, j]
        acc = 0.0
        for k in range(H):
            gW0[j, k] += zj * gbuf[k]
            acc += gbuf[k] * W0[j, k]
        gz[r, j] = acc


@numba.njit(cache=True, fastmath=_FM)
def _mlp1_forward(z, W0, b0, W1T, b1, f):
    hbuf = np.empty(W0.shape[1])
    for r in range(z.shape[0]):
        _hidden(z, r, W0, b0, hbuf)
        _output(hbuf, r, W1T, b1, f)


@numba.njit(cache=True, fastmath=_FM)
def _mlp1_vjp(z, a, W0, b0, W1T, b1, f, gz, gW0, gb0, gW1T, gb1):
    H = W0.shape[1]
    hbuf = np.empty(H)
    gbuf = np.empty(H)
    for r in range(z.shape[0]):
        _hidden(z, r, W0, b0, hbuf)
        _output_vjp(hbuf, a, r, W1T, b1, f, gbuf, gW1T, gb1)
        for k in range(H):
            gp = gbuf[k] * (1.0 - hbuf[k] * hbuf[k])
            gbuf[k] = gp
            gb0[k] += gp
        _hidden_vjp(z, r, W0, gbuf, gz, gW0)


@numba.njit(cache=True, fastmath=_FM)
def _cnf1_forward(z, W0, b0, W1T, b1, c, f, tr):
    H = W0.shape[1]
    hbuf = np.empty(H)
    for r in range(z.shape[0]):
        _hidden(z, r, W0, b0, hbuf)
        t = 0.0
        for k in range(H):
            t += (1.0 - hbuf[k] * hbuf[k]) * c[k]
        tr[r] = t
        _output(hbuf, r, W1T, b1, f)


@numba.njit(cache=True, fastmath=_FM)
def _cnf1_vjp(z, af, at, W0, b0, W1T, b1, c, f, tr, gz, gW0, gb0, gW1T, gb1, gc):
    H = W0.shape[1]
    hbuf = np.empty(H)
    gbuf = np.empty(H)
    for r in range(z.shape[0]):
        _hidden(z, r, W0, b0, hbuf)
        _output_vjp(hbuf, af, r, W1T, b1, f, gbuf, gW1T, gb1)
        ar = at[r]
        t = 0.0
        for k in range(H):
            h = hbuf[k]
            s = 1.0 - h * h
            t += s * c[k]
            gp = gbuf[k] * s - 2.0 * ar * c[k] * h * s
            gc[k] += s * ar
            gbuf[k] = gp
            gb0[k] += gp
        tr[r] = t
        _hidden_vjp(z, r, W0, gbuf, gz, gW0)


# -- the same kernels with the activations h = tanh(z W0 + b0) given (computed by BLAS and
# NumPy's SIMD tanh where it has one: flowmath.kernels.cnf_tanh.USE_KERNEL false)
@numba.njit(cache=True, fastmath=_FM)
def _mlp1_vjp_h(z, h, a, W0, W1T, b1, f, gz, gW0, gb0, gW1T, gb1):
    H = W0.shape[1]
    gbuf = np.empty(H)
    for r in range(z.shape[0]):
        hr = h[r]
        _output_vjp(hr, a, r, W1T, b1, f, gbuf, gW1T, gb1)
        for k in range(H):
            gp = gbuf[k] * (1.0 - hr[k] * hr[k])
            gbuf[k] = gp
            gb0[k] += gp
        _hidden_vjp(z, r, W0, gbuf, gz, gW0)


@numba.njit(cache=True, fastmath=_FM)
def _cnf1_forward_h(h, W1T, b1, c, f, tr):
    H = h.shape[1]
    for r in range(h.shape[0]):
        hr = h[r]
        t = 0.0
        for k in range(H):
            t += (1.0 - hr[k] * hr[k]) * c[k]
        tr[r] = t
        _output(hr, r, W1T, b1, f)


@numba.njit(cache=True, fastmath=_FM)
def _cnf1_vjp_h(z, h, af, at, W0, W1T, b1, c, f, tr, gz, gW0, gb0, gW1T, gb1, gc):
    H = W0.shape[1]
    gbuf = np.empty(H)
    for r in range(z.shape[0]):
        hr = h[r]
        _output_vjp(hr, af, r, W1T, b1, f, gbuf, gW1T, gb1)
        ar = at[r]
        t = 0.0
        for k in range(H):
            hk = hr[k]
            s = 1.0 - hk * hk
            t += s * c[k]
            gp = gbuf[k] * s - 2.0 * ar * c[k] * hk * s
            gc[k] += s * ar
            gbuf[k] = gp
            gb0[k] += gp
        tr[r] = t
        _hidden_vjp(z, r, W0, gbuf, gz, gW0)


def _activations(z, W0, b0):
    """``tanh(z W0 + b0)``, shape ``(n, H)``, by BLAS and NumPy's tanh (in place: one array)."""
    pre = z @ W0
    pre += b0
    return np.tanh(pre, out=pre)


def _numpy_tanh() -> bool:
    return not _cnf_tanh.USE_KERNEL


def _c(x):
    return np.ascontiguousarray(x, dtype=np.float64)


def _checked(z, W0, b0, W1, b1, *, square=False, **cotangents):
    """Check every array before a kernel sees it (the kernels index without bounds checks, so a
    bias one entry short would read or write past its buffer): real dtype, ``z`` of shape
    ``(n, d)``, ``W0`` ``(d, H)``, ``b0`` ``(H,)``, ``W1`` ``(H, d_out)``, ``b1`` ``(d_out,)``
    (``d_out = d`` when ``square``) and each cotangent shaped like its output. Returns
    C-contiguous float64 copies ``(z, W0, b0, W1^T, b1, *cotangents)``."""
    arrays = {"z": z, "W0": W0, "b0": b0, "W1": W1, "b1": b1, **cotangents}
    for name, a in arrays.items():
        if not hasattr(a, "dtype") or a.dtype.kind not in "fiu":
            raise TypeError(
                f"`{name}` must be a real NumPy array; got {getattr(a, 'dtype', type(a).__name__)}"
            )
    n, d = z.shape if z.ndim == 2 else (None, None)
    H = W0.shape[1] if W0.ndim == 2 else None
    d_out = W1.shape[1] if W1.ndim == 2 else None
    want = {
        "z": (n, d),
        "W0": (d, H),
        "b0": (H,),
        "W1": (H, d if square else d_out),
        "b1": (d if square else d_out,),
    }
    for name in cotangents:
        want[name] = (n,) if name == "at" else (n, d if square else d_out)
    for name, shape in want.items():
        got = arrays[name].shape
        if None in shape or got != shape:
            want_str = ", ".join("?" if s is None else str(s) for s in shape)
            raise ValueError(
                f"`{name}` must have shape ({want_str}"
                f"{',' if len(shape) == 1 else ''}) for the fused tanh-MLP kernel (z (n, d), W0 "
                f"(d, H), b0 (H,), W1 (H, d_out), b1 (d_out,)); got {got}"
            )
    out = [_c(z), _c(W0), _c(b0), _c(W1.T), _c(b1)]
    return (*out, *(_c(a) for a in cotangents.values()))


def mlp1_forward(z, W0, b0, W1, b1):
    """``tanh(z W0 + b0) W1 + b1`` for ``z`` of shape ``(n, d)``."""
    z, W0, b0, W1T, b1 = _checked(z, W0, b0, W1, b1)
    f = np.empty((z.shape[0], W1T.shape[0]))
    _mlp1_forward(z, W0, b0, W1T, b1, f)
    return f


def mlp1_vjp(z, a, W0, b0, W1, b1):
    """``(f, gz, gW0, gb0, gW1, gb1)``: the value and the VJP with cotangent ``a``."""
    z, W0, b0, W1T, b1, a = _checked(z, W0, b0, W1, b1, a=a)
    f = np.empty((z.shape[0], W1T.shape[0]))
    gz = np.empty_like(z)
    gW0, gb0, gW1T, gb1 = (
        np.zeros_like(W0),
        np.zeros_like(b0),
        np.zeros_like(W1T),
        np.zeros_like(b1),
    )
    if _numpy_tanh():
        h = _activations(z, W0, b0)
        _mlp1_vjp_h(z, h, a, W0, W1T, b1, f, gz, gW0, gb0, gW1T, gb1)
    else:
        _mlp1_vjp(z, a, W0, b0, W1T, b1, f, gz, gW0, gb0, gW1T, gb1)
    return f, gz, gW0, gb0, gW1T.T, gb1


def cnf1_forward(z, W0, b0, W1, b1):
    """``(f, tr)``: the field and its exact divergence, shapes ``(n, d)`` and ``(n,)``."""
    z, W0, b0, W1T, b1 = _checked(z, W0, b0, W1, b1, square=True)
    c = np.sum(W0 * W1T, axis=0)
    f = np.empty_like(z)
    tr = np.empty(z.shape[0])
    if _numpy_tanh():
        _cnf1_forward_h(_activations(z, W0, b0), W1T, b1, c, f, tr)
    else:
        _cnf1_forward(z, W0, b0, W1T, b1, c, f, tr)
    return f, tr


def cnf1_vjp(z, af, at, W0, b0, W1, b1):
    """``(f, tr, gz, gW0, gb0, gW1, gb1)``: value and VJP of ``[f, tr]`` with cotangents
    ``(af, at)``; the weights' gradients include the path through ``c = diag(W0 W1)``."""
    z, W0, b0, W1T, b1, af, at = _checked(z, W0, b0, W1, b1, square=True, af=af, at=at)
    c = np.sum(W0 * W1T, axis=0)
    f = np.empty_like(z)
    tr = np.empty(z.shape[0])
    gz = np.empty_like(z)
    gW0, gb0, gW1T, gb1, gc = (
        np.zeros_like(W0),
        np.zeros_like(b0),
        np.zeros_like(W1T),
        np.zeros_like(b1),
        np.zeros_like(c),
    )
    if _numpy_tanh():
        h = _activations(z, W0, b0)
        _cnf1_vjp_h(z, h, af, at, W0, W1T, b1, c, f, tr, gz, gW0, gb0, gW1T, gb1, gc)
    else:
        _cnf1_vjp(z, af, at, W0, b0, W1T, b1, c, f, tr, gz, gW0, gb0, gW1T, gb1, gc)
    gW0 += gc[None, :] * W1T
    gW1 = gW1T.T + gc[:, None] * W0.T
    return f, tr, gz, gW0, gb0, gW1, gb1
