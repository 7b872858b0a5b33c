"""The layer contract: :class:`Bijection` and :class:`Chain`.

A layer object holds only hyperparameters; its parameters are a pytree (nested dict / list /
tuple of arrays) returned by :meth:`Bijection.init`, so that ``autograd.grad`` differentiates
with respect to them. ``forward`` is the normalizing direction (data x -> latent z):

.. math:: \\log p(x) = \\log \\pi(f(x)) + \\log |\\det \\partial f / \\partial x|.

Validation happens once, in the public methods of :class:`Bijection`; subclasses implement
``_init``, ``_forward`` and ``_inverse``. Composite layers call the private methods of their
parts, so a chain validates its input once.

Parameter declarations
----------------------
A layer declares what its parameter pytree must hold by ``_param_spec(event_shape)``: the tree
of :class:`~flowmath._checks.Leaf` (shape per leaf, derived from the input's event shape and the
hyperparameters; ``log=True`` for leaves that are exponentiated) that ``init`` produces for
inputs of that event shape. The base class checks the parameters against it once per public
call — keys, sequence lengths, real floating dtype, shapes, finite values — with a message
naming the path, e.g. ``"`params[1]["net"][0]["b"]` must have shape (8,); got (7,)"``; when the
parameters are consistent but were made for another input shape, the message names the input
instead (``"`x` must have shape (n, 3) to match the parameters; got (2, 4)"``). It also declares
``_event_shape(params)``, the input event shape the parameters were made for. A layer that
declares no spec (``_param_spec`` returns ``None``, the default) is checked by
``_event_shape`` alone, as before.

Example: a layer ``y = exp(s) * x + b`` on vectors declares ::

    def _param_spec(self, event_shape):
        (d,) = event_shape
        return {"s": Leaf((d,), log=True), "b": Leaf((d,))}

    def _event_shape(self, params):
        return (getval(params["s"]).shape[0],)

The check reads every parameter once (about 1 ms per 10 M float32 values). Inside an inner loop
that calls a layer many times with parameters already checked, ``with trusted_params(): ...``
skips it (the input ``x`` and its shape against ``_event_shape`` are still checked).

Outputs: ``forward`` and ``inverse`` raise a ``ValueError`` rather than return a non-finite
``y`` or log-det (an overflow somewhere inside the layer).
"""

from __future__ import annotations

import contextlib
import contextvars
from abc import ABC, abstractmethod

import numpy as np
from autograd.builtins import container_take
from autograd.core import SparseObject
from autograd.extend import defvjp, primitive, vspace

from .._checks import (
    ANY_TREE,
    Leaf,
    _shape_str,
    check_array,
    check_finite,
    check_pytree,
    check_rng,
)
from .._pytree import tree_map
from .._xp import array_namespace, getval, is_box, to_numpy
from ..kernels.finite import count_nonfinite

__all__ = ["Bijection", "Chain", "Leaf", "cast_tree", "sum_except_batch", "trusted_params"]

_CHECK_PARAMS = contextvars.ContextVar("flowmath_check_params", default=True)


@contextlib.contextmanager
def trusted_params():
    """Skip the parameter check of every layer call inside the ``with`` block.

    For inner loops that call layers many times with parameters that were checked once
    outside (the check costs one pass over the parameters per call). The input ``x``, its shape
    against the parameters and the outputs are still checked.

    Examples
    --------
    >>> import numpy as np, flowmath as fm
    >>> from flowmath.layers.base import trusted_params
    >>> rng = np.random.default_rng(0)
    >>> layer, x = fm.DiagonalLinear(), rng.normal(size=(4, 3))
    >>> params = layer.init(rng, x)
    >>> with trusted_params():
    ...     y, logdet = layer.forward(params, x)
    """
    token = _CHECK_PARAMS.set(False)
    try:
        yield
    finally:
        _CHECK_PARAMS.reset(token)


class _InputMismatch(Exception):
    """Internal: the parameters are consistent, but for inputs of event shape ``expected``."""

    def __init__(self, expected):
        super().__init__(expected)
        self.expected = tuple(expected)


def _fits(expected, got) -> bool:
    return len(expected) == len(got) and all(
        e is None or e == g for e, g in zip(expected, got, strict=False)
    )


def _fill(expected, got):
    """``expected`` with its ``None`` (any size) entries taken from ``got`` where they align."""
    if len(expected) != len(got):
        return tuple(1 if e is None else e for e in expected)
    return tuple(g if e is None else e for e, g in zip(expected, got, strict=True))


