"""The affine coupling of vectors, conditioner and transform fused into one autograd primitive
with a hand-written VJP (and its reference twin, the composed formula).

For the small models of the 2-D toy experiments (W9: d = 2, MLP 1 -> 64 -> 64 -> 2, batch 256)
the arithmetic of a coupling is ~0.3 MFLOP and the time goes to the autograd graph: about 40
recorded operations per coupling forward (split, three products, biases, activations, tanh,
exp, products, sum, concatenate, the parameter-tree look-ups), each with a node, a VJP closure,
a vector-space lookup and an ``unbroadcast`` in the backward pass. Here one coupling is one
node:

.. math::
    r, t = \\mathrm{MLP}(x_A), \\quad s = a \\odot \\tanh r, \\qquad
    y_B = x_B \\odot e^{s} + t, \\quad \\ell = \\textstyle\\sum_i s_i \\quad\\text{(forward)},
    \\qquad x_B = (y_B - t) \\odot e^{-s}, \\quad \\ell = -\\textstyle\\sum_i s_i
    \\quad\\text{(inverse)},

and its VJP, for cotangents :math:`(\\bar y, \\bar\\ell)` and :math:`u` the transformed output
(``y_B`` or ``x_B``), :math:`\\sigma = \\pm 1` the direction,

.. math::
    \\bar s = \\sigma\\,(\\bar u \\odot u' + \\bar\\ell), \\quad
    u' = x_B e^{s} \\text{ or } x_B, \\quad
    \\bar a = \\textstyle\\sum_n \\bar s \\odot \\tanh r, \\quad
    \\bar r = \\bar s \\odot a \\odot (1 - \\tanh^2 r),

then the MLP's backward pass (``W^T``-products, activation slopes) to the weights and to
``x_A``. The intermediates of the forward pass are kept from the primitive's own call (first
derivatives cost no recomputation); when the primitive is itself being differentiated (second
derivatives), the VJP recomputes them with :mod:`autograd.numpy` from the traced inputs, so
Hessian-vector products stay exact.

Hidden activations: ``"relu"`` (``x (x > 0)``) and ``"tanh"``. Vectors ``(n, d)`` only; any
split layout of :class:`flowmath.layers.coupling._Partition` (``"ab"``, ``"ba"``, ``"perm"``).
"""

from __future__ import annotations

import threading

import autograd.numpy as anp
import numpy as np
from autograd.builtins import tuple as ag_tuple
from autograd.extend import defvjp_argnums, primitive

from .. import activations, nets
from .._xp import getval

__all__ = ["ACTIVATIONS", "affine_coupling", "affine_coupling_reference"]

#: The hidden activations written out here (entries of :data:`flowmath.activations.ACTIVATIONS`;
#: their slopes are taken from the outputs: relu' = [a > 0], tanh' = 1 - h^2).
ACTIVATIONS = ("relu", "tanh")

_STASH = threading.local()


def _split(x, part):
    if part.layout == "ab":
        return x[:, : part.n_a], x[:, part.n_a :]
    if part.layout == "ba":
        return x[:, part.n_b :], x[:, : part.n_b]
    xp = x[:, part.perm]
    return xp[:, : part.n_a], xp[:, part.n_a :]


def _merge(xp, xa, xb, part):
    if part.layout == "ab":
        return xp.concatenate([xa, xb], axis=1)
    if part.layout == "ba":
        return xp.concatenate([xb, xa], axis=1)
    return xp.concatenate([xa, xb], axis=1)[:, part.inv_perm]


def _net(params):
    net = params["net"]
    return [(net[k]["W"], net[k]["b"]) for k in range(len(net))], params["scale"]


def _forward(xp, x, params, part, act, inverse):
    """The coupling written out; returns ``((out, logdet), cache)``."""
    tanh = activations.tanh if xp is anp else np.tanh
    layers, amp = _net(params)
    xa, xb = _split(x, part)
    h, hs, slopes = xa, [xa], []
    last = len(layers) - 1
    for k, (W, b) in enumerate(layers):
        a = xp.matmul(h, W) + b
        if k == last:
            h = a
            break
        if act == "relu":
            mask = getval(a) > 0
            h = a * mask
            slopes.append(mask)
        else:
            h = tanh(a)
            slopes.append(1.0 - h * h)
        hs.append(h)
    nb = part.n_b
    th = tanh(h[:, :nb])
    t = h[:, nb:]
    s = amp * th
    if inverse:
        es = xp.exp(-s)
        ub = (xb - t) * es
        ld = -xp.sum(s, axis=1)
    else:
        es = xp.exp(s)
        ub = xb * es + t
        ld = xp.sum(s, axis=1)
    out = (_merge(xp, xa, ub, part), ld)
    return out, (xa, xb, t, th, es, ub, hs, slopes, layers, amp)


