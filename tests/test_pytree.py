"""flowmath._pytree: one leaf order (autograd's), exact round trips, boxed containers."""

import copy
import pickle

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from autograd.misc.flatten import flatten as autograd_flatten

from flowmath import _pytree as pt


def _tree(rng):
    return {
        "net": [{"W": rng.normal(size=(3, 2)), "b": rng.normal(size=2)}, {"W": rng.normal(size=4)}],
        "a": (rng.normal(size=(2, 2)), 1.5),
        "u": None,
    }


def test_leaf_order_is_autograds(rng):
    tree = {k: v for k, v in _tree(rng).items() if k != "u"}  # autograd has no None leaves
    vec, _ = autograd_flatten(tree)
    ours = np.concatenate([np.ravel(leaf) for leaf in pt.leaves(tree)])
    assert np.array_equal(vec, ours)
    vec2, back = pt.flatten_vector(tree)
    assert np.array_equal(vec2, vec)
    rebuilt = back(vec2)
    for a, b in zip(pt.leaves(rebuilt), pt.leaves(tree), strict=True):
        assert np.array_equal(a, b)


def test_flatten_round_trip_keeps_containers_and_none(rng):
    tree = _tree(rng)
    leaves, struct = pt.flatten(tree)
    assert len(leaves) == 5 == len(pt.leaves(tree))
    back = pt.unflatten(struct, leaves)
    assert back["u"] is None and isinstance(back["a"], tuple) and isinstance(back["net"], list)
    assert all(a is b for a, b in zip(pt.leaves(back), leaves, strict=True))
    assert pt.structure(tree) == struct
    assert pt.tree_size(tree) == 6 + 2 + 4 + 4 + 1
    # the structure survives copies and pickles (the LEAF marker is one object)
    assert pt.unflatten(pickle.loads(pickle.dumps(struct)), leaves)["a"][1] == 1.5
    assert copy.deepcopy(struct) == struct


def test_unflatten_rejects_a_wrong_number_of_leaves(rng):
    leaves, struct = pt.flatten(_tree(rng))
    with pytest.raises(ValueError, match="`leaves`"):
        pt.unflatten(struct, leaves[:-1])
    with pytest.raises(ValueError, match="`leaves`"):
        pt.unflatten(struct, [*leaves, 0.0])


def test_tree_map_multiple_trees(rng):
    tree = _tree(rng)
    doubled = pt.tree_map(lambda a, b: a + b, tree, tree)
    assert doubled["u"] is None
    for a, b in zip(pt.leaves(doubled), pt.leaves(tree), strict=True):
        assert np.array_equal(a, 2 * np.asarray(b))


def test_flatten_opens_boxed_containers(rng):
    """Differentiating with respect to a whole tree boxes the containers; flatten reaches the
    leaves, so a function written with it has the right gradient (sum of squares: 2 x)."""
    tree = {k: v for k, v in _tree(rng).items() if k != "u"}

    def f(t):
        leaves, _ = pt.flatten(t)
        return sum(anp.sum(leaf**2) for leaf in leaves)

    grad = autograd.grad(f)(tree)
    for g, x in zip(pt.leaves(grad), pt.leaves(tree), strict=True):
        np.testing.assert_allclose(g, 2 * np.asarray(x), rtol=0, atol=0)
