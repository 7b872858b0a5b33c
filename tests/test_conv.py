"""Mathematics of the invertible convolutions, against brute force and closed forms.

The registry (tests/cases/conv.py) already runs check_bijection, gradients and bad inputs; here:
DFT eigenvalues of a circular convolution, the Fourier log-det against the dense slogdet, the
emerging kernel against its reference twin and its VJPs, singular weights, float32.
"""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

import flowmath as fm
from flowmath.kernels import emerging
from flowmath.testing import check_grads, dense_jacobian

RTOL = 1e-12  # exact identities in float64, relative to max(1, |reference|)


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(1.0, np.max(np.abs(b))))


def circular_matrix(weight, h, w):
    """Dense matrix of y_{o,i,j} = sum w[o,c,a,b] x[c, (i+a-p)%h, (j+b-p)%w], built by its
    definition (no FFT): rows and columns ordered as (channel, i, j)."""
    c, _, k, _ = weight.shape
    p = k // 2
    mat = np.zeros((c, h, w, c, h, w))
    for o in range(c):
        for q in range(c):
            for i in range(h):
                for j in range(w):
                    for a in range(k):
                        for b in range(k):
                            mat[o, i, j, q, (i + a - p) % h, (j + b - p) % w] += weight[o, q, a, b]
    return mat.reshape(c * h * w, c * h * w)


def ar_matrix(wk, d, h, w):
    """Dense matrix of the autoregressive convolution A_{w,d} (zero padding), by definition."""
    c, _, k, _ = wk.shape
    p = k // 2
    mask = emerging.ar_mask(c, k)
    mat = np.zeros((c, h, w, c, h, w))
    for o in range(c):
        for i in range(h):
            for j in range(w):
                mat[o, i, j, o, i, j] = d[o]
                for q in range(c):
                    for a in range(k):
                        for b in range(k):
                            ii, jj = i + a - p, j + b - p
                            if mask[o, q, a, b] and 0 <= ii < h and 0 <= jj < w:
                                mat[o, i, j, q, ii, jj] += wk[o, q, a, b]
    return mat.reshape(c * h * w, c * h * w)


# -- PeriodicConv2d -----------------------------------------------------------------------------


@pytest.mark.parametrize("h, w", [(5, 4), (3, 3), (2, 6)])
def test_periodic_c1_dft_eigenvectors_closed_form(rng, h, w):
    """c = 1: a circular cross-correlation is diagonalised by the 2-D Fourier modes,
    K e_{uv} = lambda_{uv} e_{uv} with
    lambda_{uv} = sum_{a,b} w_ab exp(+2 pi i (u(a-p)/h + v(b-p)/w)) (the conjugate
    of the DFT of the padded kernel), and log|det| = sum log|lambda_{uv}|."""
    layer = fm.PeriodicConv2d(kernel_size=3)
    params = {"weight": rng.normal(size=(1, 1, 3, 3))}
    wk = params["weight"][0, 0]
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    logdet = 0.0
    for u in range(h):
        for v in range(w):
            lam = sum(
                wk[a, b] * np.exp(2j * np.pi * (u * (a - 1) / h + v * (b - 1) / w))
                for a in range(3)
                for b in range(3)
            )
            mode = np.exp(2j * np.pi * (u * ii / h + v * jj / w))
            # the layer is a real linear map: apply it to the real and imaginary parts
            out = [
                layer.forward(params, part[None, None])[0][0, 0] for part in (mode.real, mode.imag)
            ]
            assert rel(out[0] + 1j * out[1], lam * mode) < RTOL
            logdet += np.log(np.abs(lam))
    x = rng.normal(size=(1, 1, h, w))
    assert rel(layer.forward(params, x)[1], np.array([logdet])) < RTOL


@pytest.mark.parametrize("c, h, w, k", [(3, 5, 4, 3), (2, 4, 4, 3), (2, 3, 5, 5), (3, 2, 2, 3)])
def test_periodic_fourier_logdet_matches_dense_slogdet(rng, c, h, w, k):
    """docs/theory.rst: dense slogdet and the Fourier sum agree (1e-6 quoted at c=3, h=5, w=4,
    3x3; float64 gives ~1e-14). A kernel of N(0, 1) taps, not the tame init; k = 5 > h wraps."""
    layer = fm.PeriodicConv2d(kernel_size=k)
    params = {"weight": rng.normal(size=(c, c, k, k))}
    dense = circular_matrix(params["weight"], h, w)
    sign, logabs = np.linalg.slogdet(dense)
    assert sign != 0
    x = rng.normal(size=(2, c, h, w))
    y, ld = layer.forward(params, x)
    assert rel(y.reshape(2, -1), x.reshape(2, -1) @ dense.T) < RTOL
    assert rel(ld, np.full(2, logabs)) < RTOL
    x_back, ld_inv = layer.inverse(params, y)
    assert rel(x_back, x) < 1e-10 * np.linalg.cond(dense)
    assert rel(ld_inv, -ld) < RTOL


