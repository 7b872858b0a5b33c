"""Sweeps: the serial loop, local processes and a 2-worker Dask cluster give identical numbers;
an interrupted sweep resumes from its cache."""

from __future__ import annotations

import json

import pytest

from experiments import _sweep
from experiments.bits_per_dim import train_one


def _runs():
    base = {
        "data": "digits",
        "steps": 3,
        "batch_size": 32,
        "lr": 1e-3,
        "width": 8,
        "iw_samples": 2,
        "data_dir": None,
    }
    return [{**base, "model": m, "seed": s} for m in ("nice", "made") for s in (0, 1)]


def _numbers(results):
    # timings differ between executions; every other field must be identical
    return [
        {k: v for k, v in r.items() if k not in ("train_seconds", "eval_seconds")} for r in results
    ]


@pytest.fixture(scope="module")
def serial():
    return _sweep.run_sweep(train_one, _runs())


def test_dask_local_cluster_equals_serial(serial):
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(
        n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None
    ) as cluster:
        with distributed.Client(cluster) as client:
            parallel = _sweep.run_sweep(train_one, _runs(), scheduler=client)
    assert _numbers(parallel) == _numbers(serial)
    assert len({r["test_bpd"] for r in serial}) == len(serial)  # the runs really differ


def test_cache_resumes_an_interrupted_sweep(serial, tmp_path):
    runs = _runs()
    first = _sweep.run_sweep(train_one, runs[:1], cache_dir=tmp_path)
    assert _numbers(first) == _numbers(serial[:1])
    (path,) = tmp_path.glob("*.json")
    assert path.stem == _sweep.run_hash(train_one, runs[0])
    saved = json.loads(path.read_text())
    saved["result"]["marker"] = "read from the cache"
    path.write_text(json.dumps(saved))
    resumed = _sweep.run_sweep(train_one, runs, cache_dir=tmp_path)
    assert resumed[0]["marker"] == "read from the cache"  # not recomputed
    assert _numbers(resumed[1:]) == _numbers(serial[1:])
    assert len(list(tmp_path.glob("*.json"))) == len(runs)


def test_hash_depends_on_every_field():
    run = _runs()[0]
    assert _sweep.run_hash(train_one, run) == _sweep.run_hash(train_one, dict(run))
    for key, value in (("seed", 5), ("steps", 4), ("model", "maf")):
        assert _sweep.run_hash(train_one, {**run, key: value}) != _sweep.run_hash(train_one, run)


def test_bad_jobs_named():
    with pytest.raises(ValueError, match="`jobs`"):
        _sweep.run_sweep(train_one, _runs(), jobs=0)
