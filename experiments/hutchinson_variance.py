"""Hutchinson trace estimator: empirical against analytic variance (Gaussian, Rademacher, Hutch++).

For a matrix ``A`` seen through matrix-vector products, the single-probe variance of
Hutchinson's estimator is 2||A_s||_F^2 (Gaussian probes) and 2(||A_s||_F^2 - sum A_ii^2)
(Rademacher), A_s = (A + A^T)/2, and the mean of m probes divides it by m. Hutch++ (Meyer et al.
2021, arXiv:2010.09649) spends the same m products on a rank-m/3 sketch plus Hutchinson on the
deflated rest; on a decaying spectrum its variance falls at least like 1/m^2 instead of 1/m
(for eigenvalues i^-2 like m^-4: the deflated remainder has ||A - A_k||_F^2 ~ k^-3), while on a
flat spectrum it spends two thirds of the budget on a sketch that captures little and is worse
than Hutchinson until the sketch rank m/3 approaches the dimension.

Two matrices: a symmetric positive semi-definite one with eigenvalues i^-decay (random
eigenvectors) and a dense Gaussian one (flat spectrum, where the sketch gains little). For each
budget m the variance over ``trials`` independent estimates is measured with a 95 % interval from
the sample fourth moment. A reference check repeats docs/theory.rst's single-probe comparison on a
random 6 x 6 matrix (4e5 probes).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from experiments._common import fit_loglog_slope, setup_matplotlib, tex_table
from flowmath import estimators as est

__all__ = ["Config", "plot", "run", "tex"]


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    dim: int = 100
    decay: float = 2.0
    budgets: tuple = (3, 6, 12, 24, 48, 96, 192)
    trials: int = 2000
    ref_dim: int = 6
    ref_probes: int = 400_000

    @classmethod
    def quick(cls) -> Config:
        return cls(budgets=(3, 6, 12, 24, 48, 96), trials=400, ref_probes=400_000)


def _variance_interval(x):
    """Sample variance and its 95 % interval from the sample fourth moment (normal theory)."""
    x = np.asarray(x, dtype=np.float64)
    var = float(np.var(x, ddof=1))
    c = x - x.mean()
    se = float(np.sqrt(max(np.mean(c**4) - np.var(x) ** 2, 0.0) / x.size))
    return var, var - 1.96 * se, var + 1.96 * se


def _matrices(cfg: Config, rng):
    d = cfg.dim
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    lam = np.arange(1, d + 1, dtype=float) ** (-cfg.decay)
    decaying = (Q * lam) @ Q.T
    flat = rng.standard_normal((d, d)) / np.sqrt(d)
    return {"decaying": decaying, "gaussian": flat}


def _study(A, cfg: Config, rng):
    d = A.shape[0]

    def matvec(V):
        return V @ A.T

    def sweep(estimate):
        """Variance (with its interval) and mean error of ``estimate(m)`` over the budgets."""
        emp, lo, hi, mean_err = [], [], [], []
        for m in cfg.budgets:
            x = [estimate(m) for _ in range(cfg.trials)]
            v, a, b = _variance_interval(x)
            emp.append(v)
            lo.append(a)
            hi.append(b)
            mean_err.append(float(np.mean(x) - np.trace(A)))
        return {"empirical": emp, "ci_low": lo, "ci_high": hi, "mean_error": mean_err}

    out = {"budgets": list(cfg.budgets), "trace": float(np.trace(A)), "dim": d}
    for probe in ("gaussian", "rademacher"):
        single = est.hutchinson_variance(A, probe)
        res = sweep(
            lambda m, probe=probe: est.hutchinson_trace(matvec, d, n_probes=m, probe=probe, rng=rng)
        )
        out[probe] = {
            "analytic": [single / m for m in cfg.budgets],
            **res,
            "slope": fit_loglog_slope(cfg.budgets, res["empirical"]),
        }
    res = sweep(lambda m: est.hutchpp_trace(matvec, d, n_matvecs=m, rng=rng, probe="rademacher"))
    emp = res["empirical"]
    # fit the Hutch++ rate where the sketch (rank m // 3) is at most half the dimension: beyond,
    # it approaches the whole space and the variance collapses to round-off
    keep = [i for i, m in enumerate(cfg.budgets) if m // 3 <= d // 2 and emp[i] > 0]
    out["hutchpp"] = {
        **res,
        "slope": fit_loglog_slope([cfg.budgets[i] for i in keep], [emp[i] for i in keep]),
        "slope_budgets": [cfg.budgets[i] for i in keep],
    }
    return out


def _reference_check(cfg: Config, rng):
    A = rng.standard_normal((cfg.ref_dim, cfg.ref_dim))
    res = {}
    for probe in ("gaussian", "rademacher"):
        seen = []

        def matvec(V, seen=seen):
            seen.append(V)
            return V @ A.T

        est.hutchinson_trace(matvec, cfg.ref_dim, n_probes=cfg.ref_probes, probe=probe, rng=rng)
        V = seen[0]
        single = np.einsum("ij,jk,ik->i", V, A, V)
        v, lo, hi = _variance_interval(single)
        analytic = est.hutchinson_variance(A, probe)
        res[probe] = {
            "empirical": v,
            "analytic": analytic,
            "ci_low": lo,
            "ci_high": hi,
            "z": (v - analytic) / ((hi - lo) / (2 * 1.96)),
        }
    return res


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    mats = _matrices(config, rng)
    results = {name: _study(A, config, rng) for name, A in mats.items()}
    results["reference"] = _reference_check(config, rng)
    return results


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    styles = {
        "gaussian": ("C0", "o", "Hutchinson, Gaussian"),
        "rademacher": ("C1", "s", "Hutchinson, Rademacher"),
    }
    titles = {"decaying": "PSD, eigenvalues $i^{-2}$", "gaussian": "dense Gaussian (flat spectrum)"}
    for ax, name in zip(axes, ("decaying", "gaussian"), strict=False):
        r = results[name]
        m = np.array(r["budgets"])
        for probe, (c, mk, label) in styles.items():
            e = np.array(r[probe]["empirical"])
            err = [e - np.array(r[probe]["ci_low"]), np.array(r[probe]["ci_high"]) - e]
            ax.plot(m, r[probe]["analytic"], "-", color=c, lw=1, label=f"{label}: analytic/m")
            ax.errorbar(
                m, e, yerr=err, fmt=mk, color=c, ms=4, capsize=2, label=f"{label}: measured"
            )
        e = np.array(r["hutchpp"]["empirical"])
        err = [e - np.array(r["hutchpp"]["ci_low"]), np.array(r["hutchpp"]["ci_high"]) - e]
        ax.errorbar(
            m,
            e,
            yerr=err,
            fmt="^-",
            color="C2",
            ms=4,
            capsize=2,
            label=f"Hutch++ (fitted slope {r['hutchpp']['slope']:.2f})",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"matrix-vector products m (d = {r['dim']})")
        ax.set_ylabel("variance of the trace estimate")
        ax.set_title(titles[name])
        ax.legend(loc="lower left")
    ref = results["reference"]
    fig.suptitle(
        "Hutchinson variance: measured (95% interval) vs analytic; 6x6 single-probe check: "
        f"Gaussian {ref['gaussian']['empirical']:.2f} vs {ref['gaussian']['analytic']:.2f}, "
        f"Rademacher {ref['rademacher']['empirical']:.2f} vs {ref['rademacher']['analytic']:.2f}"
    )
    fig.savefig(path)
    plt.close(fig)


def tex(results: dict) -> str:
    ref = results["reference"]
    rows = [
        [p.capitalize(), ref[p]["empirical"], ref[p]["analytic"], ref[p]["z"]]
        for p in ("gaussian", "rademacher")
    ]
    t1 = tex_table(
        ["probe", "measured variance", "analytic", "z"],
        rows,
        caption="Single-probe variance of Hutchinson's estimator on a random "
        "$6\\times 6$ matrix: measured over $4\\cdot 10^5$ probes against "
        "$2\\|A_s\\|_F^2$ (Gaussian) and "
        "$2(\\|A_s\\|_F^2-\\sum_i A_{ii}^2)$ (Rademacher).",
        label="tab:hutchinson-reference",
        fmt="{:.4g}",
    )
    r = results["decaying"]
    rows = []
    for i, m in enumerate(r["budgets"]):
        rows.append(
            [
                str(m),
                r["gaussian"]["empirical"][i],
                r["gaussian"]["analytic"][i],
                r["rademacher"]["empirical"][i],
                r["rademacher"]["analytic"][i],
                r["hutchpp"]["empirical"][i],
            ]
        )
    t2 = tex_table(
        ["$m$", "Gauss meas.", "Gauss theory", "Rad. meas.", "Rad. theory", "Hutch++"],
        rows,
        caption="Variance of trace estimates with $m$ matrix-vector products on a "
        "PSD matrix with eigenvalues $i^{-2}$; fitted log-log slopes: "
        f"Gaussian {r['gaussian']['slope']:.2f}, Rademacher "
        f"{r['rademacher']['slope']:.2f}, Hutch++ {r['hutchpp']['slope']:.2f}.",
        label="tab:hutchinson-budget",
        fmt="{:.3g}",
    )
    return t1 + "\n" + t2
