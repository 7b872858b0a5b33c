"""The fused tanh kernel against its NumPy twin, its autograd primitive's derivatives, and the
Python path of the kernel (NUMBA_DISABLE_JIT=1 in a subprocess). Both tanh paths (the kernel and
NumPy's SIMD tanh, chosen per machine by ``cnf_tanh.USE_KERNEL``) run here whatever the machine:
the tests set the flag."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from flowmath._pytree import leaves
from flowmath.kernels import cnf_tanh
from flowmath.testing import check_grads


@pytest.fixture(params=[True, False], ids=["kernel", "numpy"])
def tanh_path(request, monkeypatch):
    monkeypatch.setattr(cnf_tanh, "USE_KERNEL", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kernel_matches_reference(dtype, tanh_path):
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [rng.normal(size=2000) * 3, [0.0, -0.0, 1e-300, -1e-8, 30.0, -800.0, np.inf, -np.inf]]
    ).astype(dtype)
    h, d1, d2 = cnf_tanh.tanh_derivs(x)
    r, r1, r2 = cnf_tanh.tanh_derivs_reference(x)
    assert h.dtype == dtype
    tol = 2.3e-16 if dtype == np.float64 else 2.4e-7  # one ulp of 1: the kernel's absolute error
    assert np.max(np.abs(h - r)) <= tol
    assert np.max(np.abs(d1 - r1)) <= 4 * tol
    assert np.max(np.abs(d2 - r2)) <= 8 * tol
    np.testing.assert_array_equal(np.signbit(h[x != 0]), np.signbit(x[x != 0]))
    h1, e1 = cnf_tanh.tanh_derivs(x, order=1)
    np.testing.assert_array_equal(h1, h)
    np.testing.assert_array_equal(e1, d1)
    np.testing.assert_array_equal(cnf_tanh.tanh(x), h)


def test_numpy_path_is_the_reference_bitwise(monkeypatch):
    monkeypatch.setattr(cnf_tanh, "USE_KERNEL", False)
    x = np.random.default_rng(6).normal(size=(40, 7)) * 4
    for order in (1, 2):
        for got, want in zip(
            cnf_tanh.tanh_derivs(x, order), cnf_tanh.tanh_derivs_reference(x, order), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(cnf_tanh.tanh(x), np.tanh(x))
    # other real dtypes become float64 as in the kernel (np.tanh of bool would give float16)
    assert cnf_tanh.tanh(np.array([True, False])).dtype == np.float64
    with pytest.raises(TypeError, match="`x` must be a real array"):
        cnf_tanh.tanh(np.ones(2, complex))


def test_choice_follows_numpys_dispatch():
    """The default is decided by NumPy's CPU dispatch, not a timing: on x86-64 NumPy's SIMD tanh
    needs AVX2 + FMA3 (X86_V3) or AVX-512, so the kernel is the default exactly without them."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # NumPy 1.x
        from numpy.core._multiarray_umath import __cpu_features__ as features

    simd = cnf_tanh.numpy_has_simd_tanh()
    assert simd is True or simd is False
    assert cnf_tanh.numpy_has_simd_tanh() is simd  # deterministic
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert simd == bool(features.get("AVX2") and features.get("FMA3"))
    from flowmath.ode import dynamics

    # the fused row-wise MLP forward uses the scalar tanh: on by default only with the kernel
    assert dynamics.FUSED_FORWARD is (not simd)
    assert dynamics.FUSED_MAX_DIM == 16


def test_primitive_gradients(tanh_path):
    """First and second derivatives of the primitive against finite differences."""
    x = np.random.default_rng(1).normal(size=(3, 4))
    check_grads(lambda v: cnf_tanh.tanh(v) * v, modes=["rev"], order=2)(x)


def test_shapes_and_noncontiguous_input(tanh_path):
    x = np.random.default_rng(2).normal(size=(6, 5))[:, ::2]
    np.testing.assert_allclose(cnf_tanh.tanh(x), np.tanh(x), rtol=0, atol=2.3e-16)
    assert cnf_tanh.tanh(x).shape == x.shape


