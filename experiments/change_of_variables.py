"""Change of variables: samples pushed through 1-D and 2-D flows against the exact density.

A flow ``f`` (data -> latent, the normalizing direction) with base ``pi = N(0, I)`` defines

.. math:: p(x) = \\pi(f(x))\\, |\\det J_f(x)|, \\qquad x = f^{-1}(z),\\ z \\sim \\pi.

The samples only use the inverse ``f^{-1}``; the density only uses the forward map and its
log-determinant. Their agreement, measured with a distance and compared with the distance that
sampling noise alone produces, verifies the formula (and the layers' log-dets) end to end:

- **1-D**: ``f = LeakyReLU(0.4) o D3 o LeakyReLU(2.5) o D2 o LeakyReLU(0.25) o D1`` (``D_k``
  fixed ``fm.DiagonalLinear`` maps), a piecewise-linear increasing map whose density jumps where
  ``|f'|`` does. Its CDF ``F(x) = int_{-inf}^x p`` is computed by quadrature of ``p`` (it checks
  too that ``F = Phi(f(x))``, the pushed-forward CDF). Distance: the Kolmogorov-Smirnov
  statistic ``D_n = sup |F_n - F|``; under the null ``sqrt(n) D_n`` follows Kolmogorov's law
  (mean ``sqrt(pi/2) ln 2 = 0.869``, 99 % quantile 1.628).
- **2-D**: ``f`` = three ``fm.AffineCoupling`` layers interleaved with ``fm.LULinear``, then
  ``fm.DiagonalLinear``, trained briefly on ``moons`` (so that ``p`` is far from Gaussian).
  Distance: total variation ``TV = 1/2 sum_b |N_b / n - P_b|`` between the sample histogram and
  the exact bin probabilities ``P_b`` (3 x 3 Gauss-Legendre per bin, plus one cell for the
  outside of the grid); its noise level is the distribution of the same TV for multinomial
  counts drawn from ``P_b`` (Monte Carlo).

Controls: the same distances against the density *without* the log-determinant (renormalised),
which must be far above the noise; and the total mass of ``p`` by quadrature (1 for a bijection
onto the whole space; for a chain ending in ``fm.ELU`` the range is ``(-alpha, inf)`` and the
mass is ``1 - Phi(-alpha)`` — ELU cannot end a normalizing flow on R). The 2-D mass uses
Gauss-Legendre bins on ``[-20, 20]^2``; the coupling conditioners are ReLU MLPs, so ``p`` has
kinks and the quadrature converges only algebraically (for the quick flow: 1.6e-5 off at bin
width 0.25, 2.0e-6 at 0.125).

References
----------
Dinh, Krueger, Bengio (2014), NICE, arXiv:1410.8516; Dinh, Sohl-Dickstein, Bengio (2016),
Real NVP, arXiv:1605.08803; Papamakarios et al. (2021), Normalizing flows for probabilistic
modeling and inference, JMLR 22(57), arXiv:1912.02762 (Eq. 2).
"""

from __future__ import annotations

import dataclasses
import math
import time

import autograd.numpy as anp
import numpy as np
from scipy.integrate import cumulative_simpson
from scipy.special import ndtr
from scipy.stats import kstwo, kstwobign

import flowmath as fm
from experiments._common import fit_loglog_slope, setup_matplotlib, tex_table

__all__ = ["Config", "plot", "run", "tex"]

KS_MEAN = math.sqrt(math.pi / 2) * math.log(2)  # mean of Kolmogorov's distribution


@dataclasses.dataclass(frozen=True)
class Config:
    sizes: tuple = (1000, 3000, 10_000, 30_000, 100_000, 300_000, 1_000_000)
    # 1-D flow: (log_scale, shift) of D1, D2, D3 and the LeakyReLU slopes after each
    diag_1d: tuple = ((0.2, 0.3), (-0.3, -0.8), (0.1, 0.5))
    slopes_1d: tuple = (0.25, 2.5, 0.4)
    quad_points_1d: int = 400_001
    bins_1d: int = 150
    # 2-D flow
    train_data: str = "moons"
    train_steps: int = 1500
    train_batch: int = 256
    train_lr: float = 3e-3
    hidden: tuple = (32, 32)
    grid_2d: int = 64
    extent_2d: tuple = (-4.5, 4.5, -3.5, 3.5)
    wide_box: float = 20.0
    wide_bins: int = 320
    noise_reps: int = 400
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            sizes=(1000, 3000, 10_000, 30_000, 100_000),
            quad_points_1d=200_001,
            train_steps=300,
            noise_reps=200,
            wide_bins=160,
        )


