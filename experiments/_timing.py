"""Timing plumbing shared by the benchmarks (``bench_*``) and the timed experiments.

The machines are shared and noisy (``docs/benchmarks.rst``): absolute times drift, so contenders are
compared only within one process. The protocol these helpers implement:

1. fix the thread counts: BLAS through :func:`thread_env_defaults` (before NumPy is imported),
   :func:`blas_threads` (after) or :func:`in_child_process` (a fresh interpreter); torch through
   :func:`import_baselines`, which also skips a missing baseline with a message;
2. allocate and free ~31 MiB once (:func:`warm_allocator`), so every contender meets a settled
   allocator;
3. warm up, then time the contenders in alternation, A B A B ... (:func:`alternate`), each
   sample looped to last at least ``min_time`` when calls are short (:func:`calibrate`);
4. report medians and the median of the per-round ratios (:func:`median_ms`,
   :func:`median_ratio`, :func:`summary`), not a ratio of medians: a burst of load hits both
   members of a round alike and cancels in their ratio.

Every ``experiments/bench_*.py`` has the same shape: a ``WORKLOADS`` dict from a workload's id
to a function ``fn(rounds, threads, **options) -> dict`` that times it, prints its table and
returns its numbers, and a ``main(argv)`` that hands them to :func:`bench_main`, which gives
every benchmark the same command line (``--rounds``, ``--only``, ``--threads``, ``--json``,
``--list``) and the same JSON record (threads, rounds, load average, versions, results).

This module imports only the standard library at load time (NumPy lazily), so that
:func:`thread_env_defaults` can run before NumPy reads its thread variables.
"""

from __future__ import annotations

import multiprocessing
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

__all__ = [
    "THREAD_VARS",
    "alternate",
    "bench_main",
    "blas_threads",
    "calibrate",
    "clock",
    "import_baselines",
    "in_child_process",
    "median_ms",
    "median_ratio",
    "print_ratio_table",
    "ratio_table",
    "ratios_of",
    "summary",
    "thread_env_defaults",
    "warm_allocator",
]

#: The environment variables through which BLAS and OpenMP read their thread counts.
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# -- threads ----------------------------------------------------------------------------------


def thread_env_defaults(threads: int) -> None:
    """Default every variable of :data:`THREAD_VARS` to ``threads`` (an explicit setting wins).

    BLAS reads these once, when NumPy is first imported: call this before importing NumPy
    (for a module run as ``python -m experiments.bench_x``). Once NumPy is loaded, use
    :func:`blas_threads` or :func:`in_child_process`."""
    for var in THREAD_VARS:
        os.environ.setdefault(var, str(threads))


def blas_threads(n: int) -> int | None:
    """Set the thread count of every BLAS loaded in this process (NumPy's and SciPy's) with
    threadpoolctl; returns the previous count of the first one, or ``None`` when no BLAS is
    loaded. Environment variables are read only when NumPy is first imported, too late for a
    module that the ``flowmath`` command imports."""
    from threadpoolctl import threadpool_info, threadpool_limits

    blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
    if not blas:
        return None
    threadpool_limits(limits=int(n), user_api="blas")
    return int(blas[0]["num_threads"])


