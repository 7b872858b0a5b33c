"""Model recipes: the flows of the papers, with their architecture choices scaled to a CPU.

Each recipe takes the event shape — an int ``d`` for vectors, ``(c, h, w)`` for images where
the paper uses images — and keyword hyperparameters, and returns a :class:`flowmath.Flow`
(layer and base density). The experiments build their models here; the same models can be
built by hand from the layers, as each recipe's body shows.

========================  =====================================================  ==============
recipe                    architecture (paper's choice -> here)                  event shapes
========================  =====================================================  ==============
:func:`nice`              additive couplings, alternating halves, diagonal       vectors
                          scaling, logistic base
:func:`realnvp`           affine couplings (tanh-bounded scales), alternating    vectors, images
                          masks, ActNorm for batch norm; images: checkerboard,
                          squeeze, channel couplings
:func:`glow`              ActNorm -> invertible linear (LU) -> affine coupling   vectors, images
                          per step; images: multi-scale with factor-out
:func:`made`              one MADE with Gaussian conditionals (= one MAF layer)  vectors
:func:`maf`               MAF layers with reversed orderings between them        vectors
:func:`ffjord`            one CNF, concat-squash MLP field, Hutchinson trace     vectors
:func:`iresnet`           i-ResNet blocks (spectral norm, power series) with     vectors
                          ActNorm
:func:`residual_flow`     Residual Flow blocks (LipSwish, Russian roulette,      vectors
                          Neumann gradient) with ActNorm
========================  =====================================================  ==============

Image data for the vector-only recipes is flattened, as the NICE, MADE and MAF papers did.

:func:`exact` returns the same flow with every stochastic log-det made exact (the CNF's exact
trace, the residual blocks' dense log-det): the evaluation twin of a model trained with an
unbiased estimator. Its parameters are those of the original.

References
----------
Dinh, Krueger & Bengio, "NICE", 2014, arXiv:1410.8516.
Dinh, Sohl-Dickstein & Bengio, "Density estimation using Real NVP", 2016, arXiv:1605.08803.
Kingma & Dhariwal, "Glow", 2018, arXiv:1807.03039.
Germain, Gregor, Murray & Larochelle, "MADE", 2015, arXiv:1502.03509.
Papamakarios, Pavlakou & Murray, "Masked autoregressive flow", 2017, arXiv:1705.07057.
Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud, "FFJORD", 2019, arXiv:1810.01367.
Behrmann, Grathwohl, Chen, Duvenaud & Jacobsen, "Invertible residual networks", 2019,
arXiv:1811.00995.
Chen, Behrmann, Duvenaud & Jacobsen, "Residual flows", 2019, arXiv:1906.02735.

Examples
--------
>>> import numpy as np, flowmath as fm
>>> rng = np.random.default_rng(0)
>>> x = fm.data.toy("8gaussians", 256, rng)
>>> flow = fm.models.maf(2, n_layers=2, hidden=(16,))
>>> params = flow.init(rng, x)
>>> flow.log_prob(params, x).shape
(256,)
"""

from __future__ import annotations

import copy
import numbers

from ._checks import check_int
from .distributions import Flow, StandardLogistic
from .layers.autoregressive import MAF
from .layers.base import Chain
from .layers.continuous import CNF
from .layers.coupling import AdditiveCoupling, AffineCoupling
from .layers.glow import ActNorm, Glow, Squeeze
from .layers.linear import DiagonalLinear, LULinear
from .layers.residual import IResBlock

__all__ = [
    "exact",
    "ffjord",
    "glow",
    "iresnet",
    "made",
    "maf",
    "nice",
    "realnvp",
    "residual_flow",
]


def _event(shape, name, *, images: bool):
    """``("vector", d)`` or ``("image", (c, h, w))``, validated."""
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        return "vector", check_int(shape, "event_shape", minimum=1)
    if isinstance(shape, tuple) and len(shape) == 1:
        return "vector", check_int(shape[0], "event_shape[0]", minimum=1)
    if isinstance(shape, tuple) and len(shape) == 3:
        for i, s in enumerate(shape):
            check_int(s, f"event_shape[{i}]", minimum=1)
        if not images:
            raise ValueError(
                f"`event_shape` of {name} must be an int d (vectors; flatten images as the paper "
                f"did); got {shape!r}"
            )
        return "image", tuple(int(s) for s in shape)
    raise TypeError(
        f"`event_shape` must be an int d or a tuple (c, h, w); got {type(shape).__name__} {shape!r}"
    )