def _backward(xp, g, cache, part, inverse, need_x, need_params):
    """Cotangents of ``x`` and of ``params`` from those of ``(out, logdet)``."""
    gy, gld = g
    xa, xb, t, th, es, ub, hs, slopes, layers, amp = cache
    gya, gub = _split(gy, part)
    if inverse:
        # ub = (xb - t) e^{-s}:  d/ds = -ub,  d/dt = -e^{-s},  d/dxb = e^{-s}
        gs = -(gub * ub) - gld[:, None]
        gt = -(gub * es)
    else:
        # ub = xb e^{s} + t:  d/ds = xb e^{s},  d/dt = 1,  d/dxb = e^{s}
        gs = gub * (xb * es) + gld[:, None]
        gt = gub
    gxb = gub * es
    g_amp = xp.sum(gs * th, axis=0)
    gh = xp.concatenate([gs * amp * (1.0 - th * th), gt], axis=1)
    grads = []
    for k in range(len(layers) - 1, -1, -1):
        W = layers[k][0]
        if need_params:
            grads.append({"W": xp.matmul(hs[k].T, gh), "b": xp.sum(gh, axis=0)})
        if k == 0 and not need_x:
            break
        gh = xp.matmul(gh, W.T)
        if k > 0:
            gh = gh * slopes[k - 1]
    gx = _merge(xp, gya + gh, gxb, part) if need_x else None
    gp = None
    if need_params:
        tree = {"net": grads[::-1], "scale": g_amp}
        # through nets._pack, so that under a second derivative the tree is a traced container;
        # the leaves go in as autograd's tuple (one traced argument per leaf): a plain tuple of
        # traced leaves would hide them from autograd and hand back a plain dict of boxes
        gp = nets._pack(ag_tuple(nets._leaves(tree)), nets._structure(tree))
    return gx, gp


def _forward_np(x, params, part, act, inverse):
    """:func:`_forward` with NumPy in fewer passes and arrays (the first-derivative path):
    bias and activation in place on each product, the log-det as one matrix-vector product
    ``tanh(r) a`` (equal to ``sum(s)`` to rounding), ``e^{\\pm s}`` in place on ``tanh(r) a``,
    and ``y_B`` written straight into the output. Same cache as :func:`_forward`."""
    layers, amp = _net(params)
    xa, xb = _split(x, part)
    h, hs, slopes = xa, [xa], []
    last = len(layers) - 1
    for k, (W, b) in enumerate(layers):
        h = np.matmul(h, W)
        h += b
        if k == last:
            break
        if act == "relu":
            mask = h > 0
            np.multiply(h, mask, out=h)
            slopes.append(mask)
        else:
            np.tanh(h, out=h)
            slope = np.multiply(h, h)
            np.subtract(1.0, slope, out=slope)
            slopes.append(slope)
        hs.append(h)
    nb = part.n_b
    th = np.tanh(h[:, :nb])
    t = h[:, nb:]
    ld = np.matmul(th, amp)
    es = np.multiply(th, amp)
    if inverse:
        np.negative(ld, out=ld)
        np.negative(es, out=es)
    np.exp(es, out=es)
    dtype = np.result_type(xb, es, t)
    if part.layout == "perm":
        ub = (xb - t) * es if inverse else xb * es + t
        return (_merge(np, xa, ub, part), ld), (xa, xb, t, th, es, ub, hs, slopes, layers, amp)
    out = np.empty(x.shape, dtype=dtype)
    if part.layout == "ab":
        out[:, : part.n_a] = xa
        ub = out[:, part.n_a :]
    else:
        out[:, nb:] = xa
        ub = out[:, :nb]
    if inverse:
        np.subtract(xb, t, out=ub)
        ub *= es
    else:
        np.multiply(xb, es, out=ub)
        ub += t
    return (out, ld), (xa, xb, t, th, es, ub, hs, slopes, layers, amp)


