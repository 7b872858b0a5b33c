"""Affine autoregressive flows: MAF (density in one pass) and IAF (sampling in one pass).

Both use a MADE conditioner (:mod:`flowmath.kernels.made`) that returns, for every feature
``i``, a shift :math:`\\mu_i` and a log-scale :math:`s_i = a_i \\tanh r_i` depending only on the
features before ``i`` in the layer's ordering. With ``forward`` the normalizing direction
(data ``x`` -> latent ``z``):

.. math::
    \\text{MAF:}\\quad z_i = (x_i - \\mu_i(x_{<i}))\\, e^{-s_i(x_{<i})},
    \\qquad \\log|\\det J| = -\\sum_i s_i(x_{<i});

    \\text{IAF:}\\quad x_i = z_i\\, e^{s_i(z_{<i})} + \\mu_i(z_{<i}),
    \\qquad \\log|\\det J_{x \\to z}| = -\\sum_i s_i(z_{<i}).

The Jacobian is triangular in the ordering, with ``exp(-s_i)`` on the diagonal. MAF's
``forward`` and IAF's ``inverse`` are one network pass; the other direction takes ``d``
sequential passes (a numba kernel; autograd differentiates through the reference twin).

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

import functools

import autograd.numpy as anp
import numpy as np

from .. import nets
from .._checks import Leaf, check_bool, check_choice, check_hidden, check_int, check_permutation
from .._xp import getval, is_box, leaves
from ..activations import check_activation
from ..kernels import made
from .base import VECTOR, Bijection

__all__ = ["IAF", "MAF"]

ORDERS = ("natural", "reversed", "random")


class _Autoregressive(Bijection):
    """MADE conditioner, orderings and masks shared by :class:`MAF` and :class:`IAF`."""

    event_ndims = VECTOR
    free_form = False
    free_form_reason = (
        "MADE's masks make the Jacobian triangular in the ordering (output i sees inputs before i)"
    )

    def __init__(
        self,
        hidden=(64, 64),
        order="natural",
        *,
        seed: int = 0,
        activation: str = "tanh",
        identity_init: bool = False,
    ):
        self.hidden = check_hidden(hidden)
        if isinstance(order, str):
            self.order = check_choice(order, "order", ORDERS)
        else:
            self.order = check_permutation(order, "order", ORDERS)
        self.seed = check_int(seed, "seed", minimum=0)
        self.activation = check_activation(activation, "activation", tuple(made.ACTIVATIONS))
        self.identity_init = check_bool(identity_init, "identity_init")

    # -- structure ----------------------------------------------------------------------------
    def permutation(self, d: int) -> np.ndarray:
        """The ordering: ``perm[p]`` is the feature solved at step ``p`` (degree ``p + 1``)."""
        return _permutation(
            self.order if isinstance(self.order, str) else tuple(self.order), d, self.seed
        )

    def masks(self, d: int, dtype=np.float64) -> list[np.ndarray]:
        """MADE's 0/1 masks for ``d`` features in ``dtype`` (cached)."""
        key = self.order if isinstance(self.order, str) else tuple(self.order)
        return _masks(key, d, self.hidden, self.seed, np.dtype(dtype).str)

    # -- the contract -------------------------------------------------------------------------
    def _init(self, rng, x):
        d = getval(x).shape[1]
        if not isinstance(self.order, str) and self.order.size != d:
            raise ValueError(f"`x` must have {self.order.size} features to match `order`; got {d}")
        out_scale = 0.0 if self.identity_init else 1.0
        net = nets.mlp_init(rng, [d, *self.hidden, 2 * d], out_scale=out_scale)
        return {"net": net, "scale": np.ones(d)}

    def _event_shape(self, params):
        raw = getval(params)
        return (getval(raw["scale"]).shape[0],)

    def _param_spec(self, event_shape):
        (d,) = event_shape
        if not isinstance(self.order, str) and self.order.size != d:
            raise ValueError(f"`x` must have {self.order.size} features to match `order`; got {d}")
        # the amplitude bounds the log-scale, |s| <= |a|: exp(+-a) must be representable
        return {"net": nets.mlp_spec([d, *self.hidden, 2 * d]), "scale": Leaf((d,), log=True)}

    def conditioner(self, params, w):
        """``(mu, s)``, each ``(n, d)``: the shift and log-scale at ``w`` (only earlier
        features in the ordering enter feature ``i``'s pair)."""
        masks = self.masks(w.shape[1], getval(w).dtype)
        mu, r = made.made_apply(params["net"], masks, w, self.activation)
        return mu, params["scale"] * nets.tanh(r)

    def _sequential(self, params, y, mode):
        """Solve the autoregressive recursion: numba on plain arrays, the differentiable
        reference when autograd traces ``params`` or ``y``."""
        d = y.shape[1]
        masks = self.masks(d, getval(y).dtype)
        if is_box(y) or any(is_box(leaf) for leaf in leaves(params)):
            return made.ar_affine_solve_reference(
                params["net"], masks, params["scale"], y, self.activation, mode
            )
        w, sum_s = made.ar_affine_solve(
            params["net"], masks, params["scale"], y, self.permutation(d), self.activation, mode
        )
        self._check_roundtrip(params, w, y, mode)
        return w, sum_s

    #: the sequential solve must reproduce its target to this many eps (measured ~3 eps at
    #: d = 2..200 with generic weights)
    ROUNDTRIP_EPS = 1e3

    def _check_roundtrip(self, params, w, y, mode):
        """One pass of the one-pass direction on the solution must give back ``y``: with huge
        conditioner outputs the recursion amplifies rounding feature by feature (``mu_i`` of
        1e200 cancels ``x_i``) and the answer would be wrong without a sign."""
        if not np.all(np.isfinite(w)):
            return  # reported by the base class as a non-finite output
        raw = {"net": getval(params["net"]), "scale": getval(params["scale"])}
        mu, s = self.conditioner(raw, w)
        again = (w - mu) * np.exp(-s) if mode == made.MAF_INVERSE else w * np.exp(s) + mu
        err = float(np.max(np.abs(again - y))) / max(1.0, float(np.max(np.abs(y))))
        limit = self.ROUNDTRIP_EPS * float(np.finfo(y.dtype).eps)
        if not err <= limit:
            way = "inverse" if mode == made.MAF_INVERSE else "forward"
            raise ValueError(
                f"`params` make {type(self).__name__}'s sequential {way} numerically unstable "
                f"here: its round trip misses its target by {err:.3g} relative (> {limit:.3g} = "
                f"{self.ROUNDTRIP_EPS:g} eps); the conditioner's outputs are too large for the "
                "recursion (each feature's shift cancels it)"
            )

    def __repr__(self) -> str:
        order = self.order if isinstance(self.order, str) else self.order.tolist()
        return (
            f"{type(self).__name__}(hidden={self.hidden!r}, order={order!r}, seed={self.seed!r}, "
            f"activation={self.activation!r}, identity_init={self.identity_init!r})"
        )


