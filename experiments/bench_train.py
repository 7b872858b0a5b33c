"""W9: the small-model training step that the 2-D toy experiments repeat, against plain torch
(one thread) and zuko, timed alternately in one process.

Workload (the benchmark table of the docs, W9): RealNVP on d = 2, 8 affine couplings with
alternating masks (``"half"``, ``flip`` on every other layer), conditioner MLP
1 -> 64 -> 64 -> 2 (``tanh`` hidden activations; ``s = a * tanh(raw)``), batch 256 from
8gaussians, float64; one step is the mean negative log-likelihood under N(0, I) and its
gradient with respect to every parameter.

- **flowmath**: ``Flow(Chain([AffineCoupling(...)] * 8))``, ``autograd.value_and_grad`` of
  ``-mean(log_prob)``.
- **torch-1t**: the same model in plain torch with flowmath's initial parameters (a twin: the
  loss agrees to rounding, printed), one intra-op thread (torch's fastest setting for this
  size; two threads on a shared 2-core machine are easily disturbed).
- **trusted**: flowmath's step inside ``flowmath.layers.base.trusted_params()``, i.e. without
  the per-call check of the parameter tree (what that check costs at this size).
- **zuko-1t**: ``zuko.flows.RealNVP(2, transforms=8, hidden_features=(64, 64))`` with the same
  activation; its scale parametrisation and initialisation differ, so it is context, not a twin.

For tiny matrices the per-operation overhead of the autograd graph, not the arithmetic,
dominates: the products of one step are ~3 MFLOP.

Timing protocol: one process, ~32 MiB allocated and freed once, warm-up, then rounds that
alternate the contenders (mirrored on odd rounds), each sample looped to last >= 50 ms; the
figure reported is the median over rounds of the per-round ratio flowmath / baseline. torch and
zuko are optional (``pip install 'flowmath[bench]'``): missing ones are skipped with a message.

Run: ``python -m experiments.bench_train [--rounds N] [--threads 1] [--json PATH]
[--activation tanh|relu]`` (the command line of every benchmark, ``experiments/_timing.py``).
"""

from __future__ import annotations

import math
import os

from experiments._timing import (
    alternate,
    bench_main,
    import_baselines,
    print_ratio_table,
    ratio_table,
    thread_env_defaults,
)

# one BLAS thread: the matrices are tiny (64 x 64), threads only add synchronisation
thread_env_defaults(int(os.environ.get("FLOWMATH_BENCH_THREADS", "1")))

import autograd  # noqa: E402
import autograd.numpy as anp  # noqa: E402
import numpy as np  # noqa: E402

import flowmath as fm  # noqa: E402
from flowmath.layers.base import trusted_params  # noqa: E402

__all__ = [
    "BATCH",
    "D",
    "HIDDEN",
    "N_LAYERS",
    "WORKLOADS",
    "flowmath_step",
    "main",
    "torch_step",
    "w9",
]

D, HIDDEN, N_LAYERS, BATCH = 2, (64, 64), 8, 256


def _coupling(k: int, activation: str):
    kwargs = {} if activation == "relu" else {"activation": activation}
    return fm.AffineCoupling("half", HIDDEN, flip=bool(k % 2), **kwargs)


def flowmath_step(x, rng, activation: str = "tanh"):
    """``(step, flow, params)``: ``step()`` returns the loss and its gradient."""
    flow = fm.Flow(fm.Chain([_coupling(k, activation) for k in range(N_LAYERS)]))
    params = flow.init(rng, x)

    def loss(p):
        return -anp.mean(flow.log_prob(p, x))

    value_and_grad = autograd.value_and_grad(loss)
    return (lambda: value_and_grad(params)), flow, params, loss


