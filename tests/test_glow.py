"""Glow beyond the registry: ActNorm's data-dependent initialisation and log-det, Squeeze's
permutation and its shape errors, and the multi-scale likelihood accounting for every
factored-out variable (against a dense-Jacobian computation)."""

import autograd.numpy as anp
import numpy as np
import pytest

import flowmath as fm
from flowmath.testing import check_grads, dense_jacobian

LOG2PI = np.log(2 * np.pi)


@pytest.mark.parametrize("shape,axes", [((5,), (0,)), ((3, 4, 4), (0, 2, 3))])
def test_actnorm_init_normalises_each_channel(rng, shape, axes):
    per_channel = shape[:1] + (1,) * (len(shape) - 1)
    x = rng.normal(size=(16,) + shape) * rng.uniform(0.1, 5, size=per_channel)
    x = x + rng.normal(size=per_channel) * 10
    layer = fm.ActNorm()
    params = layer.init(rng, x)
    y, ld = layer.forward(params, x)
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-12)
    hw = int(np.prod(shape[1:]))
    scale = np.exp(params["log_scale"]).ravel()
    np.testing.assert_allclose(ld, hw * np.log(np.abs(scale)).sum(), rtol=1e-13)
    np.testing.assert_allclose(scale, 1 / x.std(axis=axes), rtol=1e-12)


def test_actnorm_degenerate_batch_stays_finite(rng):
    """One sample: no spread per feature; the scale stays 1 (not 1/0)."""
    x = rng.normal(size=(1, 4))
    layer = fm.ActNorm()
    params = layer.init(rng, x)
    np.testing.assert_array_equal(params["log_scale"], 0.0)
    y, ld = layer.forward(params, x)
    np.testing.assert_allclose(y, 0.0, atol=1e-15)
    np.testing.assert_array_equal(ld, 0.0)


def test_actnorm_vector_params_reject_images(rng):
    layer = fm.ActNorm()
    params = layer.init(rng, rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 3\)"):
        layer.forward(params, rng.normal(size=(4, 3, 2, 2)))


def test_squeeze_round_trip_and_layout(rng):
    x = rng.normal(size=(3, 2, 6, 4))
    layer = fm.Squeeze()
    y, ld = layer.forward({}, x)
    assert y.shape == (3, 8, 3, 2)
    np.testing.assert_array_equal(ld, 0.0)
    # y[4c + 2u + v, i, j] = x[c, 2i + u, 2j + v]
    for c, u, v, i, j in [(0, 0, 0, 0, 0), (1, 1, 0, 2, 1), (1, 0, 1, 1, 0), (0, 1, 1, 2, 1)]:
        assert y[0, 4 * c + 2 * u + v, i, j] == x[0, c, 2 * i + u, 2 * j + v]
    x_back, ld_inv = layer.inverse({}, y)
    np.testing.assert_array_equal(x_back, x)
    np.testing.assert_array_equal(ld_inv, 0.0)
    assert layer._output_event_shape((2, 6, 4)) == (8, 3, 2)


