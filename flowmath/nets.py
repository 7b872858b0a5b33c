"""Conditioner networks as pure functions on parameter pytrees.

Every network here is a pair ``*_init(rng, ...) -> params`` and ``*_apply(params, x) -> y``:
the parameters are plain nested lists/dicts of arrays, so that ``autograd.grad`` differentiates
with respect to them, and ``*_apply`` uses only differentiable ``autograd.numpy`` operations
(no in-place assignment). They are the conditioners of the coupling layers
(:mod:`flowmath.layers.coupling`) and of the continuous and residual flows.

- :func:`mlp_init` / :func:`mlp_apply`: a multilayer perceptron on vectors ``(n, d)``;
  every hidden layer is one BLAS matrix product ``x @ W + b`` followed by a ReLU.
- :func:`convnet_init` / :func:`convnet_apply`: a small convolutional network on images
  ``(n, c, h, w)``: a 3x3 ``'same'`` convolution, ReLU, 1x1 convolutions with ReLU, and a 3x3
  output convolution (the RealNVP/Glow conditioner, Dinh et al. 2016; Kingma & Dhariwal 2018).
  A 3x3 convolution is an *im2col* product: the nine shifted copies of the zero-padded input are
  stacked along the channel axis and contracted with the weights in one matrix product.

dtype: float32 inputs with float32 parameters compute in float32 throughout (only Python
scalars enter the arithmetic, so nothing is promoted to float64).

References
----------
Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803.
Kingma & Dhariwal, "Glow: generative flow with invertible 1x1 convolutions", 2018,
arXiv:1807.03039.

Examples
--------
>>> import numpy as np
>>> from flowmath import nets
>>> rng = np.random.default_rng(0)
>>> p = nets.mlp_init(rng, [3, 16, 4])
>>> nets.mlp_apply(p, rng.normal(size=(5, 3))).shape
(5, 4)
>>> q = nets.convnet_init(rng, 2, (8, 8), 6)
>>> nets.convnet_apply(q, rng.normal(size=(5, 2, 4, 4))).shape
(5, 6, 4, 4)
"""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

from ._checks import Leaf, check_int, check_rng
from ._pytree import leaves as _leaves
from ._pytree import structure as _structure
from ._pytree import unflatten as _unflatten
from ._xp import getval
from .activations import relu, tanh  # the hidden activations (flowmath.activations)

__all__ = [
    "conv2d",
    "convnet_apply",
    "convnet_init",
    "convnet_spec",
    "mlp_apply",
    "mlp_init",
    "mlp_spec",
    "relu",
    "tanh",
    "unpack",
]


@primitive
def unpack(tree):
    """The leaves of a parameter tree as one tuple (depth first, dict keys sorted).

    Why: indexing an autograd-boxed container (``params["net"][0]["W"]``) records one
    ``container_take`` per level, and the backward pass then accumulates the gradient of every
    level into a freshly zeroed copy of that level's whole subtree — one allocation and one
    addition pass over all parameters *per nesting level*. ``unpack`` replaces the levels below
    it by one: its VJP hands the tuple of leaf gradients back as the tree, without copying.
    On W5 (7 M parameters, 4 levels) this removes about a tenth of the backward pass.
    """
    return tuple(_leaves(tree))


@primitive
def _pack(leaves, structure):
    """Inverse of :func:`unpack`: the tree of ``structure`` filled with ``leaves``."""
    return _unflatten(structure, leaves)


def _unpack_vjp(ans, tree):
    structure = _structure(getval(tree))  # boxed when differentiating a second time
    return lambda g: _pack(g, structure)


# unpack and _pack are each other's VJP (both linear), so higher derivatives are traced too
defvjp(unpack, _unpack_vjp)
defvjp(_pack, lambda ans, leaves, structure: lambda g: unpack(g))


def _as_leaves(params):
    """``params`` as a flat sequence ``(W_0, b_0, W_1, b_1, ...)``: a list of ``{"W", "b"}``
    dicts is unpacked; a flat sequence of arrays is used as it is."""
    raw = getval(params)
    if len(raw) and isinstance(raw[0], dict):
        return unpack(params)
    return params


