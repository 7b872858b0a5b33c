"""Normalisation of a CNF density against the solver tolerance (FFJORD's diagnostic).

Does a CNF density integrate to one? |1 - integral of p| against the solver tolerance for a CNF
fitted to a 1-D Gaussian mixture.

A CNF's density :math:`p(x) = \\pi(z(t_1)) \\exp \\int_0^{t_1} \\operatorname{tr}\\,
\\partial f/\\partial z\\, dt` is normalised only as exactly as the ODE is solved: the solver
approximates both the map and its log-determinant, and with a loose tolerance the two no longer
match. A 1-D CNF (MLP 32-32, tanh, exact divergence, ``t1 = 1``) is trained with
:func:`flowmath.train.fit` on samples of the mixture with weights 1/3, means -2.8, -0.9, 2.0
and variance 0.4 (at ``rtol = atol = 1e-5``); the *same* parameters are then evaluated on a fine
grid at tolerances 1e-1 ... 1e-8 (``rtol = atol``) and the density is integrated by the
trapezoid rule. A run at ``1e-11`` on the grid (801 points) and on one twice as fine gives the
quadrature's own error, the floor below which the diagnostic cannot see.

References
----------
Grathwohl, Chen, Bettencourt, Sutskever, Duvenaud, "FFJORD: Free-form Continuous Dynamics for
Scalable Reversible Generative Models", ICLR 2019, arXiv:1810.01367.
"""

from __future__ import annotations

import dataclasses
import math

import autograd.numpy as anp
import numpy as np

import flowmath as fm
from experiments._common import fit_loglog_slope, setup_matplotlib, tex_table

__all__ = ["Config", "mixture_log_density", "plot", "run", "tex"]

WEIGHTS = (1 / 3, 1 / 3, 1 / 3)
MEANS = (-2.8, -0.9, 2.0)
VARIANCE = 0.4


@dataclasses.dataclass(frozen=True)
class Config:
    tolerances: tuple = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
    reference_tol: float = 1e-11
    hidden: tuple = (32, 32)
    t1: float = 1.0
    train_tol: float = 1e-5
    steps: int = 600
    batch: int = 256
    lr: float = 1e-2
    n_data: int = 10000
    grid: tuple = (-9.0, 9.0, 801)
    seed: int = 0

    @classmethod
    def quick(cls):
        return cls(steps=50, n_data=2000)


def mixture_log_density(x):
    """Log-density of the three-component mixture at the points ``x`` (any shape)."""
    x = np.asarray(x, dtype=np.float64)[..., None]
    comps = (
        np.log(np.array(WEIGHTS))
        - 0.5 * (x - np.array(MEANS)) ** 2 / VARIANCE
        - 0.5 * math.log(2 * math.pi * VARIANCE)
    )
    top = comps.max(axis=-1, keepdims=True)
    return (top + np.log(np.exp(comps - top).sum(axis=-1, keepdims=True)))[..., 0]


def sample_mixture(n, rng):
    k = rng.choice(3, size=n, p=np.array(WEIGHTS))
    return (np.array(MEANS)[k] + math.sqrt(VARIANCE) * rng.standard_normal(n))[:, None]


def _flow(config, tol):
    return fm.Flow(fm.CNF(hidden=config.hidden, t1=config.t1, rtol=tol, atol=tol))


