"""Model recipes: every recipe builds a working flow (checked against brute force), learns a toy
below the Gaussian baseline on a small seeded budget, and has an exact evaluation twin; the
toy-density experiment's exact quantities (mixture density, checkerboard squares, entropies)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import flowmath as fm
from experiments import toy_densities as T

SMALL = {
    "nice": lambda d: fm.models.nice(d, hidden=(32, 32)),
    "realnvp": lambda d: fm.models.realnvp(d, n_couplings=4, hidden=(16,)),
    "glow": lambda d: fm.models.glow(d, levels=1, steps=2, hidden=(16,)),
    "made": lambda d: fm.models.made(d, hidden=(16,)),
    "maf": lambda d: fm.models.maf(d, n_layers=3, hidden=(16,)),
    "ffjord": lambda d: fm.models.ffjord(d, hidden=(32, 32)),
    "iresnet": lambda d: fm.models.iresnet(d, n_blocks=2, hidden=(16,)),
    "residual_flow": lambda d: fm.models.residual_flow(d, n_blocks=2, hidden=(32, 32)),
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_recipe_is_a_correct_flow(name):
    """The exact twin of each recipe passes check_bijection at init (round trips, log-det
    against the dense Jacobian); the twin shares the parameters."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3))
    flow = SMALL[name](3)
    params = flow.init(rng, x)
    twin = fm.models.exact(flow)
    assert not twin.layer.stochastic
    # the CNF is exact up to its solver tolerance (rtol = atol = 1e-5: errors ~1e-5 measured)
    tol = 1e-4 if name == "ffjord" else 1e-9
    fm.testing.check_bijection(twin.layer, params, x[:3]).assert_ok(tol)
    assert twin.log_prob(params, x).shape == (32,)
    assert flow.sample(params, 5, rng).shape == (5, 3)


@pytest.mark.parametrize("name", ["realnvp", "glow"])
def test_image_recipes(name):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 2, 4, 4))
    flow = (fm.models.realnvp if name == "realnvp" else fm.models.glow)(
        (2, 4, 4), hidden=(8,), **({"levels": 2, "steps": 1} if name == "glow" else {})
    )
    params = flow.init(rng, x)
    fm.testing.check_bijection(flow.layer, params, x[:2]).assert_ok(1e-9)
    assert flow.sample(params, 3, rng).shape == (3, 2, 4, 4)


@pytest.mark.parametrize(
    "name, steps",
    [
        ("nice", 150),
        ("realnvp", 150),
        ("glow", 150),
        ("made", 150),
        ("maf", 150),
        ("ffjord", 40),
        ("iresnet", 40),
        ("residual_flow", 200),
    ],
)
def test_recipe_learns_below_the_gaussian_baseline(name, steps):
    """On 8gaussians every recipe beats the full-covariance Gaussian fitted to the same training
    set: the paired test-NLL difference is negative by more than 4 of its standard errors."""
    rng = np.random.default_rng(2)
    x = fm.data.toy("8gaussians", 3000, rng)
    train, test = x[:2000], x[2000:]
    flow = SMALL[name](2)
    twin = fm.models.exact(flow)
    params = flow.init(rng, train[:256])
    stochastic = flow.layer.stochastic

    def loss(p, batch, r):
        return -flow.log_prob(p, batch, r if stochastic else None)

    params, _ = fm.train.fit(
        loss,
        params,
        train,
        rng=rng,
        steps=steps,
        batch_size=256,
        optimizer=fm.train.Adam(1e-2),
        schedule=fm.train.Cosine(warmup=10),
        clip_norm=50.0,
        progress=False,
    )
    diff = -twin.log_prob(params, test) - T.gaussian_nll(train, test)
    z = diff.mean() / (diff.std(ddof=1) / math.sqrt(len(diff)))
    assert z < -4, f"{name}: NLL - Gaussian NLL = {diff.mean():.3f} (z = {z:.1f})"


def test_recipes_refuse_bad_event_shapes():
    with pytest.raises(ValueError, match="`event_shape` of maf must be an int d"):
        fm.models.maf((1, 4, 4))
    with pytest.raises(TypeError, match="`event_shape` must be an int d or a tuple"):
        fm.models.realnvp("2")
    with pytest.raises(ValueError, match="`event_shape` must be >= 1"):
        fm.models.nice(0)
    with pytest.raises(TypeError, match="`flow` must be a Flow"):
        fm.models.exact(fm.MAF())


def test_eight_gaussians_density_is_the_samplers():
    """The exact mixture density integrates to 1 (quadrature on a fine grid, error < 1e-6
    measured ~1e-12) and the sampler's histogram matches it (chi-square at |z| < 4)."""
    g = np.linspace(-6, 6, 601)
    c = 0.5 * (g[1:] + g[:-1])
    xx, yy = np.meshgrid(c, c)
    p = np.exp(T.eight_gaussians_log_density(np.stack([xx.ravel(), yy.ravel()], 1)))
    assert abs(p.sum() * (g[1] - g[0]) ** 2 - 1) < 1e-6
    rng = np.random.default_rng(3)
    n = 200_000
    s = fm.data.toy("8gaussians", n, rng)
    edges = np.linspace(-4, 4, 17)
    counts = np.histogram2d(s[:, 0], s[:, 1], bins=[edges, edges])[0]
    coarse = p.reshape(600, 600)  # rows: y
    # expected counts per coarse bin from the fine quadrature (bins of 0.5 = 25 fine cells)
    fine = coarse[100:500, 100:500].T * (g[1] - g[0]) ** 2
    expected = n * fine.reshape(16, 25, 16, 25).sum(axis=(1, 3))
    keep = expected > 20
    chi2 = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    k = int(keep.sum())
    assert abs(chi2 - k) / math.sqrt(2 * k) < 4


def test_checkerboard_squares():
    rng = np.random.default_rng(4)
    s = fm.data.toy("checkerboard", 50_000, rng)
    assert np.all(T.checkerboard_dark(s))
    g = np.linspace(-4, 4, 81)
    c = 0.5 * (g[1:] + g[:-1])
    xx, yy = np.meshgrid(c, c)
    dark = T.checkerboard_dark(np.stack([xx.ravel(), yy.ravel()], 1))
    assert dark.mean() == 0.5  # 8 of the 16 squares


def test_knn_entropy_of_a_gaussian():
    """Kozachenko-Leonenko on a correlated 2-D Gaussian against ``0.5 log det(2 pi e C)``: the
    estimate is within 4 standard errors plus 0.01 (its bias at n = 50 000 measured 0.002)."""
    rng = np.random.default_rng(5)
    C = np.array([[1.0, 0.6], [0.6, 0.5]])
    x = rng.multivariate_normal([0, 0], C, size=50_000)
    h, se = T.knn_entropy(x)
    exact = 0.5 * math.log(np.linalg.det(2 * math.pi * math.e * C))
    assert abs(h - exact) < 4 * se + 0.01


def test_entropies_of_the_toys():
    rng = np.random.default_rng(6)
    h, se, _ = T.entropy("checkerboard", 10, rng)
    assert h == math.log(32) and se == 0.0
    h, se, _ = T.entropy("8gaussians", 200_000, rng)
    # for well-separated modes H = ln 8 + ln(2 pi e sigma^2) up to the overlap (< 1e-3 here)
    sep = math.log(8) + math.log(2 * math.pi * math.e * T.SIGMA_8G**2)
    assert abs(h - sep) < 4 * se + 1e-3
