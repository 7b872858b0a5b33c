"""Sweeps of independent runs (models x data sets x seeds): serial, in processes, or on Dask.

A run is a plain dict (its config) and a module-level function ``fn(run) -> dict`` that derives
every random draw from the run's own fields (its seed), so that where it executes cannot change
its numbers: the serial loop, ``jobs`` local processes and a Dask cluster give identical results.
Each result is cached as ``<cache_dir>/<hash>.json`` under the SHA-256 of the run's config (and
the function's name), so an interrupted sweep resumes with the runs it has not finished.

Dask: ``scheduler`` is the address of a running ``dask.distributed`` scheduler
(``tcp://host:8786``; start one with ``dask scheduler`` and ``dask worker ADDRESS
--nthreads 1``) or a ``distributed.Client``. The ``dask`` extra installs it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

__all__ = ["configure", "execution", "run_hash", "run_sweep"]

# How sweeps execute, set once by the command line (``flowmath reproduce --jobs N --scheduler
# ADDRESS``): execution settings, not part of any experiment's config, since they cannot change
# a number.
_EXECUTION = {"jobs": 1, "scheduler": None}


def configure(*, jobs: int | None = None, scheduler=None) -> None:
    """Set the default ``jobs`` and ``scheduler`` of :func:`run_sweep` (``None``: unchanged)."""
    if jobs is not None:
        if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
            raise ValueError(f"`jobs` must be an int >= 1; got {jobs!r}")
        _EXECUTION["jobs"] = jobs
    if scheduler is not None:
        _EXECUTION["scheduler"] = scheduler


def execution() -> dict:
    """The current defaults: ``{"jobs": ..., "scheduler": ...}``."""
    return dict(_EXECUTION)


def run_hash(fn: Callable, run: dict) -> str:
    """SHA-256 (hex, 20 characters) of the function's qualified name and the run's config."""
    key = {"fn": f"{fn.__module__}.{fn.__qualname__}", "run": run}
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _call(fn, run):
    """Run one config with one BLAS thread (the runs are the parallelism)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return fn(run)


def _roundtrip(result):
    # what a cached result reads back as: the serial and the parallel paths return the same
    return json.loads(json.dumps(result))


def run_sweep(
    fn: Callable,
    runs: list[dict],
    *,
    jobs: int | None = None,
    scheduler=None,
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """Results of ``fn(run)`` for every run, in the order of ``runs``.

    Parameters
    ----------
    fn : callable
        A module-level (picklable) function of one run dict returning a JSON-able dict.
    runs : list of dict
        JSON-able configs; each must determine its own random draws.
    jobs : int, optional
        Local worker processes (``1``: in this process). Ignored with ``scheduler``. Default:
        :func:`configure`'s (1 unless set).
    scheduler : str or distributed.Client, optional
        Run on this Dask cluster instead. Default: :func:`configure`'s (none unless set).
    cache_dir : path, optional
        Read finished runs from, and write new ones to, ``<cache_dir>/<hash>.json``.

    Returns
    -------
    list of dict
        JSON round-tripped results (tuples come back as lists), identical whichever way the
        runs were executed.
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be callable; got {type(fn).__name__}")
    jobs = _EXECUTION["jobs"] if jobs is None else jobs
    scheduler = _EXECUTION["scheduler"] if scheduler is None else scheduler
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"`jobs` must be an int >= 1; got {jobs!r}")
    runs = [dict(r) for r in runs]
    keys = [run_hash(fn, r) for r in runs]
    results: dict[int, dict] = {}
    cache = None if cache_dir is None else Path(cache_dir)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for i, key in enumerate(keys):
            path = cache / f"{key}.json"
            if path.exists():
                saved = json.loads(path.read_text())
                if saved.get("run") == _roundtrip(runs[i]):
                    results[i] = saved["result"]
    todo = [i for i in range(len(runs)) if i not in results]

    def done(i, result):
        result = _roundtrip(result)
        results[i] = result
        if cache is not None:
            payload = {"run": runs[i], "result": result}
            tmp = cache / f"{keys[i]}.json.tmp"
            tmp.write_text(json.dumps(payload))
            tmp.replace(cache / f"{keys[i]}.json")  # atomic: an interrupted write leaves no file

    if scheduler is not None:
        _run_dask(fn, runs, todo, scheduler, done)
    elif jobs == 1 or len(todo) <= 1:
        for i in todo:
            done(i, _call(fn, runs[i]))
    else:
        ctx = multiprocessing.get_context("spawn")  # no forked BLAS or numba state
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_call, fn, runs[i]): i for i in todo}
            for fut in concurrent.futures.as_completed(futures):
                done(futures[fut], fut.result())
    return [results[i] for i in range(len(runs))]


def _run_dask(fn, runs, todo, scheduler, done):
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`scheduler` needs dask.distributed: pip install 'flowmath[dask]'"
        ) from exc
    own = not isinstance(scheduler, Client)
    client = Client(scheduler) if own else scheduler
    try:
        futures = [client.submit(_call, fn, runs[i], pure=False) for i in todo]
        index = {f.key: i for f, i in zip(futures, todo, strict=True)}
        for fut in as_completed(futures):
            done(index[fut.key], fut.result())
    finally:
        if own:
            client.close()
