"""A small training loop: Adam on a pytree of parameters, with a progress line.

The loss is any scalar function ``loss(params, batch, rng)``; gradients come from
``autograd.value_and_grad``. Kept deliberately small: experiments train 1-D and 2-D toy flows
in seconds, and users who need more bring their own loop.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import autograd
import numpy as np

from ._checks import check_int, check_positive, check_rng

__all__ = ["Adam", "fit", "tree_map", "tree_zeros_like"]


def tree_map(fn, *trees):
    """Apply ``fn`` leaf-wise to pytrees of identical structure."""
    first = trees[0]
    if isinstance(first, dict):
        return {k: tree_map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (list, tuple)):
        out = [tree_map(fn, *items) for items in zip(*trees, strict=True)]
        return type(first)(out) if isinstance(first, tuple) else out
    if first is None:
        return None
    return fn(*trees)


def tree_zeros_like(tree):
    return tree_map(np.zeros_like, tree)


class Adam:
    """Adam (Kingma & Ba 2015, arXiv:1412.6980) on a parameter pytree.

    .. math:: m \\leftarrow \\beta_1 m + (1-\\beta_1) g,\\;
        v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2,
        \\; \\theta \\leftarrow \\theta - \\eta\\, \\hat m / (\\sqrt{\\hat v} + \\epsilon).
    """

    def __init__(self, lr: float = 1e-3, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
        self.lr = check_positive(lr, "lr")
        self.b1, self.b2, self.eps = b1, b2, eps

    def init(self, params):
        return {"m": tree_zeros_like(params), "v": tree_zeros_like(params), "t": 0}

    def update(self, params, grads, state):
        t = state["t"] + 1
        m = tree_map(lambda m, g: self.b1 * m + (1 - self.b1) * g, state["m"], grads)
        v = tree_map(lambda v, g: self.b2 * v + (1 - self.b2) * g * g, state["v"], grads)
        c1, c2 = 1 - self.b1**t, 1 - self.b2**t
        params = tree_map(
            lambda p, m, v: p - self.lr * (m / c1) / (np.sqrt(v / c2) + self.eps), params, m, v
        )
        return params, {"m": m, "v": v, "t": t}


def fit(
    loss: Callable,
    params,
    data: np.ndarray,
    *,
    rng: np.random.Generator,
    steps: int = 1000,
    batch_size: int = 128,
    lr: float = 1e-3,
    log_every: int = 0,
    callback: Callable | None = None,
):
    """Minimise ``loss(params, batch, rng)`` over minibatches of ``data`` with Adam.

    Returns ``(params, history)`` where ``history`` holds the loss of every step. A non-finite
    loss stops training with a ``FloatingPointError`` naming the step.
    """
    check_rng(rng)
    steps = check_int(steps, "steps", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    opt = Adam(lr)
    state = opt.init(params)
    value_and_grad = autograd.value_and_grad(loss)
    history = np.empty(steps)
    start = time.perf_counter()
    n = len(data)
    for step in range(steps):
        idx = rng.choice(n, size=min(batch_size, n), replace=False)
        value, grads = value_and_grad(params, data[idx], rng)
        if not np.isfinite(value):
            raise FloatingPointError(f"loss became non-finite ({value}) at step {step}")
        params, state = opt.update(params, grads, state)
        history[step] = value
        if callback is not None:
            callback(step, params, value)
        if log_every and (step % log_every == 0 or step == steps - 1):
            rate = (step + 1) / max(time.perf_counter() - start, 1e-9)
            sys.stderr.write(f"\r  step {step + 1}/{steps}  loss {value:.4f}  ({rate:.1f} it/s)")
            if step == steps - 1:
                sys.stderr.write("\n")
    return params, history
