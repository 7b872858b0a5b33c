"""Coupling layers: NICE's additive and RealNVP's affine coupling.

A binary mask ``b`` splits the input into a part ``x_A`` (``b = 1``) that passes through
unchanged and conditions the transformation of the rest, ``x_B``:

.. math::
    y_A = x_A, \\qquad y_B = x_B \\odot e^{s(x_A)} + t(x_A) \\quad\\text{(affine)},
    \\qquad y_B = x_B + t(x_A) \\quad\\text{(additive)}.

The Jacobian is block triangular (with the features ordered A then B)

.. math::
    J = \\begin{pmatrix} I & 0 \\\\ \\partial y_B/\\partial x_A & \\mathrm{diag}(e^{s(x_A)})
    \\end{pmatrix}, \\qquad \\log|\\det J| = \\sum_{i \\in B} s_i(x_A),

so the log-det is 0 for the additive layer (volume preserving) and the inverse is explicit,
:math:`x_B = (y_B - t(y_A)) \\odot e^{-s(y_A)}`, whatever the networks ``s`` and ``t`` are.

Masks (``mask=``)

- ``"half"``: the first half of the features (``d // 2`` of a vector, the first ``c // 2``
  channels of an image) pass through.
- ``"channel"`` (images): the even channels ``0, 2, 4, ...`` pass through (RealNVP's
  channel-wise mask, interleaved).
- ``"checkerboard"`` (images): pixels with ``i + j`` even pass through, in every channel
  (RealNVP's spatial mask).
- a boolean array of the event shape: ``True`` passes through. It needs at least one ``True``
  and one ``False``.

``flip=True`` takes the complement, so that a stack alternates which part is transformed.

Conditioners (``hidden=``, see :mod:`flowmath.nets`): vectors use an MLP ``d_A -> hidden ->
m d_B`` (``m = 2`` for affine: the log-scale and the shift; ``1`` for additive). Images whose
mask selects whole channels use the conv net ``c_A -> hidden -> m c_B`` on the passed channels;
spatial masks (checkerboard, pixel-wise boolean arrays) use the conv net ``c -> hidden -> m c``
on ``b * x`` and keep only the outputs where ``b = 0`` — the RealNVP formulation
:math:`y = b \\odot x + (1-b) \\odot (x \\odot e^{s(b \\odot x)} + t(b \\odot x))`.

Numerically stable scale (affine): the log-scale is bounded,

.. math:: s = a \\odot \\tanh(r), \\qquad |s| \\le |a|,

with ``r`` the raw network output and ``a`` a learned amplitude per transformed feature (per
channel for images), initialised to 1. This is RealNVP's choice (Dinh et al. 2016, section 4.1
and their code); it keeps :math:`e^{\\pm s}` finite however large the network's output grows,
so neither direction overflows, and unlike Glow's ``sigmoid(r + 2)`` it can both expand and
contract by the same factor.

References
----------
Dinh, Krueger & Bengio, "NICE: non-linear independent components estimation", 2014,
arXiv:1410.8516.
Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803.
"""

from __future__ import annotations

import functools

import autograd.numpy as anp
import numpy as np
from autograd.extend import defvjp, primitive

from .. import nets
from .._checks import Leaf, _shape_str, check_bool, check_choice, check_hidden
from .._xp import getval, is_box, leaves
from ..activations import ACTIVATIONS as ACTIVATION_TABLE
from ..activations import check_activation
from ..kernels.conv_cm import convnet_apply_cm
from ..kernels.coupling_mlp import ACTIVATIONS, affine_coupling
from .base import ANY, Bijection, sum_except_batch

__all__ = ["AdditiveCoupling", "AffineCoupling"]

_MASKS = ("half", "checkerboard", "channel")


