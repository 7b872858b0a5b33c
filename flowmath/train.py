"""Training: optimisers, learning-rate schedules and :func:`fit`, a research loop that validates,
keeps the best parameters, stops early, survives non-finite steps and resumes bit-identically.

The loss is any function ``loss(params, batch, rng)`` returning the negative log-likelihood in
nats, either per example (shape ``(n,)``) or already averaged (a scalar); training minimises its
mean, with gradients from ``autograd.value_and_grad``. Validation reports the mean NLL in nats
and in bits per dimension with its standard error over the validation examples.

BLAS threads: the small matrices of flow training run fastest on one BLAS thread, and a
multi-threaded BLAS pool collapses when another process loads the machine (a 2-D step went
from 7.4 ms to 160 ms with one busy neighbour). :func:`fit` therefore runs under
``threadpoolctl.threadpool_limits(blas_threads)``, by default one thread
(``FLOWMATH_BLAS_THREADS`` in the environment changes the default; ``blas_threads=None`` leaves
the pools alone).

Examples
--------
>>> import numpy as np, flowmath as fm
>>> rng = np.random.default_rng(0)
>>> x = rng.normal(size=(512, 2)) * [1.0, 0.3] + [2.0, -1.0]
>>> flow = fm.Flow(fm.Chain([fm.DiagonalLinear(), fm.AffineCoupling(hidden=(8,))]))
>>> params = flow.init(rng, x[:64])
>>> loss = lambda p, batch, rng: -flow.log_prob(p, batch)
>>> params, result = fm.train.fit(loss, params, x[:384], valid=x[384:], rng=rng, steps=300,
...                               optimizer=fm.train.Adam(1e-2), progress=False)
>>> bool(result.valid_nll[-1] < result.valid_nll[0]), result.best_step in result.valid_steps
(True, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import autograd
import autograd.numpy as anp
import numpy as np

from ._checks import check_int, check_positive, check_rng
from ._pytree import leaves as _leaves
from ._pytree import tree_map
from ._xp import getval
from .layers.base import trusted_params

__all__ = [
    "SGD",
    "Adam",
    "Constant",
    "Cosine",
    "FitResult",
    "StepDecay",
    "default_blas_threads",
    "fit",
    "global_norm",
    "load_checkpoint",
    "plot_curves",
    "tree_map",
    "tree_zeros_like",
]


# -- pytrees --------------------------------------------------------------------------------------


def tree_zeros_like(tree):
    return tree_map(np.zeros_like, tree)


def global_norm(tree) -> float:
    """:math:`\\sqrt{\\sum_\\ell \\|g_\\ell\\|_2^2}` over every leaf (inf or NaN if any is)."""
    return math.sqrt(sum(float(np.vdot(g, g).real) for g in _leaves(tree)))


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(g)) for g in _leaves(tree))


def _copy(tree):
    return tree_map(lambda a: np.array(a, copy=True), tree)


def _copy_state(state):
    """A copy of an optimiser state: its trees copied, its integer step counter ``t`` kept."""
    return {k: (v if k == "t" else _copy(v)) for k, v in state.items()}


# -- optimisers -----------------------------------------------------------------------------------


class Adam:
    """Adam (Kingma & Ba 2015, arXiv:1412.6980) on a parameter pytree.

    .. math:: m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\quad
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2,\\quad
        \\theta \\leftarrow \\theta - \\eta_t\\, \\hat m / (\\sqrt{\\hat v} + \\epsilon),

    with the bias corrections :math:`\\hat m = m / (1 - \\beta_1^t)`,
    :math:`\\hat v = v / (1 - \\beta_2^t)` and :math:`\\eta_t` the base rate ``lr`` times the
    schedule's factor.
    """

    def __init__(self, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr = check_positive(lr, "lr")
        for name, b in (("b1", b1), ("b2", b2)):
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < 1:
                raise ValueError(f"`{name}` must lie in [0, 1); got {b!r}")
        self.b1, self.b2 = float(b1), float(b2)
        self.eps = check_positive(eps, "eps")

    def init(self, params):
        return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "t": 0}

    def update(self, params, grads, state, lr: float | None = None):
        """One step; returns ``(params, state)`` (new trees, the inputs are not modified)."""
        lr = self.lr if lr is None else lr
        t = state["t"] + 1
        b1, b2 = self.b1, self.b2
        m = tree_map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: b2 * v + (1 - b2) * (g * g), state["v"], grads)
        c1, c2 = 1 - b1**t, 1 - b2**t
        params = tree_map(
            lambda p, m, v: p - (lr / c1) * m / (np.sqrt(v * (1 / c2)) + self.eps), params, m, v
        )
        return params, {"m": m, "v": v, "t": t}

    def __repr__(self) -> str:
        return f"Adam(lr={self.lr!r}, b1={self.b1!r}, b2={self.b2!r}, eps={self.eps!r})"


class SGD:
    """Stochastic gradient descent with (optionally Nesterov) momentum.

    .. math:: u \\leftarrow \\mu u + g,\\qquad
        \\theta \\leftarrow \\theta - \\eta_t\\,(g + \\mu u \\text{ if Nesterov else } u).
    """

    def __init__(self, lr: float = 1e-2, momentum: float = 0.9, *, nesterov: bool = False):
        self.lr = check_positive(lr, "lr")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
            raise TypeError(f"`momentum` must be a real number; got {momentum!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"`momentum` must lie in [0, 1); got {momentum!r}")
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"`nesterov` must be a bool; got {type(nesterov).__name__}")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def init(self, params):
        return {"u": tree_zeros_like(params), "t": 0}

    def update(self, params, grads, state, lr: float | None = None):
        lr = self.lr if lr is None else lr
        mu = self.momentum
        u = tree_map(lambda u, g: mu * u + g, state["u"], grads)
        if self.nesterov:
            params = tree_map(lambda p, g, u: p - lr * (g + mu * u), params, grads, u)
        else:
            params = tree_map(lambda p, u: p - lr * u, params, u)
        return params, {"u": u, "t": state["t"] + 1}

    def __repr__(self) -> str:
        return f"SGD(lr={self.lr!r}, momentum={self.momentum!r}, nesterov={self.nesterov!r})"


# -- schedules ------------------------------------------------------------------------------------


class _Schedule:
    """A learning-rate factor ``schedule(step, total)`` in (0, 1], with a linear warm-up over
    the first ``warmup`` steps (``factor * (step + 1) / warmup``)."""

    def __init__(self, warmup: int = 0):
        self.warmup = check_int(warmup, "warmup", minimum=0)

    def __call__(self, step: int, total: int) -> float:
        f = self._factor(step, total)
        if step < self.warmup:
            f *= (step + 1) / self.warmup
        return f

    def _factor(self, step, total):  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class Constant(_Schedule):
    """The base learning rate throughout (after the warm-up)."""

    def _factor(self, step, total):
        return 1.0


class Cosine(_Schedule):
    """Cosine decay (Loshchilov & Hutter 2017, arXiv:1608.03983) from 1 to ``final`` over the
    steps after the warm-up: :math:`f + (1 - f)(1 + \\cos(\\pi s / S))/2`."""

    def __init__(self, warmup: int = 0, final: float = 0.0):
        super().__init__(warmup)
        self.final = check_positive(final, "final", allow_zero=True)
        if self.final > 1:
            raise ValueError(f"`final` must lie in [0, 1]; got {final!r}")

    def _factor(self, step, total):
        span = max(total - self.warmup, 1)
        s = min(max(step - self.warmup, 0), span)
        return self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * s / span))


class StepDecay(_Schedule):
    """Multiply the rate by ``gamma`` every ``every`` steps."""

    def __init__(self, every: int, gamma: float = 0.1, warmup: int = 0):
        super().__init__(warmup)
        self.every = check_int(every, "every", minimum=1)
        self.gamma = check_positive(gamma, "gamma")

    def _factor(self, step, total):
        return self.gamma ** (step // self.every)


_SCHEDULES = {"constant": Constant, "cosine": Cosine}


def _check_schedule(schedule):
    if schedule is None:
        return Constant()
    if isinstance(schedule, str):
        if schedule not in _SCHEDULES:
            raise ValueError(
                f"`schedule` must be one of {', '.join(map(repr, _SCHEDULES))} or a schedule "
                f"object (Constant, Cosine, StepDecay); got {schedule!r}"
            )
        return _SCHEDULES[schedule]()
    if not callable(schedule):
        raise TypeError(
            f"`schedule` must be a schedule object or a callable (step, total) -> factor; got "
            f"{type(schedule).__name__}"
        )
    return schedule


# -- results --------------------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` measured.

    Attributes
    ----------
    train_loss : ndarray, shape (steps_done,)
        Mean training loss (nats) of every step taken (steps discarded by a roll-back are not in
        it).
    grad_norm : ndarray, shape (steps_done,)
        Global gradient norm of every step, before clipping.
    valid_steps : ndarray of int
        Steps after which the validation NLL was measured (0 is the initial parameters).
    valid_nll, valid_nll_se : ndarray
        Mean validation NLL in nats and its standard error over the validation examples.
    valid_bpd, valid_bpd_se : ndarray
        The same in bits per dimension, ``nll / (D ln 2)`` with ``D`` the event size.
    best_step : int or None
        Step of the lowest validation NLL (``None`` without validation data).
    steps_done : int
    stopped_early : bool
        Whether early stopping (``patience``) ended the run.
    rollbacks : list of (step, reason)
        Non-finite steps that were rolled back.
    wall_time : float
        Seconds spent in this call (a resumed run counts only its own part).
    lr : ndarray, shape (steps_done,)
        Learning rate used at every step.
    """

    train_loss: np.ndarray
    grad_norm: np.ndarray
    lr: np.ndarray
    valid_steps: np.ndarray
    valid_nll: np.ndarray
    valid_nll_se: np.ndarray
    valid_bpd: np.ndarray
    valid_bpd_se: np.ndarray
    best_step: int | None
    steps_done: int
    stopped_early: bool
    rollbacks: list
    wall_time: float

    @property
    def best_valid_nll(self) -> float | None:
        if self.best_step is None:
            return None
        return float(self.valid_nll[list(self.valid_steps).index(self.best_step)])

    def plot(self, ax=None):
        """Training and validation curves on ``ax`` (a new figure if ``None``); returns ``ax``."""
        return plot_curves(self, ax)


