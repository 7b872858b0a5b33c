"""NFE and cost per evaluation of a CNF against dimension (FFJORD Figure 5, on a CPU).

Exact and Hutchinson traces are compared.

FFJORD (Grathwohl et al. 2019, arXiv:1810.01367, Fig. 5) reports that the number of function
evaluations an adaptive solver needs is roughly independent of the data dimension ``d``, so the
cost of a CNF grows only through the cost of one evaluation: with Hutchinson's estimator one
Jacobian-vector product (the cost of a forward pass, ``O(n H^2)`` for width ``H``), with the exact
trace ``d`` of them (``O(n d H^2)``).

Here the field is a random, fixed MLP (two hidden layers of ``H = min(4d, 512)`` tanh units,
concat time, weights ``N(0, 1/fan_in)``), the state ``[z, log-det]`` is solved by Dormand-Prince
5(4) at ``rtol = atol = tol`` from ``t = 0`` to 1 for a batch of standard-normal points, and the
gradient of the summed log-likelihood (backsolve adjoint, fused VJP) gives the backward NFE.
The exact trace is run up to ``exact_max_dim`` (its memory, ``n d H`` per layer, and time grow
as ``d^3``).
"""

from __future__ import annotations

import dataclasses
import time

import autograd
import autograd.numpy as anp
import numpy as np

import flowmath as fm
from experiments._common import fit_loglog_slope, setup_matplotlib, tex_table
from flowmath.ode.dynamics import CNFDynamics, MLPDynamics

__all__ = ["Config", "plot", "run", "tex"]


@dataclasses.dataclass(frozen=True)
class Config:
    dims: tuple = (2, 4, 8, 16, 32, 64, 128, 256, 512)
    exact_max_dim: int = 64
    batch: int = 128
    tol: float = 1e-5
    t1: float = 1.0
    max_hidden: int = 512
    timing_repeats: int = 7
    seed: int = 0

    @classmethod
    def quick(cls):
        return cls(dims=(2, 4, 8, 16, 32, 64, 128), exact_max_dim=32, batch=64, timing_repeats=3)