def nice(event_shape, *, n_couplings: int = 4, hidden=(64, 64)) -> Flow:
    """NICE (Dinh et al. 2014, arXiv:1410.8516): ``n_couplings`` additive couplings on
    alternating halves, a diagonal scaling (the only volume change), a logistic base.

    The paper: 4 couplings, 5 hidden layers of 1000 units on MNIST; here 2 of 64 by default.
    """
    _event(event_shape, "nice", images=False)
    n_couplings = check_int(n_couplings, "n_couplings", minimum=1)
    layers = [AdditiveCoupling("half", hidden, flip=bool(k % 2)) for k in range(n_couplings)]
    layers.append(DiagonalLinear())
    return Flow(Chain(layers), base=StandardLogistic())


def realnvp(event_shape, *, n_couplings: int = 8, hidden=(64, 64)) -> Flow:
    """Real NVP (Dinh et al. 2016, arXiv:1605.08803).

    Vectors: ``n_couplings`` affine couplings with alternating halves, each preceded by ActNorm
    (the paper's batch normalisation, as a data-initialised affine layer so that the density is
    a function of one example). Images: 3 checkerboard couplings, a squeeze, 3 channel-wise
    couplings (one scale of the paper's multi-scale architecture; ``n_couplings`` is ignored),
    each preceded by ActNorm. The log-scales are ``a * tanh(r)``, the paper's bounded scale.
    """
    kind, shape = _event(event_shape, "realnvp", images=True)
    n_couplings = check_int(n_couplings, "n_couplings", minimum=1)
    layers = []
    if kind == "vector":
        for k in range(n_couplings):
            layers += [ActNorm(), AffineCoupling("half", hidden, flip=bool(k % 2))]
    else:
        for k in range(3):
            layers += [ActNorm(), AffineCoupling("checkerboard", hidden, flip=bool(k % 2))]
        layers.append(Squeeze())
        for k in range(3):
            layers += [ActNorm(), AffineCoupling("channel", hidden, flip=bool(k % 2))]
    return Flow(Chain(layers))


def glow(
    event_shape, *, levels: int = 2, steps: int = 4, hidden=(64, 64), split_prior=False
) -> Flow:
    """Glow (Kingma & Dhariwal 2018, arXiv:1807.03039).

    Images: :class:`flowmath.Glow` — ``levels`` scales of ``steps`` steps (ActNorm, LU 1x1
    convolution, affine coupling with a conv conditioner), factor-out between scales (the
    paper: 3 levels of 32 steps, 512 channels). Vectors: ``levels * steps`` steps of ActNorm,
    :class:`flowmath.LULinear` and an affine coupling on alternating halves (the permutation
    the 1x1 convolution learns is the LU linear map's).
    """
    kind, shape = _event(event_shape, "glow", images=True)
    levels = check_int(levels, "levels", minimum=1)
    steps = check_int(steps, "steps", minimum=1)
    if kind == "image":
        return Flow(Glow(levels, steps, hidden, split_prior=split_prior))
    layers = []
    for k in range(levels * steps):
        layers += [ActNorm(), LULinear(), AffineCoupling("half", hidden, flip=bool(k % 2))]
    return Flow(Chain(layers))


def made(event_shape, *, hidden=(64, 64), order="natural") -> Flow:
    """MADE with Gaussian conditionals (Germain et al. 2015, arXiv:1502.03509): one masked
    network gives :math:`\\mu_i, \\log\\sigma_i` of :math:`p(x_i \\mid x_{<i})`, i.e. one
    :class:`flowmath.MAF` layer over a standard normal."""
    _event(event_shape, "made", images=False)
    return Flow(MAF(hidden, order))


def maf(event_shape, *, n_layers: int = 5, hidden=(64, 64), order="reversed") -> Flow:
    """MAF (Papamakarios et al. 2017, arXiv:1705.07057): ``n_layers`` MAF layers, the ordering
    reversed between consecutive layers (``order="reversed"``) or drawn per layer
    (``order="random"``, seeds 0, 1, ...), each followed by ActNorm in place of the paper's
    batch normalisation."""
    _event(event_shape, "maf", images=False)
    n_layers = check_int(n_layers, "n_layers", minimum=1)
    if order not in ("reversed", "random"):
        raise ValueError(f"`order` must be 'reversed' or 'random'; got {order!r}")
    layers = []
    for k in range(n_layers):
        if order == "reversed":
            layers.append(MAF(hidden, "reversed" if k % 2 else "natural"))
        else:
            layers.append(MAF(hidden, "random", seed=k))
        if k < n_layers - 1:
            layers.append(ActNorm())
    return Flow(Chain(layers))


