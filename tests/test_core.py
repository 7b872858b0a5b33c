"""The contract's plumbing: Chain, Flow, base densities and check_bijection itself."""

import autograd.numpy as anp
import numpy as np
import pytest
from scipy import stats

import flowmath as fm
from flowmath.layers.base import Bijection


class _WrongLogdet(Bijection):
    """A deliberately wrong layer: y = 2x but claims log-det 0."""

    def _init(self, rng, x):
        return {}

    def _forward(self, params, x, rng):
        return 2.0 * x, anp.zeros(x.shape[0])

    def _inverse(self, params, y, rng):
        return 0.5 * y, anp.zeros(y.shape[0])


class _WrongInverse(_WrongLogdet):
    def _forward(self, params, x, rng):
        return 2.0 * x, anp.full(x.shape[0], x.shape[1] * np.log(2.0))

    def _inverse(self, params, y, rng):
        return 0.49 * y, anp.full(y.shape[0], -y.shape[1] * np.log(2.0))


class _BatchCoupled(_WrongInverse):
    """Right Jacobian per sample but mixes the batch: y = 2x + mean over the batch."""

    def _forward(self, params, x, rng):
        y, ld = super()._forward(params, x, rng)
        return y + anp.mean(x, axis=0), ld


def test_check_bijection_catches_wrong_layers(rng):
    x = rng.normal(size=(3, 4))
    report = fm.testing.check_bijection(_WrongLogdet(), {}, x)
    assert report.logdet_error == pytest.approx(4 * np.log(2) / max(1, 4 * np.log(2)))
    assert not report.ok()
    with pytest.raises(AssertionError, match="logdet_error"):
        report.assert_ok()
    report = fm.testing.check_bijection(_WrongInverse(), {}, x)
    assert report.logdet_error < 1e-14 and report.forward_roundtrip > 1e-3 and not report.ok()
    report = fm.testing.check_bijection(_BatchCoupled(), {}, x)
    assert report.batch_error > 1e-3 and not report.ok()


def test_check_bijection_reports_exceptions_instead_of_raising(rng):
    x = rng.normal(size=(2, 3))
    params = fm.FullLinear().init(rng, rng.normal(size=(2, 4)))
    report = fm.testing.check_bijection(fm.FullLinear(), params, x)
    assert report.errors and "must have shape" in report.errors[0] and not report.ok()


def test_chain_composes_logdets_and_validates(rng):
    x = rng.normal(size=(4, 3))
    chain = fm.Chain([fm.LULinear(), fm.ELU(), fm.FullLinear(), fm.LeakyReLU(0.3)])
    params = chain.init(rng, x)
    y, ld = chain.forward(params, x)
    total, h = 0.0, x
    for layer, p in zip(chain.layers, params, strict=True):
        h, l = layer.forward(p, h)
        total = total + l
    np.testing.assert_allclose(y, h, atol=1e-14)
    np.testing.assert_allclose(ld, total, atol=1e-13)
    fm.testing.check_bijection(chain, params, x).assert_ok(1e-10)
    with pytest.raises(ValueError, match="`params` must be a list of 4 parameter trees"):
        chain.forward(params[:2], x)
    with pytest.raises(TypeError, match=r"`layers\[1\]` must be a Bijection"):
        fm.Chain([fm.ELU(), "not a layer"])
    with pytest.raises(ValueError, match="at least one"):
        fm.Chain([])


def test_float32_is_preserved_and_int_is_promoted(rng):
    layer = fm.Chain([fm.LULinear(), fm.DiagonalLinear()])
    x = rng.normal(size=(3, 4))
    params = layer.init(rng, x)
    y32, ld32 = layer.forward(params, x.astype(np.float32))
    assert y32.dtype == ld32.dtype == np.float32
    y, _ = layer.forward(params, x)
    np.testing.assert_allclose(y32, y, rtol=1e-5, atol=1e-5)
    yi, _ = layer.forward(params, np.arange(12).reshape(3, 4))
    assert yi.dtype == np.float64