class _Unreached:
    """The cotangent of a layer's parameters that no path of the backward pass has reached."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<unreached>"


_UNREACHED = _Unreached()


class _PlacedList:
    """Stand-in for the vector space of a chain's parameter list in the backward pass: its
    zero is a list of :data:`_UNREACHED` placeholders, which the per-layer cotangents replace
    (:func:`_place`) instead of being added into zeros."""

    __slots__ = ("n",)

    def __init__(self, n):
        self.n = n

    def zeros(self):
        return [_UNREACHED] * self.n


@primitive
def _as_items(params):
    """The chain's parameter list as a node of its own, whose cotangent :func:`_take` builds
    by placement; its VJP (:func:`_materialize`) fills the layers no path reached with zeros."""
    return list(params)


@primitive
def _take(items, i):
    """``items[i]`` of the traced list from :func:`_as_items`.

    Indexing an autograd-boxed list (``container_take``) builds the vector space of the whole
    list at every index (``O(layers^2)`` Python work, a tenth of a small training step, W9),
    and its VJP (``container_untake``) adds each layer's cotangent into a zero-filled copy of
    the *whole* parameter list: on W5 (8 couplings, 7 M parameters) one 28 MB allocation and
    one addition pass over every parameter, ~25 ms of a 200 ms step. Here the cotangent is
    placed (:func:`_place`): no zeros, no addition, unless the same layer's parameters are
    reached twice (two passes through the chain), when the two are added."""
    return items[i]


@primitive
def _place(g, i, n):
    """The sparse cotangent of ``items[i]`` (an autograd ``SparseObject``): writes ``g`` into
    slot ``i`` of the accumulated list, or adds it (without mutating either) when the slot
    already holds a cotangent."""

    def mut_add(acc):
        prev = acc[i]
        acc[i] = g if prev is _UNREACHED else vspace(prev).add(prev, g)
        return acc

    return SparseObject(_PlacedList(n), mut_add)


@primitive
def _materialize(g, params):
    """The accumulated cotangent of :func:`_as_items` with every :data:`_UNREACHED` slot
    replaced by the zero of that layer's parameters."""
    if not any(e is _UNREACHED for e in g):
        return g
    return [vspace(p).zeros() if e is _UNREACHED else e for e, p in zip(g, params, strict=True)]


defvjp(_as_items, lambda ans, params: lambda g: _materialize(g, getval(params)))
defvjp(_take, lambda ans, items, i: lambda g: _place(g, i, len(items)))
# placement and materialisation are linear: their VJPs are a take and the identity, so second
# derivatives (Hessian-vector products) trace through them
defvjp(_place, lambda ans, g, i, n: lambda gg: container_take(gg, i))
defvjp(_materialize, lambda ans, g, params: lambda gg: gg)


def _items(params) -> list:
    """The per-layer parameter trees of a chain, traced ones through :func:`_take`."""
    if not is_box(params):
        return list(params)
    items = _as_items(params)
    return [_take(items, i) for i in range(len(params))]


