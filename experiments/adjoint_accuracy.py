"""Adjoint accuracy: gradient error of backsolve, checkpoint and direct against the exact gradient.

Problem with an exact gradient: ``dz/dt = A z`` on ``R^8`` (``A`` random, entries
``N(0, 1/(2 d))``, minus ``0.1 I``; eight initial states), ``L = sum_i c^T z_i(T)`` with
``T = 2``.  Then

.. math::

    \\frac{\\partial L}{\\partial A} = \\sum_i L_{\\exp}(T A^\\top, c\\, z_{i,0}^\\top)\\, T,
    \\qquad \\frac{\\partial L}{\\partial z_{i,0}} = e^{T A^\\top} c,

with :math:`L_{\\exp}` the Frechet derivative of the matrix exponential
(:func:`scipy.linalg.expm_frechet`).  For every tolerance ``rtol = atol = 10^-k`` the three
adjoint modes of :func:`flowmath.ode.solve` compute the gradient; reported are the relative error
``max|g - g*| / max|g*|`` (with respect to ``A``), the forward NFE and the backward
vector-Jacobian products (each about one forward and one backward pass through ``f``; a
backsolve evaluation of the augmented system is one such product), the reconstruction drift
``||z_hat(0) - z(0)||`` of backsolve, and the memory in stored states (units of one state
``z``: outputs for backsolve, stage inputs for checkpoint, traced stage inputs for direct, a
lower bound of its tape).

A second, nonlinear problem (the tanh MLP field of the W1 benchmark, d = 2, hidden 16, batch 16,
``L = sum z(1)^2``) has no closed-form gradient; its reference is the checkpoint gradient at
``rtol = atol = 1e-12`` (the exact gradient of a discrete solve whose own error is ~1e-12).

Expected: checkpoint and direct agree to rounding (both are the exact gradient of the same
discrete solve) and their error follows the forward solve's error; backsolve's error adds the
error of the reverse-time integration of ``[z, a, a_theta]`` at the same tolerance.

References
----------
Chen, Rubanova, Bettencourt, Duvenaud (2018), "Neural Ordinary Differential Equations",
arXiv:1806.07366.
Al-Mohy, Higham (2009), "Computing the Frechet derivative of the matrix exponential", SIAM J.
Matrix Anal. Appl. 30.
Zhuang et al. (2020), "Adaptive Checkpoint Adjoint Method", arXiv:2006.02493.
"""

from __future__ import annotations

import dataclasses

import autograd.numpy as anp
import numpy as np
from autograd import grad
from scipy.linalg import expm, expm_frechet

from experiments._common import fit_slope, setup_matplotlib, tex_table
from flowmath.ode import solve

__all__ = ["Config", "plot", "run", "tex"]

MODES = ("backsolve", "checkpoint", "direct")


@dataclasses.dataclass(frozen=True)
class Config:
    tolerances: tuple = (1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11)
    dim: int = 8
    batch: int = 8
    T: float = 2.0
    nonlinear: bool = True
    seed: int = 0

    @classmethod
    def quick(cls) -> Config:
        return cls(tolerances=(1e-3, 1e-5, 1e-7, 1e-9, 1e-11))


def _linear_problem(rng, d, n, T):
    A = rng.normal(size=(d, d)) / np.sqrt(2 * d) - 0.1 * np.eye(d)
    z0 = rng.normal(size=(n, d))
    c = rng.normal(size=d)
    # L = sum_i c^T expm(T A) z_i  =>  dL/dA = T * L_expm(T A^T, c (sum_i z_i)^T)
    exact = T * expm_frechet(T * A.T, np.outer(c, z0.sum(0)), compute_expm=False)
    exact_z0 = np.tile(expm(T * A).T @ c, (n, 1))
    return A, z0, c, exact, exact_z0


def _linear(t, z, A):
    return anp.dot(z, A.T)