def test_base_densities_match_scipy(rng):
    z = rng.normal(size=(5, 3))
    np.testing.assert_allclose(
        fm.StandardNormal().log_prob(z), stats.norm.logpdf(z).sum(1), rtol=1e-13
    )
    z = 30 * z  # tails: the logistic log-density must stay finite and exact
    np.testing.assert_allclose(
        fm.StandardLogistic().log_prob(z), stats.logistic.logpdf(z).sum(1), rtol=1e-13
    )
    s = fm.StandardLogistic().sample(np.random.default_rng(1), (20000, 1))
    assert stats.kstest(s.ravel(), stats.logistic.cdf).pvalue > 1e-3


def test_flow_log_prob_sample_roundtrip(rng):
    flow = fm.Flow(fm.Chain([fm.LULinear(), fm.LeakyReLU(0.5), fm.LULinear()]))
    x = rng.normal(size=(6, 3))
    params = flow.init(rng, x)
    z, ld = flow.layer.forward(params, x)
    np.testing.assert_allclose(
        flow.log_prob(params, x), stats.norm.logpdf(z).sum(1) + ld, rtol=1e-13
    )
    xs, logp = flow.sample_and_log_prob(params, 7, np.random.default_rng(3))
    np.testing.assert_allclose(logp, flow.log_prob(params, xs), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="call `flow.init"):
        fm.Flow(fm.ELU()).sample({}, 3, rng)


def test_flow_density_mass_is_latent_mass_of_the_image(rng):
    """Change of variables in 1-D, checked by quadrature: the mass of p(x) = pi(f(x)) |f'(x)| is
    pi(f(R)). A LeakyReLU flow is onto R (mass 1); an ELU flow is not — its image is
    (-alpha s + b, inf) — and loses exactly the latent mass below that point."""
    from scipy.integrate import quad

    def mass(flow, params):
        def p(v):
            return float(np.exp(flow.log_prob(params, np.array([[v]]))[0]))

        cuts = [-80, -5, 0, 5, 80]
        return sum(
            quad(p, a, b, limit=200, epsabs=1e-13)[0]
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)
        )

    flow = fm.Flow(fm.Chain([fm.DiagonalLinear(), fm.LeakyReLU(0.3), fm.DiagonalLinear()]))
    params = flow.init(rng, rng.normal(size=(4, 1)))
    assert abs(mass(flow, params) - 1.0) < 1e-9

    flow = fm.Flow(fm.Chain([fm.DiagonalLinear(), fm.ELU(0.7), fm.DiagonalLinear()]))
    params = flow.init(rng, rng.normal(size=(4, 1)))
    s2, b2 = np.exp(params[2]["log_scale"][0]), params[2]["b"][0]
    expected = stats.norm.sf(-0.7 * s2 + b2)
    assert expected < 0.99  # the loss is visible
    assert abs(mass(flow, params) - expected) < 1e-9


def test_gradient_of_chain_flow_wrt_list_params(rng):
    """autograd passes a Chain's parameter list as a SequenceBox; validation must accept it."""
    import autograd

    flow = fm.Flow(fm.Chain([fm.LULinear(), fm.DiagonalLinear()]))
    x = rng.normal(size=(4, 3))
    params = flow.init(rng, x)
    g = autograd.grad(lambda p: anp.sum(flow.log_prob(p, x)))(params)
    # d/d b of sum log N(Wx + b) + const = -sum_i (W x_i + b) at the diagonal layer's b
    z, _ = flow.layer.forward(params, x)
    np.testing.assert_allclose(g[1]["b"], -z.sum(0), rtol=1e-12)


def test_float32_log_prob_and_gradients_stay_float32(rng):
    import autograd

    flow = fm.Flow(fm.Chain([fm.LULinear(), fm.DiagonalLinear()]))
    x = rng.normal(size=(4, 3)).astype(np.float32)
    params = flow.init(rng, x)
    assert flow.log_prob(params, x).dtype == np.float32
    g = autograd.grad(lambda p: anp.sum(flow.log_prob(p, x)))(params)
    assert all(leaf.dtype == np.float32 for layer in g for leaf in layer.values())
