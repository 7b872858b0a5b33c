"""Coupling layers beyond the registry: the exact log-det identities (additive 0, affine
sum s(x_A)), the block-triangular Jacobian, identity initialisation, the bounded scale, masks
and their error messages."""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

import flowmath as fm
from flowmath import nets
from flowmath.testing import dense_jacobian

_MASKS = [
    ("half", (6,)),
    ("half", (2, 4, 4)),
    ("channel", (4, 2, 2)),
    ("checkerboard", (2, 4, 4)),
    (np.array([True, False, False, True, True, False]), (6,)),
]


def _mask_array(layer, shape):
    part = layer._partition(shape)
    return np.asarray(part.mask)


@pytest.mark.parametrize("mask,shape", _MASKS, ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_additive_logdet_is_exactly_zero(rng, mask, shape, dtype):
    layer = fm.AdditiveCoupling(mask, hidden=(8,))
    x = rng.normal(size=(4,) + shape).astype(dtype)
    params = layer.init(rng, x)
    y, ld = layer.forward(params, x)
    _, ld_inv = layer.inverse(params, y)
    assert ld.dtype == dtype and np.all(ld == 0) and np.all(ld_inv == 0)


def test_affine_logdet_is_sum_of_s_vectors(rng):
    layer = fm.AffineCoupling("half", hidden=(16, 16))
    x = rng.normal(size=(5, 7))
    params = layer.init(rng, x)
    _, ld = layer.forward(params, x)
    xa = x[:, :3]  # "half" of 7 features: the first 3 pass through
    raw = nets.mlp_apply(params["net"], xa)[:, :4]
    s = params["scale"] * np.tanh(raw)
    np.testing.assert_allclose(ld, s.sum(axis=1), rtol=0, atol=1e-13)
    assert np.abs(ld).max() > 1e-2  # a generic layer, not a trivially zero log-det


def test_affine_logdet_is_sum_of_s_checkerboard(rng):
    layer = fm.AffineCoupling("checkerboard", hidden=(8,))
    x = rng.normal(size=(3, 2, 4, 4))
    params = layer.init(rng, x)
    _, ld = layer.forward(params, x)
    b = _mask_array(layer, (2, 4, 4)).astype(float)
    raw = nets.convnet_apply(params["net"], x * b)[:, :2]
    s = params["scale"] * np.tanh(raw) * (1 - b)
    np.testing.assert_allclose(ld, s.sum(axis=(1, 2, 3)), rtol=0, atol=1e-13)


@pytest.mark.parametrize("cls", [fm.AffineCoupling, fm.AdditiveCoupling])
@pytest.mark.parametrize("mask,shape", _MASKS, ids=lambda v: v if isinstance(v, str) else None)
def test_block_triangular_jacobian(rng, cls, mask, shape):
    """With the entries ordered (A, B): J_AA = I, J_AB = 0 exactly, J_BB diagonal with entries
    exp(s) (1 for additive), J_BA a generic dense block."""
    layer = cls(mask, hidden=(8,))
    x = rng.normal(size=(2,) + shape)
    params = layer.init(rng, x)
    J = dense_jacobian(lambda v: layer.forward(params, v)[0], x)
    m = _mask_array(layer, shape).ravel()
    a, b = np.flatnonzero(m), np.flatnonzero(~m)
    _, ld = layer.forward(params, x)
    for i in range(x.shape[0]):
        Ji = J[i]
        np.testing.assert_array_equal(Ji[np.ix_(a, a)], np.eye(len(a)))
        np.testing.assert_array_equal(Ji[np.ix_(a, b)], 0.0)
        jbb = Ji[np.ix_(b, b)]
        np.testing.assert_array_equal(jbb - np.diag(np.diag(jbb)), 0.0)
        np.testing.assert_allclose(np.log(np.diag(jbb)).sum(), ld[i], rtol=0, atol=1e-12)
        assert np.abs(Ji[np.ix_(b, a)]).max() > 1e-3
        if cls is fm.AdditiveCoupling:
            np.testing.assert_array_equal(np.diag(jbb), 1.0)


@pytest.mark.parametrize("cls", [fm.AffineCoupling, fm.AdditiveCoupling])
@pytest.mark.parametrize("shape", [(6,), (2, 4, 4)])
def test_identity_init_and_flip(rng, cls, shape):
    x = rng.normal(size=(3,) + shape)
    layer = cls(hidden=(8,), identity_init=True)
    y, ld = layer.forward(layer.init(rng, x), x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(ld, 0.0)
    # flip=True transforms the half that "half" passes through
    flipped = cls(hidden=(8,), flip=True)
    y, _ = flipped.forward(flipped.init(rng, x), x)
    k = shape[0] // 2
    np.testing.assert_array_equal(y[:, k:], x[:, k:])
    assert np.abs(y[:, :k] - x[:, :k]).max() > 1e-3


def test_scale_is_bounded_for_extreme_inputs(rng):
    """s = a tanh(r): |log-det| <= sum |a| however large the input; no overflow either way."""
    layer = fm.AffineCoupling(hidden=(16,))
    x = rng.normal(size=(4, 6)) * 1e4
    params = layer.init(rng, x / 1e4)
    y, ld = layer.forward(params, x)
    bound = np.abs(params["scale"]).sum()
    assert np.all(np.isfinite(y)) and np.all(np.abs(ld) <= bound)
    x_back, _ = layer.inverse(params, y)
    np.testing.assert_allclose(x_back, x, rtol=1e-10, atol=1e-10 * np.abs(x).max())


def test_float32_gradient_has_no_float64(rng):
    """Gradients of a float32 log-likelihood w.r.t. float32 parameters are float32."""
    layers = [fm.AffineCoupling(hidden=(8,)), fm.AffineCoupling(hidden=(8,), flip=True)]
    x = rng.normal(size=(4, 6)).astype(np.float32)
    params = {"a": layers[0].init(rng, x), "b": layers[1].init(rng, x)}

    def loss(p, v):
        y, ld1 = layers[0].forward(p["a"], v)
        y, ld2 = layers[1].forward(p["b"], y)
        # sum * (1/n), not anp.mean: autograd's mean VJP divides by a NumPy int64 (-> float64)
        return anp.sum(-0.5 * anp.sum(y * y, axis=1) + ld1 + ld2) * (1.0 / v.shape[0])

    g, gx = autograd.grad(loss, (0, 1))(params, x)
    from flowmath._xp import leaves

    assert all(leaf.dtype == np.float32 for leaf in leaves(g))
    # the cotangent that has crossed both layers (and both paths, y and log-det) is float32
    assert gx.dtype == np.float32


@pytest.mark.parametrize("cls", [fm.AffineCoupling, fm.AdditiveCoupling])
@pytest.mark.parametrize(
    "mask, flip, shape, passes",
    [
        # Real NVP's masks, written out: the checkerboard passes pixels with i + j even in every
        # channel, "channel" the even channels, "half" the first half (flip: the complement)
        ("checkerboard", False, (2, 3, 4), lambda c, i, j: (i + j) % 2 == 0),
        ("checkerboard", True, (2, 3, 4), lambda c, i, j: (i + j) % 2 == 1),
        ("channel", False, (4, 2, 3), lambda c, i, j: c % 2 == 0),
        ("half", False, (4, 2, 3), lambda c, i, j: c < 2),
        ("half", True, (4, 2, 3), lambda c, i, j: c >= 2),
    ],
)
def test_named_masks_pass_exactly_the_entries_of_their_definition(
    rng, cls, mask, flip, shape, passes
):
    """With a non-identity conditioner every entry the mask passes through comes out bitwise
    unchanged, and every other entry moves (by |dy| > 1e-6 here: the conditioner's shift is
    O(0.1))."""
    x = rng.normal(size=(3, *shape))
    layer = cls(mask, (8,), flip=flip)
    params = layer.init(rng, x)
    params = fm.train.tree_map(lambda a: a + 0.3 * rng.normal(size=np.shape(a)), params)
    y, _ = layer.forward(params, x)
    want = np.fromfunction(np.vectorize(passes), shape, dtype=int).astype(bool)
    unchanged = np.all(y == x, axis=0)
    np.testing.assert_array_equal(unchanged, want)
    assert np.abs(y - x)[:, ~want].min() > 1e-6


def test_mask_errors(rng):
    x = rng.normal(size=(2, 6))
    with pytest.raises(ValueError, match="`mask` must be one of 'half'"):
        fm.AffineCoupling("stripes")
    with pytest.raises(ValueError, match="`mask`='checkerboard' needs images"):
        fm.AffineCoupling("checkerboard").init(rng, x)
    with pytest.raises(ValueError, match="`mask`='half' needs at least 2 features"):
        fm.AdditiveCoupling().init(rng, x[:, :1])
    with pytest.raises(ValueError, match="`mask`='channel' needs at least 2 channels"):
        fm.AdditiveCoupling("channel").init(rng, rng.normal(size=(2, 1, 4, 4)))
    with pytest.raises(ValueError, match="at least one True"):
        fm.AffineCoupling(np.ones(6, bool))
    with pytest.raises(TypeError, match="`mask` must be 'half'.*dtype float64"):
        fm.AffineCoupling(np.ones(6))
    with pytest.raises(ValueError, match="`hidden` must be a tuple of positive ints"):
        fm.AffineCoupling(hidden=(8, 0))
    layer = fm.AffineCoupling(np.array([True, False, True, False, True, False]))
    with pytest.raises(ValueError, match=r"`x` must have event shape \(6,\) to match `mask`"):
        layer.init(rng, rng.normal(size=(2, 5)))
    params = layer.init(rng, x)
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 6\)"):
        layer.forward(params, rng.normal(size=(2, 7)))
    half = fm.AffineCoupling()
    params = half.init(rng, x)
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 6\)"):
        half.forward(params, rng.normal(size=(2, 8)))
    with pytest.raises(ValueError, match=r"`y` must have shape \(n, 6\)"):
        half.inverse(params, rng.normal(size=(2, 8)))