def _check_sizes(sizes, name):
    sizes = list(sizes)
    for i, s in enumerate(sizes):
        check_int(s, f"{name}[{i}]", minimum=1)
    return [int(s) for s in sizes]


def _check_out_scale(out_scale):
    if isinstance(out_scale, bool) or not isinstance(out_scale, (int, float)) or out_scale < 0:
        raise ValueError(f"`out_scale` must be a real number >= 0; got {out_scale!r}")
    return float(out_scale)


# -- multilayer perceptron ------------------------------------------------------------------------


def _layer_init(rng, shape, fan_in, n_out, last, out_scale):
    """One layer ``{"W": shape, "b": (n_out,)}``: He-normal ``N(0, 2/fan_in)`` weights and
    ``N(0, 0.1^2)`` biases; the output layer (``last``) has ``N(0, 1/fan_in)`` weights, and
    both its weights and bias are multiplied by ``out_scale``."""
    std = math.sqrt(1.0 / fan_in) if last else math.sqrt(2.0 / fan_in)
    W = rng.normal(scale=std, size=shape)
    bias = rng.normal(scale=0.1, size=(n_out,))
    if last:
        W, bias = W * out_scale, bias * out_scale
    return {"W": W, "b": bias}


def _feedforward(params, x, layer, act=None):
    """``h <- act(layer(h, W_k, b_k))`` over the layers of ``params`` (a list of
    ``{"W", "b"}`` or its flat leaves), no activation after the last; ``act`` defaults to
    :func:`relu`."""
    act = relu if act is None else act
    leaves = _as_leaves(params)
    n_layers = len(leaves) // 2
    h = x
    for k in range(n_layers):
        h = layer(h, leaves[2 * k], leaves[2 * k + 1])
        if k < n_layers - 1:
            h = act(h)
    return h


def mlp_init(rng: np.random.Generator, sizes, *, out_scale: float = 1.0):
    """Parameters of an MLP with layer widths ``sizes = [d_in, h_1, ..., d_out]``.

    Weights are drawn He-normal, ``W ~ N(0, 2/fan_in)`` (Glorot for the output layer, scaled by
    ``out_scale``), biases ``N(0, 0.01)`` (small, non-zero, so that the network is generic).
    ``out_scale=0`` zeroes the output layer: the network then outputs exactly 0 (identity
    initialisation of a coupling layer).

    Parameters
    ----------
    rng : numpy.random.Generator
    sizes : sequence of int, length >= 2
    out_scale : float, >= 0
        Multiplies the output layer's weights and bias.

    Returns
    -------
    list of dict
        ``[{"W": (d_k, d_{k+1}), "b": (d_{k+1},)}, ...]``, float64.
    """
    check_rng(rng)
    sizes = _check_sizes(sizes, "sizes")
    if len(sizes) < 2:
        raise ValueError(f"`sizes` must hold at least an input and an output width; got {sizes}")
    out_scale = _check_out_scale(out_scale)
    return [
        _layer_init(rng, (a, b), a, b, k == len(sizes) - 2, out_scale)
        for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]


def mlp_spec(sizes):
    """The parameter declaration (:class:`flowmath._checks.Leaf` tree) of :func:`mlp_init`'s
    output for widths ``sizes``: ``[{"W": (d_k, d_{k+1}), "b": (d_{k+1},)}, ...]``."""
    return [
        {"W": Leaf((a, b)), "b": Leaf((b,))} for a, b in zip(sizes[:-1], sizes[1:], strict=True)
    ]


def mlp_apply(params, x):
    """Apply the MLP: ``h <- relu(h @ W + b)`` for the hidden layers, no activation at the end.

    Parameters
    ----------
    params : list of dict
        From :func:`mlp_init` (or its leaves ``(W_0, b_0, W_1, b_1, ...)`` as a flat sequence).
    x : ndarray, shape (n, d_in)

    Returns
    -------
    ndarray, shape (n, d_out)
    """
    return _feedforward(params, x, _dense)


