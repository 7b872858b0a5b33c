"""Bits/dim of every flow family on bundled images (the lecture's Table 4, on a CPU budget).

NICE, MADE, MAF, Real NVP, Glow (multi-scale, convolutional conditioners), FFJORD, i-ResNet and
Residual Flow, each trained on the bundled digits (8 x 8, 17 levels) and the bundled MNIST
subset (5000 x 28 x 28, 256 levels) with the fixed split of ``train_test_split(test_size=0.2,
random_state=0)``, uniformly dequantised ``y = (x + u) / K`` with fresh noise every step, under
a stated budget (steps; the wall time is measured and printed). Every model starts with
``Logit(alpha=0.05)`` (Real NVP's preprocessing, its log-det included). Reported: the test
bits/dim of the dequantisation bound with its standard error over the test images, and the
importance-weighted estimate (Burda et al. 2016) for every model; one Real NVP
row is trained with variational dequantisation (Ho et al. 2019, arXiv:1902.00275) beside its
uniform twin. FFJORD trains with Hutchinson's trace and is evaluated with the exact trace;
i-ResNet (power series) and Residual Flow (roulette) are evaluated with the exact log-det.

Exact baselines (no training): uniform (exactly ``log2 K``), per-pixel histogram (add-one
smoothing) and diagonal and full Gaussians fitted by maximum likelihood to one uniform
dequantisation of the training split (``default_rng(0)``: train first, then test).

The lecture's numbers (full MNIST, 60 000 images, GPU-days, architectures hundreds of times
larger) are printed in a separate column: NICE 4.36 (Dinh et al. 2014, arXiv:1410.8516), MADE
2.04 (Germain et al. 2015, arXiv:1502.03509), MAF 1.89 (Papamakarios et al. 2017,
arXiv:1705.07057), Real NVP 1.06 (Dinh et al. 2016, arXiv:1605.08803), Glow 1.05 (Kingma and
Dhariwal 2018, arXiv:1807.03039), FFJORD 0.99 (Grathwohl et al. 2019, arXiv:1810.01367),
i-ResNet 1.06 (Behrmann et al. 2019, arXiv:1811.00995), Residual Flows 0.97 (Chen et al. 2019,
arXiv:1906.02735).

Budgets and measured times on the shared 2-core machine (load average about 11): full settings
(digits 400 steps, MNIST subset 40 steps; the residual flows half of that; batch 64, width 64)
took 2130 s with ``--jobs 2``; quick settings (digits only, 100 steps, width 32) 116 s. On the
MNIST subset these budgets are far from converged (see the "still falling" column); the
per-pixel models also inherit a heavy tail from the data: 126 pixels are 0 in every training
image and 4 test images light one of them, so means carry standard errors of 0.3-0.5 bits/dim
(the diagonal Gaussian's per-image median is 5.79 against its mean 7.24).

Runs (model x data set x seed) are independent: ``--jobs N`` runs them in N processes,
``--scheduler ADDRESS`` on a Dask cluster, each cached under a hash of its config
(:mod:`experiments._sweep`). ``--data mnist --data-dir DIR`` trains on a user-downloaded full
MNIST (IDX or ``.npz``) instead of the bundled sets.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

import flowmath as fm
from experiments import _sweep
from experiments._common import setup_matplotlib, tex_table
from flowmath import dequantize as dq
from flowmath.data import real

__all__ = [
    "LECTURE",
    "Config",
    "baselines",
    "build",
    "load_data",
    "plot",
    "run",
    "runs",
    "still_falling",
    "tex",
    "train_one",
]

# Full-MNIST test bits/dim of the papers (the lecture's Table 4): a different data set and
# budget; context only.
LECTURE = {
    "nice": (4.36, "arXiv:1410.8516"),
    "made": (2.04, "arXiv:1502.03509"),
    "maf": (1.89, "arXiv:1705.07057"),
    "realnvp": (1.06, "arXiv:1605.08803"),
    "glow": (1.05, "arXiv:1807.03039"),
    "ffjord": (0.99, "arXiv:1810.01367"),
    "iresnet": (1.06, "arXiv:1811.00995"),
    "residual_flow": (0.97, "arXiv:1906.02735"),
}
LABELS = {
    "nice": "NICE",
    "made": "MADE",
    "maf": "MAF",
    "realnvp": "Real NVP",
    "realnvp_vd": "Real NVP + var. deq.",
    "glow": "Glow",
    "ffjord": "FFJORD",
    "iresnet": "i-ResNet",
    "residual_flow": "Residual Flow",
}
MODELS = tuple(LABELS)
CACHE_DIR = Path("results") / "sweeps" / "bits_per_dim"
LEVELS = {"digits": real.DIGITS_LEVELS, "mnist5000": real.MNIST_LEVELS, "mnist": 256}


@dataclasses.dataclass(frozen=True)
class Config:
    datasets: tuple = ("digits", "mnist5000")
    models: tuple = MODELS
    seeds: tuple = (0,)
    steps: tuple = (("digits", 400), ("mnist5000", 40))
    # the residual flows cost 5-10x more per step than the couplings: a fraction of the steps
    slow_fraction: float = 0.5
    batch_size: int = 64
    lr: float = 1e-3
    width: int = 64
    # importance samples per test image (the residual flows' exact log-det costs O(D^3) per
    # sample: fewer on the 784-dimensional MNIST)
    iw_samples: tuple = (("digits", 64), ("mnist5000", 4), ("mnist", 4))
    data_dir: str | None = None

    @classmethod
    def quick(cls) -> Config:
        return cls(
            datasets=("digits",),
            steps=(("digits", 100),),
            slow_fraction=0.5,
            width=32,
            iw_samples=(("digits", 8),),
        )


# -- data -------------------------------------------------------------------------------------
def load_data(name: str, data_dir: str | None = None, shape: str = "flat"):
    """``(train, test, levels)`` as uint8 arrays: ``(n, D)`` or ``(n, 1, h, w)``.

    ``"digits"`` and ``"mnist5000"`` are bundled (split of ``train_test_split(test_size=0.2,
    random_state=0)``); ``"mnist"`` reads ``train-images-idx3-ubyte[.gz]`` and
    ``t10k-images-idx3-ubyte[.gz]``, or ``mnist.npz`` with Keras's keys, from ``data_dir``.
    """
    if name == "digits":
        return (
            real.load_digits(split="train", shape=shape)[0],
            real.load_digits(split="test", shape=shape)[0],
            real.DIGITS_LEVELS,
        )
    if name == "mnist5000":
        return (
            real.load_mnist5000(split="train", shape=shape)[0],
            real.load_mnist5000(split="test", shape=shape)[0],
            real.MNIST_LEVELS,
        )
    if name != "mnist":
        raise ValueError(f"`data` must be 'digits', 'mnist5000' or 'mnist'; got {name!r}")
    if data_dir is None:
        raise ValueError("`data_dir` must name the folder with the MNIST files for data='mnist'")
    folder = Path(data_dir)
    npz = folder / "mnist.npz"
    if npz.is_file():
        train = real.load_mnist(npz, keys=("x_train", "y_train"), shape=shape)[0]
        test = real.load_mnist(npz, keys=("x_test", "y_test"), shape=shape)[0]
        return train, test, 256
    found = {}
    for split, stem in (("train", "train-images-idx3-ubyte"), ("test", "t10k-images-idx3-ubyte")):
        for candidate in (
            folder / stem,
            folder / f"{stem}.gz",
            folder / stem.replace("-idx", ".idx"),
        ):
            if candidate.is_file():
                found[split] = real.load_mnist(candidate, shape=shape)[0]
                break
    if set(found) != {"train", "test"}:
        raise ValueError(
            f"`data_dir` must hold mnist.npz or the IDX files train-images-idx3-ubyte[.gz] and "
            f"t10k-images-idx3-ubyte[.gz]; found {sorted(p.name for p in folder.iterdir())}"
        )
    return found["train"], found["test"], 256


# -- exact baselines --------------------------------------------------------------------------
def baselines(train, test, levels: int, seed: int = 0) -> dict:
    """Test bits/dim of the four fitted baselines, ``name -> (mean, standard error)``.

    - uniform on ``[0, 1)^D``: exactly ``log2 K``;
    - per-pixel histogram with add-one smoothing, ``P(x_j = v) = (c_jv + 1) / (n + K)``;
    - diagonal and full Gaussians fitted by maximum likelihood (``bias=True``) to the
      uniformly dequantised training split, evaluated on the dequantised test split (one draw
      from ``default_rng(seed)``, train first), as densities of ``y = (x + u)/K`` with
      ``- D ln K``.
    """
    train = np.asarray(train, dtype=np.float64).reshape(len(train), -1)
    test = np.asarray(test, dtype=np.float64).reshape(len(test), -1)
    n, d = train.shape
    to_bits = 1.0 / (d * math.log(2.0))

    def summary(logp):
        bits = -logp * to_bits
        return float(bits.mean()), float(bits.std(ddof=1) / math.sqrt(len(bits)))

    out = {"uniform": (math.log2(levels), 0.0)}
    counts = np.stack([np.bincount(train[:, j].astype(int), minlength=levels) for j in range(d)])
    probs = (counts + 1.0) / (n + levels)
    out["histogram"] = summary(np.log(probs[np.arange(d)[None], test.astype(int)]).sum(axis=1))
    rng = np.random.default_rng(seed)
    ytr = (train + rng.uniform(size=train.shape)) / levels
    yte = (test + rng.uniform(size=test.shape)) / levels
    shift = d * math.log(levels)
    mu, var = ytr.mean(axis=0), ytr.var(axis=0)
    r = yte - mu
    logp = -0.5 * np.sum(r * r / var + np.log(2 * np.pi * var), axis=1) - shift
    out["diagonal_gaussian"] = summary(logp)
    cov = np.cov(ytr.T, bias=True)
    chol = np.linalg.cholesky(cov)
    sol = np.linalg.solve(chol, r.T)
    logdet = 2.0 * np.sum(np.log(np.diag(chol)))
    logp = -0.5 * (np.sum(sol * sol, axis=0) + logdet + d * math.log(2 * math.pi)) - shift
    out["full_gaussian"] = summary(logp)
    return out


# -- models -----------------------------------------------------------------------------------
def _pre():
    """Real NVP's preprocessing, ``Logit(alpha=0.05)``, then a data-initialised ActNorm, so that
    every family starts from the same diagonal Gaussian in logit space."""
    return [fm.Logit(alpha=0.05), fm.ActNorm()]


def build(name: str, shape: tuple, width: int):
    """The flow of family ``name`` for images of ``shape = (1, h, w)``; returns ``(flow, event)``
    with ``event`` ``"flat"`` (vectors ``(n, h w)``) or ``"image"``. Couplings and
    autoregressive layers start as the identity (zero last layer, as Glow's ``Conv2dZeros``)."""
    if name == "nice":
        # NICE: 4 additive couplings (alternating halves), diagonal scaling, logistic prior
        layers = _pre() + [
            fm.AdditiveCoupling("half", (width, width), flip=bool(i % 2), identity_init=True)
            for i in range(4)
        ]
        layers.append(fm.DiagonalLinear())
        return fm.Flow(fm.Chain(layers), base=fm.StandardLogistic()), "flat"
    if name in ("made", "maf"):
        # MADE: one Gaussian autoregressive layer; MAF: 4 of them, alternating orderings
        k = 1 if name == "made" else 4
        orders = ("natural", "reversed")
        layers = _pre() + [
            fm.MAF(hidden=(width, width), order=orders[i % 2], identity_init=True) for i in range(k)
        ]
        return fm.Flow(fm.Chain(layers)), "flat"
    if name in ("realnvp", "realnvp_vd"):
        # Real NVP: checkerboard couplings, squeeze, channel couplings; conv conditioners
        hidden = (width // 2,)

        def coupling(mask, i):
            return fm.AffineCoupling(mask, hidden, flip=bool(i % 2), identity_init=True)

        layers = _pre() + [coupling("checkerboard", i) for i in range(3)]
        layers.append(fm.Squeeze())
        layers += [coupling("channel", i) for i in range(3)]
        return fm.Flow(fm.Chain(layers)), "image"
    if name == "glow":
        # Glow: multi-scale (2 levels; 8x8 needs h, w divisible by 4), ActNorm, LU 1x1 conv,
        # affine coupling with conv conditioners, split priors
        glow = fm.Glow(
            levels=2, steps=3, hidden=(width // 2,), split_prior=True, identity_init=True
        )
        return fm.Flow(fm.Chain([fm.Logit(alpha=0.05), glow])), "image"
    if name == "ffjord":
        cnf = fm.CNF(
            hidden=(width,), t1=0.5, trace="hutchinson", rtol=1e-5, atol=1e-5, identity_init=True
        )
        return fm.Flow(fm.Chain([*_pre(), cnf])), "flat"
    if name in ("iresnet", "residual_flow"):
        if name == "iresnet":
            kw = dict(logdet="series", n_terms=5, activation="elu")
        else:
            kw = dict(logdet="roulette", roulette_p=0.5, n_exact=2, activation="lipswish")
        blocks = []
        for i in range(3):
            if i:
                blocks.append(fm.ActNorm())
            blocks.append(fm.IResBlock(hidden=(2 * width,), coeff=0.9, **kw))
        return fm.Flow(fm.Chain([*_pre(), *blocks])), "flat"
    raise ValueError(f"`name` must be one of {MODELS}; got {name!r}")


# -- one run ----------------------------------------------------------------------------------
def _batched(fn, x, size=200):
    return np.concatenate([np.asarray(fn(x[i : i + size])) for i in range(0, len(x), size)])


def train_one(run: dict) -> dict:
    """Train one model on one data set with one seed; the sweep's unit of work (picklable).

    ``run`` holds ``model, data, seed, steps, batch_size, lr, width, iw_samples, data_dir``.
    Returns test bits/dim (mean and standard error), the importance-weighted estimate where
    computed, the training curve (bits/dim of each step) and the wall time.
    """
    name, data = run["model"], run["data"]
    rng = np.random.default_rng([run["seed"], sum(map(ord, name)), sum(map(ord, data))])
    shape_kind = "image"
    train, test, levels = load_data(data, run.get("data_dir"), shape=shape_kind)
    event = train.shape[1:]
    flow, kind = build(name, event, run["width"])
    if kind == "flat":
        train, test = train.reshape(len(train), -1), test.reshape(len(test), -1)
    d = int(np.prod(train.shape[1:]))
    xf = train.astype(np.float64)
    stochastic = flow.layer.stochastic
    params = {"flow": flow.init(rng, dq.uniform_dequantize(xf[:256], levels, rng))}
    q = dq.VariationalDequantizer(hidden=(run["width"],)) if name == "realnvp_vd" else None
    if q is not None:
        params["q"] = q.init(rng, xf[:256], levels)

    def log_prob(p, y, r):
        return flow.log_prob(p, y, r if stochastic else None)

    def loss(p, batch, r):
        # per-example negative dequantisation bound in nats (fit averages and reports it)
        return -dq.elbo(
            lambda y: log_prob(p["flow"], y, r),
            batch,
            levels,
            r,
            dequantizer=q,
            params=p.get("q"),
        )

    # a fixed 10 % of the training split validates (keep_best returns its best step)
    n_valid = len(xf) // 10
    params, result = fm.train.fit(
        loss,
        params,
        xf[n_valid:],
        valid=xf[:n_valid],
        rng=rng,
        steps=run["steps"],
        batch_size=run["batch_size"],
        optimizer=fm.train.Adam(run["lr"]),
        eval_every=max(1, run["steps"] // 10),
        keep_best=True,
        progress=False,
    )
    to_bits = 1.0 / (d * math.log(2.0))

    # test likelihoods with exact log-dets: FFJORD's exact trace, the residual blocks' dense one
    eval_flow = fm.models.exact(flow)
    eval_rng = np.random.default_rng([run["seed"], 7])
    xt = test.astype(np.float64)

    def test_logp(batch):
        return dq.elbo(
            lambda y: eval_flow.log_prob(params["flow"], y),
            batch,
            levels,
            eval_rng,
            dequantizer=q,
            params=params.get("q"),
        )

    start = time.perf_counter()
    bits = dq.bits_per_dim(_batched(test_logp, xt), d)
    out = {
        "model": name,
        "data": data,
        "seed": run["seed"],
        "steps": run["steps"],
        "train_seconds": float(result.wall_time),
        "best_step": None if result.best_step is None else int(result.best_step),
        "valid_steps": np.asarray(result.valid_steps).tolist(),
        "valid_bpd": np.asarray(result.valid_bpd).tolist(),
        "test_bpd": float(bits.mean()),
        "test_se": float(bits.std(ddof=1) / math.sqrt(len(bits))),
        "curve": (np.asarray(result.train_loss) * to_bits).tolist(),
        "dim": d,
        "levels": levels,
    }
    # the residual flows' exact log-det is a dense slogdet, O(D^3) per image: no importance
    # sampling on top of it above D = 256 (MNIST)
    residual = name in ("iresnet", "residual_flow")
    if run["iw_samples"] > 1 and not (residual and d > 256):

        def iw_logp(batch):
            return dq.importance_weighted_log_prob(
                lambda y: eval_flow.log_prob(params["flow"], y),
                batch,
                levels,
                eval_rng,
                n_samples=run["iw_samples"],
                dequantizer=q,
                params=params.get("q"),
            )

        iw = dq.bits_per_dim(_batched(iw_logp, xt, size=50), d)
        out["iw_bpd"] = float(iw.mean())
        out["iw_se"] = float(iw.std(ddof=1) / math.sqrt(len(iw)))
        out["iw_samples"] = run["iw_samples"]
    out["eval_seconds"] = time.perf_counter() - start
    return out


# -- the sweep --------------------------------------------------------------------------------
def runs(config: Config) -> list[dict]:
    """The independent runs of the sweep, as plain dicts (their hash is the cache key)."""
    steps = dict(config.steps)
    out = []
    for data in config.datasets:
        for model in config.models:
            for seed in config.seeds:
                n = steps[data if data in steps else "mnist5000"]
                iw = dict(config.iw_samples).get(data, 1)
                if model in ("iresnet", "residual_flow"):
                    n = max(1, int(n * config.slow_fraction))
                out.append(
                    {
                        "model": model,
                        "data": data,
                        "seed": seed,
                        "steps": n,
                        "batch_size": config.batch_size,
                        "lr": config.lr,
                        "width": config.width,
                        "iw_samples": iw,
                        "data_dir": config.data_dir,
                    }
                )
    return out


def run(config: Config) -> dict:
    start = time.perf_counter()
    # cached under results/ (git-ignored) by the hash of each run: an interrupted sweep resumes
    results = _sweep.run_sweep(train_one, runs(config), cache_dir=CACHE_DIR)
    base = {}
    for data in config.datasets:
        train, test, levels = load_data(data, config.data_dir)
        base[data] = baselines(train, test, levels)
    return {
        "runs": results,
        "baselines": base,
        "lecture": {k: v[0] for k, v in LECTURE.items()},
        "lecture_source": {k: v[1] for k, v in LECTURE.items()},
        "sweep_seconds": time.perf_counter() - start,
    }


# -- reporting --------------------------------------------------------------------------------
def _by_data(results):
    out = {}
    for r in results["runs"]:
        out.setdefault(r["data"], []).append(r)
    return out


def plot(results: dict, path) -> None:
    plt = setup_matplotlib()
    groups = _by_data(results)
    fig, axes = plt.subplots(2, len(groups), figsize=(7.5 * len(groups), 9), squeeze=False)
    for j, (data, rs) in enumerate(sorted(groups.items())):
        ax = axes[0, j]
        for r in rs:
            curve = np.asarray(r["curve"])
            k = max(1, len(curve) // 30)
            smooth = np.convolve(curve, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(len(smooth)) + k, smooth, lw=1, label=LABELS[r["model"]])
        for bname, (v, _) in results["baselines"][data].items():
            ax.axhline(v, color="k", lw=0.6, ls=":")
            ax.text(
                0.99,
                v,
                bname.replace("_", " "),
                fontsize=6,
                va="bottom",
                ha="right",
                transform=ax.get_yaxis_transform(),
            )
        # the baselines and the curves' ends, not the first steps, set the scale
        top = results["baselines"][data]["uniform"][0] + 1.5
        ends = [float(np.median(r["curve"][-10:])) for r in rs]
        ax.set_ylim(min(ends + [v for v, _ in results["baselines"][data].values()]) - 0.3, top)
        ax.set_xlabel("training step")
        ax.set_ylabel("train bits/dim (moving average)")
        ax.set_title(
            f"{data}: training curves (dequantisation bound: uniform, or variational for its row)"
        )
        ax.legend(fontsize=6, ncol=2)
        ax = axes[1, j]
        rs = sorted(rs, key=lambda r: r["test_bpd"])
        y = np.arange(len(rs))
        ax.errorbar(
            [r["test_bpd"] for r in rs],
            y,
            xerr=[2 * r["test_se"] for r in rs],
            fmt="o",
            color="C0",
            label="test bits/dim (ELBO) +- 2 s.e.",
        )
        iw = [(i, r["iw_bpd"]) for i, r in enumerate(rs) if "iw_bpd" in r]
        if iw:
            ax.plot(
                [v for _, v in iw], [i for i, _ in iw], "x", color="C3", label="importance-weighted"
            )
        ax.set_yticks(y)
        ax.set_yticklabels([LABELS[r["model"]] for r in rs], fontsize=7)
        for bname, (v, _) in results["baselines"][data].items():
            if bname != "uniform":
                ax.axvline(v, color="k", lw=0.6, ls=":")
                ax.text(v, -1.4, bname.replace("_", " "), fontsize=6, va="bottom", ha="center")
        ax.set_ylim(-1.6, len(rs) - 0.4)
        ax.set_xlabel("test bits/dim (lower is better)")
        ax.set_title(f"{data}: test bits/dim, CPU budget (baselines dotted)")
        ax.legend(fontsize=6, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def still_falling(r: dict) -> float:
    """Validation bits/dim lost per 100 steps over the last fifth of the run (positive: the
    curve has not flattened)."""
    steps, bpd = np.asarray(r["valid_steps"], float), np.asarray(r["valid_bpd"], float)
    k = max(2, len(steps) // 5 + 1)
    steps, bpd = steps[-k:], bpd[-k:]
    return float(-np.polyfit(steps, bpd, 1)[0] * 100)


def tex(results: dict) -> str:
    out = []
    for data, rs in sorted(_by_data(results).items()):
        rows = []
        for r in sorted(rs, key=lambda r: r["test_bpd"]):
            lecture = results["lecture"].get(r["model"])
            iw = f"{r['iw_bpd']:.3f} ({r['iw_samples']})" if "iw_bpd" in r else "--"
            rows.append(
                [
                    LABELS[r["model"]],
                    f"{r['test_bpd']:.3f} $\\pm$ {r['test_se']:.3f}",
                    iw,
                    str(r["steps"]),
                    f"{r['train_seconds']:.0f}",
                    f"{still_falling(r):+.3f}",
                    "--" if lecture is None else f"{lecture:.2f}",
                ]
            )
        for bname, (v, se) in results["baselines"][data].items():
            rows.append(
                [f"baseline: {bname.replace('_', ' ')}", f"{v:.3f} $\\pm$ {se:.3f}"] + ["--"] * 5
            )
        out.append(
            tex_table(
                [
                    "model",
                    "test bits/dim $\\pm$ s.e.",
                    "IW (samples)",
                    "steps",
                    "train s",
                    "still falling",
                    "paper (full MNIST)",
                ],
                rows,
                caption=(
                    f"Test bits/dim on {data} (dequantisation bound, uniform unless marked; "
                    "standard error over the test images) and the importance-weighted estimate, "
                    "trained on a CPU budget (steps of batch 64, wall seconds on a shared 2-core "
                    "machine). Still falling: validation bits/dim lost per 100 steps over the last "
                    "fifth of the run. The last column is the papers' full-MNIST number: a "
                    "different data set, resolution and budget, for context only."
                ),
                label=f"tab:bits_per_dim_{data}",
            )
        )
    return "\n".join(out)
