"""The rewritten hot paths against their previous formulas (issue: hot paths at the hardware
floor). Each previous formula is kept here as a reference twin, written out as it was; the
rewritten path must give the same values, log-dets and gradients to rounding (first and, where
the path is an autograd primitive with a hand-written VJP, second derivatives), and keep float32
inputs float32 end to end.

Tolerances are relative, ``max|a - b| / max(max|b|, 1)``, set from the measured errors with a
margin of about 15 (measured on this machine for the fused coupling: values bitwise equal,
gradients <= 6.9e-16 in float64 and 1.6e-7 in float32, Hessian-vector products <= 6.7e-16 and
3.3e-7): 1e-14 in float64, 5e-6 in float32."""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

import flowmath as fm
from flowmath._xp import leaves
from flowmath.kernels.finite import count_nonfinite, count_nonfinite_reference

TOL = {np.float64: 1e-14, np.float32: 5e-6}


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0))


def _tree_rel(ta, tb):
    return max(_rel(a, b) for a, b in zip(leaves(ta), leaves(tb), strict=True))


# -- the finiteness check -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_count_nonfinite_equals_isfinite(rng, dtype):
    x = rng.normal(size=(5, 3, 4, 4)).astype(dtype)
    info = np.finfo(dtype)
    # the edges of the finite range, subnormals and signed zeros are finite
    x.flat[:6] = [info.max, -info.max, info.tiny, info.tiny / 8, 0.0, -0.0]
    assert count_nonfinite(x) == count_nonfinite_reference(x) == 0
    x.flat[[7, 100, 200, 201]] = [np.nan, np.inf, -np.inf, -np.nan]
    assert count_nonfinite(x) == count_nonfinite_reference(x) == 4
    assert count_nonfinite(x[:, ::2]) == count_nonfinite_reference(x[:, ::2])  # strided
    assert count_nonfinite(np.arange(4)) == 0


def test_check_finite_names_the_argument(rng):
    layer = fm.InvConv1x1()
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    params = layer.init(rng, x)
    x[1, 2, 1, 0] = np.nan
    with pytest.raises(ValueError, match=r"`x` must be finite; got 1 non-finite"):
        layer.forward(params, x)


# -- the 1x1 convolution: one batched matmul ----------------------------------------------------


def _old_channel_matmul(weight, x):
    """The previous formula: ``tensordot`` over the channel axis, then a transposed view."""
    return anp.transpose(anp.tensordot(weight, x, axes=([1], [1])), (1, 0, 2, 3))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("lu", [True, False])
def test_invconv1x1_equals_tensordot_formula(rng, dtype, lu):
    layer = fm.InvConv1x1(lu=lu)
    x = rng.normal(size=(3, 5, 4, 2)).astype(dtype)
    params = layer.init(rng, x)
    y, ld = layer.forward(params, x)
    W = layer.weight(params)
    assert y.dtype == dtype and ld.dtype == dtype and y.flags.c_contiguous
    assert _rel(y, _old_channel_matmul(W, x)) <= TOL[dtype]
    xb, _ = layer.inverse(params, y)
    assert _rel(xb, x) <= 100 * TOL[dtype]
    w = rng.normal(size=y.shape).astype(dtype)

    def loss(fn):
        return lambda p, v: anp.sum(fn(layer.weight(p), v) * w)

    from flowmath.layers.conv import _channel_matmul

    g_new = autograd.grad(loss(_channel_matmul), (0, 1))(params, x)
    g_old = autograd.grad(loss(_old_channel_matmul), (0, 1))(params, x)
    assert {leaf.dtype for leaf in leaves(g_new)} == {np.dtype(dtype)}
    assert _tree_rel(g_new, g_old) <= TOL[dtype]
