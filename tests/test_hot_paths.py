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
from flowmath import nets
from flowmath._xp import leaves
from flowmath.kernels import coupling_mlp
from flowmath.kernels.finite import count_nonfinite, count_nonfinite_reference

TOL = {np.float64: 1e-14, np.float32: 5e-6}


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1.0))


def _tree_rel(ta, tb):
    return max(_rel(a, b) for a, b in zip(leaves(ta), leaves(tb), strict=True))


# -- the affine coupling of vectors: one fused primitive ------------------------------------------


def _old_affine_coupling(params, x, mask, act, inverse):
    """The previous formula, composed of autograd operations: split by the mask, the MLP
    ``h <- act(h W + b)``, ``s = a tanh(r)``, ``y_B = x_B e^s + t`` (inverse
    ``(y_B - t) e^{-s}``), log-det ``+-sum s``, merge."""
    idx_a, idx_b = np.flatnonzero(mask), np.flatnonzero(~mask)
    perm = np.concatenate([idx_a, idx_b])
    inv = np.argsort(perm)
    xs = x[:, perm]
    xa, xb = xs[:, : len(idx_a)], xs[:, len(idx_a) :]
    h = xa
    net = params["net"]
    for k in range(len(net)):
        h = anp.matmul(h, net[k]["W"]) + net[k]["b"]
        if k < len(net) - 1:
            h = nets.relu(h) if act == "relu" else nets.tanh(h)
    raw, t = h[:, : len(idx_b)], h[:, len(idx_b) :]
    s = params["scale"] * nets.tanh(raw)
    if inverse:
        ub, ld = (xb - t) * anp.exp(-s), -anp.sum(s, axis=1)
    else:
        ub, ld = xb * anp.exp(s) + t, anp.sum(s, axis=1)
    return anp.concatenate([xa, ub], axis=1)[:, inv], ld


_COUPLING_CASES = [  # (d, mask, flip): layouts "ab", "ba" and a permutation
    (2, "half", False),
    (5, "half", True),
    (6, np.array([True, False, True, True, False, False]), False),
]