def test_periodic_inverse_solves_dense_system(rng):
    layer = fm.PeriodicConv2d()
    params = {"weight": rng.normal(size=(3, 3, 3, 3))}
    dense = circular_matrix(params["weight"], 4, 5)
    y = rng.normal(size=(2, 3, 4, 5))
    x, _ = layer.inverse(params, y)
    ref = np.linalg.solve(dense, y.reshape(2, -1).T).T.reshape(y.shape)
    assert rel(x, ref) < 1e-10


def test_periodic_any_image_size_after_init(rng):
    layer = fm.PeriodicConv2d()
    params = layer.init(rng, rng.normal(size=(2, 2, 4, 4)))
    x = rng.normal(size=(2, 2, 6, 3))
    fm.testing.check_bijection(layer, params, x).assert_ok(1e-10)


def test_periodic_singular_kernel_raises(rng):
    """c = 1 with taps summing to zero: the DC frequency (0, 0) has K^ = 0."""
    layer = fm.PeriodicConv2d()
    wk = rng.normal(size=(1, 1, 3, 3))
    wk -= wk.mean()
    x = rng.normal(size=(2, 1, 4, 4))
    msg = r"`params\['weight'\]` must give non-singular per-frequency matrices.*\(u, v\) = \(0, 0\)"
    with pytest.raises(ValueError, match=msg):
        layer.forward({"weight": wk}, x)
    with pytest.raises(ValueError, match=msg):
        layer.inverse({"weight": wk}, x)
    # two identical output channels: every K^(u, v) has rank 1
    w2 = rng.normal(size=(2, 2, 3, 3))
    w2[1] = w2[0]
    with pytest.raises(ValueError, match="non-singular per-frequency"):
        layer.forward({"weight": w2}, rng.normal(size=(1, 2, 3, 3)))


