"""Time per training iteration: plain i-ResNet, + spectral norm, + log-det, and a Glow-style flow.

The lecture's table (i-ResNet paper, GPU): plain i-ResNet 0.31 s, with spectral normalisation
0.57 s, with spectral normalisation and log-det 1.88 s, Glow 0.72 s per iteration — as ratios
to the plain network 1 : 1.84 : 6.06 : 2.32. Here, on vectors (CPU, NumPy + autograd), one
training iteration is: loss, its gradient (``autograd.value_and_grad``), an Adam update and, for
spectrally normalised blocks, the power-iteration state update:

* ``plain``: ``z = x + g(x)`` per block with the raw weights, loss ``mean |z|^2 / 2`` (no log-det);
* ``+ SN``: the same with the weights spectrally normalised (one power iteration per call,
  the state carried by ``IResBlock.update_state``);
* ``+ SN + log-det``: ``-mean log p(x)`` of ``Flow(Chain(IResBlock(logdet="series")))``, 10
  power-series terms, one Gaussian probe, backpropagated through every term — flowmath's
  default, which also *certifies* ``Lip(g) < 1`` on every call (a Gram/Cholesky certificate
  per weight, recomputed because Adam changes the weights); the row ``(no certificate)``
  switches that check off to show its cost;
* ``Residual Flow``: roulette estimator (geometric p = 0.5, one exact term) with the
  Neumann-series gradient;
* ``Glow (vectors)``: ``fm.Glow`` is image-only (conv conditioners), so the matched flow is the
  vector Glow step ``ActNorm -> LULinear -> AffineCoupling(MLP)``, one step per residual block,
  the same hidden widths (parameter counts reported).

Ratios are medians over cycles that run every variant once (alternating, after a warm-up); the
quartiles of the per-cycle ratios are reported beside them, so that two variants whose ranges
overlap are read as not distinguished by the run. At quick settings an iteration takes a few
milliseconds and one disturbed cycle moves a median of three, which once ranked ``+ SN`` below
the plain network: the quick config therefore runs 15 cycles (cheap at that size), and the
table states the spread instead of hiding it.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import autograd
import autograd.numpy as anp
import numpy as np

import flowmath as fm
from flowmath._pytree import tree_size
from flowmath.layers.residual import _mlp
from flowmath.train import Adam

from ._common import setup_matplotlib, tex_table

PAPER = {"plain": 0.31, "sn": 0.57, "sn_logdet": 1.88, "glow": 0.72}
LABELS = {
    "plain": "plain i-ResNet",
    "sn": "+ SN",
    "sn_logdet": "+ SN + log-det",
    "sn_logdet_nocert": "+ SN + log-det (no certificate)",
    "residual_flow": "Residual Flow (roulette, Neumann grad.)",
    "glow": "Glow (vectors)",
}


@dataclasses.dataclass(frozen=True)
class Config:
    dim: int = 32
    blocks: int = 4
    hidden: tuple = (128, 128)
    batch: int = 256
    n_terms: int = 10
    cycles: int = 21  # the quartiles of the per-cycle ratios need a few dozen cycles
    lr: float = 1e-4
    seed: int = 0

    @classmethod
    def quick(cls):
        # 15 cycles: an iteration is ~5 ms here, so the noise of a shared machine needs more
        # rounds than at full size for a stable median (3 cycles once put "+ SN" below "plain")
        return cls(dim=16, blocks=2, hidden=(64, 64), batch=128, cycles=15)


def _count(params):
    """Trained scalars of a chain's parameters: all but the power-iteration vectors ``u``."""
    return tree_size(params) - tree_size([p.get("u") for p in params if isinstance(p, dict)])


def _make_variants(config, rng, x):
    blocks = [
        fm.IResBlock(config.hidden, logdet="series", n_terms=config.n_terms, spectral="power")
        for _ in range(config.blocks)
    ]
    chain = fm.Chain(blocks)
    flow = fm.Flow(chain)
    res_params = flow.init(rng, x)
    nocert = fm.Flow(
        fm.Chain(
            [
                fm.IResBlock(
                    config.hidden,
                    logdet="series",
                    n_terms=config.n_terms,
                    spectral="power",
                    check_lipschitz=False,
                )
                for _ in range(config.blocks)
            ]
        )
    )
    rflow = fm.Flow(
        fm.Chain(
            [
                fm.IResBlock(
                    config.hidden, logdet="roulette", spectral="power", neumann_gradient=True
                )
                for _ in range(config.blocks)
            ]
        )
    )
    glow_layers = []
    for k in range(config.blocks):
        glow_layers += [
            fm.ActNorm(),
            fm.LULinear(),
            fm.AffineCoupling("half", config.hidden, flip=bool(k % 2)),
        ]
    glow = fm.Flow(fm.Chain(glow_layers))
    glow_params = glow.init(rng, x)

    def plain_loss(params, batch, r):
        z = batch
        for p in params:
            z = z + _mlp(z, [q["W"] for q in p], [q["b"] for q in p], "elu")[0]
        return 0.5 * anp.mean(anp.sum(z * z, axis=1))

    def sn_loss(params, batch, r):
        z = batch
        for block, p in zip(blocks, params, strict=True):
            Wn, bs, _ = block.normalized_weights(p)
            z = z + _mlp(z, Wn, bs, "elu")[0]
        return 0.5 * anp.mean(anp.sum(z * z, axis=1))

    def nll(f):
        # Chain rejects a boxed list (autograd boxes the whole tree), so unbox the list level
        def loss(params, batch, r):
            plain = [params[i] for i in range(len(params))]
            return -anp.mean(f.log_prob(plain, batch, r))

        return loss

    def update_state(params):
        return [b.update_state(p) for b, p in zip(blocks, params, strict=True)]

    variants = {
        "plain": (plain_loss, res_params, None),
        "sn": (sn_loss, res_params, update_state),
        "sn_logdet": (nll(flow), res_params, update_state),
        "sn_logdet_nocert": (nll(nocert), res_params, update_state),
        "residual_flow": (nll(rflow), res_params, update_state),
        "glow": (nll(glow), glow_params, None),
    }
    counts = {"residual": _count(res_params), "glow": _count(glow_params)}
    return variants, counts


