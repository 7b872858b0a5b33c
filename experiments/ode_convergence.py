"""ODE solver convergence: error against step size and tolerance, with fitted orders.

Two problems with trusted references:

- **linear**: ``dz/dt = A z`` with a damped-oscillatory 4 x 4 ``A`` (a random matrix shifted by
  ``-0.2 I``), ``z(1) = expm(A) z0`` from :func:`scipy.linalg.expm`;
- **nonlinear**: the tanh MLP field ``f(t, z) = W2 tanh(W1 z + b1 + t u) + b2`` of the W1
  benchmark (d = 2, hidden 16, a batch of 8 states), reference from
  :func:`scipy.integrate.solve_ivp` (DOP853, rtol = atol = 1e-13).

Fixed steps: Euler, RK4 and the propagators of the three embedded pairs -- Bogacki-Shampine
3(2), Dormand-Prince 5(4) and Tsitouras 5(4), their weights ``b`` on a uniform grid, no error
control -- at steps ``h = 2^-k`` (for the two 5th-order pairs from ``h = 1/8``: their
5th-order error coefficients are small by design, so at coarser steps the 6th-order terms
dominate and the slope looks steeper; Tsitouras's local slope falls from 5.3 to 5.0 between
``h = 1/8`` and ``1/32``); the empirical order is the slope of ``log(max error)`` against
``log h`` by least squares over the errors above ``1e-13`` (theory: 1, 3, 4, 5, 5).
Adaptive: DOPRI5 at tolerances ``rtol = atol = 10^-k``; the slope of ``log error`` against
``log NFE`` (theory: ``-5`` once asymptotic) and against ``log tol`` (an elementary controller
aims at error ~ tol).

References
----------
Dormand, Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 6.
Bogacki, Shampine (1989), "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2(4).
Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column
simplifying assumption", Comput. Math. Appl. 62(2).
Hairer, Norsett, Wanner (1993), *Solving Ordinary Differential Equations I*, Sec. II.4.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from experiments._common import fit_slope, setup_matplotlib, tex_table
from flowmath.ode import BOSH3, DOPRI5, TSIT5, ButcherTableau, solve
from flowmath.ode.solve import integrate

__all__ = ["Config", "plot", "run", "tex"]

THEORY = {"euler": 1, "bosh3 (fixed)": 3, "rk4": 4, "dopri5 (fixed)": 5, "tsit5 (fixed)": 5}


@dataclasses.dataclass(frozen=True)
class Config:
    euler_steps: tuple = (5, 6, 7, 8, 9, 10, 11, 12)  # h = 2^-k
    bosh3_steps: tuple = (3, 4, 5, 6, 7, 8)
    rk4_steps: tuple = (2, 3, 4, 5, 6, 7)
    dopri5_steps: tuple = (3, 4, 5, 6)  # below h = 1/8 the errors hit rounding (~1e-13)
    tsit5_steps: tuple = (3, 4, 5, 6)  # pre-asymptotic above h = 1/8 (slope 5.3-5.8 there)
    tolerances: tuple = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11)
    t1: float = 1.0
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(
            euler_steps=(5, 6, 7, 8, 9),
            bosh3_steps=(3, 4, 5, 6, 7),
            rk4_steps=(2, 3, 4, 5, 6),
            dopri5_steps=(3, 4, 5, 6),
            tsit5_steps=(3, 4, 5, 6),
            tolerances=(1e-3, 1e-5, 1e-7, 1e-9, 1e-11),
        )


# The DOPRI5 propagator as a plain fixed-step tableau (its order conditions are re-checked).
_DP5_FIXED = ButcherTableau(name="dopri5-fixed", c=DOPRI5.c, A=DOPRI5.A, b=DOPRI5.b, order=5)
# the same for the other two embedded pairs, Bogacki-Shampine 3(2) and Tsitouras 5(4)
_BS3_FIXED = ButcherTableau(name="bosh3-fixed", c=BOSH3.c, A=BOSH3.A, b=BOSH3.b, order=3)
_TS5_FIXED = ButcherTableau(name="tsit5-fixed", c=TSIT5.c, A=TSIT5.A, b=TSIT5.b, order=5)


def _problems(rng, t1):
    A = rng.normal(size=(4, 4)) / 2 - 0.2 * np.eye(4)
    z0 = rng.normal(size=4)
    lin = {
        "f": lambda t, z, p: p @ z,
        "y0": z0,
        "params": A,
        "exact": expm(A * t1) @ z0,
    }
    d, hidden, n = 2, 16, 8
    # flowmath's MLP layout; drawn in the order W1, b1, u, W2, b2
    p = [
        {
            "W": rng.normal(size=(d, hidden)) / np.sqrt(d),
            "b": 0.1 * rng.normal(size=hidden),
            "u": rng.normal(size=hidden),
        },
        {"W": rng.normal(size=(hidden, d)) / np.sqrt(hidden), "b": 0.1 * rng.normal(size=d)},
    ]

    def mlp(t, z, p):
        return np.tanh(z @ p[0]["W"] + p[0]["b"] + t * p[0]["u"]) @ p[1]["W"] + p[1]["b"]

    z0 = rng.normal(size=(n, d))
    ref = solve_ivp(
        lambda t, y: mlp(t, y.reshape(n, d), p).ravel(),
        (0.0, t1),
        z0.ravel(),
        method="DOP853",
        rtol=1e-13,
        atol=1e-13,
    )
    nonlin = {"f": mlp, "y0": z0, "params": p, "exact": ref.y[:, -1].reshape(n, d)}
    return {"linear": lin, "nonlinear": nonlin}


def _fixed_errors(prob, tab, ks, t1):
    errs, nfes = [], []
    shape = prob["y0"].shape
    f, p = prob["f"], prob["params"]
    for k in ks:
        ys, counts = integrate(
            lambda t, y: f(t, y.reshape(shape), p).ravel(),
            np.array([0.0, t1]),
            prob["y0"].ravel().astype(float),
            tab,
            1e-6,
            1e-6,
            step_size=2.0**-k,
        )
        errs.append(float(np.abs(ys[-1].reshape(shape) - prob["exact"]).max()))
        nfes.append(counts.nfe)
    return errs, nfes


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    probs = _problems(rng, config.t1)
    from flowmath.ode import EULER, RK4

    methods = {
        "euler": (EULER, config.euler_steps),
        "bosh3 (fixed)": (_BS3_FIXED, config.bosh3_steps),
        "rk4": (RK4, config.rk4_steps),
        "dopri5 (fixed)": (_DP5_FIXED, config.dopri5_steps),
        "tsit5 (fixed)": (_TS5_FIXED, config.tsit5_steps),
    }
    out = {"problems": {}}
    for pname, prob in probs.items():
        res = {"fixed": {}, "adaptive": {}}
        for mname, (tab, ks) in methods.items():
            hs = [2.0**-k for k in ks]
            errs, nfes = _fixed_errors(prob, tab, ks, config.t1)
            # fit on the points above the rounding floor
            keep = [i for i, e in enumerate(errs) if e > 1e-13]
            order = fit_slope(np.log([hs[i] for i in keep]), np.log([errs[i] for i in keep]))[0]
            res["fixed"][mname] = {
                "h": hs,
                "error": errs,
                "nfe": nfes,
                "order": order,
                "theory": THEORY[mname],
            }
        errs, nfes, steps, rej = [], [], [], []
        for tol in config.tolerances:
            sol = solve(
                prob["f"],
                prob["y0"],
                np.array([0.0, config.t1]),
                prob["params"],
                rtol=tol,
                atol=tol,
            )
            errs.append(float(np.abs(sol.ys[-1] - prob["exact"]).max()))
            nfes.append(sol.nfe)
            steps.append(sol.n_accepted)
            rej.append(sol.n_rejected)
        tols = list(config.tolerances)
        res["adaptive"] = {
            "tol": tols,
            "error": errs,
            "nfe": nfes,
            "n_accepted": steps,
            "n_rejected": rej,
            "slope_vs_tol": fit_slope(np.log(tols), np.log(errs))[0],
            # work-precision slope on the tighter half (asymptotic regime)
            "slope_vs_nfe": fit_slope(
                np.log(nfes[len(nfes) // 2 :]), np.log(errs[len(errs) // 2 :])
            )[0],
        }
        out["problems"][pname] = res
    return out


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    from matplotlib.ticker import NullFormatter

    probs = results["problems"]
    fig, axes = plt.subplots(2, 2, figsize=(9.5, 8.8))
    colors = {
        "euler": "C0",
        "bosh3 (fixed)": "C4",
        "rk4": "C1",
        "dopri5 (fixed)": "C2",
        "tsit5 (fixed)": "C3",
    }
    for row, (pname, res) in enumerate(probs.items()):
        ax = axes[row, 0]
        for mname, r in res["fixed"].items():
            ax.loglog(
                r["h"],
                r["error"],
                "o-",
                color=colors[mname],
                label=f"{mname}: fitted order {r['order']:.2f} (theory {r['theory']})",
            )
        ax.set_xlabel("step size h")
        ax.set_ylabel("max |error| at t1")
        ax.set_title(f"{pname}: fixed steps, error vs h")
        # below the axes: inside, five labels always cover some of the points
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7)
        ax = axes[row, 1]
        for mname, r in res["fixed"].items():
            ax.loglog(r["nfe"], r["error"], "o-", color=colors[mname], alpha=0.5, label=mname)
        a = res["adaptive"]
        ax.loglog(
            a["nfe"],
            a["error"],
            "s-",
            color="k",
            label=f"dopri5 adaptive: slope vs NFE {a['slope_vs_nfe']:.2f}, "
            f"vs tol {a['slope_vs_tol']:.2f}",
        )
        for tol, nfe, err in zip(a["tol"], a["nfe"], a["error"], strict=True):
            ax.annotate(
                f"{tol:.0e}", (nfe, err), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("function evaluations (NFE)")
        ax.set_ylabel("max |error| at t1")
        ax.set_title(f"{pname}: work-precision (labels: rtol = atol)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7)
    fig.suptitle(
        "Empirical convergence orders of Euler, Bogacki-Shampine 3, RK4, Dormand-Prince 5 "
        "and Tsitouras 5"
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tex(results: dict) -> str:
    rows = []
    for pname, res in results["problems"].items():
        for mname, r in res["fixed"].items():
            rows.append([pname, mname, r["theory"], f"{r['order']:.2f}"])
        a = res["adaptive"]
        rows.append([pname, "dopri5 adaptive (slope vs NFE)", "-5", f"{a['slope_vs_nfe']:.2f}"])
        rows.append([pname, "dopri5 adaptive (slope vs tol)", "1", f"{a['slope_vs_tol']:.2f}"])
    return tex_table(
        ["problem", "method", "theory", "measured"],
        rows,
        caption="Empirical orders: least-squares slope of log max-error against log step size "
        "(fixed steps) and against log NFE and log tolerance (adaptive Dormand-Prince).",
        label="tab:ode-convergence",
        fmt="{}",
    )