def _eval_ms(fn, repeats):
    """Best of ``repeats`` timings (ms): on a shared machine the minimum is the stable figure."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def _measure(field, params, z0, probe, config):
    dyn = CNFDynamics(field, probe)
    n, d = z0.shape
    y0 = np.concatenate([z0, np.zeros((n, 1))], axis=1)
    t = np.array([0.0, config.t1])
    start = time.perf_counter()
    sol = fm.ode.solve(dyn, y0, t, params, rtol=config.tol, atol=config.tol)
    solve_s = time.perf_counter() - start
    stats: dict = {}

    def loss(p):
        ys = fm.odeint(dyn, y0, t, p, rtol=config.tol, atol=config.tol, stats=stats)
        z1, logdet = ys[-1][:, :d], ys[-1][:, d]
        return anp.sum(-0.5 * anp.sum(z1 * z1, axis=1) + logdet)

    autograd.grad(loss)(params)
    back = stats.get("backward", {})
    return {
        "nfe": int(sol.nfe),
        "n_steps": int(sol.n_steps),
        "n_rejected": int(sol.n_rejected),
        "backward_nfe": int(back.get("nfe", -1)) if back else -1,
        "solve_ms": 1e3 * solve_s,  # one solve, wall clock (noisy on a shared machine)
        "eval_ms": _eval_ms(lambda: dyn(0.5, y0, params), config.timing_repeats),
        "vjp_ms": _eval_ms(lambda: dyn.vjp(0.5, y0, params, y0), config.timing_repeats),
    }


def run(config: Config) -> dict:
    """Measured with one BLAS thread (the timings are per-evaluation costs, not throughput;
    on the shared 2-core machines a second BLAS thread waits for a core and makes them erratic).
    """
    from experiments._timing import blas_threads

    old = blas_threads(1)
    try:
        return _run(config)
    finally:
        if old is not None:
            blas_threads(old)


def _run(config: Config) -> dict:
    out = {
        "dims": list(config.dims),
        "hidden": [],
        "exact": {},
        "hutchinson": {},
        "tol": config.tol,
    }
    warm = MLPDynamics((4,))  # load the compiled kernels before anything is timed
    CNFDynamics(warm)(0.0, np.zeros((2, 3)), warm.init(np.random.default_rng(0), 2))
    for d in config.dims:
        rng = np.random.default_rng([config.seed, d])
        hidden = min(4 * d, config.max_hidden)
        out["hidden"].append(hidden)
        field = MLPDynamics((hidden, hidden))
        params = field.init(rng, d)
        z0 = rng.standard_normal((config.batch, d))
        probe = rng.standard_normal((config.batch, d))
        out["hutchinson"][str(d)] = _measure(field, params, z0, probe, config)
        if d <= config.exact_max_dim:
            out["exact"][str(d)] = _measure(field, params, z0, None, config)
    for kind in ("exact", "hutchinson"):
        ds = [int(k) for k in out[kind]]
        # cost exponents where H = 4d and the work (not the per-call overhead) dominates:
        # theory 2 for Hutchinson (n H^2), 3 for the exact trace (n d H^2)
        big = [d for d in ds if 16 <= d and 4 * d <= config.max_hidden]
        out[f"{kind}_slope_dims"] = big
        if len(big) >= 2:
            out[f"{kind}_eval_slope"] = fit_loglog_slope(
                big, [out[kind][str(d)]["eval_ms"] for d in big]
            )
            out[f"{kind}_nfe_slope"] = fit_loglog_slope(ds, [out[kind][str(d)]["nfe"] for d in ds])
    return out


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.4))
    styles = {"exact": ("C3", "s", "exact trace"), "hutchinson": ("C0", "o", "Hutchinson")}
    for kind, (color, marker, label) in styles.items():
        ds = [int(k) for k in results[kind]]
        if not ds:
            continue
        rows = [results[kind][str(d)] for d in ds]
        axes[0].plot(
            ds, [r["nfe"] for r in rows], marker=marker, color=color, label=f"{label}, forward"
        )
        axes[0].plot(
            ds,
            [r["backward_nfe"] for r in rows],
            marker=marker,
            color=color,
            ls="--",
            mfc="none",
            label=f"{label}, backward (backsolve)",
        )
        slope = results.get(f"{kind}_eval_slope")
        span = results.get(f"{kind}_slope_dims") or [0]
        tag = f" (slope {slope:.2f} on d = {span[0]}..{span[-1]})" if slope is not None else ""
        axes[1].loglog(
            ds,
            [r["eval_ms"] for r in rows],
            marker=marker,
            color=color,
            label=f"{label}: one evaluation{tag}",
        )
    axes[0].set_xscale("log", base=2)
    axes[0].set_ylim(bottom=0)
    axes[0].set_xlabel("dimension d")
    axes[0].set_ylabel("function evaluations (NFE)")
    axes[0].set_title("NFE is roughly independent of d")
    axes[0].legend()
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("dimension d (hidden width min(4d, 512))")
    axes[1].set_ylabel("ms per evaluation of [f, div f] (best of repeats)")
    axes[1].set_title("cost per evaluation (exact: about d x Hutchinson)")
    axes[1].legend(loc="upper left")
    fig.suptitle(
        f"CNF solver work against dimension (dopri5, rtol = atol = {results.get('tol', 1e-5):g})",
        fontsize=10,
    )
    fig.savefig(path)
    plt.close(fig)


def tex(results: dict) -> str:
    rows = []
    for i, d in enumerate(results["dims"]):
        h = results["hutchinson"][str(d)]
        e = results["exact"].get(str(d))
        rows.append(
            [
                str(d),
                str(results["hidden"][i]),
                str(h["nfe"]),
                str(h["backward_nfe"]),
                h["eval_ms"],
                str(e["nfe"]) if e else "--",
                e["eval_ms"] if e else None,
            ]
        )
    return tex_table(
        ["$d$", "$H$", "NFE (H)", "NFE back (H)", "ms/eval (H)", "NFE (exact)", "ms/eval (exact)"],
        rows,
        caption="Function evaluations and cost per evaluation of a CNF against dimension "
        "(random two-hidden-layer tanh MLP, dopri5). H: Hutchinson, one Gaussian probe.",
        label="tab:nfe-vs-dimension",
    )