def in_child_process(fn: Callable, arg, threads: int | None):
    """``fn(arg)`` in a freshly spawned interpreter whose BLAS uses ``threads`` threads
    (``None``: this process's settings). BLAS reads its thread count once, at import, so a
    fresh process is the only portable way to set it. On an oversubscribed machine a
    multi-threaded BLAS can be 10-100x slower on mid-sized matrices (its threads wait for each
    other), which hides every exponent; one thread measures the algorithm's cost. ``fn`` must
    be picklable (a module-level function)."""
    if threads is None:
        return fn(arg)
    saved = {k: os.environ.get(k) for k in THREAD_VARS}
    os.environ.update({k: str(int(threads)) for k in THREAD_VARS})
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            return pool.apply(fn, (arg,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def import_baselines(
    *names: str, threads: int, on_missing: Callable[[ImportError], None] | None = None
) -> tuple:
    """Import the optional baseline packages ``names`` (the first must be ``"torch"``) and give
    torch ``threads`` intra-op threads.

    Returns a tuple of the modules, in the order named; if any is missing, a tuple of ``None``
    of the same length, after calling ``on_missing(exc)`` (for the skip message; ``None``:
    skip silently). Baselines are an optional extra (``pip install 'flowmath[bench]'``)."""
    import importlib

    if not names or names[0] != "torch":
        raise ValueError(f"`names` must start with 'torch'; got {names}")
    try:
        modules = tuple(importlib.import_module(name) for name in names)
    except ImportError as exc:
        if on_missing is not None:
            on_missing(exc)
        return (None,) * len(names)
    modules[0].set_num_threads(threads)
    return modules


# -- allocator --------------------------------------------------------------------------------


def warm_allocator(mib: int = 31) -> None:
    """Allocate, touch and free ``mib`` MiB once (``docs/benchmarks.rst``): the allocator's state
    moves timings by up to 3x, and this leaves it settled for every contender alike.

    Why just under 32 MiB: glibc serves a block above its mmap threshold (128 KiB at start)
    with a fresh mapping, and freeing such a block raises the threshold to the block's size
    (and the trim threshold to twice that) only for blocks of at most 32 MiB. One freed
    31 MiB block leaves arrays up to 31 MiB on the heap and up to 62 MiB of freed memory kept
    for reuse. A 32 MiB block (plus its header) is over the limit and settles nothing: W5's
    step then maps, faults in and unmaps ~14 000 fresh pages per call (~20 % of its time at
    one thread), where the floor, reusing its few arrays, faults in none."""
    import numpy as np

    block = np.ones(mib * 2**20 // 8)
    block.sum()
    del block


# -- timing -----------------------------------------------------------------------------------


def clock(fn: Callable) -> tuple[float, object]:
    """``(seconds, fn())``: the wall-clock time of one call and what it returned."""
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def calibrate(fn: Callable, min_time: float, max_loops: int = 1 << 20) -> int:
    """Number of back-to-back calls of ``fn`` that last at least ``min_time`` seconds (doubling
    from 1, at most ``max_loops``), so that timer resolution and call jitter stay small against
    a sample. Call ``fn`` once before, as a warm-up."""
    loops = 1
    while True:
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        if time.perf_counter() - start >= min_time or loops >= max_loops:
            return loops
        loops *= 2


def alternate(
    fns: Mapping[str, Callable],
    rounds: int,
    *,
    warmup: int = 1,
    min_time: float | None = None,
    mirror: bool = False,
    order: Sequence | None = None,
) -> dict:
    """Seconds per call of each function in ``fns``, timed in alternation (A B A B ...).

    Every function is first called ``warmup`` times (in turn); then, with ``min_time`` given,
    its loop count is set by :func:`calibrate` (otherwise one call per sample). Each of the
    ``rounds`` rounds times the functions in ``order`` (default: the order of ``fns``; a name
    may appear more than once, e.g. ``[ref, b, ref, c]`` pairs the reference with each
    baseline), reversed on odd rounds when ``mirror`` is set (A B, B A: no position advantage).

    Returns ``{name: [seconds per call, one per occurrence per round]}``; the samples of one
    round sit at the same positions, so per-round ratios are ``median_ratio(t[a], t[b])``.
    """
    names = list(fns)
    order = names if order is None else list(order)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    loops = {name: 1 if min_time is None else calibrate(fns[name], min_time) for name in names}
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in order[::-1] if mirror and r % 2 else order:
            fn, k = fns[name], loops[name]
            start = time.perf_counter()
            for _ in range(k):
                fn()
            times[name].append((time.perf_counter() - start) / k)
    return times


def median_ms(seconds: Sequence[float]) -> float:
    """The median of ``seconds``, in milliseconds."""
    return 1e3 * statistics.median(seconds)


def median_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """The median of the elementwise ratios ``num[i] / den[i]`` (samples timed side by side)."""
    if len(num) != len(den):
        raise ValueError(
            f"`num` and `den` must have the same length; got {len(num)} and {len(den)}"
        )
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def summary(times: Mapping[str, Sequence[float]], reference: str) -> dict:
    """``{name: {"median_ms": ..., "ratio_to_<reference>": ...}}`` for the output of
    :func:`alternate`: the median time and the median per-round ratio to ``reference``."""
    ref = times[reference]
    return {
        name: {"median_ms": median_ms(ts), "ratio_to_" + reference: median_ratio(ts, ref)}
        for name, ts in times.items()
    }


def ratios_of(times: Mapping[str, Sequence[float]], name: str) -> dict:
    """``{other: median per-round ratio times[name] / times[other]}`` for every other contender
    of one :func:`alternate` run (``name`` over its floor, over each baseline)."""
    return {other: median_ratio(times[name], ts) for other, ts in times.items() if other != name}


def ratio_table(times: Mapping[str, Sequence[float]], name: str = "flowmath") -> dict:
    """``{row: {"median_ms", "fm_over"}}`` for the output of :func:`alternate`: each row's
    median and ``name``'s median per-round ratio to it (``fm_over`` is 1 for ``name`` itself)."""
    ratios = ratios_of(times, name)
    return {
        row: {"median_ms": median_ms(ts), "fm_over": ratios.get(row, 1.0)}
        for row, ts in times.items()
    }


def print_ratio_table(title: str, rows: Mapping[str, Mapping[str, float]]) -> None:
    """Print a :func:`ratio_table` under ``title``."""
    print(f"\n{title}")
    print(f"  {'row':<18s} {'median ms':>10s} {'flowmath / row':>15s}")
    for row, stats in rows.items():
        print(f"  {row:<18s} {stats['median_ms']:10.2f} {stats['fm_over']:15.2f}")


# -- the benchmarks' command line ---------------------------------------------------------------


def _jsonable(obj):
    """``obj`` with NumPy scalars and arrays, tuples and non-string keys made JSON-ready."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # NumPy scalar or array
        return obj.tolist()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def bench_main(
    argv: Sequence[str] | None,
    *,
    doc: str | None,
    workloads: Mapping[str, Callable[..., dict]],
    rounds: int,
    threads: int = 2,
    options: Sequence[tuple[Sequence[str], dict]] = (),
) -> dict:
    """The command line every ``experiments/bench_*.py`` shares; returns the results.

    Parameters
    ----------
    argv : sequence of str or None
        The arguments (``None``: ``sys.argv[1:]``): ``--rounds N`` alternating rounds,
        ``--only ID [ID ...]`` a subset of the workloads (default: all, in order),
        ``--threads N`` for NumPy's BLAS (set here with threadpoolctl) and for torch (each
        workload passes it on), ``--json PATH`` to also write the record, ``--list`` to print
        the workloads' ids and first docstring lines and stop.
    doc : str
        The module's docstring; its first line is the help's description.
    workloads : mapping
        ``{id: fn}`` with ``fn(rounds=..., threads=..., **options) -> dict``.
    rounds, threads : int
        The defaults of ``--rounds`` and ``--threads``.
    options : sequence of ``(flags, kwargs)``
        Extra arguments of this benchmark (``parser.add_argument(*flags, **kwargs)``); their
        values reach every workload as keyword arguments.
    """
    import argparse
    import json
    import platform
    import sys

    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds, help="alternating rounds")
    parser.add_argument(
        "--only", nargs="+", choices=list(workloads), default=None, help="workloads to run"
    )
    parser.add_argument(
        "--threads", type=int, default=threads, help="threads for NumPy's BLAS and for torch"
    )
    parser.add_argument("--json", default=None, help="also write the record to this JSON file")
    parser.add_argument("--list", action="store_true", help="list the workloads and stop")
    for flags, kwargs in options:
        parser.add_argument(*flags, **kwargs)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be a positive integer; got {args.rounds}")
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer; got {args.threads}")
    if args.list:
        for name, fn in workloads.items():
            first = (fn.__doc__ or "").strip().splitlines()
            print(f"{name:<8s} {first[0] if first else ''}")
        return {}
    common = {"rounds", "only", "threads", "json", "list"}
    extra = {k: v for k, v in vars(args).items() if k not in common}
    import numpy as np

    previous = blas_threads(args.threads)
    warm_allocator()
    load_before = os.getloadavg()
    print(
        f"threads: {args.threads} (NumPy's BLAS was {previous}); rounds: {args.rounds}; "
        f"load average {load_before[0]:.2f}"
    )
    results = {}
    for name in args.only or list(workloads):
        results[name] = workloads[name](rounds=args.rounds, threads=args.threads, **extra)
    record = {
        "threads": args.threads,
        "rounds": args.rounds,
        "options": extra,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(_jsonable(record), fh, indent=1)
    return record