def _dense(h, W, b):
    # one GEMM per layer. matmul rather than dot: autograd's dot VJP returns the weight
    # gradient as a transposed (Fortran-order) view, and adding that into the gradient
    # accumulator is a strided pass ~20x slower than the contiguous one matmul's VJP gives
    return anp.matmul(h, W) + b


# -- convolutional network ------------------------------------------------------------------------


def conv2d(x, W, b=None):
    """Cross-correlation with ``'same'`` zero padding, channels first.

    .. math:: y_{n,o,i,j} = b_o + \\sum_{c,u,v} W_{o,c,u,v}\\, x_{n,c,i+u-r,j+v-r},
        \\qquad r = (k-1)/2.

    Parameters
    ----------
    x : ndarray, shape (n, c, h, w)
    W : ndarray, shape (o, c, k, k), ``k`` odd
    b : ndarray, shape (o,), optional

    Returns
    -------
    ndarray, shape (n, o, h, w)

    Notes
    -----
    A ``k x k`` kernel is computed by im2col: the ``k^2`` shifted windows of the padded input are
    stacked, ``(n, k^2 c, h w)``, and contracted with the weights reshaped to ``(o, k^2 c)`` in a
    single batched matrix product. A 1x1 kernel is a plain matrix product over channels.
    """
    n, c, h, w = x.shape
    o, c_w, k, _ = W.shape
    if k == 1:
        y = anp.matmul(anp.reshape(W, (o, c)), anp.reshape(x, (n, c, h * w)))
    else:
        r = (k - 1) // 2
        xp = anp.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="constant")
        cols = [xp[:, :, u : u + h, v : v + w] for u in range(k) for v in range(k)]
        # patches[n, (u, v, c), i, j]; weights reordered to match: (o, u, v, c)
        patches = anp.reshape(anp.concatenate(cols, axis=1), (n, k * k * c, h * w))
        Wm = anp.reshape(anp.transpose(W, (0, 2, 3, 1)), (o, k * k * c))
        y = anp.matmul(Wm, patches)
    y = anp.reshape(y, (n, o, h, w))
    if b is not None:
        y = y + anp.reshape(b, (o, 1, 1))
    return y


def convnet_init(
    rng: np.random.Generator, c_in: int, hidden, c_out: int, *, out_scale: float = 1.0
):
    """Parameters of the conv conditioner ``c_in -> hidden[0] -> ... -> hidden[-1] -> c_out``.

    The first and the output convolutions are 3x3 (``'same'``), the ones in between 1x1; ReLU
    after every convolution but the last. With an empty ``hidden`` the network is a single 3x3
    convolution. ``out_scale=0`` zeroes the output convolution (Glow's zero initialisation).

    Returns
    -------
    list of dict
        ``[{"W": (o, c, k, k), "b": (o,)}, ...]``, float64.
    """
    check_rng(rng)
    c_in = check_int(c_in, "c_in", minimum=1)
    c_out = check_int(c_out, "c_out", minimum=1)
    hidden = _check_sizes(hidden, "hidden")
    out_scale = _check_out_scale(out_scale)
    widths = [c_in, *hidden, c_out]
    params = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        last = k == len(widths) - 2
        ks = 3 if (k == 0 or last) else 1
        params.append(_layer_init(rng, (b, a, ks, ks), a * ks * ks, b, last, out_scale))
    return params


def convnet_spec(c_in: int, hidden, c_out: int):
    """The parameter declaration of :func:`convnet_init`'s output: 3x3 first and output
    convolutions, 1x1 in between."""
    widths = [c_in, *hidden, c_out]
    n = len(widths) - 1
    return [
        {
            "W": Leaf((b, a, 3 if k in (0, n - 1) else 1, 3 if k in (0, n - 1) else 1)),
            "b": Leaf((b,)),
        }
        for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
    ]


def convnet_apply(params, x):
    """Apply the conv conditioner to ``x`` of shape ``(n, c_in, h, w)``; returns
    ``(n, c_out, h, w)``. ``params`` from :func:`convnet_init`, or its flat leaves."""
    return _feedforward(params, x, conv2d)