def plot_curves(result: FitResult, ax=None):
    """Plot the training loss (and its running mean) and the validation NLL with error bars."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    steps = np.arange(1, result.steps_done + 1)
    if len(steps):
        ax.plot(steps, result.train_loss, lw=0.5, alpha=0.4, color="C0", label="train (per step)")
        k = max(1, len(steps) // 50)
        if k > 1:
            run = np.convolve(result.train_loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], run, color="C0", label=f"train (mean of {k})")
    if len(result.valid_steps):
        ax.errorbar(
            result.valid_steps,
            result.valid_nll,
            yerr=result.valid_nll_se,
            color="C1",
            marker="o",
            ms=3,
            capsize=2,
            label="validation",
        )
        if result.best_step is not None:
            ax.axvline(result.best_step, color="C1", ls=":", lw=1, label="best")
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats)")
    ax.legend(fontsize=7)
    return ax


# -- checkpoints ----------------------------------------------------------------------------------


def _structure(tree):
    """JSON description of a pytree's containers; leaves become their index."""
    counter = [0]

    def walk(t):
        if isinstance(t, dict):
            return {"dict": {str(k): walk(t[k]) for k in sorted(t)}}
        if isinstance(t, (list, tuple)):
            return {type(t).__name__: [walk(v) for v in t]}
        if t is None:
            return None
        counter[0] += 1
        return counter[0] - 1

    return walk(tree)


