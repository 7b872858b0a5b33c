"""The bits/dim pipeline: exact baselines, the MNIST loader, one training run."""

from __future__ import annotations

import gzip
import math

import numpy as np
import pytest

from experiments import bits_per_dim as bpd
from flowmath.dequantize import bits_per_dim, elbo


@pytest.mark.parametrize(
    "data, targets",
    [
        # test-split bits/dim of the fitted baselines (uniform, histogram, diagonal and full
        # Gaussian) for train_test_split(test_size=0.2, random_state=0)
        ("digits", (4.087, 2.436, 3.400, 2.975)),
        ("mnist5000", (8.000, 1.769, 7.240, 7.759)),
    ],
)
def test_baselines_reproduce_the_reference(data, targets):
    train, test, levels = bpd.load_data(data)
    got = bpd.baselines(train, test, levels)
    assert got["uniform"] == (math.log2(levels), 0.0)
    assert got["histogram"][0] == pytest.approx(targets[1], abs=5e-4)  # deterministic
    # the Gaussians are fitted to one uniform dequantisation (default_rng(0)); over seeds 0 and
    # 1 the values moved by at most 0.003, so 0.0015 is half that spread
    assert got["diagonal_gaussian"][0] == pytest.approx(targets[2], abs=1.5e-3)
    assert got["full_gaussian"][0] == pytest.approx(targets[3], abs=1.5e-3)


def test_uniform_density_is_exactly_log2_k():
    """The uniform density on [0, 1)^D through the same bound the flows are scored with."""
    train, test, levels = bpd.load_data("digits")
    bound = elbo(lambda y: np.zeros(len(y)), test, levels, np.random.default_rng(0))
    # ln K / ln 2 against log2 K: equal to one rounding (measured 1 ulp = 8.9e-16)
    np.testing.assert_allclose(bits_per_dim(bound, test.shape[1]), math.log2(levels), rtol=4e-16)


def _idx(array, code=0x08):
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape
    )
    return header + array.astype(">u1").tobytes()


@pytest.mark.parametrize("fmt", ["idx", "idx.gz", "npz"])
def test_full_mnist_loader_reads_user_files(tmp_path, fmt):
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    if fmt == "npz":
        np.savez(
            tmp_path / "mnist.npz",
            x_train=train,
            y_train=np.arange(7),
            x_test=test,
            y_test=np.arange(3),
        )
    else:
        for name, arr in (("train-images-idx3-ubyte", train), ("t10k-images-idx3-ubyte", test)):
            raw = _idx(arr)
            if fmt == "idx.gz":
                (tmp_path / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (tmp_path / name).write_bytes(raw)
    got_train, got_test, levels = bpd.load_data("mnist", str(tmp_path), shape="image")
    assert levels == 256
    np.testing.assert_array_equal(got_train[:, 0], train)
    np.testing.assert_array_equal(got_test[:, 0], test)


def test_full_mnist_loader_names_missing_files(tmp_path):
    with pytest.raises(ValueError, match="`data_dir`"):
        bpd.load_data("mnist", str(tmp_path))


def test_one_run_learns_and_reports():
    """A few steps of MAF on digits lower the training bound, and the result carries the test
    bits/dim with its standard error and the importance-weighted estimate (IW <= ELBO in bits
    up to noise: the IW bound is tighter)."""
    run = {
        "model": "maf",
        "data": "digits",
        "seed": 0,
        "steps": 15,
        "batch_size": 64,
        "lr": 1e-3,
        "width": 16,
        "iw_samples": 8,
        "data_dir": None,
    }
    r = bpd.train_one(run)
    assert r["curve"][-1] < r["curve"][0]
    assert 0 < r["test_se"] < 0.1 * r["test_bpd"]
    assert r["iw_bpd"] <= r["test_bpd"] + 2 * r["test_se"]


def test_command_line_data_options_reach_the_config():
    """`flowmath reproduce bits_per_dim --data mnist --data-dir DIR --jobs 2` sets the data
    fields of the config and the sweep's execution, not the config's other fields."""
    import types

    from experiments import _sweep
    from flowmath.cli import _override

    before = _sweep.execution()
    args = types.SimpleNamespace(data="mnist", data_dir="/some/dir", jobs=2, scheduler=None)
    try:
        config = _override(bpd.Config(), "bits_per_dim", args)
        assert _sweep.execution()["jobs"] == 2
    finally:
        _sweep.configure(jobs=before["jobs"])
    assert config.datasets == ("mnist",) and config.data_dir == "/some/dir"
    assert dataclasses_replace_rest(config) == dataclasses_replace_rest(bpd.Config())
    runs = bpd.runs(config)
    assert {r["data"] for r in runs} == {"mnist"} and runs[0]["iw_samples"] == 4


def dataclasses_replace_rest(config):
    import dataclasses

    d = dataclasses.asdict(config)
    d.pop("datasets"), d.pop("data_dir")
    return d