def _check_output(value, name, layer, method):
    raw = to_numpy(value)
    bad = count_nonfinite(raw)  # one fused pass (no boolean temporary)
    if bad:
        raise ValueError(
            f"`params` and the input give a non-finite `{name}` in {type(layer).__name__}."
            f"{method}: {bad} of {raw.size} value(s) are NaN or inf (an overflow inside the "
            "layer); the parameters or the input are outside the range it can represent"
        )


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
    #: Whether the architecture is *free-form* (Behrmann et al. 2019, Table 1): the map may have
    #: any Jacobian, no triangular or other structure being imposed to make the log-det cheap;
    #: ``None`` when the layer does not declare it. ``free_form_reason`` says why.
    free_form: bool | None = None
    free_form_reason: str = ""
    #: True when a NaN or infinite input entry always makes ``forward``'s output non-finite
    #: (an invertible linear map: every input entry reaches an output through a non-zero
    #: weight). ``forward`` then skips the pass over the input and checks the output alone,
    #: looking at the input only when the output is non-finite, to name it.
    _nonfinite_propagates: bool = False

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
        deferred = self._nonfinite_propagates
        x, params = self._validate_call(params, x, rng, "x", finite=not deferred)
        if deferred:  # inf * 0 may meet a non-finite input: the check below reports it
            with np.errstate(invalid="ignore", over="ignore"):
                y, logdet = self._forward(params, x, rng)
        else:
            y, logdet = self._forward(params, x, rng)
        if not deferred or count_nonfinite(to_numpy(y)):
            if deferred:
                check_finite(x, "x")  # a non-finite input is named as such
            _check_output(y, "y", self, "forward")
        _check_output(logdet, "logdet", self, "forward")
        return y, logdet

    def inverse(self, params, y, rng: np.random.Generator | None = None):
        """``(x, logdet)`` with ``x = f^-1(y)`` and ``logdet = log|det df^-1/dy|`` (minus the
        forward log-det at ``x``), shape ``(n,)``."""
        y, params = self._validate_call(params, y, rng, "y")
        x, logdet = self._inverse(params, y, rng)
        _check_output(x, "x", self, "inverse")
        _check_output(logdet, "logdet", self, "inverse")
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

    def _param_spec(self, event_shape):
        """The parameter tree ``init`` makes for inputs of this event shape, as a tree of
        :class:`Leaf` (see the module docstring), or ``None`` when the layer declares nothing
        (then only ``_event_shape`` is checked)."""
        return None

    def _output_event_shape(self, event_shape):
        """Event shape of ``forward``'s output for an input event shape (default: unchanged)."""
        return tuple(event_shape)

    def _input_event_shape(self, event_shape):
        """Event shape of ``forward``'s input for an output event shape (default: unchanged);
        raises ``ValueError`` naming ``y`` when no input gives that output."""
        return tuple(event_shape)

    # -- helpers -------------------------------------------------------------------------------
    def _validate_x(self, x, name, finite: bool = True):
        ndims = tuple(k + 1 for k in self.event_ndims)
        dtype = check_array(x, name, ndim=ndims, finite=finite)
        raw = getval(x)
        if raw.shape[0] == 0:
            raise ValueError(
                f"`{name}` must hold at least one sample; got shape {_shape_str(raw.shape)}"
            )
        if 0 in raw.shape[1:]:
            raise ValueError(
                f"`{name}` must have a non-empty event (every axis after the batch axis of size "
                f"at least 1); got shape {_shape_str(raw.shape)}"
            )
        if raw.dtype != dtype:
            x = x.astype(dtype)
        return x

    def _validate_call(self, params, x, rng, name, finite: bool = True):
        if rng is not None or self.stochastic:
            if rng is None:
                raise ValueError(
                    f"`rng` must be a numpy.random.Generator: {type(self).__name__} is stochastic "
                    "(its log-det or inverse draws random numbers); got None"
                )
            check_rng(rng)
        x = self._validate_x(x, name, finite)
        got = tuple(getval(x).shape[1:])
        try:
            # the parameters are declared for the forward's input; an inverse maps back first
            event = got if name == "x" else self._input_event_shape(got)
            self._check_params(params, event, "params", getval(x).dtype)
        except _InputMismatch as mismatch:
            want = mismatch.expected
            if name != "x":
                try:
                    want = self._output_event_shape(_fill(want, event))
                except ValueError:
                    pass
            want = "(n, " + ", ".join("*" if e is None else str(e) for e in want) + ")"
            raise ValueError(
                f"`{name}` must have shape {want} to match the parameters; "
                f"got {_shape_str(getval(x).shape)}"
            ) from None
        return x, cast_tree(params, x.dtype)

    def _safe_event_shape(self, params):
        try:
            expected = self._event_shape(params)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            return None
        return None if expected is None else tuple(expected)

    def _check_params(self, params, event_shape, path, dtype):
        """Check ``params`` for inputs of ``event_shape`` (the declared spec, or only
        ``_event_shape`` for a layer that declares none; only the latter inside
        :func:`trusted_params`). Raises ``ValueError``/``TypeError`` naming the leaf, or
        :class:`_InputMismatch` when the parameters are consistent for another input shape."""
        try:
            spec = self._param_spec(event_shape) if _CHECK_PARAMS.get() else None
        except ValueError:
            # no parameters fit this input (e.g. a mask of another shape): name the input
            expected = self._safe_event_shape(params)
            if expected is not None and not _fits(expected, event_shape):
                raise _InputMismatch(expected) from None
            raise
        if spec is None:
            expected = self._event_shape(params)
            if expected is not None and not _fits(expected, event_shape):
                raise _InputMismatch(expected)
            return
        try:
            check_pytree(params, spec, path, dtype)
        except ValueError as err:
            # blame the input only when the parameters are a consistent set for another shape
            expected = self._safe_event_shape(params)
            if expected is None or _fits(expected, event_shape):
                raise
            try:
                check_pytree(params, self._param_spec(_fill(expected, event_shape)), path, dtype)
            except (ValueError, TypeError):
                raise err from None
            raise _InputMismatch(expected) from None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _kinds(ndims) -> str:
    names = {1: "vectors (n, d)", 3: "images (n, c, h, w)"}
    return " or ".join(names.get(k, f"{k}-D events") for k in sorted(ndims)) or "nothing"


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
        # every layer keeps the number of event axes, so the chain takes what all of them take
        common = set(layers[0].event_ndims)
        for i, layer in enumerate(layers[1:], start=1):
            if not common & set(layer.event_ndims):
                raise ValueError(
                    f"`layers` must agree on the input kind: `layers[{i}]` "
                    f"({type(layer).__name__}) takes {_kinds(layer.event_ndims)} but the layers "
                    f"before it give {_kinds(common)}"
                )
            common &= set(layer.event_ndims)
        self.event_ndims = tuple(sorted(common))

    @property
    def stochastic(self):  # type: ignore[override]
        return any(layer.stochastic for layer in self.layers)

    def _layer_rngs(self, rng):
        """One generator per layer (``None`` for exact layers). With two or more stochastic
        layers each gets its own stream, derived from ``rng`` before anything else is drawn, so
        that ``inverse`` (which runs the layers in reverse order) hands every layer the same
        draws as ``forward`` for the same ``rng``; with one, it gets ``rng`` itself."""
        stochastic = [layer.stochastic for layer in self.layers]
        if rng is None or sum(stochastic) < 2:
            return [rng if s else None for s in stochastic]
        seeds = rng.integers(0, 2**63 - 1, size=len(self.layers), dtype=np.int64)
        return [
            np.random.default_rng(int(seed)) if s else None
            for seed, s in zip(seeds, stochastic, strict=True)
        ]

    def _init(self, rng, x):
        params = []
        shape = tuple(getval(x).shape[1:])
        for layer in self.layers:
            p = cast_tree(layer._init(rng, x), x.dtype)
            params.append(p)
            # later layers are initialised on the data as it arrives there (ActNorm needs it)
            x, _ = layer._forward(p, x, rng if layer.stochastic else None)
            shape = layer._output_event_shape(shape)
        return params

    def _check_list(self, params, path):
        raw = getval(params)  # under autograd the list arrives as a SequenceBox
        if not isinstance(raw, (list, tuple)) or len(raw) != len(self.layers):
            got = (
                f"{type(raw).__name__} of length {len(raw)}"
                if isinstance(raw, (list, tuple))
                else type(raw).__name__
            )
            raise ValueError(
                f"`{path}` must be a list of {len(self.layers)} parameter trees (one per layer); "
                f"got {got}"
            )
        return raw

    def _event_shape(self, params):
        raw = self._check_list(params, "params")
        return self.layers[0]._event_shape(raw[0])

    def _check_params(self, params, event_shape, path, dtype):
        """Every layer's parameters, for the event shape its input has there."""
        raw = self._check_list(params, path)
        shape = tuple(event_shape)
        for k, layer in enumerate(self.layers):
            try:
                layer._check_params(raw[k], shape, f"{path}[{k}]", dtype)
            except _InputMismatch as mismatch:
                want = _fill(mismatch.expected, shape)
                try:
                    for prev in reversed(self.layers[:k]):
                        want = prev._input_event_shape(want)
                except ValueError:
                    raise ValueError(
                        f"`{path}[{k}]` were made for inputs of event shape "
                        f"{_shape_str(mismatch.expected)} ({type(layer).__name__}); the data "
                        f"reach `layers[{k}]` with event shape {_shape_str(shape)}"
                    ) from None
                raise _InputMismatch(want) from None
            shape = layer._output_event_shape(shape)

    def _param_spec(self, event_shape):
        """The list of the layers' specs (:data:`ANY_TREE` for a layer that declares none), each
        for the event shape its input has in the chain (used by containers of chains; the chain
        itself checks layer by layer, :meth:`_check_params`)."""
        specs = []
        for layer in self.layers:
            spec = layer._param_spec(event_shape)
            specs.append(ANY_TREE if spec is None else spec)
            event_shape = layer._output_event_shape(event_shape)
        return specs

    def _output_event_shape(self, event_shape):
        for layer in self.layers:
            event_shape = layer._output_event_shape(event_shape)
        return event_shape

    def _input_event_shape(self, event_shape):
        for layer in reversed(self.layers):
            event_shape = layer._input_event_shape(event_shape)
        return event_shape

    def _forward(self, params, x, rng):
        total = 0.0
        rngs = self._layer_rngs(rng)
        for layer, p, r in zip(self.layers, _items(params), rngs, strict=True):
            x, ld = layer._forward(p, x, r)
            total = total + ld
        return x, total

    def _inverse(self, params, y, rng):
        total = 0.0
        rngs = self._layer_rngs(rng)
        for layer, p, r in zip(
            reversed(self.layers), reversed(_items(params)), reversed(rngs), strict=True
        ):
            y, ld = layer._inverse(p, y, r)
            total = total + ld
        return y, total

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Chain([\n  {inner}\n])"
