"""Glow: activation normalisation, squeeze, the flow step and the multi-scale architecture.

- :class:`ActNorm`: a per-channel affine map with data-dependent initialisation,
  :math:`y = (x - \\mu) \\odot e^{\\ell}`, log-det :math:`h w \\sum_c \\ell_c`.
- :class:`Squeeze`: the space-to-depth permutation ``(c, h, w) -> (4c, h/2, w/2)``, log-det 0.
- :class:`GlowStep`: ``ActNorm -> InvConv1x1(lu=True) -> AffineCoupling("half")``.
- :class:`Glow`: ``levels`` scales of ``squeeze -> steps -> factor out half the channels``; the
  factored-out variables are re-assembled into one latent of the input's shape, so that the base
  density of :class:`flowmath.Flow` covers every one of them.

References
----------
Kingma & Dhariwal, "Glow: generative flow with invertible 1x1 convolutions", 2018,
arXiv:1807.03039.
Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803
(squeeze and the multi-scale architecture with factored-out variables).
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from .._checks import _shape_str, check_bool, check_hidden, check_int
from .._xp import getval
from .base import ANY, IMAGE, Bijection, Chain, Leaf, cast_tree
from .conv import InvConv1x1
from .coupling import AffineCoupling

__all__ = ["ActNorm", "Glow", "GlowStep", "Squeeze"]


# -- ActNorm --------------------------------------------------------------------------------------


class ActNorm(Bijection):
    """Activation normalisation: a per-channel (per-feature for vectors) affine map.

    .. math:: y_{c,i,j} = (x_{c,i,j} - \\mu_c)\\, e^{\\ell_c}, \\qquad
        \\log|\\det J| = h\\,w \\sum_c \\ell_c

    (``h w = 1`` for vectors). The scale is log-parametrised, so the map is invertible for every
    parameter value.

    Data-dependent initialisation (Glow, section 3.1): ``init`` sets :math:`\\mu_c` and
    :math:`e^{-\\ell_c}` to the mean and the standard deviation of channel ``c`` over the example
    batch (and over the pixels), so that the post-ActNorm activations of that batch have zero
    mean and unit variance per channel. A channel with (numerically) no spread on the batch,
    ``std <= 1e-8 * max(1, |mean|)`` — e.g. every feature of a one-sample vector batch — keeps
    scale 1 instead of an overflowing ``1/std``.

    Notes
    -----
    Parameters: ``{"loc": mu, "log_scale": ell}``, each of shape ``(c,)`` for vectors ``(n, c)``
    and ``(c, 1, 1)`` for images ``(n, c, h, w)`` (the shape records which the layer was built
    for).

    References
    ----------
    Kingma & Dhariwal, "Glow: generative flow with invertible 1x1 convolutions", 2018,
    arXiv:1807.03039.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> x = 3.0 + 2.0 * rng.normal(size=(16, 3, 4, 4))
    >>> layer = fm.ActNorm()
    >>> y, logdet = layer.forward(layer.init(rng, x), x)
    >>> bool(np.allclose(y.mean(axis=(0, 2, 3)), 0) and np.allclose(y.std(axis=(0, 2, 3)), 1))
    True
    """

    event_ndims = ANY
    free_form = False
    free_form_reason = "a per-channel affine map (diagonal Jacobian)"
    _RTOL = 1e-8

    def _init(self, rng, x):
        x = np.asarray(getval(x), dtype=np.float64)
        axes = (0,) if x.ndim == 2 else (0, 2, 3)
        mean = x.mean(axis=axes)
        std = x.std(axis=axes)
        flat = std <= self._RTOL * np.maximum(1.0, np.abs(mean))
        log_scale = np.where(flat, 0.0, -np.log(np.where(flat, 1.0, std)))
        shape = (x.shape[1],) if x.ndim == 2 else (x.shape[1], 1, 1)
        return {"loc": mean.reshape(shape), "log_scale": log_scale.reshape(shape)}

    def _param_spec(self, event_shape):
        shape = (event_shape[0],) if len(event_shape) == 1 else (event_shape[0], 1, 1)
        return {"loc": Leaf(shape), "log_scale": Leaf(shape, log=True)}

    def _event_shape(self, params):
        loc = getval(params["loc"])
        return (loc.shape[0],) if loc.ndim == 1 else (loc.shape[0], None, None)

    def _logdet(self, params, x):
        hw = 1 if x.ndim == 2 else x.shape[2] * x.shape[3]
        return anp.ones(x.shape[0], dtype=x.dtype) * (hw * anp.sum(params["log_scale"]))

    def _forward(self, params, x, rng):
        y = (x - params["loc"]) * anp.exp(params["log_scale"])
        return y, self._logdet(params, x)

    def _inverse(self, params, y, rng):
        x = y * anp.exp(-params["log_scale"]) + params["loc"]
        return x, -self._logdet(params, y)


# -- Squeeze --------------------------------------------------------------------------------------


def _check_even(shape, name, factor=2, what="Squeeze"):
    _, h, w = shape[-3:]
    if h % factor or w % factor:
        raise ValueError(
            f"`{name}` must have height and width divisible by {factor} for {what}; "
            f"got shape {_shape_str(shape)}"
        )


def _squeeze(x):
    n, c, h, w = x.shape
    x = anp.reshape(x, (n, c, h // 2, 2, w // 2, 2))
    x = anp.transpose(x, (0, 1, 3, 5, 2, 4))
    return anp.reshape(x, (n, 4 * c, h // 2, w // 2))


def _unsqueeze(y):
    n, c4, h2, w2 = y.shape
    c = c4 // 4
    y = anp.reshape(y, (n, c, 2, 2, h2, w2))
    y = anp.transpose(y, (0, 1, 4, 2, 5, 3))
    return anp.reshape(y, (n, c, 2 * h2, 2 * w2))


class Squeeze(Bijection):
    """Space-to-depth: each 2x2 spatial block becomes 4 channels.

    .. math:: y_{4c + 2u + v,\\, i, j} = x_{c,\\, 2i + u,\\, 2j + v}, \\qquad u, v \\in \\{0, 1\\},

    shape ``(n, c, h, w) -> (n, 4c, h/2, w/2)``. A permutation of the entries: log-det 0. Height
    and width must be even (a ``ValueError`` otherwise). No parameters (``init`` returns ``{}``).

    References
    ----------
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> y, _ = fm.Squeeze().forward({}, x)
    >>> y.shape, y[0, :, 0, 0].tolist()
    ((1, 4, 2, 2), [0.0, 1.0, 4.0, 5.0])
    """

    event_ndims = IMAGE
    free_form = False
    free_form_reason = "a fixed permutation of the entries"

    def _init(self, rng, x):
        _check_even(getval(x).shape, "x")
        return {}

    def _param_spec(self, event_shape):
        return {}

    def _output_event_shape(self, event_shape):
        _check_even(tuple(event_shape), "x")
        c, h, w = event_shape
        return (4 * c, h // 2, w // 2)

    def _input_event_shape(self, event_shape):
        c4, h2, w2 = event_shape
        if c4 % 4:
            raise ValueError(
                "`y` must have a number of channels divisible by 4 to undo Squeeze; "
                f"got event shape {_shape_str(tuple(event_shape))}"
            )
        return (c4 // 4, 2 * h2, 2 * w2)

    def _forward(self, params, x, rng):
        _check_even(x.shape, "x")
        return _squeeze(x), anp.zeros(x.shape[0], dtype=x.dtype)

    def _inverse(self, params, y, rng):
        if y.shape[1] % 4:
            raise ValueError(
                "`y` must have a number of channels divisible by 4 to undo Squeeze; "
                f"got shape {_shape_str(y.shape)}"
            )
        return _unsqueeze(y), anp.zeros(y.shape[0], dtype=y.dtype)


# -- GlowStep -------------------------------------------------------------------------------------


class GlowStep(Chain):
    """One step of Glow: ``ActNorm -> InvConv1x1(lu=lu) -> AffineCoupling("half", hidden)``.

    .. math:: \\log|\\det J| = h w \\sum_c \\ell_c + h w \\log|\\det W| + \\sum_{i \\in B} s_i(x_A).

    Parameters
    ----------
    hidden : tuple of int
        Channels of the coupling's conv conditioner (3x3 -> 1x1 ... -> 3x3).
    lu : bool
        LU-parametrised 1x1 convolution (log-det in O(c)) or a plain matrix (``slogdet``).
    identity_init : bool
        Start the coupling as the identity (Glow's zero-initialised last convolution).

    Notes
    -----
    Images ``(n, c, h, w)`` with ``c >= 2``. The parameters are a list of the three layers'
    parameter trees; ActNorm is initialised on the example batch as it arrives at the step.

    References
    ----------
    Kingma & Dhariwal, "Glow: generative flow with invertible 1x1 convolutions", 2018,
    arXiv:1807.03039.
    """

    def __init__(self, hidden=(64, 64), *, lu: bool = True, identity_init: bool = False):
        self.hidden = check_hidden(hidden)
        self.lu = check_bool(lu, "lu")
        self.identity_init = check_bool(identity_init, "identity_init")
        super().__init__(
            [
                ActNorm(),
                InvConv1x1(lu=self.lu),
                AffineCoupling("half", self.hidden, identity_init=self.identity_init),
            ]
        )

    def __repr__(self) -> str:
        return (
            f"GlowStep(hidden={self.hidden!r}, lu={self.lu!r}, "
            f"identity_init={self.identity_init!r})"
        )


# -- Glow -----------------------------------------------------------------------------------------


class Glow(Bijection):
    """The multi-scale Glow architecture with factor-out.

    With :math:`S` the squeeze, :math:`F_l` the ``steps`` flow steps of level ``l`` and
    :math:`S^{-1}` its inverse, level ``l`` maps its input ``x`` to

    .. math::
        [h, z_l] = F_l(S(x)), \\qquad
        G_l(x) = S^{-1}\\big([\\,G_{l+1}(h),\\ z_l\\,]\\big),

    where the second half of the channels, :math:`z_l`, is factored out (not transformed further)
    and the first half :math:`h` goes on to the next level; the last level factors out nothing,
    :math:`G_{L-1}(x) = S^{-1}(F_{L-1}(S(x)))`. ``forward`` returns :math:`G_0(x)`: every
    factored-out variable, re-assembled by the inverse squeezes into one tensor **of the input's
    shape** (a fixed permutation of the concatenated latents). Hence, with a factorised base
    density such as ``StandardNormal``,

    .. math:: \\log p(x) = \\sum_{l} \\log \\pi(z_l) + \\sum_{l,k} \\log|\\det J_{F_{l,k}}|,

    which is exactly what :class:`flowmath.Flow` computes: no factored-out variable is dropped
    from the likelihood, and sampling draws all of them. The squeezes and the split are
    permutations and contribute no log-det.

    Parameters
    ----------
    levels : int, >= 1
        Number of scales ``L``; height and width must be divisible by ``2**L``.
    steps : int, >= 1
        Flow steps (:class:`GlowStep`) per level, ``K``.
    hidden : tuple of int
        Channels of the couplings' conv conditioners.
    lu : bool
        LU-parametrised 1x1 convolutions.
    identity_init : bool
        Start every coupling (and split prior) as the identity.
    split_prior : bool
        Learned conditional prior for the factored-out variables (see Notes).

    Notes
    -----
    Input and output shape ``(n, c, h, w)``. Parameters: a list over levels of the parameters of
    that level's chain of steps (``steps`` :class:`GlowStep` trees, then the split prior's).

    Factored-out variables: by default they get the base density directly (RealNVP). With
    ``split_prior=True`` they get Glow's learned conditional prior
    :math:`z_l \\sim N(\\mu(h), \\sigma(h)^2)`, written as a bijection so that the base density
    still covers them: an :class:`AffineCoupling` on ``[h, z_l]`` with the ``"half"`` mask,
    whose conditioner is a single 3x3 convolution of ``h`` (Glow's ``Conv2dZeros``), maps
    :math:`z_l \\mapsto z_l e^{s(h)} + t(h)` — the same density as
    :math:`N(-t e^{-s}, e^{-2s})` — and adds :math:`\\sum s` to the log-det.

    References
    ----------
    Kingma & Dhariwal, "Glow: generative flow with invertible 1x1 convolutions", 2018,
    arXiv:1807.03039.
    Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(2, 2, 4, 4))
    >>> flow = fm.Flow(fm.Glow(levels=2, steps=1, hidden=(8,)))
    >>> params = flow.init(rng, x)
    >>> flow.log_prob(params, x).shape, flow.sample(params, 3, rng).shape
    ((2,), (3, 2, 4, 4))
    """

    event_ndims = IMAGE
    free_form = False
    free_form_reason = (
        "squeezes, ActNorm, 1x1 convolutions and affine couplings: a product of structured "
        "(permutation, diagonal, block-diagonal, block-triangular) Jacobians"
    )

    def __init__(
        self,
        levels: int = 2,
        steps: int = 4,
        hidden=(64, 64),
        *,
        lu: bool = True,
        identity_init: bool = False,
        split_prior: bool = False,
    ):
        self.levels = check_int(levels, "levels", minimum=1)
        self.steps = check_int(steps, "steps", minimum=1)
        self.hidden = check_hidden(hidden)
        self.lu = check_bool(lu, "lu")
        self.identity_init = check_bool(identity_init, "identity_init")
        self.split_prior = check_bool(split_prior, "split_prior")
        self._flows = []
        for level in range(self.levels):
            layers = [
                GlowStep(self.hidden, lu=self.lu, identity_init=self.identity_init)
                for _ in range(self.steps)
            ]
            if self.split_prior and level < self.levels - 1:
                # z (second half) | h (first half): Glow's conditional prior as a bijection
                layers.append(AffineCoupling("half", (), identity_init=self.identity_init))
            self._flows.append(Chain(layers))

    def _check(self, shape, name):
        _check_even(tuple(shape), name, 2**self.levels, f"Glow(levels={self.levels})")

    def _init(self, rng, x):
        self._check(getval(x).shape, "x")
        params = []
        h = x
        for level, flow in enumerate(self._flows):
            h = _squeeze(h)
            p = cast_tree(flow._init(rng, h), h.dtype)
            params.append(p)
            if level < self.levels - 1:
                h, _ = flow._forward(p, h, None)
                h = anp.split(h, 2, axis=1)[0]
        return params

    def _event_shape(self, params):
        raw = getval(params)  # under autograd.grad the list arrives boxed
        if not isinstance(raw, (list, tuple)) or len(raw) != self.levels:
            raise ValueError(
                f"`params` must be a list of {self.levels} parameter trees (one per level); "
                f"got {type(raw).__name__}"
            )
        c4 = getval(raw[0][0][0]["loc"]).shape[0]
        return (c4 // 4, None, None)

    def _param_spec(self, event_shape):
        """One list per level: the level's chain of steps at the squeezed shape it sees."""
        self._check((1,) + tuple(event_shape), "x")
        c, h, w = event_shape
        specs = []
        for flow in self._flows:
            c, h, w = 4 * c, h // 2, w // 2
            specs.append(flow._param_spec((c, h, w)))
            c //= 2  # half the channels go on to the next level
        return specs

    def _output_event_shape(self, event_shape):
        self._check((1,) + tuple(event_shape), "x")
        return tuple(event_shape)

    def _input_event_shape(self, event_shape):
        self._check((1,) + tuple(event_shape), "y")
        return tuple(event_shape)

    def _forward(self, params, x, rng):
        self._check(x.shape, "x")
        return self._forward_level(params, x, 0)

    def _forward_level(self, params, x, level):
        h, logdet = self._flows[level]._forward(params[level], _squeeze(x), None)
        if level < self.levels - 1:
            # split, not slicing: autograd's slice VJP goes through numpy.add.at (slow)
            keep, z = anp.split(h, 2, axis=1)
            rest, ld = self._forward_level(params, keep, level + 1)
            h = anp.concatenate([rest, z], axis=1)
            logdet = logdet + ld
        return _unsqueeze(h), logdet

    def _inverse(self, params, y, rng):
        self._check(y.shape, "y")
        return self._inverse_level(params, y, 0)

    def _inverse_level(self, params, y, level):
        h = _squeeze(y)
        logdet = 0.0
        if level < self.levels - 1:
            keep, z = anp.split(h, 2, axis=1)
            rest, logdet = self._inverse_level(params, keep, level + 1)
            h = anp.concatenate([rest, z], axis=1)
        x, ld = self._flows[level]._inverse(params[level], h, None)
        return _unsqueeze(x), logdet + ld
