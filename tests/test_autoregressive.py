"""MADE, MAF and IAF: the masks' connectivity, the triangular Jacobian in the ordering, the
numba sequential pass against its reference twin, and the kernel's shape checks."""

from __future__ import annotations

import numpy as np
import pytest

import flowmath as fm
from flowmath.kernels import made
from flowmath.testing import check_grads, dense_jacobian


def _connectivity(masks):
    """Input -> output paths of the masked network, ``(d, 2d)`` booleans (product of the
    masks; a path exists iff the product is positive)."""
    reach = masks[0]
    for m in masks[1:]:
        reach = reach @ m
    return reach > 0


@pytest.mark.parametrize("order", ["natural", "reversed", "random", np.array([3, 1, 0, 4, 2])])
@pytest.mark.parametrize("hidden", [(), (7,), (5, 6), (4, 9, 4)])
def test_made_masks_are_autoregressive(order, hidden):
    """Output i reaches input j only if j comes before i in the ordering; with the even cyclic
    degrees and widths >= d - 1 every such pair is connected (MADE's full connectivity)."""
    d = 5
    layer = fm.MAF(hidden, order, seed=4)
    perm = layer.permutation(d)
    position = np.empty(d, int)
    position[perm] = np.arange(d)
    allowed = position[:, None] < position[None, :]  # [j, i]: j strictly before i
    reach = _connectivity(layer.masks(d))
    for half in (reach[:, :d], reach[:, d:]):
        assert not np.any(half & ~allowed)
        if not isinstance(order, str) or order != "random":
            if all(h >= d - 1 for h in hidden):
                np.testing.assert_array_equal(half, allowed)


@pytest.mark.parametrize("cls", [fm.MAF, fm.IAF])
@pytest.mark.parametrize("order", ["natural", "random"])
def test_jacobian_is_triangular_in_the_ordering(cls, order):
    """With rows and columns permuted into the ordering the dense Jacobian of ``forward`` is
    exactly lower triangular (entries above the diagonal are 0.0, not small), its diagonal is
    ``exp(-s_i)`` and its log-det the layer's."""
    rng = np.random.default_rng(0)
    d = 6
    layer = cls((12, 12), order, seed=2)
    x = rng.normal(size=(3, d))
    params = layer.init(rng, x)
    J = dense_jacobian(lambda v: layer.forward(params, v)[0], x)
    perm = layer.permutation(d)
    _, logdet = layer.forward(params, x)
    for k in range(3):
        Jp = J[k][np.ix_(perm, perm)]
        assert np.all(np.triu(Jp, 1) == 0.0)
        assert np.all(np.abs(np.diag(Jp)) > 0)
        np.testing.assert_allclose(np.sum(np.log(np.abs(np.diag(Jp)))), logdet[k], rtol=1e-13)
    if cls is fm.MAF:
        _, s = layer.conditioner(params, x)
        np.testing.assert_allclose(np.diagonal(J, axis1=1, axis2=2), np.exp(-s), rtol=1e-14)


@pytest.mark.parametrize("mode", [made.MAF_INVERSE, made.IAF_FORWARD])
@pytest.mark.parametrize("hidden, activation", [((), "tanh"), ((9,), "relu"), ((8, 7, 6), "tanh")])
@pytest.mark.parametrize("order", ["natural", "random"])
def test_numba_pass_equals_its_twin(mode, hidden, activation, order):
    """The incremental numba kernel against ``d`` full passes of the masked network; measured
    differences are below 1e-14 (relative); the tolerance allows 1e-12."""
    rng = np.random.default_rng(1)
    d = 7
    layer = fm.MAF(hidden, order, seed=5, activation=activation)
    y = rng.normal(size=(11, d))
    params = layer.init(rng, y)
    params["scale"] = rng.uniform(0.5, 1.5, size=d)
    masks = layer.masks(d)
    w1, s1 = made.ar_affine_solve(
        params["net"], masks, params["scale"], y, layer.permutation(d), activation, mode
    )
    w2, s2 = made.ar_affine_solve_reference(
        params["net"], masks, params["scale"], y, activation, mode
    )
    np.testing.assert_allclose(w1, w2, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s1, s2, rtol=1e-12, atol=1e-12)


def test_float32_pass_stays_float32():
    rng = np.random.default_rng(2)
    layer = fm.MAF((8,))
    z = rng.normal(size=(4, 3)).astype(np.float32)
    params = layer.init(rng, z)
    x, ld = layer.inverse(params, z)
    assert x.dtype == np.float32 and ld.dtype == np.float32


def test_sampling_gradient_matches_finite_differences():
    """MAF's inverse (sampling) is differentiated through the reference twin; check it against
    finite differences with seeded directions."""
    rng = np.random.default_rng(3)
    layer = fm.MAF((6,), "reversed")
    z = rng.normal(size=(4, 3))
    params = layer.init(rng, z)

    def f(p):
        x, ld = layer.inverse(p, z)
        return np.sum(x**2) + np.sum(ld)

    check_grads(f, modes=["rev"], order=1, rng=np.random.default_rng(0))(params)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda p: p["net"][0].update(W=p["net"][0]["W"][:, :-1]), r"\['W'\]` must have shape"),
        (lambda p: p["net"][1].update(b=p["net"][1]["b"][:-1]), r"\['b'\]` must have shape"),
        (lambda p: p.update(scale=p["scale"][:-1]), r"`params\['scale'\]` must have shape"),
    ],
)
def test_kernel_caller_checks_shapes(edit, match):
    rng = np.random.default_rng(4)
    layer = fm.MAF((5,))
    z = rng.normal(size=(2, 4))
    params = layer.init(rng, z)
    edit(params)
    with pytest.raises(ValueError, match=match):
        made.ar_affine_solve(
            params["net"], layer.masks(4), params["scale"], z, layer.permutation(4), "tanh", 0
        )
    with pytest.raises(ValueError, match="`perm` must be a permutation"):
        made.ar_affine_solve(
            layer.init(rng, z)["net"],
            layer.masks(4),
            np.ones(4),
            z,
            np.array([0, 1, 1, 2]),
            "tanh",
            0,
        )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(hidden="64"), TypeError, "`hidden` must be a tuple of positive ints"),
        (dict(hidden=(2.7,)), TypeError, "`hidden` must be a tuple of positive ints"),
        (dict(hidden=(0,)), ValueError, "`hidden` must be a tuple of positive ints"),
        (dict(order="sorted"), ValueError, "`order` must be one of"),
        (dict(order=np.array([0, 0, 1])), ValueError, "`order` must be"),
        (dict(identity_init="False"), TypeError, "`identity_init` must be True or False"),
        (dict(activation="elu"), ValueError, "`activation` must be one of"),
        (dict(seed=-1), ValueError, "`seed` must be >= 0"),
    ],
)
def test_bad_constructor_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fm.MAF(**kwargs)


def test_identity_init_is_the_identity():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 4))
    for cls in (fm.MAF, fm.IAF):
        layer = cls((8,), identity_init=True)
        params = layer.init(rng, x)
        z, ld = layer.forward(params, x)
        np.testing.assert_array_equal(z, x)
        np.testing.assert_array_equal(ld, 0.0)
