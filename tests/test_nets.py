"""Conditioner networks: the im2col convolution against a direct loop, the MLP against its
definition, zero output layers, and float32 kept float32 through values and gradients."""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from flowmath import nets
from flowmath.testing import check_grads


def _conv_reference(x, W, b):
    n, c, h, w = x.shape
    o, _, k, _ = W.shape
    r = (k - 1) // 2
    xp = np.zeros((n, c, h + 2 * r, w + 2 * r))
    xp[:, :, r : r + h, r : r + w] = x
    y = np.zeros((n, o, h, w))
    for i in range(h):
        for j in range(w):
            patch = xp[:, :, i : i + k, j : j + k]  # (n, c, k, k)
            y[:, :, i, j] = np.einsum("ncuv,ocuv->no", patch, W) + b
    return y


@pytest.mark.parametrize("k", [1, 3, 5])
def test_conv2d_matches_direct_loop(rng, k):
    x = rng.normal(size=(2, 3, 5, 4))
    W = rng.normal(size=(4, 3, k, k))
    b = rng.normal(size=4)
    np.testing.assert_allclose(nets.conv2d(x, W, b), _conv_reference(x, W, b), rtol=0, atol=1e-12)


def test_mlp_matches_definition(rng):
    p = nets.mlp_init(rng, [3, 7, 5, 2])
    x = rng.normal(size=(4, 3))
    h = np.maximum(x @ p[0]["W"] + p[0]["b"], 0)
    h = np.maximum(h @ p[1]["W"] + p[1]["b"], 0)
    np.testing.assert_allclose(nets.mlp_apply(p, x), h @ p[2]["W"] + p[2]["b"], atol=1e-13)


def test_convnet_shapes_and_zero_output(rng):
    x = rng.normal(size=(2, 3, 4, 4))
    p = nets.convnet_init(rng, 3, (5, 6), 4)
    assert [q["W"].shape for q in p] == [(5, 3, 3, 3), (6, 5, 1, 1), (4, 6, 3, 3)]
    assert nets.convnet_apply(p, x).shape == (2, 4, 4, 4)
    assert np.abs(nets.convnet_apply(p, x)).max() > 0
    z = nets.convnet_init(rng, 3, (5,), 4, out_scale=0.0)
    assert np.all(nets.convnet_apply(z, x) == 0)
    z = nets.mlp_init(rng, [3, 5, 2], out_scale=0.0)
    assert np.all(nets.mlp_apply(z, rng.normal(size=(4, 3))) == 0)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_float32_values_and_gradients_stay_float32(rng, kind):
    """No float64 upcast: float32 parameters and inputs give float32 outputs and gradients."""
    if kind == "mlp":
        p = nets.mlp_init(rng, [6, 8, 4])
        x = rng.normal(size=(3, 6)).astype(np.float32)
        apply = nets.mlp_apply
    else:
        p = nets.convnet_init(rng, 2, (4,), 3)
        x = rng.normal(size=(3, 2, 4, 4)).astype(np.float32)
        apply = nets.convnet_apply
    p = [{k: v.astype(np.float32) for k, v in q.items()} for q in p]
    assert apply(p, x).dtype == np.float32

    def loss(p, x):
        return anp.mean(anp.tanh(apply(p, x)) * 0.5)

    gp, gx = autograd.grad(loss, (0, 1))(p, x)
    assert gx.dtype == np.float32
    assert all(v.dtype == np.float32 for q in gp for v in q.values())


def test_bad_arguments(rng):
    with pytest.raises(ValueError, match="`sizes` must hold at least"):
        nets.mlp_init(rng, [3])
    with pytest.raises(ValueError, match=r"`sizes\[1\]` must be >= 1"):
        nets.mlp_init(rng, [3, 0, 2])
    with pytest.raises(TypeError, match="`rng` must be a numpy.random.Generator"):
        nets.mlp_init(0, [3, 2])
    with pytest.raises(ValueError, match="`out_scale` must be"):
        nets.convnet_init(rng, 2, (3,), 2, out_scale=-1.0)


def test_unpack_round_trip_and_derivatives(rng):
    """unpack gives the leaves (dict keys sorted) and its VJP the tree; second and third
    derivatives through it agree with finite differences."""
    tree = {
        "b": [rng.normal(size=3), {"y": rng.normal(size=(2, 2)), "x": rng.normal(size=2)}],
        "a": rng.normal(size=1),
    }
    leaves = nets.unpack(tree)
    assert [v.shape for v in leaves] == [(1,), (3,), (2,), (2, 2)]

    def f(t):
        a, b0, bx, by = nets.unpack(t)
        return anp.sum(a**3) * anp.sum(anp.sin(b0)) + anp.sum(bx**2) * anp.sum(by**3)

    g = autograd.grad(f)(tree)
    assert set(g) == {"a", "b"} and set(g["b"][1]) == {"x", "y"}
    check_grads(f, modes=["rev"], order=3)(tree)


def test_mlp_params_gradient_to_second_order(rng):
    p = nets.mlp_init(rng, [3, 4, 2])
    x = rng.normal(size=(5, 3))
    check_grads(lambda q: anp.sum(anp.tanh(nets.mlp_apply(q, x))), modes=["rev"], order=2)(p)
    q = nets.convnet_init(rng, 2, (3,), 2)
    xi = rng.normal(size=(2, 2, 3, 3))
    check_grads(lambda r: anp.sum(nets.convnet_apply(r, xi) ** 2), modes=["rev"], order=2)(q)