def _mlp(t, z, p):
    """tanh(z W1 + b1 + t u) W2 + b2, in flowmath's MLP layout (a list of layer dicts)."""
    h = anp.tanh(anp.dot(z, p[0]["W"]) + p[0]["b"] + t * p[0]["u"])
    return anp.dot(h, p[1]["W"]) + p[1]["b"]


def _mlp_problem(rng, d=2, hidden=16, n=16):
    # flowmath's MLP layout; drawn in the order W1, b1, u, W2, b2
    p = [
        {
            "W": rng.normal(size=(d, hidden)) / np.sqrt(d),
            "b": 0.1 * rng.normal(size=hidden),
            "u": rng.normal(size=hidden),
        },
        {"W": rng.normal(size=(hidden, d)) / np.sqrt(hidden), "b": 0.1 * rng.normal(size=d)},
    ]
    return p, rng.normal(size=(n, d))


def _flat(tree):
    from flowmath._pytree import leaves

    return np.concatenate([np.ravel(x) for x in leaves(tree)])


def _grad_with_stats(f, z0, params, t, loss_of_ys, mode, tol):
    box = []

    def loss(params, z0):
        sol = solve(f, z0, t, params, rtol=tol, atol=tol, adjoint=mode, max_steps=100_000)
        box.append(sol)
        return loss_of_ys(sol.ys)

    g_p, g_z = grad(loss, (0, 1))(params, z0)
    sol = box[0]
    return g_p, g_z, sol


