"""The training engine: optimiser and schedule formulas, clipping, validation statistics,
keep-best, early stopping, roll-back of non-finite steps and bit-identical resume."""

from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np
import pytest

import flowmath as fm
from flowmath import train


def _quadratic():
    """Per-example loss 0.5 |p - x|^2 summed over features: its mean is minimised by the mean
    of the data."""

    def loss(p, batch, rng):
        return 0.5 * anp.sum((p["w"] - batch) ** 2, axis=1)

    return loss


@pytest.fixture
def data():
    rng = np.random.default_rng(5)
    return rng.normal(size=(400, 3)) + np.array([1.0, -2.0, 0.5])


def test_adam_matches_the_formula():
    rng = np.random.default_rng(0)
    p = {"a": rng.normal(size=3), "b": [rng.normal(size=(2, 2))]}
    opt = train.Adam(lr=0.1, b1=0.8, b2=0.9, eps=1e-6)
    state = opt.init(p)
    m = v = 0.0
    theta = p["a"].copy()
    for t in range(1, 4):
        g = {"a": np.sin(t * theta), "b": [np.full((2, 2), float(t))]}
        p, state = opt.update(p, g, state)
        m = 0.8 * m + 0.2 * np.sin(t * theta)
        v = 0.9 * v + 0.1 * np.sin(t * theta) ** 2
        theta = theta - 0.1 * (m / (1 - 0.8**t)) / (np.sqrt(v / (1 - 0.9**t)) + 1e-6)
        np.testing.assert_allclose(p["a"], theta, rtol=1e-14, atol=1e-15)
    assert state["t"] == 3


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_matches_the_formula(nesterov):
    opt = train.SGD(lr=0.5, momentum=0.7, nesterov=nesterov)
    p = {"w": np.array([1.0, -1.0])}
    state = opt.init(p)
    u, w = np.zeros(2), p["w"].copy()
    for t in range(3):
        g = {"w": np.array([t + 1.0, 2.0 - t])}
        p, state = opt.update(p, g, state)
        u = 0.7 * u + g["w"]
        w = w - 0.5 * ((g["w"] + 0.7 * u) if nesterov else u)
        np.testing.assert_array_equal(p["w"], w)


def test_schedules_follow_their_formulas():
    c = train.Cosine(warmup=10, final=0.1)
    for s in (0, 5, 9, 10, 55, 100, 150):
        f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(max(s - 10, 0), 90) / 90))
        if s < 10:
            f *= (s + 1) / 10
        assert c(s, 100) == pytest.approx(f, rel=1e-15)
    sd = train.StepDecay(every=30, gamma=0.5)
    assert [sd(s, 100) for s in (0, 29, 30, 61)] == [1.0, 1.0, 0.5, 0.25]
    assert train.Constant(warmup=4)(1, 10) == 0.5


def test_fit_follows_the_learning_rate_schedule(data):
    p0 = {"w": np.zeros(3)}
    _, res = train.fit(
        _quadratic(),
        p0,
        data,
        rng=np.random.default_rng(0),
        steps=50,
        batch_size=40,
        optimizer=train.SGD(0.1, momentum=0.0),
        schedule=train.Cosine(warmup=5),
        progress=False,
    )
    expected = [0.1 * train.Cosine(warmup=5)(s, 50) for s in range(50)]
    np.testing.assert_allclose(res.lr, expected, rtol=1e-15)


def test_clip_norm_rescales_to_the_global_norm(data):
    """With SGD (no momentum) one step moves the parameters by -lr * g * clip / |g|."""
    p0 = {"w": np.full(3, 10.0), "v": [np.ones(2)]}

    def loss(p, batch, rng):
        return 0.5 * anp.sum((p["w"] - batch) ** 2, axis=1) + anp.sum(p["v"][0] ** 2)

    p1, res = train.fit(
        loss,
        p0,
        data,
        rng=np.random.default_rng(1),
        steps=1,
        batch_size=400,
        optimizer=train.SGD(1.0, momentum=0.0),
        clip_norm=0.5,
        progress=False,
    )
    g = {"w": p0["w"] - data.mean(axis=0), "v": 2 * p0["v"][0]}
    norm = math.sqrt(np.sum(g["w"] ** 2) + np.sum(g["v"] ** 2))
    assert res.grad_norm[0] == pytest.approx(norm, rel=1e-12)
    np.testing.assert_allclose(p1["w"], p0["w"] - g["w"] * 0.5 / norm, rtol=1e-12)
    np.testing.assert_allclose(p1["v"][0], p0["v"][0] - g["v"] * 0.5 / norm, rtol=1e-12)


