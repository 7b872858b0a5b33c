"""The layer contract: :class:`Bijection` and :class:`Chain`.

A layer object holds only hyperparameters; its parameters are a pytree (nested dict / list /
tuple of arrays) returned by :meth:`Bijection.init`, so that ``autograd.grad`` differentiates
with respect to them. ``forward`` is the normalizing direction (data x -> latent z):

.. math:: \\log p(x) = \\log \\pi(f(x)) + \\log |\\det \\partial f / \\partial x|.

Validation happens once, in the public methods of :class:`Bijection`; subclasses implement
``_init``, ``_forward`` and ``_inverse`` and may declare the event shape they expect through
``_event_shape(params)``. Composite layers call the private methods of their parts, so a chain
validates its input once.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from .._checks import _shape_str, check_array, check_rng
from .._pytree import tree_map
from .._xp import array_namespace, getval

__all__ = ["Bijection", "Chain", "sum_except_batch", "cast_tree"]

VECTOR = (1,)
IMAGE = (3,)
ANY = (1, 3)


def sum_except_batch(x):
    """Sum over every axis but the first: shape (n, ...) -> (n,)."""
    xp = array_namespace(x)
    return xp.sum(xp.reshape(x, (x.shape[0], -1)), axis=1)


def cast_tree(tree, dtype):
    """Cast every floating leaf of a pytree to ``dtype`` (autograd-differentiable)."""

    def cast(leaf):
        raw = getval(leaf)
        if getattr(raw, "dtype", None) is not None and raw.dtype.kind == "f" and raw.dtype != dtype:
            return leaf.astype(dtype)
        return leaf

    return tree_map(cast, tree)


class Bijection(ABC):
    """Abstract invertible layer with a tractable log-determinant.

    Subclasses set ``event_ndims`` (``(1,)`` for vectors ``(n, d)``, ``(3,)`` for images
    ``(n, c, h, w)``, ``(1, 3)`` for both) and ``stochastic`` (True when the log-det or the
    inverse draws random numbers and so needs ``rng``), and implement ``_init``, ``_forward``
    and ``_inverse``.
    """

    event_ndims: tuple[int, ...] = ANY
    stochastic: bool = False

    # -- public, validating -------------------------------------------------------------------
    def init(self, rng: np.random.Generator, x):
        """Draw parameters for inputs shaped like the example batch ``x`` (shape ``(n, ...)``).

        The draw is a generic (non-identity) map unless the layer offers and is given
        ``identity_init=True``. Data-dependent initialisation (ActNorm) uses ``x``.
        """
        check_rng(rng)
        x = self._validate_x(x, "x")
        return cast_tree(self._init(rng, x), x.dtype)

    def forward(self, params, x, rng: np.random.Generator | None = None):
        """``(y, logdet)`` with ``y = f(x)`` and ``logdet = log|det df/dx|`` of shape ``(n,)``."""
        x, params = self._validate_call(params, x, rng, "x")
        y, logdet = self._forward(params, x, rng)
        return y, logdet

    def inverse(self, params, y, rng: np.random.Generator | None = None):
        """``(x, logdet)`` with ``x = f^-1(y)`` and ``logdet = log|det df^-1/dy|`` (minus the
        forward log-det at ``x``), shape ``(n,)``."""
        y, params = self._validate_call(params, y, rng, "y")
        x, logdet = self._inverse(params, y, rng)
        return x, logdet

    # -- to implement ---------------------------------------------------------------------------
    @abstractmethod
    def _init(self, rng, x):
        """Return the parameter pytree (float64 leaves; the base casts them)."""

    @abstractmethod
    def _forward(self, params, x, rng):
        """Return ``(y, logdet)``; inputs already validated."""

    @abstractmethod
    def _inverse(self, params, y, rng):
        """Return ``(x, logdet)``; inputs already validated."""

    def _event_shape(self, params):
        """The event shape the parameters were made for (``None`` entries: any size), or
        ``None`` when the layer accepts any shape."""
        return None

    def _output_event_shape(self, event_shape):
        """Event shape of ``forward``'s output for an input event shape (default: unchanged)."""
        return tuple(event_shape)

    # -- helpers -------------------------------------------------------------------------------
    def _validate_x(self, x, name):
        ndims = tuple(k + 1 for k in self.event_ndims)
        dtype = check_array(x, name, ndim=ndims)
        raw = getval(x)
        if raw.shape[0] == 0:
            raise ValueError(
                f"`{name}` must hold at least one sample; got shape {_shape_str(raw.shape)}"
            )
        if raw.dtype != dtype:
            x = x.astype(dtype)
        return x

    def _validate_call(self, params, x, rng, name):
        if rng is not None or self.stochastic:
            if rng is None:
                raise ValueError(
                    f"`rng` must be a numpy.random.Generator: {type(self).__name__} is stochastic "
                    "(its log-det or inverse draws random numbers); got None"
                )
            check_rng(rng)
        x = self._validate_x(x, name)
        expected = self._event_shape(params)
        if expected is not None:
            got = tuple(getval(x).shape[1:])
            if len(got) != len(expected) or any(
                e is not None and e != g for e, g in zip(expected, got, strict=False)
            ):
                want = "(n, " + ", ".join("*" if e is None else str(e) for e in expected) + ")"
                raise ValueError(
                    f"`{name}` must have shape {want} to match the parameters; "
                    f"got {_shape_str(getval(x).shape)}"
                )
        return x, cast_tree(params, x.dtype)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Chain(Bijection):
    """Composition ``f = f_K o ... o f_1``; log-dets add (chain rule and det multiplicativity).

    .. math:: \\log|\\det J_f(x)| = \\sum_k \\log|\\det J_{f_k}(x_{k-1})|,
        \\quad x_k = f_k(x_{k-1}).

    Parameters
    ----------
    layers : sequence of Bijection
        Applied in order by ``forward`` and in reverse order by ``inverse``.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> rng = np.random.default_rng(0)
    >>> flow = fm.Chain([fm.LULinear(), fm.ELU(), fm.DiagonalLinear()])
    >>> x = rng.normal(size=(5, 3))
    >>> params = flow.init(rng, x)
    >>> y, logdet = flow.forward(params, x)
    >>> x_back, minus = flow.inverse(params, y)
    >>> bool(np.allclose(x_back, x) and np.allclose(minus, -logdet))
    True
    """

    def __init__(self, layers):
        layers = list(layers)
        if not layers:
            raise ValueError("`layers` must hold at least one Bijection; got an empty sequence")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Bijection):
                raise TypeError(f"`layers[{i}]` must be a Bijection; got {type(layer).__name__}")
        self.layers = layers
        common = set(layers[0].event_ndims)
        for layer in layers[1:]:
            common &= set(layer.event_ndims)
        self.event_ndims = tuple(sorted(common)) or layers[0].event_ndims

    @property
    def stochastic(self):  # type: ignore[override]
        return any(layer.stochastic for layer in self.layers)

    def _init(self, rng, x):
        params = []
        for layer in self.layers:
            p = cast_tree(layer._init(rng, x), x.dtype)
            params.append(p)
            # later layers are initialised on the data as it arrives there (ActNorm needs it)
            x, _ = layer._forward(p, x, rng if layer.stochastic else None)
        return params

    def _check_params(self, params):
        raw = getval(params)  # under autograd the list arrives as a SequenceBox
        if not isinstance(raw, (list, tuple)) or len(raw) != len(self.layers):
            got = (
                f"{type(raw).__name__} of length {len(raw)}"
                if isinstance(raw, (list, tuple))
                else type(raw).__name__
            )
            raise ValueError(
                f"`params` must be a list of {len(self.layers)} parameter trees (one per layer); "
                f"got {got}"
            )

    def _event_shape(self, params):
        self._check_params(params)
        return self.layers[0]._event_shape(params[0])

    def _output_event_shape(self, event_shape):
        for layer in self.layers:
            event_shape = layer._output_event_shape(event_shape)
        return event_shape

    def _forward(self, params, x, rng):
        total = 0.0
        for layer, p in zip(self.layers, params, strict=True):
            x, ld = layer._forward(p, x, rng)
            total = total + ld
        return x, total

    def _inverse(self, params, y, rng):
        total = 0.0
        for layer, p in zip(reversed(self.layers), reversed(params), strict=True):
            y, ld = layer._inverse(p, y, rng)
            total = total + ld
        return y, total

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Chain([\n  {inner}\n])"