def _mass(config, params, tol, grid):
    """Trapezoid integral of the CNF density on the grid, the log-density and the solve's NFE.

    The layer's own solve (``CNF.dynamics`` and ``CNF.solver_options``) through
    :func:`flowmath.ode.solve`, so that the counts come with it: ``log p = log pi(z) + l``."""
    lo, hi, m = grid
    x = np.linspace(lo, hi, int(m))[:, None]
    layer = _flow(config, tol).layer
    y0 = np.concatenate([x, np.zeros_like(x)], axis=1)
    sol = fm.ode.solve(
        layer.dynamics(len(x), 1), y0, np.array([0.0, config.t1]), params, **layer.solver_options()
    )
    z, logdet = sol.ys[-1][:, :1], sol.ys[-1][:, 1]
    logp = fm.StandardNormal().log_prob(z) + logdet
    return float(np.trapezoid(np.exp(logp), x[:, 0])), logp, int(sol.nfe)


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    data = sample_mixture(config.n_data, rng)
    flow = _flow(config, config.train_tol)
    params = flow.init(rng, data[:16])

    def loss(p, batch, _rng):
        return -anp.mean(flow.log_prob(p, batch))

    params, result = fm.train.fit(
        loss,
        params,
        data,
        rng=rng,
        steps=config.steps,
        batch_size=config.batch,
        optimizer=fm.train.Adam(config.lr),
        progress=False,
    )
    history = result.train_loss
    test = sample_mixture(4000, rng)
    out = {
        "history": history[:: max(1, config.steps // 200)].tolist(),
        "test_nll": float(-np.mean(flow.log_prob(params, test))),
        "true_test_nll": float(-np.mean(mixture_log_density(test[:, 0]))),
        "tolerances": list(config.tolerances),
        "mass_error": [],
        "nfe": [],
    }
    for tol in config.tolerances:
        mass, _, nfe = _mass(config, params, tol, config.grid)
        out["mass_error"].append(abs(1.0 - mass))
        out["nfe"].append(nfe)
    lo, hi, m = config.grid
    ref_mass, ref_logp, _ = _mass(config, params, config.reference_tol, config.grid)
    fine_mass, _, _ = _mass(config, params, config.reference_tol, (lo, hi, 2 * m - 1))
    out["reference_mass_error"] = abs(1.0 - ref_mass)
    out["quadrature_error"] = abs(ref_mass - fine_mass)
    xs = np.linspace(lo, hi, int(m))
    out["grid_x"] = xs[::4].tolist()
    out["model_density"] = np.exp(ref_logp[::4]).tolist()
    out["true_density"] = np.exp(mixture_log_density(xs[::4])).tolist()
    errs = np.array(out["mass_error"])
    tols = np.array(config.tolerances)
    above = errs > 10 * max(out["quadrature_error"], out["reference_mass_error"], 1e-15)
    out["slope"] = fit_loglog_slope(tols[above], errs[above]) if above.sum() >= 2 else float("nan")
    return out


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    ax = axes[0]
    tols = results["tolerances"]
    ax.loglog(
        tols,
        results["mass_error"],
        "o-",
        color="C0",
        label=f"|1 - integral p|  (fitted slope {results['slope']:.2f})",
    )
    ax.loglog(tols, tols, ":", color="gray", label="= tolerance")
    floor = max(results["quadrature_error"], results["reference_mass_error"])
    ax.axhline(
        floor, color="C3", ls="--", lw=1, label=f"floor: quadrature / tol 1e-11 ({floor:.0e})"
    )
    for t, e, n in zip(tols, results["mass_error"], results["nfe"], strict=True):
        ax.annotate(f"{n}", (t, e), textcoords="offset points", xytext=(3, 4), fontsize=7)
    ax.invert_xaxis()
    ax.set_xlabel("solver tolerance (rtol = atol)")
    ax.set_ylabel("|1 - integral of p(x) dx|")
    ax.set_title("normalisation error shrinks with the tolerance (labels: NFE)")
    ax.legend(loc="lower left")
    ax = axes[1]
    ax.plot(
        results["grid_x"],
        results["true_density"],
        color="k",
        lw=1.2,
        label=f"mixture (NLL {results['true_test_nll']:.3f})",
    )
    ax.plot(
        results["grid_x"],
        results["model_density"],
        color="C1",
        ls="--",
        label=f"fitted CNF (test NLL {results['test_nll']:.3f})",
    )
    ax.set_xlabel("x")
    ax.set_ylabel("density")
    ax.set_title("the fitted 1-D CNF")
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


def tex(results: dict) -> str:
    rows = [
        [f"{t:.0e}", str(n), e]
        for t, n, e in zip(
            results["tolerances"], results["nfe"], results["mass_error"], strict=True
        )
    ]
    return tex_table(
        ["tolerance", "NFE", r"$|1 - \int p|$"],
        rows,
        caption="Normalisation of a 1-D CNF density fitted to a three-Gaussian mixture against "
        f"the solver tolerance (quadrature floor {results['quadrature_error']:.1e}).",
        label="tab:density-integral",
        fmt="{:.2e}",
    )