def test_validation_mean_and_standard_error(data):
    """Per-example losses: the reported s.e. is std(ddof=1)/sqrt(N) of the per-example NLLs of
    the initial parameters, recomputed here."""
    valid = data[:123] * 1.5
    p0 = {"w": np.array([0.3, 0.1, -0.2])}
    _, res = train.fit(
        _quadratic(),
        p0,
        data,
        valid=valid,
        rng=np.random.default_rng(2),
        steps=3,
        eval_every=3,
        valid_batch_size=50,
        progress=False,
    )
    per = 0.5 * np.sum((p0["w"] - valid) ** 2, axis=1)
    assert res.valid_steps.tolist() == [0, 3]
    assert res.valid_nll[0] == pytest.approx(per.mean(), rel=1e-13)
    assert res.valid_nll_se[0] == pytest.approx(per.std(ddof=1) / math.sqrt(123), rel=1e-12)
    assert res.valid_bpd[0] == pytest.approx(per.mean() / (3 * math.log(2)), rel=1e-13)


def test_keep_best_returns_the_best_validated_parameters(data):
    """Training pulls w to the mean of ``train`` while validation measures the distance to
    another point: validation first improves then worsens; the returned parameters are those
    of the best evaluation, and their validation NLL is recomputed here."""
    valid = data[:100] * 0.0 + np.array([0.5, -1.0, 0.25])
    p0 = {"w": np.array([-3.0, 3.0, -3.0])}
    kw = dict(
        valid=valid,
        steps=200,
        optimizer=train.SGD(0.02, momentum=0.0),
        eval_every=10,
        progress=False,
    )
    params, res = train.fit(_quadratic(), p0, data, rng=np.random.default_rng(3), **kw)
    k = int(np.argmin(res.valid_nll))
    assert 0 < k < len(res.valid_nll) - 1  # not monotone: the test means something
    assert res.best_step == res.valid_steps[k]
    direct = np.mean(0.5 * np.sum((params["w"] - valid) ** 2, axis=1))
    assert direct == pytest.approx(res.valid_nll[k], rel=1e-13)
    assert direct < res.valid_nll[-1]
    last, _ = train.fit(_quadratic(), p0, data, rng=np.random.default_rng(3), keep_best=False, **kw)
    assert np.mean(0.5 * np.sum((last["w"] - valid) ** 2, axis=1)) == pytest.approx(
        res.valid_nll[-1], rel=1e-13
    )


def test_early_stopping_after_patience(data):
    valid = np.full((10, 3), -5.0)  # moves away from the training optimum: never improves
    p0 = {"w": np.full(3, -4.0)}
    _, res = train.fit(
        _quadratic(),
        p0,
        data,
        valid=valid,
        rng=np.random.default_rng(4),
        steps=1000,
        optimizer=train.SGD(0.05, momentum=0.0),
        eval_every=5,
        patience=3,
        progress=False,
    )
    assert res.stopped_early
    assert res.best_step == 0
    assert res.steps_done == 15 and res.valid_steps.tolist() == [0, 5, 10, 15]


def _flow_problem():
    rng = np.random.default_rng(11)
    x = fm.data.toy("8gaussians", 600, rng)
    flow = fm.Flow(
        fm.Chain(
            [
                fm.AffineCoupling(hidden=(8,)),
                fm.LULinear(),
                fm.AffineCoupling(hidden=(8,), flip=True),
            ]
        )
    )
    p0 = flow.init(rng, x[:64])
    return flow, p0, x[:500], x[500:]


