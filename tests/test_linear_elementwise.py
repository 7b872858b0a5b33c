"""Layer-specific checks for the linear and elementwise layers beyond the registry contract."""

import numpy as np
import pytest
from scipy.special import expit, logit

import flowmath as fm


def test_full_linear_singular_weight_raises(rng):
    layer = fm.FullLinear()
    x = rng.normal(size=(3, 4))
    params = layer.init(rng, x)
    params["W"] = np.ones((4, 4))
    with pytest.raises(ValueError, match=r'`params\["W"\]` must be non-singular'):
        layer.forward(params, x)
    with pytest.raises(ValueError, match="non-singular"):
        layer.inverse(params, x)


@pytest.mark.parametrize("cls", [fm.FullLinear, lambda: fm.BlockDiagonalLinear(4)])
def test_ill_conditioned_weight_raises_with_threshold_and_value(rng, cls):
    """A weight of condition number ~1e17 (numerically singular in float64) raises, naming the
    measured reciprocal condition number and the threshold 64 eps; one of condition 1e6 works
    and round-trips to its own accuracy (cond * eps ~ 2e-10)."""
    layer = cls()
    x = rng.normal(size=(3, 4))
    params = layer.init(rng, x)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    bad = q @ np.diag([1.0, 1.0, 1.0, 1e-17]) @ q.T
    W = bad if params["W"].ndim == 2 else bad[None]
    with pytest.raises(
        ValueError, match=r"reciprocal condition number .* \(<= 1.42e-14 = 64 eps\)"
    ):
        layer.forward(dict(params, W=W), x)
    ok = q @ np.diag([1.0, 1.0, 1.0, 1e-6]) @ q.T
    p_ok = dict(params, W=ok if params["W"].ndim == 2 else ok[None])
    y, ld = layer.forward(p_ok, x)
    x_back, minus = layer.inverse(p_ok, y)
    # measured <= 1.3e-10 over 20 seeds (cond * eps = 2e-10); tolerance 1e-8 (was 1e-6)
    assert np.abs(x_back - x).max() < 1e-8 * np.abs(x).max()
    np.testing.assert_allclose(ld, np.log(1e-6), rtol=1e-12)


def test_block_diagonal_singular_block_and_bad_size(rng):
    layer = fm.BlockDiagonalLinear(3)
    x = rng.normal(size=(2, 6))
    params = layer.init(rng, x)
    params["W"][1] = 0.0
    with pytest.raises(ValueError, match="non-singular"):
        layer.forward(params, x)
    with pytest.raises(ValueError, match="divisible by `block_size`=3"):
        layer.init(rng, rng.normal(size=(2, 5)))


@pytest.mark.parametrize(
    "layer",
    [
        fm.FullLinear(),
        fm.DiagonalLinear(),
        fm.TriangularLinear(),
        fm.TriangularLinear(lower=False),
        fm.BlockDiagonalLinear(2),
        fm.LULinear(),
        fm.LULinear("identity"),
        fm.LULinear([2, 0, 3, 1]),
    ],
    ids=repr,
)
def test_linear_layers_match_their_dense_matrix(layer, rng):
    """y = W x + b with log|det W| from the layer's own cheap formula, W read off by brute force."""
    x = rng.normal(size=(5, 4))
    params = layer.init(rng, x)
    y, logdet = layer.forward(params, x)
    b, _ = layer.forward(params, np.zeros((1, 4)))
    W = (layer.forward(params, np.eye(4))[0] - b).T
    np.testing.assert_allclose(y, x @ W.T + b, rtol=0, atol=1e-12)
    np.testing.assert_allclose(logdet, np.linalg.slogdet(W)[1], rtol=0, atol=1e-12)
    if isinstance(layer, fm.LULinear):
        np.testing.assert_allclose(layer.weight(params), W, atol=1e-12)
    if isinstance(layer, fm.TriangularLinear):
        tri = np.tril(W) if layer.lower else np.triu(W)
        np.testing.assert_array_equal(W, tri)


def test_lu_permutation_validation():
    with pytest.raises(ValueError, match="`permutation` must be a permutation"):
        fm.LULinear([0, 0, 1])
    with pytest.raises(ValueError, match="`permutation` must be 'reverse'"):
        fm.LULinear("random")


def test_shape_mismatch_message(rng):
    layer = fm.FullLinear()
    params = layer.init(rng, rng.normal(size=(2, 4)))
    with pytest.raises(
        ValueError, match=r"`x` must have shape \(n, 4\) to match the parameters; got \(3, 5\)"
    ):
        layer.forward(params, rng.normal(size=(3, 5)))


def test_elementwise_closed_forms(rng):
    x = rng.normal(size=(3, 5)) * 3
    y, ld = fm.Sigmoid().forward({}, x)
    np.testing.assert_allclose(y, expit(x), rtol=1e-14)
    np.testing.assert_allclose(ld, np.log(expit(x) * (1 - expit(x))).sum(1), rtol=1e-12)
    u = rng.uniform(size=(3, 5))
    y, _ = fm.Logit().forward({}, u)
    np.testing.assert_allclose(y, logit(u), rtol=1e-12)
    y, ld = fm.LeakyReLU(0.1).forward({}, x)
    np.testing.assert_allclose(ld, (x < 0).sum(1) * np.log(0.1), rtol=1e-14)
    y, ld = fm.ELU(2.0).forward({}, x)
    np.testing.assert_allclose(y, np.where(x > 0, x, 2 * np.expm1(np.minimum(x, 0))), rtol=1e-14)


def test_elu_no_overflow_warning_for_large_inputs():
    y, ld = fm.ELU().forward({}, np.array([[800.0, -800.0]]))  # warnings are errors in this run
    assert y[0, 0] == 800.0 and y[0, 1] == -1.0 and np.isfinite(ld).all()


def test_out_of_domain_inverses_raise():
    with pytest.raises(ValueError, match=r"`y` must lie in the open interval \(-1.0, inf\)"):
        fm.ELU().inverse({}, np.array([[-1.5, 0.0]]))
    with pytest.raises(ValueError, match=r"`y` must lie in the open interval \(0.0, 1.0\)"):
        fm.Sigmoid().inverse({}, np.array([[0.5, 1.0]]))
    with pytest.raises(ValueError, match=r"`x` must lie in the open interval \(0.0, 1.0\)"):
        fm.Logit().forward({}, np.array([[0.0, 0.5]]))
    with pytest.raises(ValueError, match=r"open interval \(-0.0555"):
        fm.Logit(0.05).forward({}, np.array([[1.2, 0.5]]))
    y, _ = fm.Logit(0.05).forward({}, np.array([[0.0, 1.0]]))  # closed interval allowed
    assert np.isfinite(y).all()


@pytest.mark.parametrize("bad", [dict(alpha=0.0), dict(alpha=-1.0)])
def test_elu_bad_alpha(bad):
    with pytest.raises(ValueError, match="`alpha` must be finite and > 0"):
        fm.ELU(**bad)