@pytest.mark.parametrize("d,mask,flip", _COUPLING_CASES, ids=["ab", "ba", "perm"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_fused_affine_coupling_equals_composed_formula(rng, d, mask, flip, act, dtype, inverse):
    layer = fm.AffineCoupling(mask, hidden=(16, 8), flip=flip, activation=act)
    x = rng.normal(size=(7, d)).astype(dtype)
    params = layer.init(rng, x)
    bmask = layer._partition((d,)).mask
    run = layer.inverse if inverse else layer.forward
    y, ld = run(params, x)
    y0, ld0 = _old_affine_coupling(params, x, bmask, act, inverse)
    assert y.dtype == dtype and ld.dtype == dtype
    assert _rel(y, y0) <= TOL[dtype] and _rel(ld, ld0) <= TOL[dtype]

    w_y = rng.normal(size=x.shape).astype(dtype)
    w_l = rng.normal(size=len(x)).astype(dtype)

    def scalar(fn):
        return lambda p, v: anp.sum(fn(p, v)[0] * w_y) + anp.sum(fn(p, v)[1] * w_l)

    new = scalar(lambda p, v: layer._couple(p, v, inverse))
    old = scalar(lambda p, v: _old_affine_coupling(p, v, bmask, act, inverse))
    g_new, g_old = autograd.grad(new, (0, 1))(params, x), autograd.grad(old, (0, 1))(params, x)
    assert {leaf.dtype for leaf in leaves(g_new)} == {np.dtype(dtype)}
    assert all(leaf.flags.c_contiguous for leaf in leaves(g_new))
    assert _tree_rel(g_new, g_old) <= TOL[dtype]

    # second derivatives (the VJP is traced when differentiated): Hessian-vector products
    v = rng.normal(size=x.shape).astype(dtype)

    def hvp(fn, argnum):
        inner = lambda p, z: anp.sum(autograd.grad(fn, 1)(p, z) * v)  # noqa: E731
        return autograd.grad(inner, argnum)(params, x)

    assert _rel(hvp(new, 1), hvp(old, 1)) <= TOL[dtype]
    assert _tree_rel(hvp(new, 0), hvp(old, 0)) <= TOL[dtype]
    # and the other way round, d/dx <d/dp f, V>: the parameter cotangent built inside the traced
    # VJP is a traced container (it was a plain dict of traced leaves, which autograd rejected)
    V = [rng.normal(size=np.shape(leaf)).astype(dtype) for leaf in leaves(params)]

    def mixed(fn):
        def inner(z):
            g = nets.unpack(autograd.grad(fn, 0)(params, z))
            return sum(anp.sum(a * b) for a, b in zip(g, V, strict=True))

        return autograd.grad(inner)(x)

    assert _rel(mixed(new), mixed(old)) <= TOL[dtype]


@pytest.mark.parametrize("d,mask,flip", _COUPLING_CASES, ids=["ab", "ba", "perm"])
@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_fused_coupling_numpy_path_equals_generic_path(rng, d, mask, flip, act, dtype, inverse):
    """The first-derivative path (in-place NumPy, ``_forward_np``/``_backward_np``) against the
    generic one run with NumPy (``_forward``/``_backward`` with ``xp = numpy``): outputs
    bitwise equal but the log-det (a matrix-vector product instead of a row sum: equal to
    rounding), cotangents bitwise equal from the same cache, dtypes kept."""
    layer = fm.AffineCoupling(mask, hidden=(16, 8), flip=flip, activation=act)
    x = rng.normal(size=(7, d)).astype(dtype)
    params = layer.init(rng, x)
    part = layer._partition((d,))
    (y, ld), cache = coupling_mlp._forward_np(x, params, part, act, inverse)
    (y0, ld0), cache0 = coupling_mlp._forward(np, x, params, part, act, inverse)
    assert y.dtype == ld.dtype == dtype
    assert np.array_equal(y, y0) and _rel(ld, ld0) <= TOL[dtype]
    g = (rng.normal(size=x.shape).astype(dtype), rng.normal(size=len(x)).astype(dtype))
    gx, gp = coupling_mlp._backward_np(g, cache0, part, inverse, True, True)
    gx0, gp0 = coupling_mlp._backward(np, g, cache0, part, inverse, True, True)
    assert gx.dtype == dtype and np.array_equal(gx, gx0)
    for a, b in zip(leaves(gp), leaves(gp0), strict=True):
        assert a.dtype == dtype and a.flags.c_contiguous and np.array_equal(a, b)


def test_coupling_activation_is_validated():
    with pytest.raises(ValueError, match="`activation`"):
        fm.AffineCoupling(activation="elu")


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
    for bad in (np.nan, np.inf, -np.inf):
        # InvConv1x1.forward checks its output alone (a non-finite input reaches it) and names
        # the input when the output is non-finite because of it
        z = x.copy()
        z[1, 2, 1, 0] = bad
        with pytest.raises(ValueError, match=r"`x` must be finite; got 1 non-finite"):
            layer.forward(params, z)
        with pytest.raises(ValueError, match=r"`y` must be finite; got 1 non-finite"):
            layer.inverse(params, z)
    # a finite input whose image overflows float32: the output check names the overflow
    big = np.full_like(x, 3e38)
    with pytest.raises(ValueError, match=r"non-finite `y` in InvConv1x1.forward"):
        layer.forward({**params, "log_s": params["log_s"] + 2}, big)


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


# -- the convolutional conditioner: channel-major, every convolution one GEMM -----------------


def _old_conv2d(x, W, b):
    """The previous formula: per-sample im2col by slicing the padded input, one batched
    ``matmul`` of ``(o, k^2 c)`` with ``(n, k^2 c, h w)``."""
    n, c, h, w = x.shape
    o, _, k, _ = W.shape
    r = (k - 1) // 2
    xp = anp.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="constant")
    cols = [xp[:, :, u : u + h, v : v + w] for u in range(k) for v in range(k)]
    patches = anp.reshape(anp.concatenate(cols, axis=1), (n, k * k * c, h * w))
    Wm = anp.reshape(anp.transpose(W, (0, 2, 3, 1)), (o, k * k * c))
    return anp.reshape(anp.matmul(Wm, patches), (n, o, h, w)) + anp.reshape(b, (o, 1, 1))


def _old_convnet(params, x, act):
    h = x
    for k, layer in enumerate(params):
        h = _old_conv2d(h, layer["W"], layer["b"])
        if k < len(params) - 1:
            h = act(h)
    return h


@pytest.mark.parametrize(
    "c,hidden,c_out",
    [(6, (16, 16), 4), (2, (), 8), (6, (2,), 6)],
    ids=["im2col-1x1-taps", "single-im2col", "taps-first"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_channel_major_convnet_equals_per_sample_im2col(rng, c, hidden, c_out, dtype):
    from flowmath.kernels.conv_cm import convnet_apply_cm

    x = rng.normal(size=(3, c, 5, 4)).astype(dtype)
    params = [
        {key: leaf.astype(dtype) for key, leaf in layer.items()}
        for layer in nets.convnet_init(rng, c, hidden, c_out)
    ]
    w = rng.normal(size=(3, c_out, 5, 4)).astype(dtype)
    act = nets.tanh  # smooth, so the second derivatives are not trivially zero

    def new(p, z):
        return anp.sum(convnet_apply_cm(list(nets.unpack(p)), z, "tanh") * w)

    def old(p, z):
        return anp.sum(_old_convnet(p, z, act) * w)

    for name, fn in (("relu", nets.relu), ("tanh", act)):
        y = convnet_apply_cm(list(nets.unpack(params)), x, name)
        assert y.dtype == dtype and y.flags.c_contiguous
        assert _rel(y, _old_convnet(params, x, fn)) <= TOL[dtype]
    for name, fn in (("relu", nets.relu), ("tanh", act)):

        def new_a(p, z, name=name):
            return anp.sum(convnet_apply_cm(list(nets.unpack(p)), z, name) * w)

        def old_a(p, z, fn=fn):
            return anp.sum(_old_convnet(p, z, fn) * w)

        g_new = autograd.grad(new_a, (0, 1))(params, x)
        g_old = autograd.grad(old_a, (0, 1))(params, x)
        assert {leaf.dtype for leaf in leaves(g_new)} == {np.dtype(dtype)}
        assert all(leaf.flags.c_contiguous for leaf in leaves(g_new))
        assert _tree_rel(g_new, g_old) <= TOL[dtype]
    v = rng.normal(size=x.shape).astype(dtype)

    def hvp(fn):
        return autograd.grad(lambda z: anp.sum(autograd.grad(fn, 1)(params, z) * v))(x)

    if hidden:  # (a single convolution is linear: no second derivative)
        assert _rel(hvp(new), hvp(old)) <= TOL[dtype]


# -- Chain: per-layer parameters of a traced list, cotangents placed ------------------------------


def test_chain_gradients_equal_plain_indexing(rng):
    """Chain takes the per-layer trees of a traced parameter list through one shared vector
    space; the previous formula indexed the boxed list layer by layer (``zip(layers, params)``).
    Same gradients and Hessian-vector products."""
    layers = [fm.AffineCoupling(hidden=(8,), flip=bool(k % 2), activation="tanh") for k in range(3)]
    layers.insert(1, fm.LULinear())
    chain = fm.Chain(layers)
    x = rng.normal(size=(6, 4))
    params = chain.init(rng, x)
    w = rng.normal(size=x.shape)

    def new(p, z):
        y, ld = chain._forward(p, z, None)
        return anp.sum(y * w) + anp.sum(ld)

    def old(p, z):
        total = 0.0
        for layer, q in zip(chain.layers, p, strict=True):
            z, ld = layer._forward(q, z, None)
            total = total + ld
        return anp.sum(z * w) + anp.sum(total)

    g_new, g_old = autograd.grad(new, (0, 1))(params, x), autograd.grad(old, (0, 1))(params, x)
    assert _tree_rel(g_new, g_old) <= TOL[np.float64]
    v = rng.normal(size=x.shape)

    def hvp(fn):
        return autograd.grad(lambda p: anp.sum(autograd.grad(fn, 1)(p, x) * v))(params)

    assert _tree_rel(hvp(new), hvp(old)) <= TOL[np.float64]


def _plain_chain(chain, p, z):
    """The previous formula: the boxed list indexed layer by layer."""
    total = 0.0
    for layer, q in zip(chain.layers, p, strict=True):
        z, ld = layer._forward(q, z, None)
        total = total + ld
    return z, total


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chain_placed_cotangents_equal_plain_indexing(rng, dtype):
    """Chain places each layer's parameter cotangent into the list instead of adding it into a
    zero-filled copy of the whole list. Against plain indexing: the same gradients when a layer
    is reached by no path (its zeros are filled in, of its dtype), when the chain runs twice on
    the same parameters (the two cotangents of each layer are added), and for second
    derivatives taken the other way round (gradient in x of a parameter-gradient product)."""
    layers = [
        fm.AffineCoupling(hidden=(8,), activation="tanh"),
        fm.AdditiveCoupling(hidden=(8,), flip=True),
        fm.AffineCoupling(hidden=(8,), flip=True, activation="tanh"),
    ]
    chain = fm.Chain(layers)
    x = rng.normal(size=(6, 4)).astype(dtype)
    params = chain.init(rng, x)
    w = rng.normal(size=x.shape).astype(dtype)

    def logdet_only(fwd):  # the additive layer's log-det is 0: no path reaches its parameters
        return lambda p, z: anp.sum(fwd(p, z)[1])

    def twice(fwd):
        def f(p, z):
            y, ld = fwd(p, z)
            y2, ld2 = fwd(p, y * 0.5)
            return anp.sum(y2 * w) + anp.sum(ld) + anp.sum(ld2)

        return f

    new = lambda p, z: chain._forward(p, z, None)  # noqa: E731
    old = lambda p, z: _plain_chain(chain, p, z)  # noqa: E731
    for make in (logdet_only, twice):
        g_new = autograd.grad(make(new))(params, x)
        g_old = autograd.grad(make(old))(params, x)
        assert _tree_rel(g_new, g_old) <= TOL[dtype]
        assert all(leaf.dtype == dtype for leaf in leaves(g_new))
    unreached = autograd.grad(logdet_only(new))(params, x)[1]
    assert all(not np.any(leaf) for leaf in leaves(unreached))
    V = [rng.normal(size=np.shape(leaf)).astype(dtype) for leaf in leaves(params)]

    def mixed(fwd):  # d/dx < d/dp f, V >
        return autograd.grad(
            lambda z: sum(
                anp.sum(a * b)
                for a, b in zip(nets.unpack(autograd.grad(twice(fwd))(params, z)), V, strict=True)
            )
        )(x)

    assert _rel(mixed(new), mixed(old)) <= TOL[dtype]


# -- emerging convolution: the masked convolution as one channel-major GEMM -----------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("c,k", [(3, 3), (2, 5)])
def test_ar_conv_equals_per_sample_im2col(rng, dtype, c, k):
    """``ar_conv`` (one channel-major convolution + the diagonal) against its previous formula
    (per-sample im2col of slices, ``ar_conv_reference``): values, gradients in ``w``, ``d``,
    ``x`` and a Hessian-vector product to rounding; float32 kept float32."""
    from flowmath.kernels import emerging

    x = rng.normal(size=(4, c, 5, 6)).astype(dtype)
    w = (rng.normal(size=(c, c, k, k)) * 0.3).astype(dtype)
    d = np.exp(rng.normal(size=c) * 0.3).astype(dtype)
    wy = rng.normal(size=x.shape).astype(dtype)
    y, y0 = emerging.ar_conv(w, d, x), emerging.ar_conv_reference(w, d, x)
    assert y.dtype == dtype and _rel(y, y0) <= TOL[dtype]

    def scalar(fn):
        return lambda w_, d_, x_: anp.sum(anp.tanh(fn(w_, d_, x_)) * wy)

    new, old = scalar(emerging.ar_conv), scalar(emerging.ar_conv_reference)
    g_new = autograd.grad(new, (0, 1, 2))(w, d, x)
    g_old = autograd.grad(old, (0, 1, 2))(w, d, x)
    for a, b in zip(g_new, g_old, strict=True):
        assert a.dtype == dtype and a.flags.c_contiguous and _rel(a, b) <= TOL[dtype]
    v = rng.normal(size=x.shape).astype(dtype)

    def hvp(fn):
        inner = lambda w_: anp.sum(autograd.grad(fn, 2)(w_, d, x) * v)  # noqa: E731
        return autograd.grad(inner)(w)

    assert _rel(hvp(new), hvp(old)) <= TOL[dtype]


@pytest.mark.parametrize("c,o", [(3, 3), (6, 2)], ids=["im2col", "taps"])
def test_conv2d_cm_equals_sliding_windows(rng, c, o):
    """``conv2d_cm`` (both branches: im2col for ``o >= c``, taps for few output channels)
    against the definition written with sliding windows of the zero-padded input."""
    from flowmath.kernels.conv_cm import conv2d_cm, swap01

    x = rng.normal(size=(3, c, 5, 4))
    W = rng.normal(size=(o, c, 3, 3))
    win = np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1))), (3, 3), axis=(2, 3)
    )
    ref = np.einsum("ocuv,ncijuv->noij", W, win)
    assert _rel(swap01(conv2d_cm(swap01(x), W)), ref) <= TOL[np.float64]


