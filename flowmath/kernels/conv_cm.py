"""The convolutional conditioner in the channel-major layout: every convolution one GEMM.

:func:`flowmath.nets.conv2d` computes a ``k x k`` convolution per sample, ``(o, k^2 c)`` times
``(k^2 c, h w)`` for each of the ``n`` images: ``n`` small products, and under autograd the
nine shifted windows are slices of the padded input whose VJP scatters with ``numpy.add.at``
(on a Glow step of 256 x 12 x 16 x 16 that scatter alone took seconds). Here activations are
kept as ``(channels, n, h, w)``, so that the batch and the pixels form one long axis and every
layer is a single matrix product:

* ``k = 1``: ``(o, c) @ (c, n h w)``;
* ``k > 1`` with few input channels, by **im2col**: the ``k^2`` windows of the zero-padded
  input stacked as ``(k^2 c, n h w)`` rows (order ``(u, v, c)``), times the weights reshaped to
  ``(o, k^2 c)``;
* ``k > 1`` with few output channels, by **taps**: ``Z = W_t @ pad(a)`` with ``W_t`` the
  ``(k^2 o, c)`` stack of the taps ``W[:, :, u, v]`` and ``pad(a)`` ``(c, n (h+2r)(w+2r))``,
  then :math:`y_{o,n,i,j} = \\sum_{u,v} Z_{(u,v,o),n,i+u,j+v}` — the copied matrix has
  ``k^2 o`` rows instead of ``k^2 c``.

The layout changes, the padding, im2col and the tap sum are linear autograd primitives whose
VJPs are each other (swap / swap, pad / crop, im2col / col2im, tap sum / tap spread), written
with whole-array slice assignments, so gradients come back contiguous and in the input's dtype,
and second derivatives are traced like any other. The reference twin is
:func:`flowmath.nets.convnet_apply` (per-sample im2col, the previous formula).
"""

from __future__ import annotations

import autograd.numpy as anp
from autograd.extend import defvjp, defvjp_argnums, primitive

from .. import nets
from .._xp import array_namespace, getval

__all__ = ["conv2d_cm", "convnet_apply_cm", "swap01"]


@primitive
def swap01(x):
    """``(n, c, ...) <-> (c, n, ...)``, contiguous (its own adjoint)."""
    xp = array_namespace(x)
    return xp.ascontiguousarray(xp.swapaxes(x, 0, 1))


defvjp(swap01, lambda ans, x: lambda g: swap01(g))


@primitive
def _pad(a, r):
    """Zero-pad the last two axes by ``r``."""
    xp = array_namespace(a)
    c, n, h, w = a.shape
    out = xp.zeros((c, n, h + 2 * r, w + 2 * r), dtype=a.dtype)
    out[:, :, r : r + h, r : r + w] = a
    return out


@primitive
def _crop(g, r):
    """Adjoint of :func:`_pad`: the interior, contiguous."""
    xp = array_namespace(g)
    h, w = g.shape[2] - 2 * r, g.shape[3] - 2 * r
    return xp.ascontiguousarray(g[:, :, r : r + h, r : r + w])


defvjp(_pad, lambda ans, a, r: lambda g: _crop(g, r))
defvjp(_crop, lambda ans, g, r: lambda h: _pad(h, r))


@primitive
def _im2col(a, k):
    """``(c, n, h, w) -> (k^2 c, n h w)``: the windows of the zero-padded input, row
    ``(u k + v) c + channel`` holding ``a[channel, :, i + u - r, j + v - r]``."""
    xp = array_namespace(a)
    c, n, h, w = a.shape
    r = (k - 1) // 2
    pad = _pad(a, r)
    cols = xp.empty((k * k, c, n, h, w), dtype=a.dtype)
    for u in range(k):
        for v in range(k):
            cols[u * k + v] = pad[:, :, u : u + h, v : v + w]
    return cols.reshape(k * k * c, n * h * w)


@primitive
def _col2im(g, k, shape):
    """Adjoint of :func:`_im2col`: the windows added back into the padded input, cropped."""
    xp = array_namespace(g)
    c, n, h, w = shape
    r = (k - 1) // 2
    g = g.reshape(k * k, c, n, h, w)
    pad = xp.zeros((c, n, h + 2 * r, w + 2 * r), dtype=g.dtype)
    for u in range(k):
        for v in range(k):
            pad[:, :, u : u + h, v : v + w] += g[u * k + v]
    return _crop(pad, r)


defvjp(_im2col, lambda ans, a, k: lambda g: _col2im(g, k, getval(a).shape))
defvjp(_col2im, lambda ans, g, k, shape: lambda h: _im2col(h, k))


@primitive
def _tap_sum(Z, k, shape):
    """``Z`` ``(k^2 o, n (h+2r) (w+2r))`` -> ``(o, n, h, w)``:
    ``y[o, n, i, j] = sum_{u,v} Z[(u k + v) o + o, n, i + u, j + v]``."""
    o, n, h, w = shape
    r = (k - 1) // 2
    Z = Z.reshape(k * k, o, n, h + 2 * r, w + 2 * r)
    out = Z[0, :, :, :h, :w].copy()
    for t in range(1, k * k):
        u, v = divmod(t, k)
        out += Z[t, :, :, u : u + h, v : v + w]
    return out