def _backward_np(g, cache, part, inverse, need_x, need_params):
    """:func:`_backward` with NumPy in fewer passes and arrays: the cotangents of ``s`` and
    ``t`` written into one block (the last layer's output cotangent), activation slopes
    applied in place, the input cotangent written straight into its output. Same operations
    in the same order as :func:`_backward` (bitwise equal results)."""
    gy, gld = g
    xa, xb, t, th, es, ub, hs, slopes, layers, amp = cache
    gya, gub = _split(gy, part)
    n, nb = th.shape
    dtype = np.result_type(gub, gld, es, xb, th, amp)
    gh = np.empty((n, nb + t.shape[1]), dtype=dtype)
    gs, gt = gh[:, :nb], gh[:, nb:]
    gxb = np.multiply(gub, es)
    if inverse:
        # ub = (xb - t) e^{-s}:  d/ds = -ub,  d/dt = -e^{-s},  d/dxb = e^{-s}
        np.multiply(gub, ub, out=gs)
        gs += gld[:, None]
        np.negative(gs, out=gs)  # -(gub ub) - gld, exactly
        np.negative(gxb, out=gt)
    else:
        # ub = xb e^{s} + t:  d/ds = xb e^{s},  d/dt = 1,  d/dxb = e^{s}
        np.multiply(xb, es, out=gs)
        gs *= gub
        gs += gld[:, None]
        gt[...] = gub
    tmp = np.multiply(gs, th)
    g_amp = np.sum(tmp, axis=0)
    np.multiply(th, th, out=tmp)
    np.subtract(1.0, tmp, out=tmp)
    gs *= amp
    gs *= tmp
    grads = []
    for k in range(len(layers) - 1, -1, -1):
        W = layers[k][0]
        if need_params:
            grads.append({"W": np.matmul(hs[k].T, gh), "b": np.sum(gh, axis=0)})
        if k == 0 and not need_x:
            break
        gh = np.matmul(gh, W.T)
        if k > 0:
            gh *= slopes[k - 1]
    gx = gp = None
    if need_x:
        if part.layout == "perm":
            gx = _merge(np, gya + gh, gxb, part)
        else:
            gx = np.empty(gy.shape, dtype=np.result_type(gya, gh, gxb))
            a_cols = slice(0, part.n_a) if part.layout == "ab" else slice(nb, None)
            b_cols = slice(part.n_a, None) if part.layout == "ab" else slice(0, nb)
            np.add(gya, gh, out=gx[:, a_cols])
            gx[:, b_cols] = gxb
    if need_params:
        gp = {"net": grads[::-1], "scale": g_amp}
    return gx, gp


@primitive
def affine_coupling(x, params, part, act, inverse):
    """``(out, logdet)`` of the affine coupling of vectors ``x`` ``(n, d)``: ``params`` is
    ``{"net": [{"W", "b"}, ...], "scale": a}``, ``part`` the mask partition (split kind),
    ``act`` the hidden activation, ``inverse`` the direction."""
    out, cache = _forward_np(x, params, part, act, inverse)
    _STASH.last = (out, cache)
    return out


def _vjp(argnums, ans, args, kwargs):
    x, params, part, act, inverse = args
    last = getattr(_STASH, "last", None)
    _STASH.last = None
    if last is not None and last[0] is ans:
        xp, cache = np, last[1]
    else:  # differentiated through (second derivatives): recompute traced intermediates
        xp = anp
        cache = _forward(anp, x, params, part, act, inverse)[1]
    need_x, need_params = 0 in argnums, 1 in argnums

    def vjp(g):
        if xp is np:
            gx, gp = _backward_np(g, cache, part, inverse, need_x, need_params)
        else:
            gx, gp = _backward(xp, g, cache, part, inverse, need_x, need_params)
        return tuple(gx if a == 0 else gp for a in argnums)

    return vjp


defvjp_argnums(affine_coupling, _vjp)


def affine_coupling_reference(x, params, part, act, inverse):
    """The composed formula (every operation recorded by autograd): the twin the tests compare
    :func:`affine_coupling` with, values and derivatives of every order."""
    return _forward(anp, x, params, part, act, inverse)[0]
