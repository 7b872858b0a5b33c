"""MADE masks and the sequential pass of masked autoregressive flows.

A MADE network (Germain et al. 2015) is an MLP whose weights are multiplied by 0/1 masks built
from *degrees*: the inputs get the degrees :math:`1..d` in the chosen ordering, every hidden unit
a degree :math:`m(k) \\in [1, d-1]`, and

.. math:: M^{(0)}_{ik} = [m(k) \\ge \\deg(i)], \\quad M^{(l)}_{jk} = [m_l(k) \\ge m_{l-1}(j)],
    \\quad M^{\\mathrm{out}}_{ko} = [\\deg(o) > m_L(k)],

so that output ``o`` depends only on the inputs of smaller degree. The network returns two
outputs per feature, ``[mu, r]``; the affine autoregressive map uses the log-scale
``s = a * tanh(r)``.

Inverting ``x_i = z_i e^{s_i(x_{<i})} + mu_i(x_{<i})`` (MAF sampling) or solving
``z_i = (x_i - mu_i(z_{<i})) e^{-s_i(z_{<i})}`` (IAF density) takes ``d`` sequential steps.
:func:`ar_affine_solve` runs them in a numba kernel that updates the first layer's
pre-activations incrementally: step ``p`` costs one column of the first layer and the deeper
layers once, :math:`O(h + L h^2)` per sample, instead of a full network pass.
:func:`ar_affine_solve_reference` is the plain-array twin: ``d`` full passes of the masked
network over the batch (after pass ``p`` the first ``p`` features in the ordering are exact,
because each depends only on earlier ones); it is differentiable by autograd and is what the
layers use when differentiating.

References
----------
Germain, Gregor, Murray & Larochelle, "MADE: masked autoencoder for distribution estimation",
2015, arXiv:1502.03509.
Papamakarios, Pavlakou & Murray, "Masked autoregressive flow for density estimation", 2017,
arXiv:1705.07057.
Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved variational inference with
inverse autoregressive flow", 2016, arXiv:1606.04934.
"""

from __future__ import annotations

import autograd.numpy as anp
import numba
import numpy as np

from .. import activations, nets

__all__ = [
    "ACTIVATIONS",
    "ar_affine_solve",
    "ar_affine_solve_reference",
    "made_apply",
    "made_degrees",
    "made_masks",
]

#: The activations the sequential kernel implements: name -> its code in
#: :data:`flowmath.activations.ACTIVATIONS` (the kernel's ``act == 0`` branch is relu, else tanh).
ACTIVATIONS = {name: activations.ACTIVATIONS[name].code for name in ("relu", "tanh")}
MAF_INVERSE, IAF_FORWARD = 0, 1


def made_degrees(perm: np.ndarray, hidden, seed: int | None):
    """Degrees of the inputs (``deg[perm[p]] = p + 1``) and of every hidden layer.

    ``seed=None`` gives deterministic cyclic hidden degrees :math:`m(k) = 1 + (k \\bmod (d-1))`
    (every degree used as evenly as the width allows); an integer seed draws them as MADE does,
    :math:`m_l(k) \\sim U\\{\\min m_{l-1}, d-1\\}`.
    """
    d = len(perm)
    deg_in = np.empty(d, dtype=np.int64)
    deg_in[perm] = np.arange(1, d + 1)
    top = max(d - 1, 1)
    rng = None if seed is None else np.random.default_rng(seed)
    degs, low = [], 1
    for h in hidden:
        if rng is None:
            m = 1 + np.arange(h) % top
        else:
            m = rng.integers(min(low, top), top + 1, size=h)
        degs.append(m.astype(np.int64))
        low = int(m.min())
    return deg_in, degs


def made_masks(perm: np.ndarray, hidden, seed: int | None = None) -> list[np.ndarray]:
    """0/1 float masks of shapes ``(d, h_1), (h_1, h_2), ..., (h_L, 2d)`` (outputs ``[mu, r]``).

    With ``hidden=()`` the single mask ``(d, 2d)`` is :math:`[\\deg(o) > \\deg(i)]`."""
    deg_in, degs = made_degrees(perm, hidden, seed)
    masks, prev = [], deg_in
    for m in degs:
        masks.append((m[None, :] >= prev[:, None]).astype(np.float64))
        prev = m
    out = np.concatenate([deg_in, deg_in])
    masks.append((out[None, :] > prev[:, None]).astype(np.float64))
    return masks


def made_apply(net, masks, x, activation: str):
    """``[mu, r]`` of shape ``(n, d)`` each: the masked MLP ``h <- act(h (W * M) + b)``."""
    act = activations.ACTIVATIONS[activation].fn
    h = x
    last = len(masks) - 1
    for k, mask in enumerate(masks):
        h = anp.dot(h, net[k]["W"] * mask) + net[k]["b"]
        if k < last:
            h = act(h)
    d = x.shape[1]
    return h[:, :d], h[:, d:]


def ar_affine_solve_reference(net, masks, scale, y, activation: str, mode: int):
    """``d`` full passes of the masked network (differentiable; the twin of the kernel).

    Returns ``(w, sum_s)``: ``w`` the solution (``x`` for ``mode=MAF_INVERSE``, ``z`` for
    ``mode=IAF_FORWARD``) and ``sum_s = sum_i s_i(w_{<i})``, shape ``(n,)``."""
    w = anp.zeros(y.shape, dtype=y.dtype)
    s = None
    for _ in range(y.shape[1]):
        mu, r = made_apply(net, masks, w, activation)
        s = scale * nets.tanh(r)
        w = y * anp.exp(s) + mu if mode == MAF_INVERSE else (y - mu) * anp.exp(-s)
    return w, anp.sum(s, axis=1)


