"""Sweep wall time: the serial loop against a 2-worker Dask ``LocalCluster`` (and 2 local
processes), alternating in one process.

Workload: a small bits/dim sweep, ``models x seeds`` runs of :func:`experiments.bits_per_dim.
train_one` on the bundled digits (``--steps`` steps each, width 16). The cluster is started
once, before the rounds (its start-up time is printed separately); each round runs the serial
sweep and the parallel ones in turn, and the figure reported is the median over rounds of the
per-round ratio parallel / serial. The results are also checked to be identical. On a machine
whose two cores are busy with other work the parallel speed-up shrinks towards 1: the ratio is
only meaningful beside the load printed with it.

Run: ``python -m experiments.bench_sweep [--rounds N] [--steps N] [--json PATH]`` (the command
line of every benchmark, ``experiments/_timing.py``).
"""

from __future__ import annotations

import os
import time

from experiments import _sweep
from experiments._timing import bench_main, median_ratio
from experiments.bits_per_dim import train_one


def _runs(steps):
    base = {
        "data": "digits",
        "steps": steps,
        "batch_size": 64,
        "lr": 1e-3,
        "width": 16,
        "iw_samples": 1,
        "data_dir": None,
    }
    return [{**base, "model": m, "seed": s} for m in ("nice", "made", "maf") for s in (0, 1)]


def _strip(results):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in results]


def sweep(rounds: int = 2, threads: int = 1, steps: int = 150) -> dict:
    """The bits/dim sweep (3 models x 2 seeds): serial, 2 Dask workers, 2 local processes."""
    from distributed import Client, LocalCluster

    runs = _runs(steps)
    start = time.perf_counter()
    cluster = LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    )
    client = Client(cluster)
    startup = time.perf_counter() - start
    times = {"serial": [], "dask_2_workers": [], "processes_2": []}
    reference = None
    try:
        for _ in range(rounds):
            for name in times:
                t0 = time.perf_counter()
                if name == "serial":
                    out = _sweep.run_sweep(train_one, runs)
                elif name == "dask_2_workers":
                    out = _sweep.run_sweep(train_one, runs, scheduler=client)
                else:
                    out = _sweep.run_sweep(train_one, runs, jobs=2)
                times[name].append(time.perf_counter() - t0)
                if reference is None:
                    reference = _strip(out)
                elif _strip(out) != reference:
                    raise AssertionError(f"{name} gave other numbers than the serial sweep")
    finally:
        client.close()
        cluster.close()
    report = {
        "runs": len(runs),
        "steps": steps,
        "cluster_startup_s": startup,
        "seconds": times,
        "ratio_dask_over_serial": median_ratio(times["dask_2_workers"], times["serial"]),
        "ratio_processes_over_serial": median_ratio(times["processes_2"], times["serial"]),
        "load_average": os.getloadavg(),
    }
    for key, value in report.items():
        print(f"{key:>28s}: {value}")
    return report


#: The workloads of this benchmark (``--only`` picks from these ids).
WORKLOADS = {"sweep": sweep}


def main(argv=None) -> dict:
    """``python -m experiments.bench_sweep [--rounds N] [--steps N] [--json PATH]``: the shared
    command line of ``experiments/_timing.py`` (the workers use one BLAS thread each)."""
    return bench_main(
        argv,
        doc=__doc__,
        workloads=WORKLOADS,
        rounds=2,
        threads=1,
        options=[(("--steps",), {"type": int, "default": 150, "help": "steps per run"})],
    )


if __name__ == "__main__":
    main()