def test_resume_is_bit_identical(tmp_path):
    """An interrupted run resumed from its checkpoint ends with exactly the parameters, curves
    and Generator state of an uninterrupted one (a stochastic loss draws from ``rng`` too)."""
    flow, p0, x, v = _flow_problem()

    def loss(p, batch, rng):
        noise = 0.01 * rng.normal(size=batch.shape)  # the loss's own draws are part of the state
        return -flow.log_prob(p, batch + noise)

    kw = dict(
        valid=v,
        steps=40,
        batch_size=64,
        eval_every=7,
        checkpoint_every=10,
        schedule=train.Cosine(warmup=5),
        clip_norm=50.0,
        progress=False,
    )
    rng_a = np.random.default_rng(123)
    pa, ra = train.fit(loss, p0, x, rng=rng_a, **kw)

    class Interrupt(Exception):
        pass

    calls = [0]

    def stop_at_23(p):
        calls[0] += 1
        if calls[0] == 23:
            raise Interrupt
        return p

    ck = tmp_path / "run.npz"
    with pytest.raises(Interrupt):
        train.fit(
            loss, p0, x, rng=np.random.default_rng(123), checkpoint=ck, after_step=stop_at_23, **kw
        )
    assert train.load_checkpoint(ck)["step"] == 20
    rng_b = np.random.default_rng(999)  # its state is restored from the checkpoint
    pb, rb = train.fit(loss, p0, x, rng=rng_b, checkpoint=ck, **kw)
    for a, b in zip(train._leaves(pa), train._leaves(pb), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ra.train_loss, rb.train_loss)
    np.testing.assert_array_equal(ra.valid_nll, rb.valid_nll)
    assert ra.best_step == rb.best_step
    assert rng_a.bit_generator.state == rng_b.bit_generator.state


def test_checkpoint_of_another_run_is_refused(tmp_path):
    flow, p0, x, v = _flow_problem()
    loss = lambda p, b, r: -flow.log_prob(p, b)  # noqa: E731
    ck = tmp_path / "c.npz"
    train.fit(loss, p0, x, rng=np.random.default_rng(0), steps=4, checkpoint=ck, progress=False)
    with pytest.raises(ValueError, match="`checkpoint`.*4 steps"):
        train.fit(loss, p0, x, rng=np.random.default_rng(0), steps=8, checkpoint=ck, progress=False)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable flowmath checkpoint"):
        train.load_checkpoint(tmp_path / "bad.npz")


def test_nan_gradient_is_rolled_back_and_the_rate_halved(data):
    """A NaN on one step never reaches the parameters: the run returns to the last snapshot,
    halves the rate and still completes; the final parameters are finite and near the optimum."""
    calls = [0]

    def loss(p, batch, rng):
        calls[0] += 1
        out = 0.5 * anp.sum((p["w"] - batch) ** 2, axis=1)
        return out * np.nan if calls[0] == 17 else out

    params, res = train.fit(
        loss,
        {"w": np.zeros(3)},
        data,
        rng=np.random.default_rng(6),
        steps=60,
        batch_size=50,
        optimizer=train.SGD(0.1, momentum=0.0),
        eval_every=10,
        progress=False,
    )
    assert res.rollbacks == [(16, "non-finite loss")]
    assert res.steps_done == 60 and len(res.train_loss) == 60
    assert np.all(np.isfinite(res.train_loss))
    # steps 10..16 were redone at half the rate: lr halves from step 10 on
    np.testing.assert_array_equal(res.lr[:10], 0.1)
    np.testing.assert_array_equal(res.lr[10:], 0.05)
    np.testing.assert_allclose(params["w"], data.mean(axis=0), atol=0.3)


def test_persistent_nan_raises_naming_the_step(data):
    def loss(p, batch, rng):
        return anp.sum(p["w"]) * np.nan + 0.0 * batch[:, 0]

    with pytest.raises(FloatingPointError, match="non-finite loss at step 0; rolled back 2"):
        train.fit(
            loss,
            {"w": np.zeros(3)},
            data,
            rng=np.random.default_rng(0),
            steps=5,
            max_rollbacks=2,
            progress=False,
        )


def test_loss_spike_is_undone_by_keep_best(data):
    """A late spike (a gradient 1e4 times too large on one step) throws the parameters away;
    without clipping the last parameters are bad, ``keep_best`` returns the pre-spike ones, and
    with ``clip_norm`` the spike never happens."""
    valid = data[300:]
    calls = [0]

    def loss(p, batch, rng):
        calls[0] += 1
        scale = 1e4 if calls[0] == 95 else 1.0
        return scale * 0.5 * anp.sum((p["w"] - batch) ** 2, axis=1)

    kw = dict(
        valid=valid,
        steps=100,
        batch_size=50,
        eval_every=10,
        progress=False,
        optimizer=train.SGD(0.05, momentum=0.0),
    )
    best, res = train.fit(loss, {"w": np.zeros(3)}, data[:300], rng=np.random.default_rng(7), **kw)
    assert res.valid_nll[-1] > 100 * res.best_valid_nll
    assert res.best_step <= 90  # before the spike (step 95)
    assert res.best_step == res.valid_steps[np.argmin(res.valid_nll)]
    nll = lambda p: np.mean(0.5 * np.sum((p["w"] - valid) ** 2, axis=1))  # noqa: E731
    assert nll(best) == pytest.approx(res.best_valid_nll, rel=1e-13)
    calls[0] = 0
    clipped, res_c = train.fit(
        loss, {"w": np.zeros(3)}, data[:300], rng=np.random.default_rng(7), clip_norm=10.0, **kw
    )
    assert res_c.valid_nll[-1] < 1.01 * res_c.best_valid_nll + 0.05