def _rebuild(structure, leaves):
    if structure is None:
        return None
    if isinstance(structure, int):
        return leaves[structure]
    ((kind, body),) = structure.items()
    if kind == "dict":
        return {k: _rebuild(v, leaves) for k, v in body.items()}
    items = [_rebuild(v, leaves) for v in body]
    return tuple(items) if kind == "tuple" else items


def _save_state(path: Path, state: dict) -> None:
    """Write the training state to ``path`` (one ``.npz``) atomically: arrays as entries, the
    rest (tree structures, Generator state, counters, curves) as one JSON entry."""
    arrays, meta = {}, {}
    for name, tree in state["trees"].items():
        leaves = _leaves(tree)
        meta[name] = _structure(tree)
        for i, leaf in enumerate(leaves):
            arrays[f"{name}/{i}"] = np.asarray(leaf)
    payload = {k: v for k, v in state.items() if k != "trees"}
    payload["structures"] = meta
    arrays["__meta__"] = np.frombuffer(json.dumps(payload).encode(), dtype=np.uint8)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_checkpoint(path):
    """Read a checkpoint written by :func:`fit`: a dict with ``"params"``, ``"opt_state"``,
    ``"best_params"`` (or ``None``), ``"step"``, ``"rng_state"`` and the curves so far."""
    path = Path(path)
    try:
        with np.load(path) as data:
            payload = json.loads(bytes(data["__meta__"]).decode())
            trees = {}
            for name, structure in payload.pop("structures").items():
                n = sum(1 for k in data.files if k.startswith(name + "/"))
                leaves = [data[f"{name}/{i}"] for i in range(n)]
                trees[name] = _rebuild(structure, leaves)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"`checkpoint` {str(path)!r} is not a readable flowmath checkpoint: {exc}"
        ) from exc
    payload.update(trees)
    payload["opt_state"]["t"] = int(payload["opt_t"])
    return payload