class _Partition:
    """How a mask splits an event: ``kind`` is ``"split"`` (a subset of the entries along axis 1
    — features of a vector, channels of an image — passes through) or ``"spatial"`` (a
    pixel-wise mask, applied multiplicatively)."""

    def __init__(self, mask: np.ndarray, image: bool):
        self.mask = mask
        self.image = image
        per_axis1 = mask.reshape(mask.shape[0], -1)
        if image and not (per_axis1.all(axis=1) | ~per_axis1.any(axis=1)).all():
            self.kind = "spatial"
            return
        self.kind = "split"
        sel = per_axis1[:, 0]
        self.idx_a = np.flatnonzero(sel)
        self.idx_b = np.flatnonzero(~sel)
        self.n_a, self.n_b = len(self.idx_a), len(self.idx_b)
        d = len(sel)
        # fast paths: contiguous blocks are slices (views), merged by one concatenate
        if np.array_equal(self.idx_a, np.arange(self.n_a)):
            self.layout = "ab"
        elif np.array_equal(self.idx_b, np.arange(self.n_b)):
            self.layout = "ba"
        else:
            self.layout = "perm"
            self.perm = np.concatenate([self.idx_a, self.idx_b])
            self.inv_perm = np.argsort(self.perm)
        self.d = d

    # Slicing under autograd (``x[:, :k]``) has a VJP built on ``numpy.add.at``, which costs
    # tens of milliseconds on a 256 x 784 batch; ``split`` and a permutation primitive have
    # VJPs that are one ``concatenate`` / one gather.
    def split(self, x):
        if self.layout == "ab":
            return tuple(anp.split(x, [self.n_a], axis=1))
        if self.layout == "ba":
            xb, xa = anp.split(x, [self.n_b], axis=1)
            return xa, xb
        return tuple(anp.split(_permute(x, self.perm, self.inv_perm), [self.n_a], axis=1))

    def merge(self, xa, xb):
        if self.layout == "ab":
            return anp.concatenate([xa, xb], axis=1)
        if self.layout == "ba":
            return anp.concatenate([xb, xa], axis=1)
        return _permute(anp.concatenate([xa, xb], axis=1), self.inv_perm, self.perm)


@primitive
def _permute(x, perm, inv):
    """``x[:, perm]`` for a permutation ``perm`` of axis 1 (``inv`` its inverse)."""
    return x[:, perm]


defvjp(_permute, lambda ans, x, perm, inv: lambda g: _permute(g, inv, perm))


