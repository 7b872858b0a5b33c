"""Smoke and validation tests of flowmath.estimators' public API (shapes, dtypes, messages)."""

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from flowmath import estimators as est


def _linear_vjp(W):
    return lambda V: anp.dot(V, W)


def test_all_is_sorted_and_importable():
    assert est.__all__ == sorted(est.__all__)
    for name in est.__all__:
        assert hasattr(est, name)


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_shapes_and_dtype(probe):
    A = np.random.default_rng(0).standard_normal((5, 5))
    t = est.hutchinson_trace(
        lambda V: V @ A.T, 5, n_probes=7, probe=probe, rng=np.random.default_rng(1)
    )
    assert np.ndim(t) == 0
    t32 = est.hutchinson_trace(
        lambda V: V @ A.T.astype(np.float32),
        5,
        n_probes=3,
        probe=probe,
        rng=np.random.default_rng(1),
        dtype=np.float32,
    )
    assert np.asarray(t32).dtype == np.float32
    assert abs(float(est.exact_trace(lambda V: V @ A.T, 5)) - np.trace(A)) < 1e-12


def test_logdet_estimators_shapes_and_float32():
    rng = np.random.default_rng(0)
    W = 0.3 * rng.standard_normal((4, 4)) / 2
    W32 = W.astype(np.float32)
    v = lambda V: V @ W32  # noqa: E731
    out = est.power_series_logdet(v, 6, 4, n_terms=5, rng=rng, dtype=np.float32)
    assert out.shape == (6,) and out.dtype == np.float32
    r = est.roulette_logdet(v, 6, 4, rng=rng, dtype=np.float32, per_sample=True)
    assert r.logdet.shape == (6,) and r.logdet.dtype == np.float32
    assert r.n_terms.shape == (6,) and r.n_terms.min() >= 2
    m = est.neumann_logdet(v, 6, 4, rng=rng, dtype=np.float32)
    assert m.logdet.shape == (6,) and m.logdet.dtype == np.float32


def test_neumann_value_equals_roulette_value():
    W = np.random.default_rng(3).standard_normal((4, 4)) * 0.15
    a = est.roulette_logdet(
        _linear_vjp(W), 9, 4, rng=np.random.default_rng(5), per_sample=True, n_probes=2
    )
    b = est.neumann_logdet(
        _linear_vjp(W), 9, 4, rng=np.random.default_rng(5), per_sample=True, n_probes=2
    )
    np.testing.assert_allclose(b.logdet, a.logdet, rtol=1e-13, atol=1e-14)
    assert np.array_equal(a.n_terms, b.n_terms) and a.n_matvecs == b.n_matvecs

    def f(W):
        r = est.neumann_logdet(
            _linear_vjp(W), 9, 4, rng=np.random.default_rng(5), per_sample=True, n_probes=2
        )
        return anp.sum(r.logdet)

    assert abs(f(W) - np.sum(a.logdet)) < 1e-12
    assert autograd.grad(f)(W).shape == (4, 4)