def test_python_path_without_jit():
    """The kernel's Python source (no JIT) gives the same values: keeps the pure path honest."""
    code = (
        "import numpy as np; from flowmath.kernels import cnf_tanh as k; k.USE_KERNEL = True; "
        "x = np.linspace(-5, 5, 101); h, a, b = k.tanh_derivs(x); "
        "r, s, c = k.tanh_derivs_reference(x); "
        "print(max(abs(h - r).max(), abs(a - s).max(), abs(b - c).max()))"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1")
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert float(out.stdout.strip()) < 1e-15


@pytest.mark.parametrize("time", ["concat", "concat-squash"])
def test_fused_one_hidden_layer_kernels_match_numpy_path(time, monkeypatch, tanh_path):
    """The row-wise kernels of cnf_mlp1 against the generic NumPy paths (their twins)."""
    from flowmath.ode import dynamics

    rng = np.random.default_rng(3)
    d, n, t = 3, 7, 0.45
    fld = dynamics.MLPDynamics((11,), time=time)
    params = fld.init(rng, d)
    y, a = rng.normal(size=(2, n, d + 1))
    probe = None
    outs = {}
    monkeypatch.setattr(dynamics, "FUSED_FORWARD", True)
    for limit in (16, 0):
        monkeypatch.setattr(dynamics, "FUSED_MAX_DIM", limit)
        cnf = dynamics.CNFDynamics(fld, probe)
        outs[limit] = (
            fld(t, y[:, :d], params),
            fld.vjp(t, y[:, :d], params, a[:, :d]),
            cnf(t, y, params),
            cnf.vjp(t, y, params, a),
        )
    fused, plain = outs[16], outs[0]

    def flat(x):
        return np.concatenate([np.ravel(leaf) for leaf in leaves(x)])

    for got, want in zip(fused, plain, strict=True):
        np.testing.assert_allclose(flat(got), flat(want), rtol=1e-13, atol=1e-13)
    # FUSED_FORWARD off (the default where NumPy has a SIMD tanh): the forward is the NumPy path
    monkeypatch.setattr(dynamics, "FUSED_FORWARD", False)
    monkeypatch.setattr(dynamics, "FUSED_MAX_DIM", 16)
    np.testing.assert_array_equal(fld(t, y[:, :d], params), plain[0])


def test_fused_path_is_taken_only_where_it_applies(monkeypatch):
    from flowmath.ode import dynamics

    rng = np.random.default_rng(4)
    fld = dynamics.MLPDynamics((5,))
    params = fld.init(rng, 2)
    z = rng.normal(size=(3, 2))
    monkeypatch.setattr(dynamics, "FUSED_MAX_DIM", 16)
    assert dynamics._fusable(fld, z, params)
    assert not dynamics._fusable(fld, z.astype(np.float32), params)
    assert not dynamics._fusable(dynamics.MLPDynamics((5, 5)), z, params)
    assert not dynamics._fusable(dynamics.MLPDynamics((5,), activation="softplus"), z, params)
    assert not dynamics._fusable(fld, rng.normal(size=(3, 17)), params)


def test_fused_kernels_propagate_non_finite_values(tanh_path):
    """No fast-math assumption about NaN/inf: a non-finite state reaches the solver's check."""
    from flowmath.kernels import cnf_mlp1

    rng = np.random.default_rng(5)
    z = rng.normal(size=(3, 2))
    z[1, 0] = np.nan
    W0, b0, W1, b1 = (
        rng.normal(size=(2, 4)),
        rng.normal(size=4),
        rng.normal(size=(4, 2)),
        rng.normal(size=2),
    )
    f = cnf_mlp1.mlp1_forward(z, W0, b0, W1, b1)
    f2, tr = cnf_mlp1.cnf1_forward(z, W0, b0, W1, b1)
    assert np.all(np.isnan(f[1])) and np.all(np.isnan(f2[1])) and np.isnan(tr[1])
    assert np.all(np.isfinite(f[[0, 2]])) and np.all(np.isfinite(tr[[0, 2]]))
