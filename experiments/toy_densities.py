"""FFJORD's Figure 2 on the 2-D toys: FFJORD, Glow, Real NVP, MAF and a Residual Flow trained
on multi-modal and discontinuous densities, their test NLL against the entropy bound, and the
claim that "Glow has trouble modeling the areas of low probability", measured.

Each model (:mod:`flowmath.models`) is trained with :func:`flowmath.train.fit` (Adam, cosine
schedule with warm-up, gradient clipping, validation every ``eval_every`` steps, the
best-validated parameters kept) on fresh samples of each toy, seeded per (seed, toy, model).
FFJORD trains with Hutchinson's trace (one Gaussian probe per solve) and is evaluated with the
exact trace; the Residual Flow trains with Russian roulette and is evaluated with the dense
log-det (:func:`flowmath.models.exact`). Reported:

* test NLL in nats, with its standard error over the test set and, over the training seeds, the
  standard deviation of the seed means;
* the entropy of each toy, the lower bound of any model's expected test NLL: exact for
  ``checkerboard`` (uniform on area 32: ``ln 32``), by Monte Carlo on the exact mixture density
  for ``8gaussians``, and by the Kozachenko-Leonenko nearest-neighbour estimator for
  ``pinwheel`` and ``2spirals`` (whose densities have no closed form), whose own bias is
  measured on the two toys with exact entropies;
* the NLL of a full-covariance Gaussian fitted to the training set;
* the probability mass each model puts where the data has none or little: the 8 empty squares
  of the checkerboard, and the region between the 8 Gaussians (farther than 3 standard
  deviations from every centre: a little under e^{-4.5} = 1.1 % because the tails of
  neighbouring modes overlap; measured on samples, 1.0 %), by quadrature of the model density
  on a grid.

The models are the recipes at the paper's toy settings except FFJORD's field, 32-32-32 instead
of 64-64-64 (a third of the cost per step here), and the budgets: hundreds of steps, where the
paper trains for 10 000 iterations. Full settings take 33 min with ``flowmath reproduce
toy_densities --jobs 4`` on this project's loaded 2-core machine (60 runs of 1.5-5 min each on one
core); quick settings (one seed, tens of steps) under 2 min.

References
----------
Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, "FFJORD: free-form continuous dynamics for
scalable reversible generative models", ICLR 2019, arXiv:1810.01367 (Figure 2).
Kozachenko & Leonenko, "Sample estimate of the entropy of a random vector", Problems Inform.
Transmission 23, 1987.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types

import numpy as np
from scipy.special import digamma, logsumexp

import flowmath as fm
from experiments._common import EXECUTION_FIELDS, config_dict, setup_matplotlib, tex_table

__all__ = [
    "Config",
    "checkerboard_dark",
    "eight_gaussians_log_density",
    "entropy",
    "knn_entropy",
    "plot",
    "run",
    "tex",
]

TOYS = ("8gaussians", "checkerboard", "2spirals", "pinwheel")
MODELS = ("ffjord", "glow", "realnvp", "maf", "residual_flow")
LABELS = {
    "ffjord": "FFJORD",
    "glow": "Glow",
    "realnvp": "Real NVP",
    "maf": "MAF",
    "residual_flow": "Residual Flow",
}
EXTENT = 4.0  # every figure and quadrature uses [-4, 4]^2
HIST_BINS = 60  # sample histograms in the figure
SIGMA_8G = 0.5 / 1.414  # the mixture's component std after FFJORD's division by 1.414


@dataclasses.dataclass(frozen=True)
class Config:
    toys: tuple = TOYS
    models: tuple = MODELS
    seeds: tuple = (0, 1, 2)
    n_train: int = 20000
    n_valid: int = 2000
    n_test: int = 10000
    batch_size: int = 256
    # steps per model: FFJORD and the Residual Flow cost 5-10x a coupling step
    steps: tuple = (
        ("ffjord", 300),
        ("glow", 1000),
        ("realnvp", 1000),
        ("maf", 1000),
        ("residual_flow", 400),
    )
    lr: float = 5e-3
    warmup: int = 50
    clip_norm: float = 50.0
    eval_every: int = 100
    grid: int = 120
    n_samples: int = 10000
    entropy_samples: int = 400_000
    seed: int = 0
    # execution only (results do not depend on it; `flowmath reproduce --jobs N` or
    # `--scheduler ADDRESS` choose where the runs execute): the cache of finished runs
    cache_dir: str | None = "results/toy_densities_cache"

    @classmethod
    def quick(cls):
        return cls(
            seeds=(0,),
            n_train=4000,
            n_valid=500,
            n_test=2000,
            steps=(
                ("ffjord", 40),
                ("glow", 80),
                ("realnvp", 80),
                ("maf", 80),
                ("residual_flow", 30),
            ),
            eval_every=20,
            grid=60,
            n_samples=4000,
            entropy_samples=40_000,
            cache_dir=None,
        )


# -- the toys' exact quantities -------------------------------------------------------------------


def eight_gaussians_log_density(x):
    """Exact log-density of ``8gaussians`` (equal mixture, centres ``4 e^{i k pi/4} / 1.414``,
    std ``0.5 / 1.414``)."""
    x = np.asarray(x, dtype=np.float64)
    k = np.arange(8) * (math.pi / 4)
    centres = 4.0 * np.stack([np.cos(k), np.sin(k)], axis=1) / 1.414
    sq = np.sum((x[:, None, :] - centres[None]) ** 2, axis=2)
    comp = -0.5 * sq / SIGMA_8G**2 - math.log(2 * math.pi * SIGMA_8G**2)
    return logsumexp(comp, axis=1) - math.log(8)


def eight_gaussians_far(x):
    """Points farther than 3 component standard deviations from every centre."""
    k = np.arange(8) * (math.pi / 4)
    centres = 4.0 * np.stack([np.cos(k), np.sin(k)], axis=1) / 1.414
    sq = np.sum((np.asarray(x)[:, None, :] - centres[None]) ** 2, axis=2)
    return np.all(sq > (3 * SIGMA_8G) ** 2, axis=1)


def checkerboard_dark(x):
    """The squares of [-4, 4]^2 that carry the checkerboard's mass: ``floor(x/2)`` and
    ``floor(y/2)`` of equal parity."""
    x = np.asarray(x)
    a, b = np.floor(x[:, 0] / 2), np.floor(x[:, 1] / 2)
    inside = np.all(np.abs(x) <= EXTENT, axis=1)
    return inside & (a % 2 == b % 2)


def knn_entropy(x, k: int = 4, n_splits: int = 10):
    """Kozachenko-Leonenko entropy estimate (nats) of the sample ``x`` (n, d) and its standard
    error over ``n_splits`` disjoint parts:

    .. math:: \\hat H = \\psi(n) - \\psi(k) + \\log V_d + \\frac{d}{n} \\sum_i \\log \\varepsilon_i,

    with :math:`\\varepsilon_i` the distance to the ``k``-th nearest neighbour and :math:`V_d`
    the volume of the unit ball."""
    from scipy.spatial import cKDTree

    x = np.asarray(x, dtype=np.float64)
    n, d = x.shape
    log_vd = (d / 2) * math.log(math.pi) - math.lgamma(d / 2 + 1)

    def estimate(part):
        m = len(part)
        dist, _ = cKDTree(part).query(part, k=k + 1)
        return digamma(m) - digamma(k) + log_vd + d * np.mean(np.log(dist[:, k]))

    parts = [estimate(p) for p in np.array_split(x, n_splits)]
    # the whole sample has a smaller bias than its parts; the parts give the spread
    return float(estimate(x)), float(np.std(parts, ddof=1) / math.sqrt(n_splits))


def entropy(name: str, n: int, rng):
    """``(H, standard error, method)`` of toy ``name`` in nats."""
    if name == "checkerboard":
        return math.log(8 * 2 * 2), 0.0, "exact: ln 32"
    x = fm.data.toy(name, n, rng)
    if name == "8gaussians":
        lp = eight_gaussians_log_density(x)
        return float(-lp.mean()), float(lp.std(ddof=1) / math.sqrt(n)), "Monte Carlo, exact p"
    h, se = knn_entropy(x)
    return h, se, "nearest neighbours (k = 4)"


def gaussian_nll(train, test):
    """Test NLL (nats) of the full-covariance Gaussian fitted to ``train`` by maximum
    likelihood; per example."""
    mu = train.mean(axis=0)
    cov = np.cov(train, rowvar=False, bias=True)
    diff = test - mu
    _, logdet = np.linalg.slogdet(cov)
    maha = np.sum(diff * np.linalg.solve(cov, diff.T).T, axis=1)
    return 0.5 * (maha + logdet + test.shape[1] * math.log(2 * math.pi))


# -- one training run -----------------------------------------------------------------------------


def _recipe(name):
    return {
        # the paper's field is 64-64-64; 32-32-32 costs a third per step on this CPU
        "ffjord": lambda: fm.models.ffjord(2, hidden=(32, 32, 32)),
        "glow": lambda: fm.models.glow(2, levels=1, steps=4),
        "realnvp": lambda: fm.models.realnvp(2, n_couplings=8),
        "maf": lambda: fm.models.maf(2, n_layers=5),
        "residual_flow": lambda: fm.models.residual_flow(2, n_blocks=4),
    }[name]()


def _grid(config):
    g = np.linspace(-EXTENT, EXTENT, config.grid + 1)
    centres = 0.5 * (g[1:] + g[:-1])
    xx, yy = np.meshgrid(centres, centres, indexing="xy")
    return np.stack([xx.ravel(), yy.ravel()], axis=1), (g[1] - g[0]) ** 2


def _data(config, toy, seed):
    rng = np.random.default_rng([config.seed, seed, TOYS.index(toy)])
    n = config.n_train + config.n_valid + config.n_test
    x = fm.data.toy(toy, n, rng)
    a, b = config.n_train, config.n_train + config.n_valid
    return x[:a], x[a:b], x[b:]


def _one(run: dict) -> dict:
    """One (toy, model, seed) training run; ``run`` holds the config fields it reads."""
    config = types.SimpleNamespace(**run)
    toy, model, seed = run["toy"], run["model"], run["seed"]
    train, valid, test = _data(config, toy, seed)
    rng = np.random.default_rng([config.seed, seed, TOYS.index(toy), MODELS.index(model), 1])
    flow = _recipe(model)
    evaluate = fm.models.exact(flow)
    params = flow.init(rng, train[: config.batch_size])
    stochastic = flow.layer.stochastic

    def loss(p, batch, r):
        return -flow.log_prob(p, batch, r if stochastic else None)

    def valid_loss(p, batch, r):
        return -evaluate.log_prob(p, batch)

    steps = dict(config.steps)[model]
    start = time.perf_counter()
    params, result = fm.train.fit(
        loss,
        params,
        train,
        valid=valid,
        valid_loss=valid_loss,
        rng=rng,
        steps=steps,
        batch_size=config.batch_size,
        optimizer=fm.train.Adam(config.lr),
        schedule=fm.train.Cosine(warmup=config.warmup),
        clip_norm=config.clip_norm,
        eval_every=min(config.eval_every, steps),
        progress=False,
    )
    train_time = time.perf_counter() - start
    nll = -evaluate.log_prob(params, test)
    grid, cell = _grid(config)
    logp = evaluate.log_prob(params, grid)
    density = np.exp(logp)
    out = {
        "toy": toy,
        "model": model,
        "seed": seed,
        "steps": steps,
        "train_time": train_time,
        "best_step": result.best_step,
        "test_nll": float(nll.mean()),
        "test_nll_se": float(nll.std(ddof=1) / math.sqrt(len(nll))),
        "valid_steps": result.valid_steps.tolist(),
        "valid_nll": result.valid_nll.tolist(),
        "box_mass": float(density.sum() * cell),
    }
    if toy == "checkerboard":
        out["low_mass"] = float(density[~checkerboard_dark(grid)].sum() * cell)
    elif toy == "8gaussians":
        out["low_mass"] = float(density[eight_gaussians_far(grid)].sum() * cell)
    if run["first_seed"]:
        # the figure's density image at half the quadrature resolution (log10, 3 decimals)
        g = config.grid // 2
        img = density.reshape(g, 2, g, 2).mean(axis=(1, 3))
        out["log10_density"] = np.round(np.log10(np.maximum(img, 1e-30)), 3).tolist()
        out["sample_hist"] = _hist(flow.sample(params, config.n_samples, rng))
    return out


def _hist(x):
    """Counts of ``x`` on a HIST_BINS x HIST_BINS grid over [-4, 4]^2 (rows: y)."""
    edges = np.linspace(-EXTENT, EXTENT, HIST_BINS + 1)
    return np.histogram2d(x[:, 1], x[:, 0], bins=[edges, edges])[0].astype(int).tolist()


def run(config: Config) -> dict:
    from experiments._sweep import run_sweep

    fields = {k: v for k, v in config_dict(config).items() if k not in EXECUTION_FIELDS}
    runs = [
        dict(fields, toy=t, model=m, seed=s, first_seed=s == config.seeds[0])
        for s in config.seeds
        for t in config.toys
        for m in config.models
    ]
    results = run_sweep(_one, runs, cache_dir=config.cache_dir)
    out = {"runs": results, "toys": {}}
    for toy in config.toys:
        rng = np.random.default_rng([config.seed, 99, TOYS.index(toy)])
        h, se, method = entropy(toy, config.entropy_samples, rng)
        train, _, test = _data(config, toy, config.seeds[0])
        g = gaussian_nll(train, test)
        info = {
            "entropy": h,
            "entropy_se": se,
            "entropy_method": method,
            "gaussian_nll": float(g.mean()),
            "gaussian_nll_se": float(g.std(ddof=1) / math.sqrt(len(g))),
            "data_hist": _hist(fm.data.toy(toy, config.n_samples, rng)),
        }
        if toy == "8gaussians":
            far = eight_gaussians_far(fm.data.toy(toy, config.entropy_samples, rng))
            info["true_low_mass"] = float(far.mean())
            info["true_low_mass_se"] = float(far.std() / math.sqrt(len(far)))
        elif toy == "checkerboard":
            info["true_low_mass"] = 0.0
            info["true_low_mass_se"] = 0.0
        out["toys"][toy] = info
    # the nearest-neighbour estimator's own bias, where the exact entropy is known
    rng = np.random.default_rng([config.seed, 98])
    out["knn_check"] = {}
    for toy in ("8gaussians", "checkerboard"):
        if toy in config.toys:
            x = fm.data.toy(toy, config.entropy_samples, rng)
            h, se = knn_entropy(x)
            out["knn_check"][toy] = {"knn": h, "knn_se": se, "exact": out["toys"][toy]["entropy"]}
    out["summary"] = summarise(out, config)
    return out


def summarise(results, config):
    """Per (toy, model): mean test NLL over seeds, its test-set s.e. (mean of the seeds'), the
    s.d. over seeds, the low-density mass (mean and s.d. over seeds) and the training time."""
    table = {}
    for toy in config.toys:
        for model in config.models:
            rs = [r for r in results["runs"] if r["toy"] == toy and r["model"] == model]
            nll = np.array([r["test_nll"] for r in rs])
            entry = {
                "nll": float(nll.mean()),
                "nll_se": float(np.mean([r["test_nll_se"] for r in rs])),
                "nll_sd_seeds": float(nll.std(ddof=1)) if len(nll) > 1 else None,
                "train_time": float(np.mean([r["train_time"] for r in rs])),
                "steps": rs[0]["steps"],
                "box_mass": float(np.mean([r["box_mass"] for r in rs])),
            }
            if "low_mass" in rs[0]:
                lm = np.array([r["low_mass"] for r in rs])
                entry["low_mass"] = float(lm.mean())
                entry["low_mass_sd"] = float(lm.std(ddof=1)) if len(lm) > 1 else None
            table[f"{toy}/{model}"] = entry
    return table


# -- figure and table -----------------------------------------------------------------------------


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    toys = list(results["toys"])
    first = {(r["toy"], r["model"]): r for r in results["runs"] if "log10_density" in r}
    models = [m for m in MODELS if any(k[1] == m for k in first)]
    ncols = 1 + 2 * len(models)
    fig, axes = plt.subplots(len(toys), ncols, figsize=(1.25 * ncols, 1.3 * len(toys) + 0.4))
    axes = np.atleast_2d(axes)
    ext = (-EXTENT, EXTENT, -EXTENT, EXTENT)

    def show(ax, image):
        ax.imshow(
            np.asarray(image), origin="lower", extent=ext, cmap="viridis", interpolation="nearest"
        )

    for i, toy in enumerate(toys):
        show(axes[i, 0], results["toys"][toy]["data_hist"])
        axes[i, 0].set_ylabel(toy, fontsize=8)
        for j, model in enumerate(models):
            r = first[(toy, model)]
            show(axes[i, 1 + 2 * j], 10.0 ** np.asarray(r["log10_density"]))
            show(axes[i, 2 + 2 * j], r["sample_hist"])
            if i == 0:
                axes[i, 1 + 2 * j].set_title(f"{LABELS[model]}\ndensity", fontsize=7)
                axes[i, 2 + 2 * j].set_title(f"{LABELS[model]}\nsamples", fontsize=7)
    axes[0, 0].set_title("data\nsamples", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.suptitle(
        "2-D toys (FFJORD Fig. 2): data, learned density on [-4, 4]^2, model samples (first seed)",
        fontsize=8,
    )
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def tex(results: dict) -> str:
    toys = list(results["toys"])
    summary = results["summary"]
    models = [m for m in MODELS if f"{toys[0]}/{m}" in summary]
    n_seeds = len({r["seed"] for r in results["runs"]})

    def cell(entry):
        s = f"{entry['nll']:.3f} $\\pm$ {entry['nll_se']:.3f}"
        if entry["nll_sd_seeds"] is not None:
            s += f" ({entry['nll_sd_seeds']:.3f})"
        return s

    header = ["model", *toys, "steps", "s / run"]
    rows = []
    for m in models:
        es = [summary[f"{t}/{m}"] for t in toys]
        times = np.mean([e["train_time"] for e in es])
        rows.append([LABELS[m], *(cell(e) for e in es), str(es[0]["steps"]), f"{times:.0f}"])
    rows.append(
        [
            "Gaussian (full cov.)",
            *(f"{results['toys'][t]['gaussian_nll']:.3f}" for t in toys),
            "",
            "",
        ]
    )
    rows.append(
        [
            "entropy (bound)",
            *(
                f"{results['toys'][t]['entropy']:.3f}"
                + (
                    f" $\\pm$ {results['toys'][t]['entropy_se']:.3f}"
                    if results["toys"][t]["entropy_se"] > 0
                    else ""
                )
                for t in toys
            ),
            "",
            "",
        ]
    )
    low = [t for t in toys if "true_low_mass" in results["toys"][t]]
    caption = (
        "Test NLL (nats) on the 2-D toys: mean over "
        f"{n_seeds} training seed(s) $\\pm$ the test-set standard error"
        + (" (standard deviation over seeds)" if n_seeds > 1 else "")
        + "; steps of training and wall seconds per run (one process on a shared, loaded "
        "2-core machine). "
        "The entropy is the lower bound of the expected test NLL."
    )
    out = tex_table(header, rows, caption, "tab:toy-densities")
    if low:
        header2 = ["model", *(f"{t}: mass in low-density region" for t in low)]
        rows2 = []
        for m in models:
            vals = []
            for t in low:
                e = summary[f"{t}/{m}"]
                v = f"{100 * e['low_mass']:.2f}\\%"
                if e.get("low_mass_sd") is not None:
                    v += f" ({100 * e['low_mass_sd']:.2f})"
                vals.append(v)
            rows2.append([LABELS[m], *vals])
        rows2.append(
            ["data", *(f"{100 * results['toys'][t]['true_low_mass']:.2f}\\%" for t in low)]
        )
        out += tex_table(
            header2,
            rows2,
            "Probability mass the models put where the data has little: the empty squares of "
            "the checkerboard (true 0) and the region farther than 3 standard deviations from "
            "all 8 centres (true mass measured on samples); quadrature of the model density on "
            "the grid, mean (s.d.) over seeds.",
            "tab:toy-low-density",
        )
    return out