@functools.lru_cache(maxsize=64)
def _named_mask(name: str, event_shape: tuple, flip: bool) -> np.ndarray:
    image = len(event_shape) == 3
    if name == "half":
        c = event_shape[0]
        if c < 2:
            what = "channels" if image else "features"
            raise ValueError(
                f"`mask`='half' needs at least 2 {what} to split; got event shape "
                f"{_shape_str(event_shape)}"
            )
        m = np.zeros(event_shape, dtype=bool)
        m[: c // 2] = True
    elif not image:
        raise ValueError(
            f"`mask`={name!r} needs images (n, c, h, w); got vectors of event shape "
            f"{_shape_str(event_shape)} (use 'half' or a boolean array)"
        )
    elif name == "channel":
        c = event_shape[0]
        if c < 2:
            raise ValueError(
                "`mask`='channel' needs at least 2 channels; got event shape "
                f"{_shape_str(event_shape)}"
            )
        m = np.zeros(event_shape, dtype=bool)
        m[0::2] = True
    else:  # checkerboard
        _, h, w = event_shape
        if h * w < 2:
            raise ValueError(
                "`mask`='checkerboard' needs at least 2 pixels; got event shape "
                f"{_shape_str(event_shape)}"
            )
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        m = np.broadcast_to((ii + jj) % 2 == 0, event_shape).copy()
    if flip:
        m = ~m
    m.setflags(write=False)
    return m


class _Coupling(Bijection):
    """Shared machinery; subclasses set ``_m`` (network outputs per transformed entry) and
    implement ``_transform`` / ``_untransform``."""

    event_ndims = ANY
    _m = 1
    free_form = False
    free_form_reason = (
        "the Jacobian is block-triangular by construction (the conditioner sees only the "
        "pass-through part)"
    )

    def __init__(
        self,
        mask="half",
        hidden=(64, 64),
        *,
        flip: bool = False,
        identity_init: bool = False,
        activation: str = "relu",
    ):
        if isinstance(mask, str):
            check_choice(mask, "mask", _MASKS)
            self.mask = mask
        else:
            arr = np.asarray(mask)
            if arr.dtype != bool:
                raise TypeError(
                    "`mask` must be 'half', 'checkerboard', 'channel' or a boolean array of the "
                    f"event shape; got an array of dtype {arr.dtype}"
                )
            if arr.ndim not in (1, 3):
                raise ValueError(
                    "`mask` must be a boolean array of a vector (d,) or image (c, h, w) event "
                    f"shape; got shape {_shape_str(arr.shape)}"
                )
            if arr.all() or not arr.any():
                raise ValueError(
                    "`mask` must have at least one True (passes through) and one False "
                    f"(transformed) entry; got all {bool(arr.flat[0])}"
                )
            arr = arr.copy()
            arr.setflags(write=False)
            self.mask = arr
        self.hidden = check_hidden(hidden)
        self.flip = check_bool(flip, "flip")
        self.identity_init = check_bool(identity_init, "identity_init")
        self.activation = check_activation(activation, "activation", ACTIVATIONS)

    # -- mask resolution ----------------------------------------------------------------------
    def _partition(self, event_shape) -> _Partition:
        event_shape = tuple(int(s) for s in event_shape)
        if isinstance(self.mask, str):
            m = _named_mask(self.mask, event_shape, self.flip)
        else:
            if self.mask.shape != event_shape:
                raise ValueError(
                    f"`x` must have event shape {_shape_str(self.mask.shape)} to match `mask`; "
                    f"got {_shape_str(event_shape)}"
                )
            m = ~self.mask if self.flip else self.mask
        return _cached_partition(m.tobytes(), m.shape)

    # -- the contract -------------------------------------------------------------------------
    def _init(self, rng, x):
        shape = tuple(getval(x).shape[1:])
        part = self._partition(shape)
        out_scale = 0.0 if self.identity_init else 1.0
        if not part.image:
            net = nets.mlp_init(
                rng, [part.n_a, *self.hidden, self._m * part.n_b], out_scale=out_scale
            )
            n_scale = (part.n_b,)
        elif part.kind == "split":
            net = nets.convnet_init(
                rng, part.n_a, self.hidden, self._m * part.n_b, out_scale=out_scale
            )
            n_scale = (part.n_b, 1, 1)
        else:
            c = shape[0]
            net = nets.convnet_init(rng, c, self.hidden, self._m * c, out_scale=out_scale)
            n_scale = (c, 1, 1)
        params = {"net": net}
        if self._m == 2:
            params["scale"] = np.ones(n_scale)
        return params

    def _param_spec(self, event_shape):
        part = self._partition(event_shape)
        if not part.image:
            net = nets.mlp_spec([part.n_a, *self.hidden, self._m * part.n_b])
            n_scale = (part.n_b,)
        elif part.kind == "split":
            net = nets.convnet_spec(part.n_a, self.hidden, self._m * part.n_b)
            n_scale = (part.n_b, 1, 1)
        else:
            c = event_shape[0]
            net = nets.convnet_spec(c, self.hidden, self._m * c)
            n_scale = (c, 1, 1)
        spec = {"net": net}
        if self._m == 2:
            # the amplitude bounds the log-scale, |s| <= |a|: exp(+-a) must be representable
            spec["scale"] = Leaf(n_scale, log=True)
        return spec

    def _event_shape(self, params):
        if not isinstance(self.mask, str):
            return self.mask.shape
        raw = getval(params)  # shapes only: no need to trace the indexing
        W0 = getval(raw["net"][0]["W"])
        Wl = getval(raw["net"][-1]["W"])
        if W0.ndim == 2:  # MLP: vectors of d_A + d_B features
            return (W0.shape[0] + Wl.shape[1] // self._m,)
        if self.mask == "checkerboard":
            return (W0.shape[1], None, None)
        return (W0.shape[1] + Wl.shape[0] // self._m, None, None)

    def _unpacked(self, params):
        """``(net leaves, scale)`` through one :func:`flowmath.nets.unpack` (keys sorted:
        ``"net"`` before ``"scale"``), so the backward pass accumulates the parameter gradient
        at one nesting level instead of four."""
        leaves = nets.unpack(params)
        n = len(leaves) - (1 if self._m == 2 else 0)
        net = [leaves[i] for i in range(n)]
        return net, (leaves[n] if self._m == 2 else None)

    def _conditioner(self, net, part, xa):
        act = ACTIVATION_TABLE[self.activation].fn
        if part.image:  # every convolution one GEMM over the batch and the pixels
            return convnet_apply_cm(net, xa, self.activation)
        return nets._feedforward(net, xa, nets._dense, act)

    def _forward(self, params, x, rng):
        return self._couple(params, x, False)

    def _inverse(self, params, y, rng):
        return self._couple(params, y, True)

    def _couple(self, params, x, inverse):
        """The pass-through part of ``x`` conditions the transform of the rest
        (:meth:`_transform` forward, :meth:`_untransform` inverse); returns the output and
        the log-det. The affine coupling of vectors runs as one fused autograd primitive
        (:func:`flowmath.kernels.coupling_mlp.affine_coupling`)."""
        part = self._partition(x.shape[1:])
        if self._m == 2 and not part.image and _fusable(params):
            return affine_coupling(x, params, part, self.activation, inverse)
        step = self._untransform if inverse else self._transform
        params = self._unpacked(params)
        if part.kind == "spatial":
            b = part.mask.astype(x.dtype)
            # ``step`` gets the whole input with ``nb = 1 - b``: its output is already
            # b*x + (1-b)*(...)
            return step(params, self._conditioner(params[0], part, x * b), x, 1.0 - b)
        xa, xb = part.split(x)
        yb, ld = step(params, self._conditioner(params[0], part, xa), xb, None)
        return part.merge(xa, yb), ld


def _fusable(params) -> bool:
    """The fused primitive sees ``params`` whole: either a traced (boxed) tree or a plain one
    with plain leaves (a plain container of traced leaves would hide them from autograd)."""
    return is_box(params) or not any(is_box(leaf) for leaf in leaves(params))


@functools.lru_cache(maxsize=64)
def _cached_partition(mask_bytes: bytes, shape: tuple) -> _Partition:
    m = np.frombuffer(mask_bytes, dtype=bool).reshape(shape)
    return _Partition(m, image=len(shape) == 3)


class AdditiveCoupling(_Coupling):
    """NICE's additive coupling: :math:`y_A = x_A,\\ y_B = x_B + t(x_A)`; log-det exactly 0.

    Parameters
    ----------
    mask : {"half", "checkerboard", "channel"} or bool ndarray of the event shape
        Which entries pass through (``True``); see the module docstring.
    hidden : tuple of int
        Hidden widths of the conditioner (MLP for vectors, conv net channels for images).
    flip : bool
        Use the complement of the mask.
    activation : {"relu", "tanh"}
        Hidden activation of the conditioner.
    identity_init : bool
        Zero the conditioner's output layer so that the layer starts as the identity
        (default off: ``init`` draws a generic map).

    Notes
    -----
    Input shapes: vectors ``(n, d)`` or images ``(n, c, h, w)``; ``forward`` returns the same
    shape and a log-det of zeros, shape ``(n,)``.

    References
    ----------
    Dinh, Krueger & Bengio, "NICE: non-linear independent components estimation", 2014,
    arXiv:1410.8516.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.AdditiveCoupling(hidden=(16,))
    >>> x = rng.normal(size=(4, 6))
    >>> params = layer.init(rng, x)
    >>> y, logdet = layer.forward(params, x)
    >>> bool(np.all(logdet == 0) and np.allclose(layer.inverse(params, y)[0], x))
    True
    """

    _m = 1

    def _transform(self, params, t, xb, nb):
        if nb is not None:
            t = t * nb
        zero = anp.zeros(xb.shape[0], dtype=xb.dtype)
        return xb + t, zero

    def _untransform(self, params, t, yb, nb):
        if nb is not None:
            t = t * nb
        zero = anp.zeros(yb.shape[0], dtype=yb.dtype)
        return yb - t, zero


class AffineCoupling(_Coupling):
    """RealNVP's affine coupling: :math:`y_A = x_A,\\ y_B = x_B \\odot e^{s(x_A)} + t(x_A)`.

    .. math:: \\log|\\det J| = \\sum_{i \\in B} s_i(x_A), \\qquad s = a \\odot \\tanh(r(x_A)).

    Parameters
    ----------
    mask : {"half", "checkerboard", "channel"} or bool ndarray of the event shape
        Which entries pass through (``True``); see the module docstring.
    hidden : tuple of int
        Hidden widths of the conditioner (MLP for vectors, conv net channels for images).
    flip : bool
        Use the complement of the mask.
    activation : {"relu", "tanh"}
        Hidden activation of the conditioner.
    identity_init : bool
        Zero the conditioner's output layer (``s = t = 0``) so that the layer starts as the
        identity (default off: ``init`` draws a generic map).

    Notes
    -----
    The parameters are ``{"net": conditioner params, "scale": a}`` with ``a`` the amplitude of the
    bounded log-scale (one per transformed feature, or per channel for images; initialised to 1).
    The conditioner outputs ``[r, t]`` stacked along axis 1.

    References
    ----------
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.AffineCoupling(mask="checkerboard", hidden=(8, 8))
    >>> x = rng.normal(size=(3, 2, 4, 4))
    >>> params = layer.init(rng, x)
    >>> y, logdet = layer.forward(params, x)
    >>> x_back, minus = layer.inverse(params, y)
    >>> bool(np.allclose(x_back, x) and np.allclose(minus, -logdet))
    True
    """

    _m = 2

    def _scale_shift(self, params, h, nb):
        raw, t = anp.split(h, 2, axis=1)
        s = params[1] * nets.tanh(raw)
        if nb is not None:
            s, t = s * nb, t * nb
        return s, t

    def _transform(self, params, h, xb, nb):
        s, t = self._scale_shift(params, h, nb)
        return xb * anp.exp(s) + t, sum_except_batch(s)

    def _untransform(self, params, h, yb, nb):
        s, t = self._scale_shift(params, h, nb)
        return (yb - t) * anp.exp(-s), -sum_except_batch(s)
