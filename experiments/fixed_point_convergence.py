"""Fixed-point inverse of an i-ResNet block: error against iteration with the Banach bounds.

For ``F(x) = x + g(x)`` with certified ``Lip(g) <= L < 1`` the iteration
``x^{k+1} = y - g(x^k)``, ``x^0 = y``, obeys (Behrmann et al. 2019, Algorithm 1)

.. math:: \\|x^k - x^*\\| \\le \\frac{L^k}{1-L}\\|x^1 - x^0\\| \\ (\\text{a priori}),
    \\qquad \\|x^k - x^*\\| \\le \\frac{L}{1-L}\\|x^k - x^{k-1}\\| \\ (\\text{a posteriori}).

Two maps per ``c`` in {0.5, 0.7, 0.9, 0.99}, both ``IResBlock`` s with certified ``L = c``:

* worst case: ``g(x) = c Q x`` with ``Q`` Haar-orthogonal (``hidden=()``), so the error contracts
  by exactly ``c`` per iteration; the starting error ``||x^0 - x*|| = ||c Q x*||`` is set to 1;
* an MLP: ``g = W2 ELU(W1 x + b1) + b2`` with both weights normalised to ``sqrt(c)`` (exact
  SVD normalisation), random weights, errors reported relative to ``||x^0 - x*||``.

The iterations to 1e-6 are compared with docs/theory.rst's "about 20, 39, 131, 1375", which are
``ceil(log 1e-6 / log c)`` — the *true* error of the worst case with unit starting error; the
a priori bound needs ``log(1/(1-c)) / log(1/c)`` more iterations (its ``1/(1-L)`` factor).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import flowmath as fm

from ._common import setup_matplotlib, tex_table

REFERENCE = {0.5: 20, 0.7: 39, 0.9: 131, 0.99: 1375}


@dataclasses.dataclass(frozen=True)
class Config:
    cs: tuple = (0.5, 0.7, 0.9, 0.99)
    dim: int = 16
    hidden: int = 64
    n: int = 8
    target: float = 1e-6
    tol: float = 1e-13
    seed: int = 0

    @classmethod
    def quick(cls):
        return cls(dim=6, hidden=16, n=3)


def _first_below(curve, level):
    """First iteration index at which ``curve`` (k = 0, 1, ...) is <= level (None if never)."""
    idx = np.nonzero(np.asarray(curve) <= level)[0]
    return int(idx[0]) if idx.size else None


def _run_map(block, params, x_star, tol):
    y, _ = block.forward(params, x_star)
    _, _, info = block.inverse_with_info(params, y, tol=tol, record=True)
    h = info.history
    err = np.linalg.norm(h["iterates"] - x_star, axis=2)  # (k+1, n)
    e0 = err[0]
    rel = err / e0
    pri = h["a_priori"] / e0
    post = h["a_posteriori"] / e0
    # worst sample at every iteration; the bound must dominate the error sample by sample
    slack = 64 * np.finfo(float).eps * (1 + np.linalg.norm(y, axis=1)) / (1 - info.lipschitz)
    ok = bool(np.all(err[1:] <= np.minimum(h["a_priori"], h["a_posteriori"])[1:] + slack))
    return {
        "L": info.lipschitz,
        "error": rel.max(axis=1).tolist(),
        "a_priori": pri.max(axis=1).tolist(),
        "a_posteriori": post.max(axis=1).tolist(),
        "n_iter": info.n_iter,
        "bound_holds": ok,
        "final_error": float(err[-1].max()),
        "final_bound": float(info.bound.max()),
        "residual_bound": float(info.residual_bound.max()),
    }


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    out = {}
    for c in config.cs:
        d = config.dim
        Q, _ = np.linalg.qr(rng.normal(size=(d, d)))
        lin = fm.IResBlock(hidden=(), coeff=c, logdet="exact")
        lp = [{"W": c * Q.T, "b": np.zeros(d)}]  # g(x) = c Q x (row form x Q^T c)
        xs = rng.normal(size=(config.n, d))
        xs /= c * np.linalg.norm(xs, axis=1, keepdims=True)  # ||x^0 - x*|| = 1
        worst = _run_map(lin, lp, xs, config.tol)
        mlp = fm.IResBlock(hidden=(config.hidden,), coeff=math.sqrt(c), logdet="exact")
        xm = 2.0 * rng.normal(size=(config.n, d))
        mp = mlp.init(rng, xm)
        res_mlp = _run_map(mlp, mp, xm, config.tol)
        t = config.target
        row = {
            "reference": REFERENCE.get(c),
            "theory_true": math.ceil(math.log(t) / math.log(c)),
            "theory_a_priori": math.ceil(math.log(t * (1 - c)) / math.log(c)),
        }
        for name, res in (("worst", worst), ("mlp", res_mlp)):
            row[f"{name}_true"] = _first_below(res["error"], t)
            row[f"{name}_a_priori"] = _first_below(res["a_priori"], t)
            row[f"{name}_a_posteriori"] = _first_below(res["a_posteriori"], t)
            bound = np.minimum(res["a_priori"], res["a_posteriori"])
            row[f"{name}_bound"] = _first_below(bound, t)
        out[str(c)] = {"worst": worst, "mlp": res_mlp, "iterations": row}
    return {"per_c": out, "target": config.target}


def plot(results, path):
    plt = setup_matplotlib()
    per_c = results["per_c"]
    fig, axes = plt.subplots(
        1, len(per_c), figsize=(3.2 * len(per_c), 3.2), squeeze=False, sharey=True
    )
    t = results["target"]
    for ax, (c, res) in zip(axes[0], per_c.items(), strict=True):
        for name, col in (("worst", "C0"), ("mlp", "C1")):
            r = res[name]
            k = np.arange(len(r["error"]))
            label = "worst case (g = cQx)" if name == "worst" else "MLP block"
            ax.semilogy(
                k, np.maximum(r["error"], 1e-17), color=col, lw=1.6, label=f"{label}: error"
            )
            ax.semilogy(
                k[1:],
                r["a_priori"][1:],
                color=col,
                ls="--",
                lw=1,
                label="a priori $L^k\\|x^1-x^0\\|/(1-L)$",
            )
            ax.semilogy(
                k[1:],
                r["a_posteriori"][1:],
                color=col,
                ls=":",
                lw=1,
                label="a posteriori $L\\|x^k-x^{k-1}\\|/(1-L)$",
            )
        ax.axhline(t, color="gray", lw=0.8)
        ref = res["iterations"]["reference"]
        if ref is not None:
            ax.axvline(ref, color="k", lw=0.8, ls="-.", label=f"reference {ref} it.")
        ax.set_title(f"c = L = {c}")
        ax.set_xlabel("iteration k")
        ax.set_ylim(1e-17, 1e3)
    axes[0][0].set_ylabel("||x^k - x*|| / ||x^0 - x*||")
    axes[0][0].legend(loc="lower left", fontsize=6)
    fig.suptitle(
        "Fixed-point inverse: error (solid) never exceeds the Banach bounds (dashed, dotted)"
    )
    fig.savefig(path)
    plt.close(fig)


def tex(results) -> str:
    rows = []
    for c, res in results["per_c"].items():
        it = res["iterations"]
        rows.append(
            [
                c,
                it["reference"],
                it["worst_true"],
                it["worst_a_posteriori"],
                it["worst_a_priori"],
                it["theory_a_priori"],
                it["mlp_true"],
                it["mlp_bound"],
            ]
        )
    return tex_table(
        ["c", "ref.", "true", "a post.", "a priori", "theory a priori", "MLP true", "MLP bound"],
        rows,
        caption=(
            "Fixed-point iterations to reach $10^{-6}$ (relative to $\\|x^0 - x^*\\|$). "
            "Worst case $g(x) = cQx$: true error, a posteriori and a priori Banach bounds; "
            "the reference numbers are $\\lceil \\log 10^{-6} / \\log c\\rceil$, the true "
            "error. MLP block: true error and the stopping bound."
        ),
        label="tab:fixed-point",
        fmt="{:.0f}",
    )