def test_squeeze_bad_shapes(rng):
    layer = fm.Squeeze()
    with pytest.raises(
        ValueError,
        match=r"`x` must have height and width divisible by 2 for "
        r"Squeeze; got shape \(2, 1, 3, 4\)",
    ):
        layer.forward({}, rng.normal(size=(2, 1, 3, 4)))
    with pytest.raises(ValueError, match="divisible by 2"):
        layer.init(rng, rng.normal(size=(2, 1, 4, 5)))
    with pytest.raises(ValueError, match="divisible by 2"):
        layer._output_event_shape((1, 4, 5))
    with pytest.raises(ValueError, match="`y` must have a number of channels divisible by 4"):
        layer.inverse({}, rng.normal(size=(2, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"`x` must be 4-D"):
        layer.forward({}, rng.normal(size=(2, 4)))


def _factored_variables(glow, params, x):
    """Run Glow's levels by hand with the public layers: the list of factored-out variables and
    the sum of the flow steps' log-dets."""
    zs, total = [], 0.0
    h = x
    for level in range(glow.levels):
        h, _ = fm.Squeeze().forward({}, h)
        for step, p in zip(glow._flows[level].layers, params[level], strict=True):
            h, ld = step.forward(p, h)
            total = total + ld
        if level < glow.levels - 1:
            k = h.shape[1] // 2
            zs.append(h[:, k:])
            h = h[:, :k]
    zs.append(h)
    return zs, total


@pytest.mark.parametrize("split_prior", [False, True])
def test_multiscale_loglik_accounts_for_every_factored_variable(rng, split_prior):
    """log p(x) = sum_l log N(z_l) + sum of log-dets, and equals log N(f(x)) + log|det J_f| with
    J_f the dense autograd Jacobian (2 x 4 x 4 image, 2 levels)."""
    x = rng.normal(size=(3, 2, 4, 4))
    glow = fm.Glow(levels=2, steps=2, hidden=(8,), split_prior=split_prior)
    flow = fm.Flow(glow)
    params = flow.init(rng, x)
    logp = flow.log_prob(params, x)

    zs, total = _factored_variables(glow, params, x)
    assert [z.shape[1:] for z in zs] == [(4, 2, 2), (16, 1, 1)]
    assert sum(z[0].size for z in zs) == x[0].size
    by_hand = total + sum(
        -0.5 * (z**2).reshape(len(z), -1).sum(axis=1) - 0.5 * z[0].size * LOG2PI for z in zs
    )
    np.testing.assert_allclose(logp, by_hand, rtol=1e-12, atol=1e-12)

    z, _ = glow.forward(params, x)
    J = dense_jacobian(lambda v: glow.forward(params, v)[0], x)
    _, logabs = np.linalg.slogdet(J)
    dense = -0.5 * (z**2).reshape(3, -1).sum(axis=1) - 0.5 * 32 * LOG2PI + logabs
    np.testing.assert_allclose(logp, dense, rtol=1e-10, atol=1e-10)
    # the latent is a permutation of the factored variables: same multiset of values
    np.testing.assert_allclose(
        np.sort(z[0].ravel()), np.sort(np.concatenate([v[0].ravel() for v in zs])), atol=1e-14
    )


def test_glow_sample_and_gradient(rng):
    x = rng.normal(size=(2, 1, 4, 4))
    flow = fm.Flow(fm.Glow(levels=2, steps=1, hidden=(4,)))
    params = flow.init(rng, x)
    s = flow.sample(params, 5, rng)
    assert s.shape == (5, 1, 4, 4) and np.all(np.isfinite(s))
    xs, logp = flow.sample_and_log_prob(params, 4, np.random.default_rng(1))
    np.testing.assert_allclose(flow.log_prob(params, xs), logp, rtol=1e-10, atol=1e-10)
    check_grads(lambda p: anp.mean(flow.log_prob(p, x)), modes=["rev"], order=1)(params)


def test_glow_bad_shapes(rng):
    glow = fm.Glow(levels=2, steps=1, hidden=(4,))
    with pytest.raises(
        ValueError,
        match=r"`x` must have height and width divisible by 4 for "
        r"Glow\(levels=2\); got shape \(2, 1, 6, 4\)",
    ):
        glow.init(rng, rng.normal(size=(2, 1, 6, 4)))
    params = glow.init(rng, rng.normal(size=(2, 1, 4, 4)))
    with pytest.raises(ValueError, match="`y` must have height and width divisible by 4"):
        glow.inverse(params, rng.normal(size=(2, 1, 4, 2)))
    with pytest.raises(ValueError, match=r"`x` must have shape \(n, 1, \*, \*\)"):
        glow.forward(params, rng.normal(size=(2, 2, 4, 4)))
    with pytest.raises(ValueError, match="`levels` must be >= 1"):
        fm.Glow(levels=0)


def test_glow_actnorm_initialised_on_the_data_as_it_arrives(rng):
    """Data-dependent init inside the model: every ActNorm normalises the init batch *at its
    own input* (after the squeezes, convolutions and couplings before it)."""
    x = 2.0 + 3.0 * rng.normal(size=(8, 2, 4, 4))
    glow = fm.Glow(levels=2, steps=2, hidden=(4,))
    params = glow.init(rng, x)
    h = x
    checked = 0
    for level in range(glow.levels):
        h, _ = fm.Squeeze().forward({}, h)
        for step, p in zip(glow._flows[level].layers, params[level], strict=True):
            actnorm_out, _ = step.layers[0].forward(p[0], h)
            np.testing.assert_allclose(actnorm_out.mean(axis=(0, 2, 3)), 0.0, atol=1e-12)
            np.testing.assert_allclose(actnorm_out.var(axis=(0, 2, 3)), 1.0, rtol=1e-10)
            checked += 1
            h, _ = step.forward(p, h)
        if level < glow.levels - 1:
            h = h[:, : h.shape[1] // 2]
    assert checked == 4


def test_split_prior_is_a_conditional_gaussian(rng):
    """With split_prior, the factored-out z of level 0 has density N(z; mu(h), sigma(h)^2) with
    mu = -t e^{-s}, sigma = e^{-s} read off the prior coupling; the model's log-likelihood is
    the steps' log-dets + that conditional density + the last level's standard normal."""
    x = rng.normal(size=(4, 1, 4, 4))
    glow = fm.Glow(levels=2, steps=1, hidden=(4,), split_prior=True)
    params = glow.init(rng, x)
    prior = glow._flows[0].layers[-1]
    assert isinstance(prior, fm.AffineCoupling) and prior.hidden == ()
    h, _ = fm.Squeeze().forward({}, x)
    h, ld0 = glow._flows[0].layers[0].forward(params[0][0], h)
    keep, z = h[:, :2], h[:, 2:]
    out = fm.nets.convnet_apply(params[0][1]["net"], keep)
    s = params[0][1]["scale"] * np.tanh(out[:, :2])
    t = out[:, 2:]
    mu, sigma = -t * np.exp(-s), np.exp(-s)
    log_cond = (-0.5 * ((z - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * LOG2PI).sum(axis=(1, 2, 3))
    h1, _ = fm.Squeeze().forward({}, keep)
    z1, ld1 = glow._flows[1].layers[0].forward(params[1][0], h1)
    log_last = (-0.5 * z1**2 - 0.5 * LOG2PI).sum(axis=(1, 2, 3))
    flow = fm.Flow(glow)
    flow.init(rng, x)
    np.testing.assert_allclose(
        flow.log_prob(params, x), ld0 + log_cond + ld1 + log_last, rtol=1e-12, atol=1e-11
    )