def test_periodic_bad_hyperparameters_and_params(rng):
    with pytest.raises(ValueError, match="`kernel_size` must be odd"):
        fm.PeriodicConv2d(kernel_size=2)
    with pytest.raises(ValueError, match="`kernel_size` must be >= 1"):
        fm.PeriodicConv2d(kernel_size=0)
    with pytest.raises(TypeError, match="`kernel_size` must be an integer"):
        fm.PeriodicConv2d(kernel_size=3.0)
    layer = fm.PeriodicConv2d()
    x = rng.normal(size=(2, 2, 4, 4))
    params = layer.init(rng, x)
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 2, \*, \*\)"):
        layer.forward(params, rng.normal(size=(2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r'`params\["weight"\]` must have shape \(2, 2, 3, 3\)'):
        layer.forward({"weight": rng.normal(size=(2, 2, 5, 5))}, x)


# -- InvConv1x1 ----------------------------------------------------------------------------------


@pytest.mark.parametrize("c", [1, 4, 7])
def test_invconv_lu_logdet_is_hw_sum_log_s(rng, c):
    """log|det J| = h w sum log|s_i| = h w log|det W| = slogdet of the dense Jacobian."""
    x = rng.normal(size=(2, c, 3, 5))
    layer = fm.InvConv1x1()
    params = layer.init(rng, x)
    w = layer.weight(params)
    (
        _,
        ld,
    ) = layer.forward(params, x)
    assert rel(ld, np.full(2, 15 * np.sum(params["log_s"]))) < RTOL
    assert rel(ld, np.full(2, 15 * np.linalg.slogdet(w)[1])) < RTOL
    jac = dense_jacobian(lambda v: layer.forward(params, v)[0], x[:1])[0]
    assert rel(jac, np.kron(w, np.eye(15))) < RTOL
    # the same W as a full matrix gives the same map
    full = fm.InvConv1x1(lu=False)
    y_full, ld_full = full.forward({"weight": w}, x)
    assert rel(y_full, layer.forward(params, x)[0]) < RTOL and rel(ld_full, ld) < RTOL


def test_invconv_init_is_generic(rng):
    x = rng.normal(size=(2, 5, 2, 2))
    for lu in (True, False):
        layer = fm.InvConv1x1(lu=lu)
        w = layer.weight(layer.init(rng, x))
        assert not np.allclose(w, np.eye(5))
        assert abs(np.linalg.slogdet(w)[1]) > 1e-3  # not volume preserving either


def test_invconv_singular_weight_raises(rng):
    layer = fm.InvConv1x1(lu=False)
    x = rng.normal(size=(2, 3, 4, 4))
    a, b = rng.normal(size=3), rng.normal(size=3)
    for weight in (np.outer(a, b), np.zeros((3, 3))):
        with pytest.raises(ValueError, match=r"`params\['weight'\]` must be a non-singular 3x3"):
            layer.forward({"weight": weight}, x)
        with pytest.raises(ValueError, match=r"`params\['weight'\]` must be a non-singular 3x3"):
            layer.inverse({"weight": weight}, x)


def test_invconv_lu_overflowing_log_s_raises(rng):
    layer = fm.InvConv1x1()
    x = rng.normal(size=(2, 3, 4, 4))
    params = layer.init(rng, x)
    params["log_s"] = np.array([0.0, 800.0, 0.0])
    with pytest.raises(ValueError, match=r'`params\["log_s"\]` must lie in'):
        layer.forward(params, x)
    params["log_s"] = np.array([0.0, 0.0, 100.0])  # fine in float64, overflows float32
    layer.forward(params, x)
    with pytest.raises(ValueError, match=r'`params\["log_s"\]` must lie in .* in float32'):
        layer.forward(params, x.astype(np.float32))


def test_invconv_bad_lu_argument():
    with pytest.raises(TypeError, match="`lu` must be True or False"):
        fm.InvConv1x1(lu="yes")


def test_invconv_perm_and_sign_are_frozen(rng):
    """Glow's P and sign(s) are buffers: zero gradient, so an optimiser never moves them."""
    layer = fm.InvConv1x1()
    x = rng.normal(size=(3, 4, 2, 2))
    flow = fm.Flow(layer)
    params = flow.init(rng, x)
    grads = autograd.grad(lambda p: anp.mean(flow.log_prob(p, x)))(params)
    assert np.all(grads["perm"] == 0) and np.all(grads["sign"] == 0)
    assert np.any(grads["log_s"] != 0) and np.any(grads["lower"] != 0)


@pytest.mark.parametrize("lu", [True, False])
def test_invconv_float32(rng, lu):
    x = rng.normal(size=(4, 6, 3, 3)).astype(np.float32)
    layer = fm.InvConv1x1(lu=lu)
    params = layer.init(rng, x)
    y, ld = layer.forward(params, x)
    x_back, ld_inv = layer.inverse(params, y)
    assert y.dtype == ld.dtype == x_back.dtype == ld_inv.dtype == np.float32
    assert rel(x_back, x) < 1e-5


# -- EmergingConv2d and its kernel --------------------------------------------------------------


@pytest.fixture
def ar_problem(rng):
    c, k = 3, 3
    wk = rng.normal(size=(c, c, k, k)) * 0.4  # random taps, also outside the mask (ignored)
    d = np.exp(0.3 * rng.normal(size=c))
    y = rng.normal(size=(2, c, 4, 5))
    return wk, d, y


def test_ar_conv_matches_dense_triangular_matrix(ar_problem):
    """A_{w,d} is triangular in raster order (pixel, then channel) with d on the diagonal."""
    wk, d, y = ar_problem
    c, h, w = y.shape[1:]
    dense = ar_matrix(wk, d, h, w)
    assert rel(emerging.ar_conv(wk, d, y).reshape(2, -1), y.reshape(2, -1) @ dense.T) < RTOL
    order = np.arange(c * h * w).reshape(c, h, w).transpose(1, 2, 0).ravel()
    permuted = dense[np.ix_(order, order)]
    assert np.all(np.triu(permuted, 1) == 0)
    assert rel(np.diag(permuted), np.tile(d, h * w)) == 0


def test_ar_solve_kernel_twin_and_python_path_agree(ar_problem):
    """The numba kernel, its Python source (as under NUMBA_DISABLE_JIT=1), the plain array twin
    and a dense solve give the same x."""
    wk, d, y = ar_problem
    x = emerging.ar_solve(wk, d, y)
    dense = ar_matrix(wk, d, *y.shape[2:])
    ref = np.linalg.solve(dense, y.reshape(2, -1).T).T.reshape(y.shape)
    assert rel(x, ref) < 1e-12
    assert rel(emerging.ar_solve_reference(wk, d, y), x) < 1e-13
    assert rel(emerging._ar_solve_kernel.py_func(wk, d, y), x) < 1e-13
    assert rel(emerging.ar_conv(wk, d, x), y) < 1e-13


def test_ar_solve_float32(ar_problem):
    wk, d, y = ar_problem
    x32 = emerging.ar_solve(wk.astype(np.float32), d.astype(np.float32), y.astype(np.float32))
    assert x32.dtype == np.float32
    assert rel(x32, emerging.ar_solve(wk, d, y)) < 1e-5


def test_ar_solve_vjp_second_order(ar_problem):
    """VJPs (w.r.t. w, d, y) against finite differences, to second order (the VJP calls the
    primitive again)."""
    wk, d, y = ar_problem
    y = y[:1, :2, :3, :3]
    wk, d = wk[:2, :2], d[:2]

    def loss(wk, d, y):
        return anp.sum(anp.sin(emerging.ar_solve(wk, d, y)))

    check_grads(loss, modes=["rev"], order=2)(wk, d, y)


def test_ar_solve_vjp_is_transpose_solve_and_masks(ar_problem):
    """d x / d y = A^{-1}: its VJP is A^{-T} g (a dense transpose solve); taps outside the mask
    get exactly zero gradient."""
    wk, d, y = ar_problem
    g = np.random.default_rng(3).normal(size=y.shape)
    dense = ar_matrix(wk, d, *y.shape[2:])
    vjp_y = autograd.grad(lambda v: anp.sum(g * emerging.ar_solve(wk, d, v)))(y)
    ref = np.linalg.solve(dense.T, g.reshape(2, -1).T).T.reshape(y.shape)
    assert rel(vjp_y, ref) < 1e-12
    vjp_w = autograd.grad(lambda v: anp.sum(g * emerging.ar_solve(v, d, y)))(wk)
    assert np.all(vjp_w[emerging.ar_mask(3, 3) == 0] == 0)


def test_emerging_logdet_centre_taps_and_dense(rng):
    layer = fm.EmergingConv2d()
    x = rng.normal(size=(2, 3, 4, 5))
    params = layer.init(rng, x)
    _, ld = layer.forward(params, x)
    expected = 20 * (np.sum(params["log_d1"]) + np.sum(params["log_d2"]))
    assert rel(ld, np.full(2, expected)) < RTOL
    jac = dense_jacobian(lambda v: layer.forward(params, v)[0], x[:1])[0]
    assert rel(ld[:1], np.array([np.linalg.slogdet(jac)[1]])) < RTOL
    # the two masks are complementary: together the receptive field is the full 3x3 x c
    centre = jac.reshape(3, 4, 5, 3, 4, 5)[:, 2, 2]
    assert np.all(centre[:, :, 1:4, 1:4] != 0)


def test_emerging_any_image_size_and_k5(rng):
    layer = fm.EmergingConv2d(kernel_size=5)
    params = layer.init(rng, rng.normal(size=(2, 2, 3, 3)))
    x = rng.normal(size=(2, 2, 6, 7))
    fm.testing.check_bijection(layer, params, x).assert_ok(1e-10)


def test_emerging_inverse_is_bounded_at_init_for_large_images(rng):
    """The init is diagonally dominant, so the back-substitution does not blow up with size."""
    layer = fm.EmergingConv2d()
    x = rng.normal(size=(2, 4, 32, 32))
    params = layer.init(rng, x[:, :, :4, :4])
    y, _ = layer.forward(params, x)
    x_back, _ = layer.inverse(params, y)
    assert rel(x_back, x) < 1e-12


def test_emerging_bad_params(rng):
    layer = fm.EmergingConv2d()
    x = rng.normal(size=(2, 2, 4, 4))
    params = layer.init(rng, x)
    bad = dict(params, log_d2=np.array([0.0, -800.0]))
    with pytest.raises(ValueError, match=r'`params\["log_d2"\]` must lie in'):
        layer.inverse(bad, x)
    bad = dict(params, w1=np.zeros((2, 2, 5, 5)))
    with pytest.raises(ValueError, match=r'`params\["w1"\]` must have shape \(2, 2, 3, 3\)'):
        layer.forward(bad, x)
    with pytest.raises(ValueError, match="`kernel_size` must be odd"):
        fm.EmergingConv2d(kernel_size=4)