# -- periodic convolution: the real FFT on plain arrays -------------------------------------------


def _old_periodic(layer, params, x, inverse):
    """The previous formula: the full complex FFT, one product (or solve) per frequency, the
    real part of the inverse FFT."""
    n, c, h, w = x.shape
    mats = layer.fourier_matrices(params, h, w).reshape(h * w, c, c)
    xhat = np.fft.fft2(x).reshape(n, c, h * w).transpose(2, 1, 0)
    yhat = np.linalg.solve(mats, xhat) if inverse else np.matmul(mats, xhat)
    return np.real(np.fft.ifft2(yhat.transpose(2, 1, 0).reshape(n, c, h, w))).astype(x.dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("hw", [(5, 4), (4, 7)], ids=["even-w", "odd-w"])
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_periodic_conv_real_fft_equals_complex_fft(rng, dtype, hw, inverse):
    """PeriodicConv2d on plain arrays transforms with the real FFT (half the spectrum); the
    previous formula used the full complex FFT. Same output to rounding, float32 kept; traced
    calls still take the complex path, and the gradient is unchanged."""
    layer = fm.PeriodicConv2d()
    x = rng.normal(size=(3, 2, *hw)).astype(dtype)
    params = {k: v.astype(dtype) for k, v in layer.init(rng, x).items()}
    run = layer.inverse if inverse else layer.forward
    y, ld = run(params, x)
    assert y.dtype == ld.dtype == dtype
    assert _rel(y, _old_periodic(layer, params, x, inverse)) <= TOL[dtype]
    # the map is linear: the traced (complex-FFT) gradient A^T v and the plain (real-FFT)
    # output A u satisfy the adjoint identity <A^T v, u> = <v, A u>
    u, v = rng.normal(size=x.shape).astype(dtype), rng.normal(size=x.shape).astype(dtype)
    adj = autograd.grad(lambda z: anp.sum(run(params, z)[0] * v))(x)
    lhs, rhs = float(np.sum(adj * u)), float(np.sum(v * run(params, u)[0]))
    assert abs(lhs - rhs) <= TOL[dtype] * np.sum(np.abs(v)) * np.abs(run(params, u)[0]).max()
