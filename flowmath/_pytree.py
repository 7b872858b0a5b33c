"""Pytrees: the one implementation of leaves, flatten / unflatten and map for parameter trees.

A pytree is a nested ``dict`` / ``list`` / ``tuple`` whose leaves are arrays or scalars; ``None``
is an empty subtree (it has no leaves and comes back as ``None``). Leaves are ordered depth
first with dict keys sorted: the order of :func:`autograd.misc.flatten`, which
:func:`flatten_vector` uses to concatenate them into one differentiable vector.

Layer parameters, optimiser states and ODE parameter trees all go through these functions, so
that every part of the package agrees on one leaf order.

Examples
--------
>>> import numpy as np
>>> tree = {"b": [np.zeros(2), None], "a": (np.ones((2, 2)),)}
>>> leaves, struct = flatten(tree)
>>> [leaf.shape for leaf in leaves]
[(2, 2), (2,)]
>>> unflatten(struct, leaves)["b"][1] is None
True
>>> tree_size(tree)
6
>>> vec, back = flatten_vector(tree["a"])  # autograd's flatten: no None leaves
>>> vec.shape, back(vec)[0].shape
((4,), (2, 2))
"""

from __future__ import annotations

from autograd.misc.flatten import flatten as _autograd_flatten
from autograd.tracer import Box, getval

__all__ = [
    "LEAF",
    "flatten",
    "flatten_vector",
    "leaves",
    "structure",
    "tree_map",
    "tree_size",
    "unflatten",
]


class _Leaf:
    """Marker for a leaf position in a :func:`structure`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LEAF"

    def __reduce__(self):  # one instance, also across copies and pickles
        return "LEAF"


#: The marker of a leaf in the structure returned by :func:`structure` and :func:`flatten`.
LEAF = _Leaf()


def leaves(tree) -> list:
    """The leaves of ``tree`` in order (depth first, dict keys sorted; ``None`` has none).

    A container boxed by autograd (when differentiating with respect to a whole tree) counts as
    one leaf here, the box; :func:`flatten` opens it."""
    if isinstance(tree, dict):
        return [leaf for key in sorted(tree) for leaf in leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in leaves(item)]
    return [] if tree is None else [tree]


def structure(tree):
    """The containers of ``tree`` with :data:`LEAF` at each leaf (dict keys sorted, ``None``
    kept): what :func:`unflatten` fills."""
    if isinstance(tree, dict):
        return {key: structure(tree[key]) for key in sorted(tree)}
    if isinstance(tree, (list, tuple)):
        return _sequence(type(tree), [structure(item) for item in tree])
    return None if tree is None else LEAF


def _sequence(kind, items):
    """A list / tuple of ``kind`` from ``items`` (a named tuple takes them positionally)."""
    return kind(items) if kind in (list, tuple) else kind(*items)


def _open_box(tree):
    """A container boxed by autograd (``DictBox``, ``SequenceBox``) as a plain container of
    boxed items (indexing records the dependence); anything else as it is."""
    if isinstance(tree, Box) and isinstance(getval(tree), (dict, list, tuple)):
        raw = getval(tree)
        if isinstance(raw, dict):
            return {key: tree[key] for key in raw}
        return _sequence(type(raw), [tree[i] for i in range(len(raw))])
    return tree


def flatten(tree) -> tuple[list, object]:
    """``(leaves, structure)`` of ``tree``; ``unflatten(structure, leaves)`` rebuilds it.

    Unlike :func:`leaves`, containers boxed by autograd are opened, so that the leaves are the
    (boxed) arrays and the rebuilt tree is a plain container."""
    tree = _open_box(tree)
    if isinstance(tree, dict):
        keys = sorted(tree)
        parts = [flatten(tree[key]) for key in keys]
        return [leaf for p in parts for leaf in p[0]], {
            key: p[1] for key, p in zip(keys, parts, strict=True)
        }
    if isinstance(tree, (list, tuple)):
        parts = [flatten(item) for item in tree]
        return [leaf for p in parts for leaf in p[0]], _sequence(type(tree), [p[1] for p in parts])
    if tree is None:
        return [], None
    return [tree], LEAF


def unflatten(struct, leaves_):
    """The tree of ``struct`` (from :func:`structure` or :func:`flatten`) filled with
    ``leaves_`` in order; raises ``ValueError`` when their number does not match."""
    leaves_ = list(leaves_)
    tree, used = _fill(struct, leaves_, 0)
    if used != len(leaves_):
        raise ValueError(
            f"`leaves` must have one entry per leaf of the structure ({used}); got {len(leaves_)}"
        )
    return tree


def _fill(struct, leaves_, pos):
    if struct is LEAF:
        if pos >= len(leaves_):
            raise ValueError(f"`leaves` has {len(leaves_)} entries; the structure needs more")
        return leaves_[pos], pos + 1
    if isinstance(struct, dict):
        out = {}
        for key in struct:
            out[key], pos = _fill(struct[key], leaves_, pos)
        return out, pos
    if isinstance(struct, (list, tuple)):
        items = []
        for item in struct:
            value, pos = _fill(item, leaves_, pos)
            items.append(value)
        return _sequence(type(struct), items), pos
    return None, pos


def tree_map(fn, *trees):
    """``fn`` applied leaf-wise to trees of one structure (``None`` stays ``None``; dicts keep
    the first tree's key order, lists and tuples their type)."""
    first = trees[0]
    if isinstance(first, dict):
        return {key: tree_map(fn, *(t[key] for t in trees)) for key in first}
    if isinstance(first, (list, tuple)):
        return _sequence(type(first), [tree_map(fn, *items) for items in zip(*trees, strict=True)])
    if first is None:
        return None
    return fn(*trees)


def tree_size(tree) -> int:
    """The number of scalars in the leaves of ``tree``."""
    import numpy as np

    return sum(int(np.size(getval(leaf))) for leaf in leaves(tree))


def flatten_vector(tree):
    """``(vector, unflatten)``: the leaves of ``tree`` raveled and concatenated into one 1-D
    array (autograd's own :func:`autograd.misc.flatten`, differentiable), and the function that
    maps such a vector back to a tree. NumPy arrays only; ``None`` subtrees are not allowed."""
    return _autograd_flatten(tree)