# -- the loop -------------------------------------------------------------------------------------


def default_blas_threads() -> int | None:
    """BLAS threads :func:`fit` uses by default: ``FLOWMATH_BLAS_THREADS`` if set (``"none"``
    leaves the pools alone), else 1."""
    env = os.environ.get("FLOWMATH_BLAS_THREADS")
    if env is None:
        return 1
    if env.strip().lower() == "none":
        return None
    try:
        n = int(env)
    except ValueError:
        raise ValueError(
            f"`FLOWMATH_BLAS_THREADS` must be a positive integer or 'none'; got {env!r}"
        ) from None
    if n < 1:
        raise ValueError(f"`FLOWMATH_BLAS_THREADS` must be a positive integer; got {n}")
    return n


class _Batches:
    """Minibatches from a fresh permutation each epoch (the last incomplete batch is dropped so
    that every step sees ``batch_size`` examples). Its position is part of the checkpoint."""

    def __init__(self, n, batch_size):
        self.n, self.batch_size = n, min(batch_size, n)
        self.per_epoch = n // self.batch_size
        self.perm = None
        self.pos = 0

    def next(self, rng):
        if self.perm is None or self.pos == self.per_epoch:
            self.perm = rng.permutation(self.n)
            self.pos = 0
        i = self.pos * self.batch_size
        self.pos += 1
        return self.perm[i : i + self.batch_size]


def _check_data(data, name):
    raw = getval(data)
    if not isinstance(raw, np.ndarray):
        raise TypeError(
            f"`{name}` must be a NumPy array with the examples on axis 0; got {type(raw).__name__}"
        )
    if raw.ndim < 1 or raw.shape[0] < 1:
        raise ValueError(
            f"`{name}` must hold at least one example on axis 0; got shape {raw.shape}"
        )
    if raw.dtype.kind not in "fiu":
        raise TypeError(f"`{name}` must be a real array; got dtype {raw.dtype}")
    if not np.all(np.isfinite(raw)):
        raise ValueError(f"`{name}` must be finite; got non-finite values")
    return raw


def _check_params(params):
    """Every leaf a finite real floating array (integer leaves cannot be optimised: autograd
    gives them no gradient and the update would truncate)."""
    for i, leaf in enumerate(_leaves(params)):
        raw = getval(leaf)
        dtype = getattr(raw, "dtype", None)
        if dtype is None or np.dtype(dtype).kind != "f":
            what = f"dtype {dtype}" if dtype is not None else type(raw).__name__
            raise TypeError(
                f"`params` must hold floating arrays (leaf {i} in depth-first order, dict keys "
                f"sorted); got {what}"
            )
        if not np.all(np.isfinite(raw)):
            raise ValueError(f"`params` must be finite; leaf {i} holds NaN or inf")


def _check_flag(value, name):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool; got {type(value).__name__} {value!r}")
    return bool(value)


def _per_example(value, n, name):
    """The loss's value as per-example NLLs (n,) or None when it returned a scalar."""
    v = np.asarray(getval(value))
    if v.ndim == 0:
        return None
    if v.shape != (n,):
        raise ValueError(
            f"`{name}` must return a scalar or one value per example, shape ({n},); got shape "
            f"{v.shape}"
        )
    return v