@numba.njit(cache=True, nogil=True)
def _solve_kernel(y, wflat, woff, bflat, boff, sizes, perm, scale, act, mode):
    n, d = y.shape
    n_w = sizes.shape[0] - 1  # weight layers
    out = np.empty_like(y)
    sum_s = np.zeros(n)
    width = 0
    for k in range(1, n_w + 1):
        width = max(width, sizes[k])
    acc = np.empty(sizes[1])
    h = np.empty(width)
    h2 = np.empty(width)
    for s_i in range(n):
        for j in range(sizes[1]):
            acc[j] = bflat[boff[0] + j]
        for p in range(d):
            i = perm[p]
            if n_w == 1:
                mu = acc[i]
                r = acc[d + i]
            else:
                n_in = sizes[1]
                for j in range(n_in):
                    a = acc[j]
                    h[j] = (a if a > 0.0 else 0.0) if act == 0 else np.tanh(a)
                for k in range(1, n_w - 1):
                    n_out = sizes[k + 1]
                    for j in range(n_out):
                        a = bflat[boff[k] + j]
                        for q in range(n_in):
                            a += h[q] * wflat[woff[k] + q * n_out + j]
                        h2[j] = (a if a > 0.0 else 0.0) if act == 0 else np.tanh(a)
                    for j in range(n_out):
                        h[j] = h2[j]
                    n_in = n_out
                kl = n_w - 1
                n_out = sizes[n_w]
                mu = bflat[boff[kl] + i]
                r = bflat[boff[kl] + d + i]
                for q in range(n_in):
                    mu += h[q] * wflat[woff[kl] + q * n_out + i]
                    r += h[q] * wflat[woff[kl] + q * n_out + d + i]
            s = scale[i] * np.tanh(r)
            if mode == 0:
                v = y[s_i, i] * np.exp(s) + mu
            else:
                v = (y[s_i, i] - mu) * np.exp(-s)
            out[s_i, i] = v
            sum_s[s_i] += s
            # the new feature enters the first layer (or the output, without hidden layers)
            n1 = sizes[1]
            for j in range(n1):
                acc[j] += v * wflat[woff[0] + i * n1 + j]
    return out, sum_s


def ar_affine_solve(net, masks, scale, y, perm, activation: str, mode: int):
    """The kernel on plain arrays: ``(w, sum_s)`` as :func:`ar_affine_solve_reference`.

    Shapes are checked here, before the kernel sees them: ``y`` ``(n, d)``, ``perm`` a
    permutation of ``d``, the weights ``(sizes[k], sizes[k+1])`` with ``sizes[0] = d`` and
    ``sizes[-1] = 2d``, biases ``(sizes[k+1],)``, masks of the weights' shapes, ``scale`` ``(d,)``.
    """
    y = np.asarray(y)
    if y.ndim != 2:
        raise ValueError(f"`y` must be 2-D (n, d); got shape {y.shape}")
    n, d = y.shape
    perm = np.ascontiguousarray(perm, dtype=np.int64)
    if perm.shape != (d,) or not np.array_equal(np.sort(perm), np.arange(d)):
        raise ValueError(f"`perm` must be a permutation of range({d}); got {perm!r}")
    if len(net) != len(masks):
        raise ValueError(f"`net` must hold {len(masks)} layers; got {len(net)}")
    sizes = [d]
    for k, (layer, mask) in enumerate(zip(net, masks, strict=True)):
        W, b = np.asarray(layer["W"]), np.asarray(layer["b"])
        if W.ndim != 2 or W.shape[0] != sizes[-1] or W.shape != mask.shape:
            raise ValueError(
                f"`params['net'][{k}]['W']` must have shape {mask.shape}; got {W.shape}"
            )
        if b.shape != (W.shape[1],):
            raise ValueError(
                f"`params['net'][{k}]['b']` must have shape ({W.shape[1]},); got {b.shape}"
            )
        sizes.append(W.shape[1])
    if sizes[-1] != 2 * d:
        raise ValueError(f"the last layer must have 2 d = {2 * d} outputs; got {sizes[-1]}")
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    if scale.shape != (d,):
        raise ValueError(f"`params['scale']` must have shape ({d},); got {scale.shape}")
    wflat = np.concatenate(
        [(np.asarray(L["W"], np.float64) * M).ravel() for L, M in zip(net, masks, strict=True)]
    )
    bflat = np.concatenate([np.asarray(L["b"], np.float64) for L in net])
    w_sizes = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    woff = np.concatenate([[0], np.cumsum(w_sizes)[:-1]]).astype(np.int64)
    boff = np.concatenate([[0], np.cumsum(sizes[1:])[:-1]]).astype(np.int64)
    out, sum_s = _solve_kernel(
        np.ascontiguousarray(y, dtype=np.float64),
        wflat,
        woff,
        bflat,
        boff,
        np.asarray(sizes, dtype=np.int64),
        perm,
        scale,
        ACTIVATIONS[activation],
        mode,
    )
    return out.astype(y.dtype, copy=False), sum_s.astype(y.dtype, copy=False)
