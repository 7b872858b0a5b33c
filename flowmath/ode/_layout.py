"""State layouts: a state pytree (or one array, or a Python float) as the solvers' flat float64
vector.

A pytree is a nested dict (keys sorted) / list / tuple of arrays or floats; its leaves and their
order come from :mod:`flowmath._pytree` (the package's one pytree module, through
:func:`tree_flatten`). :class:`StateLayout` maps a state to the flat vector and back, with each
leaf's shape and output dtype.
"""

from __future__ import annotations

import functools
import numbers

import numpy as np

from .._pytree import flatten, unflatten
from .._xp import getval, is_box

__all__ = ["StateLayout", "tree_flatten"]


def tree_flatten(tree):
    """``(leaves, rebuild)``: the leaves of a pytree (:func:`flowmath._pytree.flatten`, which
    opens containers boxed by autograd) and the function rebuilding the tree from a leaf list."""
    leaves, struct = flatten(tree)
    return leaves, functools.partial(unflatten, struct)


def _as_float64(x):
    """``x`` as float64, traced or not (a Python float becomes a 0-d array)."""
    raw = getval(x)
    if not hasattr(raw, "dtype"):
        return np.asarray(x, dtype=np.float64) if not is_box(x) else x * 1.0
    return x if raw.dtype == np.float64 else x.astype(np.float64)


class StateLayout:
    """How a state ``y0`` (an array of any shape, a Python float, or a pytree of arrays) maps to
    the solvers' flat float64 vector of ``size`` entries.

    ``single`` is True for one array (or a float): then ``flat`` is a reshape, bitwise, and
    ``f`` receives arrays of ``y0``'s shape.  For a pytree ``f`` receives the same pytree and
    must return one of the same structure; leaves are concatenated in :func:`tree_flatten`
    order.  Output leaves keep float32 for float32 inputs and are float64 otherwise.
    """

    def __init__(self, y0):
        raw0 = getval(y0)
        if type(raw0) is np.ndarray and raw0.dtype.kind in "iuf":  # the usual case, fast
            if not np.isfinite(raw0).all():
                raise ValueError("`y0` must be finite; got non-finite values")
            self.single, self.leaves, self.rebuild = True, [y0], lambda leaves: leaves[0]
            self.shapes, self.in_dtypes = [raw0.shape], [raw0.dtype]
            self.sizes = [raw0.size]
            self.offsets = np.array([0, raw0.size])
            self.size = raw0.size
            self.out_dtypes = [np.float32 if raw0.dtype == np.float32 else np.float64]
            self.shape = raw0.shape
            return
        leaves, rebuild = tree_flatten(y0)
        self.single = len(leaves) == 1 and not isinstance(getval(y0), (dict, list, tuple))
        raws = [getval(leaf) for leaf in leaves]
        if not raws:
            raise ValueError("`y0` must have at least one leaf; got an empty pytree")
        self.shapes, self.in_dtypes = [], []
        for raw in raws:
            if isinstance(raw, bool) or not (
                isinstance(raw, numbers.Real) or (hasattr(raw, "shape") and hasattr(raw, "dtype"))
            ):
                raise TypeError(
                    "`y0` must be an array, a real number or a pytree of arrays; got "
                    f"{type(raw).__name__}"
                )
            if type(raw).__module__.split(".")[0] == "cupy":
                raise TypeError(
                    "`y0` must be a NumPy array: the ODE drivers run on the host (NumPy only); "
                    "got a CuPy array (use cupy.asnumpy)"
                )
            arr = np.asarray(raw)
            if arr.dtype.kind not in "iuf":
                raise TypeError(f"`y0` must be a real array; got dtype {arr.dtype}")
            if not np.all(np.isfinite(arr)):
                raise ValueError("`y0` must be finite; got non-finite values")
            self.shapes.append(arr.shape)
            self.in_dtypes.append(arr.dtype)
        self.rebuild = rebuild
        self.sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        self.size = int(self.offsets[-1])
        self.out_dtypes = [np.float32 if d == np.float32 else np.float64 for d in self.in_dtypes]
        self.shape = self.shapes[0] if self.single else None
        self.leaves = leaves

    # -- plain arrays -------------------------------------------------------------------------
    def values(self, tree):
        """The plain values of a (possibly traced) state of this layout."""
        if self.single:
            return getval(tree)
        return self.rebuild([getval(leaf) for leaf in tree_flatten(tree)[0]])

    def flat(self, tree) -> np.ndarray:
        """The flat float64 vector of a plain state pytree of this layout."""
        if self.single:
            return np.asarray(getval(tree), dtype=np.float64).reshape(self.size)
        leaves = tree_flatten(tree)[0]
        if len(leaves) != len(self.shapes):
            raise ValueError(
                f"`f` must return a pytree with the structure of `y0` ({len(self.shapes)} "
                f"leaves); got {len(leaves)} leaves"
            )
        out = np.empty(self.size)
        for leaf, shape, a, b in zip(
            leaves, self.shapes, self.offsets[:-1], self.offsets[1:], strict=True
        ):
            if np.shape(getval(leaf)) != shape:
                raise ValueError(
                    f"`f` must return leaves with the shapes of `y0`'s; got {np.shape(leaf)} "
                    f"for a leaf of shape {shape}"
                )
            out[a:b] = np.ravel(leaf)
        return out

    def unflat(self, vec, lead=()):
        """The state pytree (plain arrays, float64) of a flat vector, or of a stack of them with
        leading shape ``lead``."""
        if self.single:
            return vec.reshape(tuple(lead) + self.shape)
        parts = [
            vec[..., a:b].reshape(tuple(lead) + shape)
            for shape, a, b in zip(self.shapes, self.offsets[:-1], self.offsets[1:], strict=True)
        ]
        return self.rebuild(parts)

    def cast(self, tree):
        """Cast each leaf of a plain state pytree to its output dtype."""
        if self.single:
            return tree.astype(self.out_dtypes[0], copy=False)
        leaves = tree_flatten(tree)[0]
        return self.rebuild(
            [x.astype(d, copy=False) for x, d in zip(leaves, self.out_dtypes, strict=True)]
        )

    # -- traced -------------------------------------------------------------------------------
    def flat_traced(self, tree):
        """``flat`` for a state that autograd traces (concatenation of raveled leaves)."""
        import autograd.numpy as anp

        if self.single:
            return anp.reshape(tree, (self.size,))
        leaves = tree_flatten(tree)[0]
        return anp.concatenate([anp.ravel(_as_float64(x)) for x in leaves])

    def unflat_state_traced(self, vec):
        """The state pytree of a traced flat vector (what ``f`` receives in the direct mode)."""
        import autograd.numpy as anp

        if self.single:
            return anp.reshape(vec, self.shape)
        return self.rebuild(
            [
                anp.reshape(vec[a:b], shape)
                for shape, a, b in zip(
                    self.shapes, self.offsets[:-1], self.offsets[1:], strict=True
                )
            ]
        )

    def unflat_traced(self, ys):
        """The output pytree of a traced ``(T, size)`` stack, cast to the output dtypes."""
        import autograd.numpy as anp

        T = ys.shape[0]
        if self.single:
            out = anp.reshape(ys, (T,) + self.shape)
            return out.astype(self.out_dtypes[0]) if self.out_dtypes[0] != np.float64 else out
        parts = []
        for shape, a, b, d in zip(
            self.shapes, self.offsets[:-1], self.offsets[1:], self.out_dtypes, strict=True
        ):
            leaf = anp.reshape(ys[:, a:b], (T,) + shape)
            parts.append(leaf.astype(d) if d != np.float64 else leaf)
        return self.rebuild(parts)