def _evaluate(fn, params, data, batch_size, rng):
    """Mean NLL over ``data`` in batches and its standard error over the examples (from the
    batch means, weighted by size, when ``fn`` returns scalars)."""
    n = len(data)
    values, means, sizes = [], [], []
    for i in range(0, n, batch_size):
        batch = data[i : i + batch_size]
        out = fn(params, batch, rng)
        per = _per_example(out, len(batch), "valid_loss")
        if per is None:
            means.append(float(out))
        else:
            values.append(per)
            means.append(float(np.mean(per)))
        sizes.append(len(batch))
    if values and len(values) == len(means):
        allv = np.concatenate(values)
        mean = float(np.mean(allv))
        se = float(np.std(allv, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    else:
        w = np.asarray(sizes, float) / n
        mean = float(np.dot(w, means))
        k = len(means)
        if k > 1:
            var = float(np.dot(w, (np.asarray(means) - mean) ** 2)) * k / (k - 1)
            se = math.sqrt(var / k)
        else:
            se = math.inf
    return mean, se


def fit(
    loss: Callable,
    params,
    train,
    *,
    valid=None,
    rng: np.random.Generator,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
    optimizer=None,
    schedule=None,
    clip_norm: float | None = None,
    eval_every: int | None = None,
    patience: int | None = None,
    keep_best: bool = True,
    checkpoint=None,
    checkpoint_every: int | None = None,
    progress: bool = True,
    valid_loss: Callable | None = None,
    valid_batch_size: int | None = None,
    max_rollbacks: int = 5,
    after_step: Callable | None = None,
    blas_threads: int | None | str = "default",
):
    """Minimise the mean of ``loss(params, batch, rng)`` over minibatches of ``train``.

    Parameters
    ----------
    loss : callable
        ``loss(params, batch, rng)`` -> NLL in nats, per example ``(n,)`` or a scalar mean.
    params : pytree
        Initial parameters (not modified).
    train, valid : ndarray
        Examples on axis 0. ``valid`` (optional) is evaluated every ``eval_every`` steps.
    rng : numpy.random.Generator
        Every draw — batches, the loss's own randomness — comes from it. Validation draws from
        a generator seeded once from it, so ``eval_every`` does not change the training stream.
    steps, epochs : int
        Length of the run: exactly one of them (``epochs`` counts ``len(train) // batch_size``
        steps each).
    batch_size : int
        Examples per step (all of ``train`` if it is smaller).
    optimizer : Adam or SGD
        Default ``Adam(1e-3)``.
    schedule : schedule object, ``"constant"``, ``"cosine"`` or callable
        Learning-rate factor ``schedule(step, total)`` (:class:`Constant`, :class:`Cosine`,
        :class:`StepDecay`, each with ``warmup``).
    clip_norm : float, optional
        Rescale the gradient to this global norm when it is larger.
    eval_every : int, optional
        Validation period in steps (default: 20 evaluations per run).
    patience : int, optional
        Stop after this many evaluations without a new best validation NLL.
    keep_best : bool
        Return the parameters of the best validation NLL (with ``valid``; otherwise the last).
    checkpoint : str or Path, optional
        A ``.npz`` file. If it exists, training resumes from it and continues bit-identically to
        an uninterrupted run; it is (re)written every ``checkpoint_every`` steps (default
        ``eval_every``) and at the end.
    progress : bool
        A tqdm bar (running loss, validation NLL, it/s) when standard error is a terminal.
    valid_loss : callable, optional
        Evaluation NLL (default ``loss``): for example the exact-trace twin of a model trained
        with Hutchinson's estimator.
    valid_batch_size : int, optional
        Batch size of the evaluation (default ``max(batch_size, 512)``).
    max_rollbacks : int
        A non-finite loss or gradient (or validation NLL) never reaches the parameters: the run
        returns to the last good snapshot (the last evaluation, or the start), halves the
        learning rate and continues; after ``max_rollbacks`` such events it raises
        ``FloatingPointError`` naming the step.
    after_step : callable, optional
        ``after_step(params) -> params`` applied after each update (for example a spectral-norm
        state update).
    blas_threads : int or None
        BLAS threads for the run (threadpoolctl); default :func:`default_blas_threads`.

    Returns
    -------
    params : pytree
        The best-validated parameters (``keep_best`` with ``valid``) or the last ones.
    result : FitResult
    """
    if not callable(loss):
        raise TypeError(f"`loss` must be callable (params, batch, rng) -> NLL; got {type(loss)}")
    check_rng(rng)
    _check_params(params)
    train = _check_data(train, "train")
    if valid is not None:
        valid = _check_data(valid, "valid")
        if valid.shape[1:] != train.shape[1:]:
            raise ValueError(
                f"`valid` must have the event shape of `train`, {train.shape[1:]}; got "
                f"{valid.shape[1:]}"
            )
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    batches = _Batches(len(train), batch_size)
    if (steps is None) == (epochs is None):
        raise ValueError(
            f"exactly one of `steps` and `epochs` must be given; got steps={steps!r}, "
            f"epochs={epochs!r}"
        )
    if steps is not None:
        total = check_int(steps, "steps", minimum=1)
    else:
        total = check_int(epochs, "epochs", minimum=1) * batches.per_epoch
    optimizer = Adam() if optimizer is None else optimizer
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"`optimizer` must be Adam, SGD or alike; got {type(optimizer).__name__}")
    schedule = _check_schedule(schedule)
    if clip_norm is not None:
        clip_norm = check_positive(clip_norm, "clip_norm")
    eval_every = (
        max(1, total // 20)
        if eval_every is None
        else check_int(eval_every, "eval_every", minimum=1)
    )
    if patience is not None:
        patience = check_int(patience, "patience", minimum=1)
    keep_best = _check_flag(keep_best, "keep_best")
    progress = _check_flag(progress, "progress")
    checkpoint_every = (
        eval_every
        if checkpoint_every is None
        else check_int(checkpoint_every, "checkpoint_every", minimum=1)
    )
    valid_fn = loss if valid_loss is None else valid_loss
    if not callable(valid_fn):
        raise TypeError(f"`valid_loss` must be callable; got {type(valid_loss).__name__}")
    valid_batch_size = (
        max(batch_size, 512)
        if valid_batch_size is None
        else check_int(valid_batch_size, "valid_batch_size", minimum=1)
    )
    max_rollbacks = check_int(max_rollbacks, "max_rollbacks", minimum=0)
    if after_step is not None and not callable(after_step):
        raise TypeError(f"`after_step` must be callable; got {type(after_step).__name__}")
    if blas_threads == "default":
        blas_threads = default_blas_threads()
    elif blas_threads is not None:
        blas_threads = check_int(blas_threads, "blas_threads", minimum=1)
    ckpt = None
    if checkpoint is not None:
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"`checkpoint` must be a path; got {type(checkpoint).__name__}")
        ckpt = Path(checkpoint)
        if ckpt.suffix != ".npz":
            ckpt = ckpt.with_suffix(ckpt.suffix + ".npz") if ckpt.suffix else ckpt / "state.npz"
        ckpt.parent.mkdir(parents=True, exist_ok=True)

    loop = _Loop(
        loss=loss,
        train=train,
        valid=valid,
        valid_fn=valid_fn,
        rng=rng,
        total=total,
        batches=batches,
        optimizer=optimizer,
        schedule=schedule,
        clip_norm=clip_norm,
        eval_every=eval_every,
        patience=patience,
        keep_best=keep_best,
        ckpt=ckpt,
        checkpoint_every=checkpoint_every,
        progress=progress,
        valid_batch_size=valid_batch_size,
        max_rollbacks=max_rollbacks,
        after_step=after_step,
    )
    if blas_threads is None:
        return loop.run(params)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=blas_threads, user_api="blas"):
        return loop.run(params)