@primitive
def _tap_spread(g, k):
    """Adjoint of :func:`_tap_sum`: ``g`` ``(o, n, h, w)`` placed at every tap's offset."""
    xp = array_namespace(g)
    o, n, h, w = g.shape
    r = (k - 1) // 2
    Z = xp.zeros((k * k, o, n, h + 2 * r, w + 2 * r), dtype=g.dtype)
    for t in range(k * k):
        u, v = divmod(t, k)
        Z[t, :, :, u : u + h, v : v + w] = g
    return Z.reshape(k * k * o, n * (h + 2 * r) * (w + 2 * r))


defvjp(_tap_sum, lambda ans, Z, k, shape: lambda g: _tap_spread(g, k))
defvjp(_tap_spread, lambda ans, g, k: lambda h: _tap_sum(h, k, getval(g).shape))


@primitive
def _gemm_bias_act(Wm, X, b, act):
    """``act(Wm @ X + b[:, None])`` with the bias and the activation applied in place on the
    product (one pass, no temporaries of its size); ``act`` is ``"relu"``, ``"tanh"`` or
    ``None``."""
    xp = array_namespace(Wm, X, b)
    y = xp.matmul(Wm, X)
    y += b.reshape(-1, 1)
    if act == "relu":
        xp.maximum(y, 0, out=y)
    elif act == "tanh":
        xp.tanh(y, out=y)
    return y


def _gemm_bias_act_vjp(argnums, ans, args, kwargs):
    Wm, X, b, act = args

    def vjp(g):
        # the slope from the output: relu' = [y > 0], tanh' = 1 - y^2 (traced when ``ans``
        # is, i.e. under a second derivative)
        if act == "relu":
            g = g * (getval(ans) > 0)
        elif act == "tanh":
            g = g * (1.0 - ans * ans)
        grads = {
            0: lambda: anp.matmul(g, anp.transpose(X)),
            1: lambda: anp.matmul(anp.transpose(Wm), g),
            2: lambda: anp.sum(g, axis=1),
        }
        return tuple(grads[a]() for a in argnums)

    return vjp


defvjp_argnums(_gemm_bias_act, _gemm_bias_act_vjp)


def _conv_cm(a, W, b, act):
    """One ``'same'`` convolution in the channel-major layout followed by the activation
    ``act`` (``"relu"``, ``"tanh"`` or ``None``): ``a`` ``(c, n, h, w)``, ``W``
    ``(o, c, k, k)``, ``b`` ``(o,)``; returns ``(o, n, h, w)``."""
    c, n, h, w = getval(a).shape
    o, _, k, _ = getval(W).shape
    if k == 1:
        y = _gemm_bias_act(anp.reshape(W, (o, c)), anp.reshape(a, (c, n * h * w)), b, act)
        return anp.reshape(y, (o, n, h, w))
    r = (k - 1) // 2
    if c * h * w <= o * (h + 2 * r) * (w + 2 * r):  # im2col copies fewer rows
        Wm = anp.reshape(anp.transpose(W, (0, 2, 3, 1)), (o, k * k * c))
        return anp.reshape(_gemm_bias_act(Wm, _im2col(a, k), b, act), (o, n, h, w))
    Wt = anp.reshape(anp.transpose(W, (2, 3, 0, 1)), (k * k * o, c))
    padded = anp.reshape(_pad(a, r), (c, -1))
    y = _tap_sum(anp.matmul(Wt, padded), k, (o, n, h, w)) + anp.reshape(b, (o, 1, 1, 1))
    return _ACT_FN[act](y)


def conv2d_cm(a, W):
    """One ``'same'`` zero-padded ``k x k`` cross-correlation without bias in the channel-major
    layout, :math:`y_{o,n,i,j} = \\sum_{c,u,v} W_{o,c,u,v}\\, a_{c,n,i+u-r,j+v-r}`: ``a``
    ``(c, n, h, w)``, ``W`` ``(o, c, k, k)``; returns ``(o, n, h, w)``, one GEMM."""
    o, c, k, _ = getval(W).shape
    _, n, h, w = getval(a).shape
    if k == 1:
        return anp.reshape(
            anp.matmul(anp.reshape(W, (o, c)), anp.reshape(a, (c, -1))), (o, n, h, w)
        )
    r = (k - 1) // 2
    if c * h * w <= o * (h + 2 * r) * (w + 2 * r):  # im2col copies fewer rows
        Wm = anp.reshape(anp.transpose(W, (0, 2, 3, 1)), (o, k * k * c))
        return anp.reshape(anp.matmul(Wm, _im2col(a, k)), (o, n, h, w))
    Wt = anp.reshape(anp.transpose(W, (2, 3, 0, 1)), (k * k * o, c))
    return _tap_sum(anp.matmul(Wt, anp.reshape(_pad(a, r), (c, -1))), k, (o, n, h, w))


_ACT_FN = {
    None: lambda y: y,
    "relu": lambda y: y * (getval(y) > 0),
    "tanh": lambda y: nets.tanh(y),
}


def convnet_apply_cm(leaves, x, act):
    """:func:`flowmath.nets.convnet_apply` in the channel-major layout: ``leaves`` the flat
    ``(W_0, b_0, W_1, b_1, ...)``, ``x`` ``(n, c, h, w)``, ``act`` the hidden activation
    (``"relu"`` or ``"tanh"``); returns ``(n, c_out, h, w)``."""
    a = swap01(x)
    n_layers = len(leaves) // 2
    for k in range(n_layers):
        a = _conv_cm(a, leaves[2 * k], leaves[2 * k + 1], act if k < n_layers - 1 else None)
    return swap01(a)