def torch_step(torch, params, x, activation: str = "tanh"):
    """The same model in plain torch with flowmath's parameters: ``(step, loss)``."""
    act = torch.tanh if activation == "tanh" else torch.relu
    leaves = []

    def leaf(a):
        t = torch.from_numpy(np.array(a, dtype=np.float64)).requires_grad_(True)
        leaves.append(t)
        return t

    layers = [
        ([(leaf(q["W"]), leaf(q["b"])) for q in p["net"]], leaf(p["scale"]), bool(k % 2))
        for k, p in enumerate(params)
    ]
    xt = torch.from_numpy(x)
    const = 0.5 * D * math.log(2 * math.pi)

    def loss():
        v, ld = xt, 0.0
        for net, amp, flip in layers:
            first, second = v[:, :1], v[:, 1:]
            va, vb = (second, first) if flip else (first, second)
            h = va
            for i, (W, b) in enumerate(net):
                h = torch.addmm(b, h, W)
                if i < len(net) - 1:
                    h = act(h)
            raw, t = h.chunk(2, dim=1)
            s = amp * torch.tanh(raw)
            vb = vb * torch.exp(s) + t
            v = torch.cat([vb, va] if flip else [va, vb], dim=1)
            ld = ld + s.sum(dim=1)
        return -(-0.5 * (v * v).sum(dim=1) - const + ld).mean()

    def step():
        for t in leaves:
            t.grad = None
        value = loss()
        value.backward()
        return value

    return step, loss


def zuko_step(torch, x, activation: str = "tanh"):
    try:
        import zuko
    except ImportError:
        print("note: zuko is not installed: zuko baseline skipped")
        return None
    torch.manual_seed(0)
    act = torch.nn.Tanh if activation == "tanh" else torch.nn.ReLU
    flow = zuko.flows.RealNVP(D, transforms=N_LAYERS, hidden_features=HIDDEN, activation=act)
    flow = flow.double()
    xt = torch.from_numpy(x)

    def step():
        flow.zero_grad(set_to_none=True)
        value = -flow().log_prob(xt).mean()
        value.backward()
        return value

    return step


def w9(rounds: int = 15, threads: int = 1, activation: str = "tanh") -> dict:
    """W9: RealNVP d = 2 (8 couplings, MLP 1-64-64-2), loss + gradient, batch 256, float64."""
    rng = np.random.default_rng(20261201)
    x = fm.data.eight_gaussians(BATCH, rng)
    step, flow, params, loss = flowmath_step(x, rng, activation)

    def trusted():
        with trusted_params():
            return step()

    fns = {"flowmath": step, "trusted": trusted}
    result = {}

    def skip(exc):
        print("note: torch is not installed: baselines skipped (pip install 'flowmath[bench]')")

    (torch,) = import_baselines("torch", threads=threads, on_missing=skip)
    if torch is not None:
        t_step, t_loss = torch_step(torch, params, x, activation)
        with torch.no_grad():
            ref = float(t_loss())
        result["loss_rel_diff_vs_torch"] = abs(float(loss(params)) - ref) / abs(ref)
        fns[f"torch-{threads}t"] = t_step
        z = zuko_step(torch, x, activation)
        if z is not None:
            fns[f"zuko-{threads}t"] = z
    times = alternate(fns, rounds, warmup=3, min_time=0.05, mirror=True)
    result["rows"] = ratio_table(times)
    print_ratio_table(
        f"W9 RealNVP d=2, 8 couplings, MLP 1-64-64-2 ({activation}), batch 256, float64: "
        "loss + gradient",
        result["rows"],
    )
    if "loss_rel_diff_vs_torch" in result:
        print(f"  loss flowmath vs torch twin: rel. diff {result['loss_rel_diff_vs_torch']:.1e}")
    return result


#: The workloads of this benchmark (``--only`` picks from these ids).
WORKLOADS = {"W9": w9}


def main(argv=None) -> dict:
    """``python -m experiments.bench_train [--rounds N] [--threads N] [--json PATH]
    [--activation tanh|relu]``: the shared command line of ``experiments/_timing.py``."""
    return bench_main(
        argv,
        doc=__doc__,
        workloads=WORKLOADS,
        rounds=15,
        threads=int(os.environ.get("FLOWMATH_BENCH_THREADS", "1")),
        options=[(("--activation",), {"choices": ["tanh", "relu"], "default": "tanh"})],
    )


if __name__ == "__main__":
    main()