class _Loop:
    """The state of one :func:`fit` run; everything that :meth:`run` mutates is saved by
    :meth:`_state` and restored by :meth:`_resume`, which is what makes resuming exact."""

    def __init__(self, **kw):
        self.__dict__.update(kw)
        self.value_and_grad = autograd.value_and_grad(self._mean_loss)
        self.n_dims = int(np.prod(self.train.shape[1:])) if self.train.ndim > 1 else 1

    def _mean_loss(self, params, batch, rng):
        out = self.loss(params, batch, rng)
        if _per_example(out, len(batch), "loss") is None:
            return out
        return anp.sum(out) * (1.0 / len(batch))

    # -- state ------------------------------------------------------------------------------
    def _fresh(self, params):
        self.params = _copy(params)
        self.opt_state = self.optimizer.init(self.params)
        self.step = 0
        self.lr_factor = 1.0
        self.train_loss, self.grad_norm, self.lrs = [], [], []
        self.valid_steps, self.valid_nll, self.valid_se = [], [], []
        self.best = (math.inf, None, None)  # (nll, step, params)
        self.bad_evals = 0
        self.rollbacks = []
        self.stopped_early = False
        # validation draws from its own stream (seeded once) so eval_every leaves training alone
        self.valid_seed = int(self.rng.integers(2**63))
        self.snapshot = None

    def _state(self):
        trees = {
            "params": self.params,
            "opt_state": {k: v for k, v in self.opt_state.items() if k != "t"},
        }
        if self.best[2] is not None:
            trees["best_params"] = self.best[2]
        snap = self.snapshot
        trees["snap_params"] = snap["params"]
        trees["snap_opt_state"] = {k: v for k, v in snap["opt_state"].items() if k != "t"}
        return {
            "snap_t": int(snap["opt_state"]["t"]),
            "snap_step": snap["step"],
            "snap_n_valid": snap["n_valid"],
            "trees": trees,
            "opt_t": int(self.opt_state["t"]),
            "step": self.step,
            "total": self.total,
            "lr_factor": self.lr_factor,
            "rng_state": self.rng.bit_generator.state,
            "rng_kind": type(self.rng.bit_generator).__name__,
            "perm": None if self.batches.perm is None else self.batches.perm.tolist(),
            "pos": self.batches.pos,
            "train_loss": self.train_loss,
            "grad_norm": self.grad_norm,
            "lrs": self.lrs,
            "valid_steps": self.valid_steps,
            "valid_nll": self.valid_nll,
            "valid_se": self.valid_se,
            "best_nll": None if not math.isfinite(self.best[0]) else self.best[0],
            "best_step": self.best[1],
            "bad_evals": self.bad_evals,
            "rollbacks": self.rollbacks,
            "stopped_early": self.stopped_early,
            "valid_seed": self.valid_seed,
        }

    def _resume(self, params):
        s = load_checkpoint(self.ckpt)
        if s["total"] != self.total:
            raise ValueError(
                f"`checkpoint` {str(self.ckpt)!r} belongs to a run of {s['total']} steps; this "
                f"call asks for {self.total}"
            )
        if _structure(s["params"]) != _structure(params):
            raise ValueError(
                f"`checkpoint` {str(self.ckpt)!r} holds parameters of another structure than "
                "`params`"
            )
        if s["rng_kind"] != type(self.rng.bit_generator).__name__:
            raise ValueError(
                f"`rng` must use the bit generator of the checkpoint, {s['rng_kind']}; got "
                f"{type(self.rng.bit_generator).__name__}"
            )
        self.params = s["params"]
        self.opt_state = dict(s["opt_state"], t=int(s["opt_t"]))
        self.step, self.lr_factor = int(s["step"]), float(s["lr_factor"])
        self.rng.bit_generator.state = s["rng_state"]
        self.batches.perm = None if s["perm"] is None else np.asarray(s["perm"], dtype=np.int64)
        self.batches.pos = int(s["pos"])
        self.train_loss, self.grad_norm, self.lrs = s["train_loss"], s["grad_norm"], s["lrs"]
        self.valid_steps, self.valid_nll = s["valid_steps"], s["valid_nll"]
        self.valid_se = s["valid_se"]
        best_nll = math.inf if s["best_nll"] is None else s["best_nll"]
        self.best = (best_nll, s["best_step"], s.get("best_params"))
        self.bad_evals, self.rollbacks = int(s["bad_evals"]), s["rollbacks"]
        self.stopped_early = bool(s["stopped_early"])
        self.valid_seed = int(s["valid_seed"])
        self.snapshot = {
            "params": s["snap_params"],
            "opt_state": dict(s["snap_opt_state"], t=int(s["snap_t"])),
            "step": int(s["snap_step"]),
            "n_valid": int(s["snap_n_valid"]),
        }

    def _snap(self):
        return {
            "params": _copy(self.params),
            "opt_state": _copy_state(self.opt_state),
            "step": self.step,
            "n_valid": len(self.valid_steps),
        }

    def _rollback(self, reason):
        self.rollbacks.append([self.step, reason])
        if len(self.rollbacks) > self.max_rollbacks:
            raise FloatingPointError(
                f"training diverged: {reason} at step {self.step}; rolled back "
                f"{self.max_rollbacks} time(s) with the learning rate halved each time"
            )
        snap = self.snapshot
        self.params = _copy(snap["params"])
        self.opt_state = _copy_state(snap["opt_state"])
        self.step = snap["step"]
        del self.train_loss[self.step :], self.grad_norm[self.step :], self.lrs[self.step :]
        n = snap["n_valid"]
        del self.valid_steps[n:], self.valid_nll[n:], self.valid_se[n:]
        self.lr_factor *= 0.5

    # -- evaluation -------------------------------------------------------------------------
    def _evaluate(self):
        """Validate at the current step; returns False when the NLL is not finite."""
        if self.valid is None:
            return True
        vrng = np.random.default_rng([self.valid_seed, self.step])
        nll, se = _evaluate(self.valid_fn, self.params, self.valid, self.valid_batch_size, vrng)
        if not math.isfinite(nll):
            return False
        self.valid_steps.append(self.step)
        self.valid_nll.append(nll)
        self.valid_se.append(se)
        if nll < self.best[0]:
            self.best = (nll, self.step, _copy(self.params) if self.keep_best else None)
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return True

    # -- run --------------------------------------------------------------------------------
    def run(self, params):
        start = time.perf_counter()
        if self.ckpt is not None and self.ckpt.exists():
            self._resume(params)
        else:
            self._fresh(params)
            if not self._evaluate():
                raise FloatingPointError(
                    "the validation NLL of the initial parameters is not finite"
                )
            self.snapshot = self._snap()
        bar = self._bar()
        try:
            if self.step < self.total and not self.stopped_early:
                self._one_step(bar)  # the layers check the parameter tree once, here
            # every later update keeps the tree's structure, shapes and dtypes, and fit checks
            # its values itself (finite loss, gradient and parameters): the per-call check of
            # the layers would repeat that work at every step (10-20 % of a small 2-D step)
            with trusted_params():
                while self.step < self.total and not self.stopped_early:
                    self._one_step(bar)
        finally:
            if bar is not None:
                bar.close()
        if self.ckpt is not None:
            _save_state(self.ckpt, self._state())
        final = self.params
        if self.keep_best and self.valid is not None and self.best[2] is not None:
            final = self.best[2]
        bpd = 1.0 / (self.n_dims * math.log(2))
        nll = np.asarray(self.valid_nll, float)
        se = np.asarray(self.valid_se, float)
        result = FitResult(
            train_loss=np.asarray(self.train_loss, float),
            grad_norm=np.asarray(self.grad_norm, float),
            lr=np.asarray(self.lrs, float),
            valid_steps=np.asarray(self.valid_steps, int),
            valid_nll=nll,
            valid_nll_se=se,
            valid_bpd=nll * bpd,
            valid_bpd_se=se * bpd,
            best_step=self.best[1] if self.valid is not None else None,
            steps_done=self.step,
            stopped_early=self.stopped_early,
            rollbacks=[tuple(r) for r in self.rollbacks],
            wall_time=time.perf_counter() - start,
        )
        return final, result

    def _bar(self):
        if not (self.progress and sys.stderr.isatty()):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total, initial=self.step, leave=False, dynamic_ncols=True)

    def _one_step(self, bar):
        idx = self.batches.next(self.rng)
        lr = self.optimizer.lr * self.lr_factor * self.schedule(self.step, self.total)
        value, grads = self.value_and_grad(self.params, self.train[idx], self.rng)
        value = float(value)
        norm = global_norm(grads)
        if not math.isfinite(value) or not math.isfinite(norm):
            what = "non-finite loss" if not math.isfinite(value) else "non-finite gradient"
            self._rollback(what)
            return
        if self.clip_norm is not None and norm > self.clip_norm:
            scale = self.clip_norm / norm
            grads = tree_map(lambda g: g * scale, grads)
        params, opt_state = self.optimizer.update(self.params, grads, self.opt_state, lr)
        if not _all_finite(params):
            self._rollback("non-finite parameters after the update")
            return
        if self.after_step is not None:
            params = self.after_step(params)
        self.params, self.opt_state = params, opt_state
        self.step += 1
        self.train_loss.append(value)
        self.grad_norm.append(norm)
        self.lrs.append(lr)
        if self.step % self.eval_every == 0 or self.step == self.total:
            if not self._evaluate():
                self._rollback("non-finite validation NLL")
                return
            self.snapshot = self._snap()
            if self.patience is not None and self.bad_evals >= self.patience:
                self.stopped_early = True
        if self.ckpt is not None and (
            self.step % self.checkpoint_every == 0 or self.step == self.total
        ):
            _save_state(self.ckpt, self._state())
        if bar is not None:
            post = {"loss": f"{value:.3f}"}
            if self.valid_nll:
                post["valid"] = f"{self.valid_nll[-1]:.3f}"
            bar.set_postfix(post, refresh=False)
            bar.update(1)