# -- 1-D ---------------------------------------------------------------------------------------
def _flow_1d(config, rng):
    layers = []
    for slope in config.slopes_1d:
        layers += [fm.DiagonalLinear(), fm.LeakyReLU(slope)]
    flow = fm.Flow(fm.Chain(layers))
    params = flow.init(rng, np.zeros((2, 1)))  # structure and shapes; values set below
    for k, (log_scale, shift) in enumerate(config.diag_1d):
        params[2 * k] = {"log_scale": np.array([log_scale]), "b": np.array([shift])}
    return flow, params


def _kinks(flow, params):
    """The points where a LeakyReLU's input crosses 0: the prefix of the chain up to it, inverted
    at 0. ``p`` jumps there, so quadrature treats them as breakpoints."""
    layers = flow.layer.layers
    out = []
    for j, layer in enumerate(layers):
        if isinstance(layer, fm.LeakyReLU):
            if j == 0:
                out.append(0.0)
            else:
                x, _ = fm.Chain(layers[:j]).inverse(params[:j], np.zeros((1, 1)))
                out.append(float(x[0, 0]))
    return sorted(out)


def _cdf_by_quadrature(flow, params, lo, hi, n_points):
    """``F(x) = int_lo^x p`` and ``p`` on a grid: composite Simpson on each piece between the
    jumps of ``p`` (endpoints nudged one ulp inside, so each piece sees its own smooth branch);
    error O(h^4). Returns the grid (with every kink twice: left and right limits)."""
    breaks = np.unique([lo] + [k for k in _kinks(flow, params) if lo < k < hi] + [hi])
    per_piece = max(3, (n_points // (len(breaks) - 1)) | 1)  # odd: Simpson
    grids, dens, cdfs, total = [], [], [], 0.0
    for a, b in zip(breaks[:-1], breaks[1:], strict=True):
        g = np.linspace(a, b, per_piece)
        inner = g.copy()
        # a kink computed by inverting the chain is exact only to rounding: evaluate the
        # endpoints a relative 1e-12 inside so that each lands on its piece's branch
        nudge = 1e-12 * (1.0 + max(abs(a), abs(b)))
        inner[0], inner[-1] = a + nudge, b - nudge
        d = np.exp(flow.log_prob(params, inner[:, None]))
        c = cumulative_simpson(d, x=g, initial=0.0)
        grids.append(g)
        dens.append(d)
        cdfs.append(total + c)
        total += c[-1]
    return np.concatenate(grids), np.concatenate(dens), np.concatenate(cdfs)


def _ks(samples, grid, cdf):
    x = np.sort(samples)
    n = len(x)
    f = np.interp(x, grid, cdf)
    return float(max(np.max(np.arange(1, n + 1) / n - f), np.max(f - np.arange(n) / n)))


def _run_1d(config, rng):
    flow, params = _flow_1d(config, rng)
    nmax = max(config.sizes)
    samples = flow.sample(params, nmax, rng)[:, 0]
    lo, hi = float(samples.min()) - 5.0, float(samples.max()) + 5.0
    grid, dens, cdf = _cdf_by_quadrature(flow, params, lo, hi, config.quad_points_1d)
    z, _ = flow.layer.forward(params, grid[:, None])
    pushed = ndtr(z[:, 0])  # Phi(f(x)): the CDF pushed forward (f increasing)
    mass = float(cdf[-1] + ndtr(z[0, 0]) + ndtr(-z[-1, 0]))  # quadrature + the far tails
    cdf_error = float(np.max(np.abs(cdf + ndtr(z[0, 0]) - pushed)))
    # control: the density without |f'| (renormalised)
    wrong = np.exp(flow.base.log_prob(z))
    wrong_cdf = np.concatenate([[0.0], np.cumsum(np.diff(grid) * (wrong[1:] + wrong[:-1]) / 2)])
    wrong_cdf_total = wrong_cdf[-1]
    wrong_cdf /= wrong_cdf_total
    ks, ks_wrong, pvalues = [], [], []
    for n in config.sizes:
        d = _ks(samples[:n], grid, cdf + ndtr(z[0, 0]))
        ks.append(d)
        pvalues.append(float(kstwo.sf(d, n)))
        ks_wrong.append(_ks(samples[:n], grid, wrong_cdf))
    # a chain whose last layer is ELU maps onto (-alpha, inf) only: mass 1 - Phi(-alpha)
    elu = fm.Chain([fm.DiagonalLinear(), fm.ELU(1.0)])
    elu_params = [params[0], {}]
    elu_grid = np.linspace(-60.0, 60.0, 1_200_001)
    zz, ld = elu.forward(elu_params, elu_grid[:, None])
    elu_mass = float(np.trapezoid(np.exp(fm.StandardNormal().log_prob(zz) + ld), elu_grid))
    sizes = np.asarray(config.sizes, float)
    lo_q, hi_q = np.quantile(samples, [0.0005, 0.9995])
    hist_density, hist_edges = np.histogram(
        samples, bins=config.bins_1d, range=(lo_q - 0.5, hi_q + 0.5), density=True
    )
    hist_density *= np.mean((samples >= hist_edges[0]) & (samples <= hist_edges[-1]))
    return {
        "sizes": list(config.sizes),
        "ks": ks,
        "ks_pvalue": pvalues,
        "ks_expected": list(KS_MEAN / np.sqrt(sizes)),
        "ks_q99": list(kstwobign.ppf(0.99) / np.sqrt(sizes)),
        "ks_slope": fit_loglog_slope(sizes, ks),
        "ks_without_logdet": ks_wrong,
        "mass": mass,
        "cdf_vs_pushforward": cdf_error,
        "elu_mass": elu_mass,
        "elu_mass_theory": float(1.0 - ndtr(-1.0)),
        "hist_n": nmax,
        "hist_edges": hist_edges.tolist(),
        "hist_density": hist_density.tolist(),
        "grid": grid[:: max(1, len(grid) // 2000)].tolist(),
        "density": dens[:: max(1, len(grid) // 2000)].tolist(),
        "density_without_logdet": (wrong / wrong_cdf_total)[:: max(1, len(grid) // 2000)].tolist(),
    }


# -- 2-D ---------------------------------------------------------------------------------------
def _flow_2d(config):
    h = config.hidden
    return fm.Flow(
        fm.Chain(
            [
                fm.AffineCoupling(hidden=h),
                fm.LULinear(),
                fm.AffineCoupling(hidden=h, flip=True),
                fm.LULinear(),
                fm.AffineCoupling(hidden=h),
                fm.DiagonalLinear(),
            ]
        )
    )


def _bin_probabilities(log_density, edges_x, edges_y, order=3):
    """``P_b = int_b p`` by ``order x order`` Gauss-Legendre in every bin."""
    nodes, weights = np.polynomial.legendre.leggauss(order)
    hx, hy = np.diff(edges_x)[0], np.diff(edges_y)[0]
    cx = (edges_x[:-1, None] + hx * (nodes[None, :] + 1) / 2).ravel()  # (nx * order,)
    cy = (edges_y[:-1, None] + hy * (nodes[None, :] + 1) / 2).ravel()
    gx, gy = np.meshgrid(cx, cy, indexing="ij")
    dens = np.exp(log_density(np.stack([gx.ravel(), gy.ravel()], 1))).reshape(gx.shape)
    nx, ny = len(edges_x) - 1, len(edges_y) - 1
    w = np.outer(weights, weights) * hx * hy / 4
    dens = dens.reshape(nx, order, ny, order)
    return np.einsum("iajb,ab->ij", dens, w)


def _tv(counts, probs):
    return 0.5 * float(np.sum(np.abs(counts / counts.sum() - probs)))


def _run_2d(config, rng):
    flow = _flow_2d(config)
    data = fm.data.toy(config.train_data, 20_000, rng)
    params = flow.init(rng, data[:512])

    def loss(p, batch, r):
        # unpack the traced list into a plain list of per-layer trees: Chain checks
        # isinstance(params, list), which an autograd SequenceBox is not
        return -anp.mean(flow.log_prob([p[i] for i in range(len(p))], batch))

    params, result = fm.train.fit(
        loss,
        params,
        data,
        rng=rng,
        steps=config.train_steps,
        batch_size=config.train_batch,
        optimizer=fm.train.Adam(config.train_lr),
        progress=False,
    )
    history = result.train_loss
    nmax = max(config.sizes)
    samples = flow.sample(params, nmax, rng)
    x0, x1, y0, y1 = config.extent_2d
    ex = np.linspace(x0, x1, config.grid_2d + 1)
    ey = np.linspace(y0, y1, config.grid_2d + 1)
    probs = _bin_probabilities(lambda x: flow.log_prob(params, x), ex, ey)
    inside = float(probs.sum())
    # mass by quadrature over a wide box (checks normalisation independently of the samples);
    # the conditioners are ReLU MLPs, so p has kinks: the quadrature error is O(h^2), 1e-6..1e-5
    wide_edges = np.linspace(-config.wide_box, config.wide_box, config.wide_bins + 1)
    mass = float(
        _bin_probabilities(
            lambda x: flow.log_prob(params, x), wide_edges, wide_edges, order=4
        ).sum()
    )
    p_all = np.append(probs.ravel(), max(1.0 - inside, 0.0))

    def wrong_log_density(x):
        z, _ = flow.layer.forward(params, x)
        return flow.base.log_prob(z)

    wrong = _bin_probabilities(wrong_log_density, ex, ey)
    wrong_wide = _bin_probabilities(wrong_log_density, wide_edges, wide_edges, order=4).sum()
    wrong = wrong / wrong_wide
    w_all = np.append(wrong.ravel(), max(1.0 - wrong.sum(), 0.0))
    tv, tv_wrong, tv_mean, tv_q99, tv_p = [], [], [], [], []
    for n in config.sizes:
        h, _, _ = np.histogram2d(samples[:n, 0], samples[:n, 1], bins=[ex, ey])
        counts = np.append(h.ravel(), n - h.sum())
        d = _tv(counts, p_all)
        null = np.array([_tv(c, p_all) for c in rng.multinomial(n, p_all, size=config.noise_reps)])
        tv.append(d)
        tv_mean.append(float(null.mean()))
        tv_q99.append(float(np.quantile(null, 0.99)))
        tv_p.append(float((1 + np.sum(null >= d)) / (1 + len(null))))
        tv_wrong.append(_tv(counts, w_all))
    hist, _, _ = np.histogram2d(samples[:, 0], samples[:, 1], bins=[ex, ey])
    cell = (ex[1] - ex[0]) * (ey[1] - ey[0])
    return {
        "sizes": list(config.sizes),
        "tv": tv,
        "tv_noise_mean": tv_mean,
        "tv_noise_q99": tv_q99,
        "tv_pvalue": tv_p,
        "tv_slope": fit_loglog_slope(np.asarray(config.sizes, float), tv),
        "tv_without_logdet": tv_wrong,
        "mass_in_grid": inside,
        "mass": mass,
        "train_loss_first_last": [float(np.mean(history[:20])), float(np.mean(history[-20:]))],
        "extent": list(config.extent_2d),
        "density_grid": (probs / cell).tolist(),
        "sample_hist": (hist / (nmax * cell)).tolist(),
    }


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    start = time.perf_counter()
    one_d = _run_1d(config, rng)
    middle = time.perf_counter()
    two_d = _run_2d(config, rng)
    return {
        "one_d": one_d,
        "two_d": two_d,
        "seconds": [middle - start, time.perf_counter() - middle],
    }


# -- figure and table --------------------------------------------------------------------------
def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    r1, r2 = results["one_d"], results["two_d"]
    fig, axes = plt.subplots(2, 2, figsize=(10, 8))

    ax = axes[0, 0]
    edges = np.asarray(r1["hist_edges"])
    ax.stairs(
        r1["hist_density"],
        edges,
        fill=True,
        color="C0",
        alpha=0.45,
        label=f"histogram of {r1['hist_n']} samples $x = f^{{-1}}(z)$",
    )
    ax.plot(r1["grid"], r1["density"], "k-", lw=1.2, label=r"exact $\pi(f(x))\,|f'(x)|$")
    ax.plot(
        r1["grid"],
        r1["density_without_logdet"],
        "C3--",
        lw=1,
        label=r"control: $\pi(f(x))$ renormalised",
    )
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title("1-D: LeakyReLU / DiagonalLinear chain")
    ax.legend(loc="upper right")

    ax = axes[0, 1]
    n = np.asarray(r1["sizes"], float)
    ax.loglog(n, r1["ks"], "o-", color="C0", label=f"KS vs exact CDF (slope {r1['ks_slope']:.2f})")
    ax.loglog(n, r1["ks_expected"], "k--", label=r"noise: mean $0.869/\sqrt{n}$")
    ax.fill_between(n, 0, r1["ks_q99"], color="k", alpha=0.1, label="noise: 99 % quantile")
    ax.loglog(n, r1["ks_without_logdet"], "s-", color="C3", label="control without log-det")
    ax.set_xlabel("samples n")
    ax.set_ylabel(r"$D_n = \sup_x |F_n(x) - F(x)|$")
    ax.set_title(f"1-D Kolmogorov-Smirnov; mass of p = 1 {r1['mass'] - 1:+.1e}")
    ax.legend(loc="lower left")

    ax = axes[1, 0]
    x0, x1, y0, y1 = r2["extent"]
    hist = np.asarray(r2["sample_hist"])
    dens = np.asarray(r2["density_grid"])
    ax.imshow(hist.T, origin="lower", extent=(x0, x1, y0, y1), cmap="Blues", aspect="auto")
    gx = np.linspace(x0, x1, dens.shape[0] + 1)
    gy = np.linspace(y0, y1, dens.shape[1] + 1)
    cx, cy = (gx[:-1] + gx[1:]) / 2, (gy[:-1] + gy[1:]) / 2
    levels = np.quantile(dens[dens > 1e-4], [0.2, 0.4, 0.6, 0.8, 0.95])
    ax.contour(cx, cy, dens.T, levels=levels, colors="k", linewidths=0.8)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    ax.set_title("2-D: coupling flow (moons); samples (shade), exact density (contours)")

    ax = axes[1, 1]
    n = np.asarray(r2["sizes"], float)
    ax.loglog(n, r2["tv"], "o-", color="C0", label=f"TV vs exact bins (slope {r2['tv_slope']:.2f})")
    ax.loglog(n, r2["tv_noise_mean"], "k--", label="noise: mean (multinomial)")
    ax.fill_between(n, 0, r2["tv_noise_q99"], color="k", alpha=0.1, label="noise: 99 % quantile")
    ax.loglog(n, r2["tv_without_logdet"], "s-", color="C3", label="control without log-det")
    ax.set_xlabel("samples n")
    ax.set_ylabel("total variation on the grid")
    ax.set_title(f"2-D total variation; mass of p = 1 {r2['mass'] - 1:+.1e}")
    ax.legend(loc="lower left")

    fig.suptitle(
        r"Change of variables: samples $f^{-1}(z)$ against "
        r"$p(x) = \pi(f(x))\,|\det J_f(x)|$"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sci(value: float) -> str:
    """``1.6e-05`` as LaTeX ``1.6\\times 10^{-5}``."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}\\times 10^{{{int(exponent)}}}"


def tex(results: dict) -> str:
    r1, r2 = results["one_d"], results["two_d"]
    rows = []
    for i, n in enumerate(r1["sizes"]):
        rows.append(
            [
                str(n),
                f"{r1['ks'][i]:.2e}",
                f"{r1['ks_expected'][i]:.2e}",
                f"{r1['ks_pvalue'][i]:.2f}",
                f"{r1['ks_without_logdet'][i]:.2e}",
                f"{r2['tv'][i]:.2e}",
                f"{r2['tv_noise_mean'][i]:.2e}",
                f"{r2['tv_pvalue'][i]:.2f}",
                f"{r2['tv_without_logdet'][i]:.2e}",
            ]
        )
    caption = (
        "Samples pushed through a flow against the exact density $\\pi(f(x))|\\det J_f|$. "
        "1-D: Kolmogorov-Smirnov distance, its mean under sampling noise $0.869/\\sqrt n$ and "
        "p-value; 2-D: total variation on a "
        f"{len(r2['density_grid'])}$\\times${len(r2['density_grid'][0])} grid, its Monte Carlo "
        "noise mean and p-value; 'w/o' columns: the same distance against the density without "
        f"the log-determinant. Mass of $p$ by quadrature minus one: 1-D ${_sci(r1['mass'] - 1)}$, "
        f"2-D ${_sci(r2['mass'] - 1)}$; a chain ending in ELU: {r1['elu_mass']:.4f} "
        f"(theory $1-\\Phi(-1)$ = {r1['elu_mass_theory']:.4f})."
    )
    return tex_table(
        ["n", "KS", "noise", "p", "KS w/o", "TV", "noise", "p", "TV w/o"],
        rows,
        caption=caption,
        label="tab:change-of-variables",
        fmt="{}",
    )
