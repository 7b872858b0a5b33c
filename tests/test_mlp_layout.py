"""One MLP parameter layout: every network's parameters are a list of layer dicts
``[{"W": (fan_in, fan_out), "b": (fan_out,), ...}, ...]`` whose layer computes ``h W + b``."""

import numpy as np
import pytest

import flowmath as fm
from flowmath import nets
from flowmath.dequantize import VariationalDequantizer
from flowmath.ode.dynamics import MLPDynamics

D, H = 4, 6


def _mlps():
    """(name, the MLP's layer list, the extra keys a layer may carry) for every network."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, D))
    out = [("nets.mlp_init", nets.mlp_init(rng, [D, H, 3]), set())]
    for layer in (fm.AffineCoupling(hidden=(H,)), fm.AdditiveCoupling(hidden=(H,))):
        out.append((type(layer).__name__, layer.init(rng, x)["net"], set()))
    for layer in (fm.MAF(hidden=(H,)), fm.IAF(hidden=(H,))):
        out.append((type(layer).__name__, layer.init(rng, x)["net"], set()))
    out.append(("IResBlock", fm.IResBlock(hidden=(H,)).init(rng, x), set()))
    out.append(("IResBlock power", fm.IResBlock(hidden=(H,), spectral="power").init(rng, x), {"u"}))
    out.append(("CNF", fm.CNF(hidden=(H,)).init(rng, x), {"u"}))
    squash = MLPDynamics((H,), time="concat-squash").init(rng, D)
    out.append(("MLPDynamics concat-squash", squash, {"gate_w", "gate_b", "bias_t"}))
    levels = rng.integers(0, 4, size=(5, D))
    out.append(
        ("VariationalDequantizer", VariationalDequantizer((H,)).init(rng, levels, 4)["net"], set())
    )
    return out


@pytest.mark.parametrize("name, layers, extra", _mlps(), ids=[m[0] for m in _mlps()])
def test_every_mlp_is_a_list_of_layer_dicts(name, layers, extra):
    assert isinstance(layers, list) and len(layers) >= 2, name
    fan_in = None
    for i, layer in enumerate(layers):
        assert isinstance(layer, dict) and {"W", "b"} <= set(layer) <= {"W", "b"} | extra, (
            i,
            layer,
        )
        W, b = layer["W"], layer["b"]
        assert W.ndim == 2 and b.shape == (W.shape[1],), (name, i, W.shape, b.shape)
        for k in set(layer) - {"W", "b"}:  # per-unit extras (time weights, gates, the state)
            assert layer[k].shape == (W.shape[1],), (name, i, k)
        if fan_in is not None:
            assert W.shape[0] == fan_in, (name, i)  # widths chain: h W + b
        fan_in = W.shape[1]


def test_layer_computes_h_W_plus_b():
    """The same layer dicts give the same map in nets.mlp_apply and in the residual block's
    branch g (IResBlock with a coefficient that leaves these small weights unnormalised)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, D))
    block = fm.IResBlock(hidden=(H,), coeff=0.99, logdet="exact")
    params = [{"W": 0.1 * rng.normal(size=(D, H)), "b": rng.normal(size=H)}]
    params.append({"W": 0.1 * rng.normal(size=(H, D)), "b": rng.normal(size=D)})
    assert max(np.linalg.svd(p["W"], compute_uv=False)[0] for p in params) < 0.99
    y, _ = block.forward(params, x)
    h = fm.activations.elu(x @ params[0]["W"] + params[0]["b"])
    np.testing.assert_allclose(y - x, h @ params[1]["W"] + params[1]["b"], rtol=0, atol=1e-15)
    relu_g = nets.mlp_apply(params, x)
    h = fm.activations.relu(x @ params[0]["W"] + params[0]["b"])
    np.testing.assert_allclose(relu_g, h @ params[1]["W"] + params[1]["b"], rtol=0, atol=1e-15)


def test_checkpoint_keeps_the_layout(tmp_path):
    """fit's checkpoints are generic pytrees: a residual flow's parameters (power mode, with
    the state u in each layer dict) come back from the checkpoint in the same layout, leaf for
    leaf, and an earlier-layout tree is refused as another structure."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(64, D))
    flow = fm.Flow(fm.Chain([fm.IResBlock(hidden=(H,), logdet="exact", spectral="power")]))
    p0 = flow.init(rng, x)
    loss = lambda p, b, r: -flow.log_prob(p, b)  # noqa: E731
    ck = tmp_path / "res.npz"
    params, _ = fm.train.fit(
        loss, p0, x, rng=np.random.default_rng(0), steps=3, checkpoint=ck, progress=False
    )
    saved = fm.train.load_checkpoint(ck)["params"]
    assert [sorted(q) for q in saved[0]] == [["W", "b", "u"]] * 2
    for a, b in zip(fm._pytree.leaves(saved), fm._pytree.leaves(params), strict=True):
        np.testing.assert_array_equal(a, b)
    old = [{"W": [q["W"].T for q in p0[0]], "b": [q["b"] for q in p0[0]]}]
    with pytest.raises(ValueError, match="another structure"):
        fm.train.fit(
            loss, old, x, rng=np.random.default_rng(0), steps=3, checkpoint=ck, progress=False
        )
