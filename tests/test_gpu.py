"""The namespaces flowmath's paths run on, measured: a strict array-API namespace on the CPU
(array-api-strict) and `flowmath gpu-check`'s CuPy comparison (skips cleanly without CuPy)."""

import sys
import types
import warnings

import numpy as np
import pytest

import flowmath as fm
from flowmath import gpu
from flowmath.cli import main


def test_every_public_layer_is_a_case():
    layers = {
        name
        for name in fm.__all__
        if isinstance(getattr(fm, name), type)
        and issubclass(getattr(fm, name), fm.Bijection)
        and name != "Bijection"
    }
    assert layers <= {case.name for case in gpu.CASES}, layers - {c.name for c in gpu.CASES}


def test_array_api_strict_outcome_is_the_documented_one():
    """Every layer's _forward/_inverse and every estimator run on array_api_strict arrays; the
    ones that fail (or fall back to NumPy) are exactly gpu.NUMPY_ONLY, which the docs list, and
    the ones that run agree with NumPy to 1e-10 (checked inside the report)."""
    pytest.importorskip("array_api_strict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # array_api_strict warns on every NumPy dtype comparison
        report = gpu.array_api_report()
    assert set(report) == {c.name for c in gpu.CASES} | set(gpu.ESTIMATORS)
    numpy_only = {name for name, (runs, _) in report.items() if not runs}
    details = {name: report[name][1] for name in numpy_only ^ set(gpu.NUMPY_ONLY)}
    assert numpy_only == set(gpu.NUMPY_ONLY), f"update gpu.NUMPY_ONLY and the docs: {details}"


def test_gpu_check_without_cupy_skips_cleanly(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert main(["gpu-check"]) == 0
    assert "CuPy is not installed" in capsys.readouterr().out


def _fake_cupy(n_devices):
    """A stand-in for CuPy built on NumPy: the comparison and timing code of gpu_check runs on
    the CPU (differences must then be exactly 0)."""
    cp = types.ModuleType("cupy")

    class ndarray:  # no array is a fake-CuPy array: the layers compute with NumPy
        pass

    cp.ndarray = ndarray
    cp.asarray = np.asarray
    cp.asnumpy = np.asarray
    runtime = types.SimpleNamespace(
        getDeviceCount=lambda: n_devices,
        getDeviceProperties=lambda i: {"name": b"fake device"},
    )
    cp.cuda = types.SimpleNamespace(
        runtime=runtime, Device=lambda: types.SimpleNamespace(synchronize=lambda: None)
    )
    return cp


def test_gpu_check_compares_every_layer(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(1))
    lines = []
    assert gpu.gpu_check(batch=8, repeats=1, out=lines.append) == 0
    rows = {line.split()[0]: line for line in lines[2:-1]}
    assert set(rows) == {case.name for case in gpu.CASES}
    for line in rows.values():
        diffs = [float(v) for v in line.split()[1:4]]
        assert diffs == [0.0, 0.0, 0.0], line
    assert lines[-1] == "gpu-check: every layer agrees with NumPy"


def test_gpu_check_without_a_device(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(0))
    lines = []
    assert gpu.gpu_check(out=lines.append) == 0
    assert lines == ["gpu-check: CuPy found no GPU; nothing checked"]