def test_blas_threads_are_capped_inside_fit(data):
    from threadpoolctl import threadpool_info

    seen = []

    def loss(p, batch, rng):
        seen.append([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"])
        return 0.5 * anp.sum((p["w"] - batch) ** 2, axis=1)

    train.fit(loss, {"w": np.zeros(3)}, data, rng=np.random.default_rng(0), steps=2, progress=False)
    assert seen and all(t == [1] * len(t) for t in seen)


def test_no_progress_output_when_off(data, capsys):
    train.fit(
        _quadratic(),
        {"w": np.zeros(3)},
        data,
        rng=np.random.default_rng(0),
        steps=5,
        progress=False,
    )
    assert capsys.readouterr().err == ""


def test_epochs_count_full_batches(data):
    _, res = train.fit(
        _quadratic(),
        {"w": np.zeros(3)},
        data,
        rng=np.random.default_rng(0),
        epochs=3,
        batch_size=64,
        progress=False,
    )
    assert res.steps_done == 3 * (400 // 64)


def test_plot_curves(data):
    import matplotlib

    matplotlib.use("Agg")
    _, res = train.fit(
        _quadratic(),
        {"w": np.zeros(3)},
        data,
        valid=data[:50],
        rng=np.random.default_rng(0),
        steps=120,
        progress=False,
    )
    ax = res.plot()
    assert len(ax.lines) >= 2 and ax.get_ylabel() == "NLL (nats)"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(steps=None), ValueError, "exactly one of `steps` and `epochs`"),
        (dict(steps=5, epochs=2), ValueError, "exactly one of `steps` and `epochs`"),
        (dict(steps=0), ValueError, "`steps` must be >= 1"),
        (dict(steps=2.5), TypeError, "`steps` must be an integer"),
        (dict(steps=5, batch_size=0), ValueError, "`batch_size`"),
        (dict(steps=5, clip_norm=-1.0), ValueError, "`clip_norm`"),
        (dict(steps=5, keep_best="False"), TypeError, "`keep_best` must be a bool"),
        (dict(steps=5, progress=1), TypeError, "`progress` must be a bool"),
        (dict(steps=5, schedule="linear"), ValueError, "`schedule` must be one of"),
        (dict(steps=5, optimizer="adam"), TypeError, "`optimizer`"),
        (dict(steps=5, valid=np.zeros((4, 2))), ValueError, "`valid` must have the event"),
        (dict(steps=5, rng=0), TypeError, "`rng` must be a numpy.random.Generator"),
        (dict(steps=5, blas_threads=0), ValueError, "`blas_threads`"),
        (dict(steps=5, checkpoint=3), TypeError, "`checkpoint` must be a path"),
    ],
)
def test_bad_arguments(data, kwargs, exc, match):
    kw = dict(rng=np.random.default_rng(0), progress=False)
    kw.update(kwargs)
    with pytest.raises(exc, match=match):
        train.fit(_quadratic(), {"w": np.zeros(3)}, data, **kw)


def test_bad_data_and_loss_shapes(data):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="`train` must be finite"):
        train.fit(_quadratic(), {"w": np.zeros(3)}, data * np.nan, rng=rng, steps=2)
    with pytest.raises(TypeError, match="`train` must be a NumPy array"):
        train.fit(_quadratic(), {"w": np.zeros(3)}, data.tolist(), rng=rng, steps=2)

    def bad(p, batch, r):
        return anp.sum((p["w"] - batch) ** 2, axis=0)  # (3,), not (n,)

    with pytest.raises(ValueError, match=r"`loss` must return a scalar or one value per example"):
        train.fit(bad, {"w": np.zeros(3)}, data, rng=rng, steps=2, progress=False)


def test_bad_parameter_leaves(data):
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match=r"`params` must hold floating arrays \(leaf 0"):
        train.fit(_quadratic(), {"w": np.zeros(3, int)}, data, rng=rng, steps=2)
    with pytest.raises(ValueError, match="`params` must be finite; leaf 1"):
        train.fit(_quadratic(), {"v": np.zeros(1), "w": np.full(3, np.nan)}, data, rng=rng, steps=2)
