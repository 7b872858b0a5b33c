"""The benchmarks' shared command line (``experiments/_timing.bench_main``): every
``experiments/bench_*.py`` exposes ``WORKLOADS`` and a ``main(argv)`` with the same flags, and
bad flags are refused by argparse (exit 2) before anything is timed. No timing is asserted."""

from __future__ import annotations

import importlib
import json
import os
import pathlib

import pytest
from threadpoolctl import threadpool_limits

from experiments import _timing

ROOT = pathlib.Path(__file__).resolve().parents[1]
BENCHES = sorted(p.stem for p in (ROOT / "experiments").glob("bench_*.py"))


def _import(name):
    saved = dict(os.environ)  # some benchmarks default the BLAS thread variables at import
    try:
        return importlib.import_module(f"experiments.{name}")
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_there_are_benchmarks():
    assert {"bench_layers", "bench_ode", "bench_residual", "bench_train"} <= set(BENCHES)


@pytest.mark.parametrize("name", BENCHES)
def test_every_benchmark_has_the_shared_shape(name, capsys):
    mod = _import(name)
    assert isinstance(mod.WORKLOADS, dict) and mod.WORKLOADS
    for wid, fn in mod.WORKLOADS.items():
        assert callable(fn), wid
        assert (fn.__doc__ or "").strip(), f"{name}.{wid} has no docstring for --list"
    assert mod.main(["--list"]) == {}
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert listed == list(mod.WORKLOADS)


@pytest.mark.parametrize("name", BENCHES)
@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--only", "no-such-workload"], "--only"),
        (["--rounds", "0"], "--rounds"),
        (["--threads", "-1"], "--threads"),
        (["--rounds", "two"], "--rounds"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(name, argv, fragment, capsys):
    mod = _import(name)
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2
    assert fragment in capsys.readouterr().err


def test_bench_main_runs_the_chosen_workloads_and_writes_one_record(tmp_path, capsys):
    calls = []

    def one(rounds, threads, scale):
        """First workload."""
        calls.append(("one", rounds, threads, scale))
        return {"value": rounds * scale}

    def two(rounds, threads, scale):
        """Second workload."""
        calls.append(("two", rounds, threads, scale))
        return {"value": -1}

    out = tmp_path / "record.json"
    with threadpool_limits():  # bench_main sets the BLAS threads; give them back afterwards
        record = _timing.bench_main(
            ["--only", "one", "--rounds", "3", "--threads", "1", "--json", str(out)]
            + ["--scale", "2"],
            doc="A fake benchmark.\n\nMore text.",
            workloads={"one": one, "two": two},
            rounds=7,
            options=[(("--scale",), {"type": int, "default": 1})],
        )
    assert calls == [("one", 3, 1, 2)]
    assert record["results"] == {"one": {"value": 6}}
    saved = json.loads(out.read_text())
    assert saved["threads"] == 1 and saved["rounds"] == 3 and saved["options"] == {"scale": 2}
    assert saved["results"] == {"one": {"value": 6}}
    assert len(saved["load_average_before"]) == 3
    assert "threads: 1" in capsys.readouterr().out


def test_jsonable_turns_numpy_into_plain_values():
    import numpy as np

    got = _timing._jsonable({1: np.float32(0.5), "a": (np.arange(2), None), "b": object()})
    assert got["1"] == 0.5 and got["a"] == [[0, 1], None] and isinstance(got["b"], str)
    json.dumps(got)


def test_ratio_table_is_the_median_of_per_round_ratios(capsys):
    """flowmath 2, 3, 10 ms against a floor of 1, 3, 2 ms: the per-round ratios are 2, 1, 5, so
    fm_over is their median 2 (the ratio of the medians, 3 / 2 = 1.5, would be wrong)."""
    times = {"flowmath": [0.002, 0.003, 0.010], "floor": [0.001, 0.003, 0.002]}
    table = _timing.ratio_table(times)
    assert table["flowmath"]["fm_over"] == 1.0
    assert table["flowmath"]["median_ms"] == pytest.approx(3.0, rel=1e-12)
    assert table["floor"]["median_ms"] == pytest.approx(2.0, rel=1e-12)
    assert table["floor"]["fm_over"] == pytest.approx(2.0, rel=1e-12)
    _timing.print_ratio_table("T", table)
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "T" and out[-1].split() == ["floor", "2.00", "2.00"]
