"""Cost of the parameter check (issue 9) on W5 and W9: the same step with the check and inside
:func:`flowmath.layers.base.trusted_params` (which skips it), timed alternately in one process.

- **W5**: RealNVP on d = 784, 8 affine couplings (half masks, alternating), MLP 392 -> 512 ->
  512 -> 784, batch 256, float32: log_prob and the gradient of its mean (6.9 M parameters, all
  read once per call by the check).
- **W9**: RealNVP on d = 2, 8 affine couplings, MLP 1 -> 64 -> 64 -> 2 (tanh), batch 256,
  float64: the mean NLL and its gradient (the step the toy experiments repeat; 34 k
  parameters, 56 leaves: here the check's per-leaf Python overhead is what shows).

Reported: the median per-round ratio checked / trusted (1.00 = invisible), both medians, and the
check alone (``Chain._check_params`` on the same parameters) as a share of the step.
Run: ``python -m experiments.bench_param_check [--rounds N] [--only W5 W9] [--threads N]
[--json PATH]`` (the command line of every benchmark, ``experiments/_timing.py``).
"""

from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np

import flowmath as fm
from flowmath.layers.base import trusted_params

from ._timing import (
    alternate,
    bench_main,
    blas_threads,
    median_ms,
    median_ratio,
    warm_allocator,
)


def _step(d, hidden, dtype, activation, seed=0):
    rng = np.random.default_rng(seed)
    if d == 2:
        x = fm.data.toy("8gaussians", 256, rng)
    else:
        x = rng.normal(size=(256, d))
    x = x.astype(dtype)
    layers = [
        fm.AffineCoupling("half", hidden, flip=bool(k % 2), activation=activation) for k in range(8)
    ]
    flow = fm.Flow(fm.Chain(layers))
    params = flow.init(rng, x)

    def loss(p):
        return -anp.sum(flow.log_prob(p, x)) * (1.0 / x.shape[0])

    value_and_grad = autograd.value_and_grad(loss)

    def checked():
        return value_and_grad(params)

    def trusted():
        with trusted_params():
            return value_and_grad(params)

    a, b = checked(), trusted()
    assert a[0] == b[0], "the check must not change the result"

    def check_alone():
        flow.layer._check_params(params, x.shape[1:], "params", x.dtype)

    return checked, trusted, check_alone


_WORKLOADS = {
    "W5": (784, (512, 512), np.float32, "relu", None),
    "W9": (2, (64, 64), np.float64, "tanh", 0.05),
}


def _workload(name: str):
    d, hidden, dtype, act, min_time = _WORKLOADS[name]

    def run(rounds: int = 15, threads: int = 2) -> dict:
        checked, trusted, check_alone = _step(d, hidden, dtype, act)
        times = alternate(
            {"checked": checked, "trusted": trusted, "check alone": check_alone},
            rounds,
            warmup=2,
            min_time=min_time,
            mirror=True,
        )
        r = {
            "checked_ms": median_ms(times["checked"]),
            "trusted_ms": median_ms(times["trusted"]),
            "ratio": median_ratio(times["checked"], times["trusted"]),
            "check_ms": median_ms(times["check alone"]),
            "check_share": median_ratio(times["check alone"], times["trusted"]),
        }
        print(
            f"{name}: with the parameter check {r['checked_ms']:.2f} ms, without "
            f"{r['trusted_ms']:.2f} ms, median ratio {r['ratio']:.3f}; the check alone "
            f"{r['check_ms']:.3f} ms ({100 * r['check_share']:.2f} % of the step)"
        )
        return r

    run.__doc__ = f"{name}: the step with and without the parameter check (d = {d}, {act})."
    return run


#: The workloads of this benchmark (``--only`` picks from these ids).
WORKLOADS = {name: _workload(name) for name in _WORKLOADS}


def run(rounds: int = 15) -> dict:
    """Both workloads with 2 BLAS threads: ``{id: {checked_ms, trusted_ms, ratio, ...}}``."""
    blas_threads(2)
    warm_allocator()
    return {name: fn(rounds, 2) for name, fn in WORKLOADS.items()}


def main(argv=None) -> dict:
    """``python -m experiments.bench_param_check [--rounds N] [--only W5 W9] [--threads N]
    [--json PATH]``: the shared command line of ``experiments/_timing.py``."""
    return bench_main(argv, doc=__doc__, workloads=WORKLOADS, rounds=15, threads=2)


if __name__ == "__main__":
    main()