@functools.lru_cache(maxsize=256)
def _permutation(order, d, seed):
    if order == "natural":
        perm = np.arange(d)
    elif order == "reversed":
        perm = np.arange(d)[::-1].copy()
    elif order == "random":
        perm = np.random.default_rng(seed).permutation(d)
    else:
        perm = np.asarray(order, dtype=np.int64)
    perm.setflags(write=False)
    return perm


@functools.lru_cache(maxsize=256)
def _masks(order, d, hidden, seed, dtype):
    perm = _permutation(order, d, seed)
    # random orderings draw their hidden degrees from the same seed (MADE's connectivity
    # agnostic training uses both); fixed orderings use the even, cyclic degrees
    masks = made.made_masks(perm, hidden, seed if order == "random" else None)
    masks = [m.astype(dtype) for m in masks]
    for m in masks:
        m.setflags(write=False)
    return masks


class MAF(_Autoregressive):
    """Masked autoregressive flow layer: density in one pass, sampling in ``d`` passes.

    .. math:: z_i = (x_i - \\mu_i(x_{<i}))\\, e^{-s_i(x_{<i})}, \\qquad
        \\log|\\det J| = -\\sum_i s_i(x_{<i}), \\qquad s = a \\odot \\tanh r.

    Parameters
    ----------
    hidden : tuple of int
        Hidden widths of the MADE conditioner (``()``: a masked linear map).
    order : {"natural", "reversed", "random"} or int array
        The ordering of the features; ``"random"`` draws it (and the hidden degrees) from
        ``seed``. Stacks of MAF layers alternate or randomise the order.
    seed : int
        Seed of the random ordering (a hyperparameter: the masks are not trained).
    activation : {"tanh", "relu"}
    identity_init : bool
        Zero the conditioner's output layer so the layer starts as the identity.

    Notes
    -----
    ``params = {"net": [{"W", "b"}, ...], "scale": a}`` with the MLP layout of
    :func:`flowmath.nets.mlp_init` (the masks are applied in the map). The inverse runs the
    numba kernel :func:`flowmath.kernels.made.ar_affine_solve`, or its autograd-differentiable
    twin when the parameters are traced.

    References
    ----------
    Papamakarios, Pavlakou & Murray, "Masked autoregressive flow for density estimation", 2017,
    arXiv:1705.07057. Germain et al., "MADE", 2015, arXiv:1502.03509.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.MAF(hidden=(16,), order="random")
    >>> x = rng.normal(size=(4, 5))
    >>> params = layer.init(rng, x)
    >>> z, logdet = layer.forward(params, x)
    >>> x_back, minus = layer.inverse(params, z)
    >>> bool(np.allclose(x_back, x, atol=1e-12) and np.allclose(minus, -logdet))
    True
    """

    def _forward(self, params, x, rng):
        mu, s = self.conditioner(params, x)
        return (x - mu) * anp.exp(-s), -anp.sum(s, axis=1)

    def _inverse(self, params, z, rng):
        x, sum_s = self._sequential(params, z, made.MAF_INVERSE)
        return x, sum_s


class IAF(_Autoregressive):
    """Inverse autoregressive flow layer: sampling in one pass, density in ``d`` passes.

    .. math:: x_i = z_i\\, e^{s_i(z_{<i})} + \\mu_i(z_{<i}), \\qquad
        \\log|\\det J_{x \\to z}| = -\\sum_i s_i(z_{<i}).

    ``forward`` (``x -> z``, the density direction) solves the recursion sequentially;
    ``inverse`` (``z -> x``, sampling) is one pass. Parameters as :class:`MAF`.

    References
    ----------
    Kingma, Salimans, Jozefowicz, Chen, Sutskever & Welling, "Improved variational inference
    with inverse autoregressive flow", 2016, arXiv:1606.04934.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> layer = fm.IAF(hidden=(16,))
    >>> z = rng.normal(size=(4, 3))
    >>> params = layer.init(rng, z)
    >>> x, logdet_inv = layer.inverse(params, z)
    >>> z_back, logdet = layer.forward(params, x)
    >>> bool(np.allclose(z_back, z, atol=1e-12) and np.allclose(logdet, -logdet_inv))
    True
    """

    def _forward(self, params, x, rng):
        z, sum_s = self._sequential(params, x, made.IAF_FORWARD)
        return z, -sum_s

    def _inverse(self, params, z, rng):
        mu, s = self.conditioner(params, z)
        return z * anp.exp(s) + mu, anp.sum(s, axis=1)