def run(config: Config) -> dict:
    rng = np.random.default_rng(config.seed)
    data = (
        rng.normal(size=(8 * config.batch, config.dim))
        @ rng.normal(size=(config.dim, config.dim))
        / np.sqrt(config.dim)
    )
    variants, counts = _make_variants(config, rng, data[: config.batch])
    opt = Adam(config.lr)
    state = {}
    for name, (loss, params, _) in variants.items():
        state[name] = (params, opt.init(params), autograd.value_and_grad(loss))

    def step(name, i):
        params, ostate, vg = state[name]
        batch = data[(i % 8) * config.batch : (i % 8 + 1) * config.batch]
        t = time.perf_counter()
        value, grads = vg(params, batch, np.random.default_rng(i))
        params, ostate = opt.update(params, grads, ostate)
        upd = variants[name][2]
        if upd is not None:
            params = upd(params)
        dt = time.perf_counter() - t
        if not np.isfinite(value):
            raise FloatingPointError(f"{name}: loss became non-finite at iteration {i}")
        state[name] = (params, ostate, vg)
        return dt

    names = list(variants)
    for name in names:  # warm-up
        step(name, 0)
    times = {name: [] for name in names}
    for i in range(1, config.cycles + 1):
        for name in names:
            times[name].append(step(name, i))
    per_cycle = {
        name: [t / p for t, p in zip(times[name], times["plain"], strict=True)] for name in names
    }
    ratios = {name: statistics.median(r) for name, r in per_cycle.items()}
    quartiles = {name: np.quantile(r, [0.25, 0.75]).tolist() for name, r in per_cycle.items()}
    paper_ratio = {k: v / PAPER["plain"] for k, v in PAPER.items()}
    return {
        "median_s": {name: statistics.median(times[name]) for name in names},
        "ratio_to_plain": ratios,
        "ratio_quartiles": quartiles,
        "paper_ratio_to_plain": paper_ratio,
        "paper_s": PAPER,
        "n_params": counts,
    }


def plot(results, path):
    plt = setup_matplotlib()
    names = list(results["ratio_to_plain"])
    ours = [results["ratio_to_plain"][n] for n in names]
    paper = [results["paper_ratio_to_plain"].get(n, np.nan) for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    y = np.arange(len(names))
    q = results.get("ratio_quartiles")
    xerr = None
    if q is not None:  # the quartiles of the per-cycle ratios
        lo, hi = np.array([q[n] for n in names]).T
        xerr = np.vstack([np.array(ours) - lo, hi - np.array(ours)])
    ax.barh(
        y + 0.2,
        ours,
        height=0.38,
        xerr=xerr,
        capsize=2,
        label="flowmath (CPU, this run; whiskers: quartiles)",
    )
    ax.barh(y - 0.2, paper, height=0.38, label="i-ResNet paper (GPU)")
    ax.set_yticks(y, [LABELS[n] for n in names])
    ax.invert_yaxis()
    ax.set_xlabel("time per training iteration / plain i-ResNet")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.legend(loc="lower right")
    ax.set_title("Running time per training iteration, relative to the plain i-ResNet")
    fig.savefig(path)
    plt.close(fig)


def tex(results) -> str:
    rows = []
    for name, r in results["ratio_to_plain"].items():
        paper = results["paper_ratio_to_plain"].get(name)
        lo, hi = results["ratio_quartiles"][name]
        rows.append(
            [
                LABELS[name],
                1e3 * results["median_s"][name],
                r,
                f"{lo:.2f}--{hi:.2f}",
                paper if paper is not None else None,
            ]
        )
    return tex_table(
        ["model", "ms / iteration", "ratio", "quartiles", "paper ratio"],
        rows,
        caption=(
            "Time per training iteration (loss, gradient, Adam step, power-iteration "
            "state), relative to a plain i-ResNet: median and quartiles of the per-cycle "
            "ratios (overlapping ranges are not distinguished by the run); the paper's GPU "
            "figures 0.31 : 0.57 : 1.88 : 0.72 s as ratios for context."
        ),
        label="tab:running-time",
    )