def ffjord(
    event_shape,
    *,
    hidden=(64, 64, 64),
    t1: float = 0.5,
    trace: str = "hutchinson",
    probe: str = "gaussian",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    adjoint: str = "backsolve",
) -> Flow:
    """FFJORD (Grathwohl et al. 2019, arXiv:1810.01367) on the 2-D toys: one CNF with a
    concat-squash MLP field 64-64-64 (tanh), ``T = 0.5``, dopri5 at ``rtol = atol = 1e-5``,
    Hutchinson's trace with one Gaussian probe per solve (the paper's toy settings). Evaluate
    with :func:`exact` (the exact trace)."""
    _event(event_shape, "ffjord", images=False)
    return Flow(
        CNF(
            hidden,
            t1,
            trace,
            probe,
            time="concat-squash",
            rtol=rtol,
            atol=atol,
            adjoint=adjoint,
        )
    )


def iresnet(
    event_shape,
    *,
    n_blocks: int = 4,
    hidden=(64, 64),
    coeff: float = 0.9,
    n_terms: int = 10,
) -> Flow:
    """i-ResNet (Behrmann et al. 2019, arXiv:1811.00995): ``n_blocks`` residual blocks with
    spectrally normalised ELU MLPs (``coeff = 0.9``), log-det by ``n_terms`` power-series terms
    with one Gaussian probe, ActNorm before every block (as the paper's density models)."""
    _event(event_shape, "iresnet", images=False)
    n_blocks = check_int(n_blocks, "n_blocks", minimum=1)
    layers = []
    for _ in range(n_blocks):
        layers += [ActNorm(), IResBlock(hidden, coeff, "series", n_terms)]
    return Flow(Chain(layers))


def residual_flow(
    event_shape,
    *,
    n_blocks: int = 4,
    hidden=(64, 64),
    coeff: float = 0.98,
    n_exact: int = 2,
    roulette_p: float = 0.5,
) -> Flow:
    """Residual Flow (Chen et al. 2019, arXiv:1906.02735): residual blocks with LipSwish
    activations and the paper's spectral coefficient 0.98, the unbiased Russian-roulette log-det
    (geometric ``p``, ``n_exact`` terms always) whose gradient is the Neumann-series estimator,
    ActNorm before every block.

    LipSwish has slope 0.45 at 0 (ELU: 1), so a block starts weaker than an i-ResNet block and
    learns more slowly on a short budget (measured on 8gaussians, two blocks 32-32, 200 Adam
    steps: NLL 4.12 with coefficient 0.9, 3.90 with 0.98, 3.52 for ELU at 0.9)."""
    _event(event_shape, "residual_flow", images=False)
    n_blocks = check_int(n_blocks, "n_blocks", minimum=1)
    layers = []
    for _ in range(n_blocks):
        layers += [
            ActNorm(),
            IResBlock(
                hidden,
                coeff,
                "roulette",
                activation="lipswish",
                roulette_p=roulette_p,
                n_exact=n_exact,
                neumann_gradient=True,
            ),
        ]
    return Flow(Chain(layers))


def exact(flow: Flow) -> Flow:
    """The same flow with exact log-dets: CNFs with the exact trace, residual blocks with the
    dense log-det. Parameters are shared (pass the original's); ``init`` state is copied."""
    if not isinstance(flow, Flow):
        raise TypeError(f"`flow` must be a Flow; got {type(flow).__name__}")
    twin = Flow(_exact_layer(flow.layer), base=flow.base)
    twin.event_shape, twin.latent_shape = flow.event_shape, flow.latent_shape
    return twin


def _exact_layer(layer):
    if isinstance(layer, Chain) and type(layer) is Chain:
        return Chain([_exact_layer(sub) for sub in layer.layers])
    if isinstance(layer, CNF) and layer.trace != "exact":
        twin = copy.copy(layer)
        twin.trace = "exact"
        return twin
    if isinstance(layer, IResBlock) and layer.logdet != "exact":
        twin = copy.copy(layer)
        twin.logdet = "exact"
        return twin
    return layer