def _record(sol):
    bw = sol.backward
    return {
        "fwd_nfe": sol.nfe,
        "fwd_steps": sol.n_accepted,
        "bwd_nfe": bw.nfe,
        "bwd_vjp": bw.n_vjp,
        "bwd_steps": bw.n_steps,
        "drift": bw.drift,
        "stored_states": bw.n_stored_states,
    }


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    A, z0, c, exact, exact_z0 = _linear_problem(rng, config.dim, config.batch, config.T)
    t = np.array([0.0, config.T])
    out = {"tolerances": list(config.tolerances), "linear": {}, "nonlinear": {}}
    for mode in MODES:
        rows = []
        for tol in config.tolerances:
            g_A, g_z, sol = _grad_with_stats(
                _linear, z0, A, t, lambda ys: anp.sum(anp.dot(ys[-1], c)), mode, tol
            )
            rec = _record(sol)
            rec["rel_error"] = float(np.abs(g_A - exact).max() / np.abs(exact).max())
            rec["rel_error_z0"] = float(np.abs(g_z - exact_z0).max() / np.abs(exact_z0).max())
            rows.append(rec)
        out["linear"][mode] = rows
    if config.nonlinear:
        p, zm = _mlp_problem(rng)
        t1 = np.array([0.0, 1.0])

        def loss_ys(ys):
            return anp.sum(ys[-1] ** 2)

        ref_p, ref_z, _ = _grad_with_stats(_mlp, zm, p, t1, loss_ys, "checkpoint", 1e-12)
        ref = np.concatenate([_flat(ref_p), ref_z.ravel()])
        for mode in MODES:
            rows = []
            for tol in config.tolerances:
                g_p, g_z, sol = _grad_with_stats(_mlp, zm, p, t1, loss_ys, mode, tol)
                g = np.concatenate([_flat(g_p), g_z.ravel()])
                rec = _record(sol)
                rec["rel_error"] = float(np.abs(g - ref).max() / np.abs(ref).max())
                rows.append(rec)
            out["nonlinear"][mode] = rows
    # agreement of checkpoint and direct (the exact gradient of the same discrete solve)
    out["checkpoint_vs_direct_max_rel_gap"] = float(
        max(
            abs(a["rel_error"] - b["rel_error"])
            for prob in ("linear", "nonlinear")
            if out[prob]
            for a, b in zip(out[prob]["checkpoint"], out[prob]["direct"], strict=True)
        )
    )
    tols = np.log(config.tolerances)
    out["slopes"] = {
        prob: {
            m: fit_slope(tols, np.log([max(r["rel_error"], 1e-16) for r in out[prob][m]]))[0]
            for m in MODES
        }
        for prob in ("linear", "nonlinear")
        if out[prob]
    }
    return out


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    tols = results["tolerances"]
    probs = [p for p in ("linear", "nonlinear") if results[p]]
    fig, axes = plt.subplots(len(probs), 3, figsize=(12, 3.6 * len(probs)), squeeze=False)
    style = {"backsolve": ("C0", "o-"), "checkpoint": ("C1", "s-"), "direct": ("C2", "x--")}
    for row, prob in enumerate(probs):
        res = results[prob]
        ax = axes[row, 0]
        for mode, rows in res.items():
            col, mk = style[mode]
            ax.loglog(
                tols,
                [r["rel_error"] for r in rows],
                mk,
                color=col,
                label=f"{mode} (slope {results['slopes'][prob][mode]:.2f})",
            )
        drift = [r["drift"] for r in res["backsolve"]]
        ax.loglog(tols, drift, ":", color="C0", label="backsolve drift ||z_hat(0) - z(0)||")
        ax.loglog(tols, tols, color="0.6", lw=0.8, label="tolerance")
        ref = "expm_frechet (exact)" if prob == "linear" else "checkpoint at 1e-12"
        ax.set_title(f"{prob}: gradient error vs {ref}")
        ax.set_xlabel("rtol = atol")
        ax.set_ylabel("max |g - g*| / max |g*|")
        ax.invert_xaxis()
        ax.legend()
        ax = axes[row, 1]
        for mode, rows in res.items():
            col, mk = style[mode]
            ax.loglog(
                tols,
                [r["fwd_nfe"] + r["bwd_vjp"] for r in rows],
                mk,
                color=col,
                label=f"{mode}: forward NFE + backward VJPs",
            )
        ax.loglog(
            tols,
            [r["fwd_nfe"] for r in res["checkpoint"]],
            color="0.5",
            lw=0.8,
            label="forward NFE alone",
        )
        ax.set_title(f"{prob}: cost of one gradient")
        ax.set_xlabel("rtol = atol")
        ax.set_ylabel("evaluations")
        ax.invert_xaxis()
        ax.legend()
        ax = axes[row, 2]
        for mode, rows in res.items():
            col, mk = style[mode]
            ax.loglog(tols, [r["stored_states"] for r in rows], mk, color=col, label=mode)
        ax.set_title(f"{prob}: memory (stored states)")
        ax.set_xlabel("rtol = atol")
        ax.set_ylabel("states of size z kept for the backward pass")
        ax.invert_xaxis()
        ax.legend()
    fig.suptitle("Adjoint gradients: error, cost and memory of backsolve, checkpoint, direct")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tex(results: dict) -> str:
    rows = []
    tols = results["tolerances"]
    for prob in ("linear", "nonlinear"):
        if not results[prob]:
            continue
        for mode, recs in results[prob].items():
            for tol, r in zip(tols, recs, strict=True):
                if tol not in (tols[0], tols[len(tols) // 2], tols[-1]):
                    continue
                rows.append(
                    [
                        prob,
                        mode,
                        f"{tol:.0e}",
                        f"{r['rel_error']:.1e}",
                        str(r["fwd_nfe"]),
                        str(r["bwd_vjp"]),
                        str(r["stored_states"]),
                        "--" if r["drift"] is None else f"{r['drift']:.1e}",
                    ]
                )
    return tex_table(
        [
            "problem",
            "adjoint",
            "tol",
            "rel. grad. error",
            "fwd NFE",
            "bwd VJPs",
            "stored states",
            "drift",
        ],
        rows,
        caption="Gradient error of the three adjoint modes against the exact gradient "
        "(linear: expm\\_frechet; nonlinear: checkpoint at tolerance $10^{-12}$), with the "
        "forward evaluations, the backward vector-Jacobian products and the memory in stored "
        "states.",
        label="tab:adjoint-accuracy",
        fmt="{}",
    )