def test_exact_logdet_matches_slogdet_and_differentiates():
    J = np.random.default_rng(0).standard_normal((3, 4, 4)) * 0.2
    ref = np.linalg.slogdet(np.eye(4) + J)[1]
    np.testing.assert_allclose(est.exact_logdet(J), ref, rtol=0, atol=1e-13)
    g = autograd.grad(lambda J: anp.sum(est.exact_logdet(J)))(J)
    np.testing.assert_allclose(g, np.transpose(np.linalg.inv(np.eye(4) + J), (0, 2, 1)), atol=1e-12)
    with pytest.raises(ValueError, match="`jac` must have shape"):
        est.exact_logdet(J[0])
    with pytest.raises(ValueError, match="singular"):
        est.exact_logdet(-np.eye(2)[None])


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (
            lambda r: est.hutchinson_trace(lambda V: V, 3, probe="normal", rng=r),
            ValueError,
            "`probe` must be one of",
        ),
        (
            lambda r: est.hutchinson_trace(lambda V: V, 3, n_probes=0, rng=r),
            ValueError,
            "`n_probes` must be >= 1",
        ),
        (lambda r: est.hutchinson_trace(lambda V: V, 3, rng=0), TypeError, "`rng` must be"),
        (
            lambda r: est.hutchinson_trace(lambda V: V[:, :2], 3, rng=r),
            ValueError,
            "`matvec` must map",
        ),
        (
            lambda r: est.hutchpp_trace(lambda V: V, 3, n_matvecs=2, rng=r),
            ValueError,
            "`n_matvecs` must be >= 3",
        ),
        (
            lambda r: est.power_series_logdet(lambda V: V, 2, 3, n_terms=0, rng=r),
            ValueError,
            "`n_terms` must be >= 1",
        ),
        (
            lambda r: est.power_series_logdet(lambda V: V, 2, 3, rng=None),
            TypeError,
            "`rng` must be",
        ),
        (
            lambda r: est.power_series_logdet(lambda V: V[:1], 2, 3, rng=r),
            ValueError,
            "`vjp` must map",
        ),
        (
            lambda r: est.roulette_logdet(lambda V: V, 2, 3, p=0.0, rng=r),
            ValueError,
            r"`p` must lie in \(0, 1\]",
        ),
        (
            lambda r: est.roulette_logdet(lambda V: V, 2, 3, p=1.5, rng=r),
            ValueError,
            r"`p` must lie in \(0, 1\]",
        ),
        (
            lambda r: est.roulette_logdet(lambda V: V, 2, 3, distribution="binomial", rng=r),
            ValueError,
            "`distribution` must be one of",
        ),
        (
            lambda r: est.roulette_logdet(lambda V: V, 2, 3, n_exact=-1, rng=r),
            ValueError,
            "`n_exact` must be >= 0",
        ),
        (
            lambda r: est.series_truncation_bound(1.0, 3, 2),
            ValueError,
            r"`lipschitz` must lie in \[0, 1\)",
        ),
        (
            lambda r: est.series_truncation_bound(-0.1, 3, 2),
            ValueError,
            r"`lipschitz` must lie in \[0, 1\)",
        ),
        (lambda r: est.choose_n_terms(0.5, 3, 0.0), ValueError, "`bias` must be finite and > 0"),
        (
            lambda r: est.choose_n_terms(0.999999, 3, 1e-12, max_terms=100),
            ValueError,
            "`max_terms`",
        ),
        (lambda r: est.hutchinson_variance(np.ones((2, 3))), ValueError, "`A` must be a square"),
        (
            lambda r: est.power_series_bias_std(np.ones((2, 3)), 3),
            ValueError,
            r"`jac` must have shape \(d, d\)",
        ),
        (
            lambda r: est.power_series_logdet(lambda V: V, 2, 3, probes=np.ones((2, 2, 3)), rng=r),
            ValueError,
            "`probes` must have shape",
        ),
    ],
)
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call(np.random.default_rng(0))


def test_partial_sums_are_the_truncations():
    rng = np.random.default_rng(4)
    W = rng.standard_normal((5, 5)) * 0.15
    V = rng.standard_normal((2, 7, 5))
    S = est.power_series_partial_sums(_linear_vjp(W), 7, 5, n_terms=6, n_probes=2, probes=V)
    assert S.shape == (6, 7)
    for n in range(1, 7):
        ref = est.power_series_logdet(_linear_vjp(W), 7, 5, n_terms=n, n_probes=2, probes=V)
        np.testing.assert_allclose(S[n - 1], ref, rtol=1e-13, atol=1e-14)
    g1 = autograd.grad(
        lambda W: anp.sum(
            est.power_series_partial_sums(_linear_vjp(W), 7, 5, n_terms=6, n_probes=2, probes=V)[3]
        )
    )(W)
    g2 = autograd.grad(
        lambda W: anp.sum(
            est.power_series_logdet(_linear_vjp(W), 7, 5, n_terms=4, n_probes=2, probes=V)
        )
    )(W)
    np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-14)


def test_layer_style_vjp_from_autograd_make_vjp():
    """A layer builds vjp with autograd.make_vjp of its batch map g at x (nested under the
    gradient with respect to the parameters); it must agree with the explicit chain rule."""
    rng = np.random.default_rng(0)
    d, h, n = 3, 6, 5
    W1 = rng.standard_normal((h, d)) * 0.3
    W2 = rng.standard_normal((d, h)) * 0.3
    x = rng.standard_normal((n, d))

    def total(params, how, which):
        W1, W2 = params

        def g(x):
            return anp.dot(anp.tanh(anp.dot(x, W1.T)), W2.T)

        if how == "make_vjp":
            vjp, _ = autograd.make_vjp(g)(x)
        else:
            s = 1 - anp.tanh(anp.dot(x, W1.T)) ** 2

            def vjp(V):
                return anp.dot(anp.dot(V, W2) * s, W1)

        r = np.random.default_rng(7)
        if which == "series":
            return anp.sum(est.power_series_logdet(vjp, n, d, n_terms=5, rng=r))
        return anp.sum(est.neumann_logdet(vjp, n, d, rng=r, per_sample=True).logdet)

    for which in ("series", "neumann"):
        a = total((W1, W2), "make_vjp", which)
        b = total((W1, W2), "explicit", which)
        assert abs(a - b) < 1e-13
        ga = autograd.grad(total)((W1, W2), "make_vjp", which)
        gb = autograd.grad(total)((W1, W2), "explicit", which)
        for u, v in zip(ga, gb, strict=True):
            np.testing.assert_allclose(u, v, rtol=1e-11, atol=1e-13)
